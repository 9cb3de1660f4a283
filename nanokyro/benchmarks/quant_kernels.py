"""Sweep of the quantised linear kernels against bf16: llama-3.1-8b's qkv, o, gate/up and down projections of one
layer, random weights, each shape's 20 calls replayed from a CUDA graph, for each row count. Every kernel and
every FP8 GEMV setting tried is timed in one process; a variant that fails prints its error and the sweep goes
on. The switch points (quant_triton.GEMV_CONFIG, GEMV_MAX_ROWS, quant_cuda's settings) are read from its output
(docs/PERFORMANCE.md). `python -m nanokyro.benchmarks.quant_kernels [--rows 1,2,...]`.

Triton compiles every setting on first use; a pool of processes compiles them first (into Triton's disk cache),
so the timing process only loads them.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import traceback

import torch
import torch.nn.functional as F

from nanokyro import quant, small_batch  # noqa: F401 - small_batch registers nanokyro::gemv
from nanokyro.quant_cuda import MAX_ROWS as MMA_MAX_ROWS, WG_HEIGHTS, w4_dequantise, w4_gemm, w4_gemv, w4_gemvb, w4_wgmma
from nanokyro.quant_formats import FP8, FP8_MAX, mma_pack, mma_scales_zeros, pack_rows
from nanokyro.quant_triton import GemvConfig, dequantise_int4_cuda, qgemv

# (name, N, K, gated): gate/up's weight stacks 2N rows (gate and up, 14336 each) for an output of N
SHAPES = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 14336, 4096, True),
          ("down", 4096, 14336, False)]  # fmt: skip
ROWS = [1, 2, 4, 8, 16, 32, 64, 256]
GROUP = 128
DEVICE = "cuda"


def fp8_configs(rows: int) -> list[GemvConfig]:
    """Settings of quant_triton.qgemv to try for FP8 per-channel weights at `rows` rows."""
    C, out = GemvConfig, []
    tiles = [C(16, bn, bk, w, True, st) for bn, bk, w, st in [(32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3),
                                                              (64, 256, 4, 4), (128, 128, 8, 3), (32, 512, 4, 2),
                                                              (16, 256, 4, 3), (64, 128, 4, 5)]]  # fmt: skip
    if rows == 1:
        for bn in (2, 4, 8, 16):
            for bk in (1024, 2048, 4096, 8192):
                if 4096 <= bn * bk <= 65536:
                    out += [C(1, bn, bk, w, False) for w in (4, 8)]
        out += [C(1, bn, bk, w, False, prefetch=True) for bn, bk, w in [
            (2, 2048, 4), (2, 4096, 4), (4, 1024, 4), (4, 2048, 4), (4, 2048, 8), (4, 4096, 8), (8, 512, 4),
            (8, 1024, 4), (8, 2048, 8), (16, 512, 4)]]  # fmt: skip
        out += [C(1, bn, bk, w, False, prefetch=True, reduce_once=True) for bn, bk, w in [
            (2, 1024, 4), (2, 2048, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (4, 2048, 8), (8, 512, 4),
            (8, 1024, 8), (16, 256, 4), (16, 512, 8)]]  # fmt: skip
        out += [C(1, bn, bk, w, False, vec=vec, x_2d=x_2d) for bn, bk, w, vec, x_2d in [
            (4, 1024, 4, 8, True), (4, 512, 4, 8, True), (8, 512, 4, 8, True), (8, 1024, 8, 8, True),
            (2, 2048, 4, 8, True), (2, 1024, 4, 8, True), (4, 1024, 8, 8, True), (8, 256, 4, 8, True),
            (16, 256, 4, 8, True), (4, 2048, 8, 8, True), (4, 1024, 4, 16, True), (1, 4096, 4, 8, True),
            (4, 1024, 4, 8, False), (8, 512, 4, 8, False), (2, 2048, 4, 8, False), (1, 2048, 4, 8, False)]]  # fmt: skip
        # the weight as 32-bit words, fp8 to fp32 by inline PTX (session 12: 63.2-82.1 us a layer; the first is
        # FP8_WORDS_CONFIG, the dispatch's)
        out += [C(1, bn, bk, w, False, vec=8, words=True) for bn, bk, w in [
            (4, 2048, 4), (8, 2048, 4), (16, 1024, 4), (8, 2048, 8), (16, 2048, 8), (8, 4096, 8)]]  # fmt: skip
        out += [C(1, 4, 2048, 4, False, split_k=2), C(1, 4, 2048, 4, False, split_k=4),
                C(1, 8, 1024, 4, False, split_k=2), C(1, 8, 1024, 4, False, split_k=4),
                C(1, 4, 2048, 4, False, split_k=2, prefetch=True), C(1, 4, 1024, 4, False, split_k=2, prefetch=True)]
        out += [tiles[1], tiles[2], tiles[2]._replace(split_k=2)]
    if rows in (2, 4):
        out += [C(rows, bn, bk, w, False) for bn in (4, 8) for bk in (1024, 2048) for w in (4, 8)]
        out += [C(rows, 4, 2048, 4, False, split_k=2)]
    if 2 <= rows <= 16:
        out += tiles + [tiles[2]._replace(split_k=2)]
    if rows <= 16:  # the tiles' dot in f16 (fp8 to f16 in one instruction per two values); more programs at one row
        out += [t._replace(f16=True) for t in tiles]
        out += [tiles[i]._replace(f16=True, split_k=k) for i in (0, 1, 2) for k in (2, 4)]
    if 32 <= rows <= 64:
        out += [C(bm, bn, 128, w, True, st) for bm, bn, w, st in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3),
                                                                 (32, 128, 4, 4)]]  # fmt: skip
    if rows >= 128:
        out += [C(128, 128, 128, 8, True, 3), C(128, 256, 64, 8, True, 3)]
    return out


def label(c: GemvConfig) -> str:
    return (f"fp8 {'tile' if c.dot else 'gemv'} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
            + (f" k{c.split_k}" if c.split_k > 1 else "") + (" pf" if c.prefetch else "")
            + (" r1" if c.reduce_once else "") + (" f16" if c.f16 else "")
            + (f" row v{c.vec}" + (" x2d" if c.x_2d else "") + (" words" if c.words else "") if c.vec else ""))


@functools.cache
def weights() -> list[dict]:
    """Per shape: the bf16 weight and its FP8 (per-channel), int4 (the rows layout, the MMA layout, and torch's
    tinygemm layout on CUDA: a peer) forms."""
    gen = torch.Generator(DEVICE).manual_seed(0)
    out = []
    for name, n, k, gated in SHAPES:
        rows_n = n * 2 if gated else n
        w = torch.randn(rows_n, k, device=DEVICE, dtype=torch.bfloat16, generator=gen) / k**0.5
        scale = (w.float().abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        q = torch.randint(0, 16, (rows_n, k), device=DEVICE, dtype=torch.int32, generator=gen)
        s = (torch.rand(rows_n, k // GROUP, device=DEVICE, generator=gen) / 100).bfloat16()
        z = torch.full((rows_n, k // GROUP), 8.0, device=DEVICE).bfloat16()
        out.append(dict(name=name, n=n, k=k, gated=gated, w=w, wq=(w.float() / scale).to(FP8), scale=scale,
                        qw=pack_rows(q), s=s, z=z, mma=mma_pack(q), mma_sz=mma_scales_zeros(s, z),
                        tinygemm=tinygemm_weight(q, s, z)))  # fmt: skip
        del q
    return out


def tinygemm_weight(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple | None:
    """torch's own int4 kernel's operands (`_weight_int4pack_mm`, CUDA only): the weight in its tile layout (from
    uint8 [N, K/2], feature 2j in byte j's high nibble) and bf16 [K/g, N, 2] scales and zeros for its
    (q - 8) * scale + zero."""
    if not q.is_cuda:
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
    sz = torch.stack([s.float(), (8 - z.float()) * s.float()], -1).transpose(0, 1).contiguous().bfloat16()
    return packed, sz


def variants(rows: int) -> dict:
    """name -> (f(weights of a shape, x) -> y, weight bytes of that shape)."""
    g = quant._gate
    fp8_bytes = lambda d: d["wq"].numel() + d["scale"].numel() * 4  # noqa: E731
    int4_bytes = lambda d: d["qw"].numel() * 4 + d["s"].numel() * 4  # noqa: E731
    v = {"bf16 cuBLAS": (lambda d, x: g(F.linear(x, d["w"]), d["gated"]), lambda d: d["w"].numel() * 2)}
    if rows <= 2:
        v["bf16 gemv (small_batch)"] = (lambda d, x: torch.ops.nanokyro.gemv(x, d["w"], None, d["gated"]),
                                        v["bf16 cuBLAS"][1])  # fmt: skip
    v["fp8 dispatch"] = (lambda d, x: torch.ops.nanokyro.fp8_linear(x, d["wq"], d["scale"], None, d["gated"], True),
                         fp8_bytes)  # fmt: skip
    for scaling in ("rowwise", "tensorwise"):  # the scales applied by torch._scaled_mm, or after it
        v[f"fp8 _scaled_mm {scaling}"] = (
            lambda d, x, s=scaling: g(quant._scaled_mm_fp8(x, d["wq"], d["scale"], s), d["gated"]), fp8_bytes)
    for c in fp8_configs(rows):
        v[label(c)] = (lambda d, x, c=c: qgemv(x, d["wq"], d["scale"], None, None, d["gated"], c), fp8_bytes)
    if torch.cuda.is_available():
        v["int4 torch tinygemm"] = (
            lambda d, x: g(torch._weight_int4pack_mm(x, d["tinygemm"][0], GROUP, d["tinygemm"][1]), d["gated"]),
            int4_bytes)  # fmt: skip
    v["int4 triton"] = (lambda d, x: qgemv(x, d["qw"], d["s"], d["z"], None, d["gated"]), int4_bytes)
    v["int4 mma dispatch"] = (lambda d, x: torch.ops.nanokyro.int4_mma_linear(x, d["mma"], d["mma_sz"], GROUP, None,
                                                                              d["gated"]), int4_bytes)  # fmt: skip
    if rows <= MMA_MAX_ROWS:
        for warps in (4, 8, 16):
            v[f"int4 mma gemv w{warps}"] = (
                lambda d, x, w=warps: w4_gemv(x, d["mma"], d["mma_sz"], GROUP, None, d["gated"], w), int4_bytes)
        for warps in (None, 2, 4, 8, 16):  # the GEMV with bulk copies (None: the dispatch's warps)
            v[f"int4 mma gemvb w{warps}"] = (
                lambda d, x, w=warps: w4_gemvb(x, d["mma"], d["mma_sz"], GROUP, None, d["gated"], w), int4_bytes)
    if rows > MMA_MAX_ROWS:
        v["int4 mma gemm"] = (lambda d, x: g(w4_gemm(x, d["mma"], d["mma_sz"], GROUP, None), d["gated"]), int4_bytes)
        for splits in (1, 2, 4, 8):  # K split a fixed number of ways (the dispatch's from quant_cuda.GEMM_CTAS)
            v[f"int4 mma gemm k{splits}"] = (
                lambda d, x, s=splits: g(w4_gemm(x, d["mma"], d["mma_sz"], GROUP, None, s), d["gated"]), int4_bytes)
        for bn in WG_HEIGHTS:  # the warpgroup-MMA GEMM (sm_90) at each CTA height
            v[f"int4 wgmma bn{bn}"] = (
                lambda d, x, b=bn: g(w4_wgmma(x, d["mma"], d["mma_sz"], GROUP, None, None, b), d["gated"]), int4_bytes)
        v["int4 mma dequant + cuBLAS"] = (
            lambda d, x: g(F.linear(x, w4_dequantise(d["mma"], d["mma_sz"], GROUP, x.dtype)), d["gated"]), int4_bytes)
    if rows >= 8:
        v["int4 dequant + cuBLAS"] = (lambda d, x: g(F.linear(x, dequantise_int4_cuda(d["qw"], d["s"], d["z"],
                                                                                      x.dtype)), d["gated"]),
                                      int4_bytes)  # fmt: skip
    return v


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `reps` calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * reps)


def inputs(rows: int) -> list[torch.Tensor]:
    gen = torch.Generator(DEVICE).manual_seed(rows)
    return [torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _, _, k, _ in SHAPES]


def _warm(job: tuple[int, list[str]]) -> list[str]:
    """In a pool process: run each named variant once per shape (compiling its kernels into the disk cache)."""
    rows, names = job
    table, xs, errors = variants(rows), inputs(rows), []
    for name in names:
        try:
            for d, x in zip(weights(), xs):
                table[name][0](d, x)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - the timing pass reports it
            errors.append(f"{rows} {name}: {type(e).__name__}")
    return errors


def matches(name: str, match: str) -> bool:
    return not match or any(m in name for m in match.split(","))


def warm_up(rows_list: list[int], workers: int, match: str) -> None:
    jobs = [(rows, names[i::workers]) for rows in rows_list
            for names in [[n for n in variants(rows) if matches(n, match)]] for i in range(workers)]  # fmt: skip
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for errors in pool.imap_unordered(_warm, jobs):
            for e in errors:
                print("warm-up failed:", e, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--workers", type=int, default=12, help="processes compiling the Triton settings (0: none)")
    ap.add_argument("--warm-only", action="store_true", help="only compile (e.g. while something else runs)")
    ap.add_argument("--match", default="",
                    help="comma-separated parts of the variants' names to compile and time (all: '')")
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.workers:
        try:
            warm_up(rows_list, args.workers, args.match)
        except Exception:  # noqa: BLE001 - the timing pass compiles what is missing
            traceback.print_exc()
    if args.warm_only:
        print("compiled", flush=True)
        return
    summary = []
    for rows in rows_list:
        xs, results = inputs(rows), []
        head = f"{'variant':<40} {'layer us':>9} {'TB/s':>6} " + " ".join(f"{s[0]:>8}" for s in SHAPES)
        print(f"\n## rows {rows}\n{head}")
        for name, (fn, nbytes) in variants(rows).items():
            if not matches(name, args.match):
                continue
            try:
                times = [graph_time(lambda d=d, x=x: fn(d, x)) for d, x in zip(weights(), xs)]
            except Exception:  # noqa: BLE001 - one failing variant must not end the sweep
                print(f"{name:<40} FAILED: {traceback.format_exc(limit=1).splitlines()[-1][:150]}", flush=True)
                continue
            total, tb = sum(times), sum(nbytes(d) for d in weights()) / sum(times) / 1e12
            results.append((total, name, times))
            print(f"{name:<40} {total * 1e6:9.1f} {tb:6.2f} " + " ".join(f"{t * 1e6:8.1f}" for t in times), flush=True)
        summary.append((rows, results))
    print("\n## best per family (layer us; per shape the best of the family)")
    for rows, results in summary:
        line = [f"rows {rows:>4}:"]
        for family in ("bf16", "fp8", "int4"):
            fam = [r for r in results if r[1].startswith(family)]
            if not fam:
                continue
            best = min(fam)
            per_shape = sum(min(r[2][i] for r in fam) for i in range(len(SHAPES)))
            line.append(f"{family} {best[0] * 1e6:.1f} ({best[1]}; per-shape best {per_shape * 1e6:.1f})")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
