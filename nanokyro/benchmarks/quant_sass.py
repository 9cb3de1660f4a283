"""Instructions per weight of the FP8 per-channel kernels up to 16 rows, with no GPU: each setting compiled for
sm_90 on the CPU as Triton's JIT specialises llama-3.1-8b's shapes (pointers and multiples of 16 aligned, ones
constant), and the SASS of its loops counted. Lane-instructions per weight = a loop body's warp instructions x 32
x warps / the weights one iteration reads; an H200 issues ~33.5 T lane-instructions a second (132 SMs x 128
lanes x 1.98 GHz), ~8.6 per weight at 3.9 TB/s of fp8, conversions (F2F*) at a quarter of that rate. Tensor-core
instructions (HMMA, QGMMA) count as one each. `python -m nanokyro.benchmarks.quant_sass` (needs Triton's
bundled ptxas and nvdisasm; compiles ~20 kernels, a minute on one core).
"""
from __future__ import annotations

import collections
import re

from nanokyro import quant_triton as qt
from nanokyro.quant_triton import GemvConfig

# (kind, N, K, gated): llama-3.1-8b's projections, one kind per FP8_CHANNEL_CONFIG entry
KINDS = [("qkv, o", 6144, 4096, False), ("gate/up", 14336, 4096, True), ("down", 4096, 14336, False)]
SCALARS = ("M", "N", "K", "k_split", "x_stride", "w_stride", "s_stride", "y_stride")


def compile_sm90(kernel, ints: dict, consts: dict, num_warps: int, num_stages: int):
    """`kernel` compiled for sm_90 with the JIT's specialisation of these integer arguments (pointers: bf16 x and
    y, fp8 w, fp32 the rest)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*fp8e4nv"}
    signature, constexprs, attrs = {}, dict(consts), {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts or ints.get(name) == 1:
            signature[name], constexprs[name] = "constexpr", consts.get(name, 1)
            continue
        signature[name] = ptr.get(name, "*fp32") if name.endswith("_ptr") else "i32"
        if name.endswith("_ptr") or ints[name] % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))  # fmt: skip


def loop_bodies(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop (a label and a later branch back to it), in order."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\s*\w+:\s*", line)}
    out = []
    for i, line in enumerate(lines):
        back = re.search(r"BRA (\w+)", line)
        if back and labels.get(back[1], i) < i:
            body = [x.split("\t")[-1].strip() for x in lines[labels[back[1]] + 1 : i + 1] if "\t" in x]
            out.append(collections.Counter(re.sub(r"^@!?U?P\w+ ", "", b).split()[0] for b in body if b))
    return out


def kernel_for(c: GemvConfig, M: int, N: int, K: int, gated: bool):
    """(compiled kernel, weights one iteration of its main loop reads) for the kernel qgemv runs with setting c."""
    ints = dict(M=M, N=N, K=K, k_split=K, x_stride=K, w_stride=K, s_stride=1, y_stride=N)
    if c.f16_run or c.vec:
        bn = max(c.block_n // 2, 1) if gated else c.block_n
        consts = dict(has_bias=False, gated=gated, x_2d=c.x_2d, vec=c.vec, f16_run=c.f16_run, block_n=bn,
                      block_k=c.block_k)  # fmt: skip
        return compile_sm90(qt.fp8_row_kernel, ints, consts, c.num_warps, 1), bn * c.block_k * max(c.f16_run, 1)
    if c.a8:
        consts = dict(has_bias=False, gated=gated, block_m=c.block_m, block_n=c.block_n, block_k=c.block_k)
        k = compile_sm90(qt.fp8_a8_kernel, ints, consts, c.num_warps, c.num_stages)
        return k, (2 if gated else 1) * c.block_n * c.block_k
    bn = c.block_n // 2 if gated and not c.dot else c.block_n
    consts = dict(int4=False, per_row=True, group=c.block_k, has_bias=False, gated=gated, use_dot=c.dot,
                  prefetch=c.prefetch, reduce_once=c.reduce_once, f16=c.f16, block_m=c.block_m, block_n=bn,
                  block_k=c.block_k)  # fmt: skip
    k = compile_sm90(qt.qgemv_kernel, ints, consts, c.num_warps, c.num_stages)
    return k, (2 if gated else 1) * bn * c.block_k


def count(name: str, c: GemvConfig, M: int, N: int, K: int, gated: bool) -> None:
    kernel, weights = kernel_for(c, M, N, K, gated)
    body = max(loop_bodies(kernel.asm["sass"]), key=lambda b: sum(b.values()))  # the K loop (gated: gate's)
    per_weight = lambda n: n * 32 * c.num_warps / weights  # noqa: E731
    conv = sum(n for op, n in body.items() if op.startswith("F2F"))
    mma = {op.split(".")[0] + "." + op.split(".")[1]: n for op, n in body.items() if "MMA" in op}
    print(f"{name:<34} {per_weight(sum(body.values())):6.2f} {per_weight(conv):6.2f}  {mma or ''}", flush=True)


def main() -> None:
    print(f"{'kernel (llama-3.1-8b shape)':<34} {'instr':>6} {'conv':>6}  (lane-instructions per weight, main loop)")
    for kind, n, k, gated in KINDS:
        key = "gated" if gated else "long" if k > 8192 else None
        print(f"## {kind} {n}x{k}")
        count("dispatch, 1 row (GEMV, fp32)", qt.FP8_CHANNEL_CONFIG[1][key], 1, n, k, gated)
        count("dispatch, 16 rows (f16 tile)", qt.FP8_CHANNEL_CONFIG[16].get(key, qt.F16_TILE), 16, n, k, gated)
        count("f16 GEMV, 1 row", qt.FP8_F16_ROW_CONFIG[1][key], 1, n, k, gated)
        for run in (2, 8):
            count(f"f16 GEMV, 1 row, run {run}", qt.FP8_F16_ROW_CONFIG[1][key]._replace(f16_run=run), 1, n, k, gated)
        a8 = qt.FP8_A8_CONFIG[16].get(key, qt.FP8_A8_CONFIG[16][None])
        count(f"W8A8 {a8.block_n}x{a8.block_k} w{a8.num_warps}", a8, 16, n, k, gated)
        for bn, bk, w in [(128, 128, 4), (128, 256, 8)]:
            count(f"W8A8 {bn}x{bk} w{w}", a8._replace(block_n=bn, block_k=bk, num_warps=w), 16, n, k, gated)


if __name__ == "__main__":
    main()
