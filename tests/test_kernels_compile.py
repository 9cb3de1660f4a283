"""Every Triton kernel that the CUDA paths launch, compiled for Hopper (sm_90) on the CPU, at the settings the
dispatch tables choose (and, at the end, quant_cuda.py's CUDA C++ through NVRTC). The CPU tests run the kernels
in Triton's interpreter, which accepts code that the compiler refuses: a float constexpr as an `if` condition
once broke every CUDA engine while the suite passed. Here the wrappers run as on a GPU, with CPU tensors and a
stand-in for Triton's driver that names an sm_90 target, and every launch only compiles (its outputs are left
unwritten). The machine code comes from this machine's Triton; the GPU image's may be older."""
import ctypes
import glob
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPILE_ALL = r"""
import re

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit


class Hopper:
    # What JITFunction.run asks of Triton's driver before it compiles.
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(Hopper())
launch = jit.JITFunction.run
compiled = []


def before_wait(ptx):
    # The instructions (opcodes with their qualifiers, without predicates) before the PTX's one PDL wait
    assert ptx.count("griddepcontrol.wait") == 1
    head = ptx[: ptx.index("griddepcontrol.wait")]
    return re.findall(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)", head, re.MULTILINE)


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
    name, ptx, pdl = self.__name__, kernel.asm["ptx"], kwargs.get("launch_pdl", False)
    assert kwargs.get("launch_pdl", True), name  # passed only as True: Triton without PDL refuses the keyword
    # A kernel launched with PDL waits for the kernel before it and lets the next one start, but for the RoPE + KV
    # write, followed by FlashInfer's attention; no other kernel does either (small_batch.py's rules)
    assert ("griddepcontrol.wait" in ptx) == pdl, name
    assert ("griddepcontrol.launch_dependents" in ptx) == (pdl and name != "rope_kv_kernel"), name
    if pdl:  # before the wait: no store, atomic, async copy, branch or return, and loads of constants only
        ops = before_wait(ptx)
        assert not [op for op in ops if op.startswith(("st.", "atom.", "red.", "cp.async", "bra", "ret"))], (name, ops)
        loads = [op for op in ops if op.startswith(("ld.", "ldu.")) and not op.startswith("ld.param")]
        if name in ("rms_norm_kernel", "all_reduce_rms_norm_kernel"):  # the norm's weight (two loads a thread in fp32)
            assert 1 <= len(loads) <= 2 and all("volatile" not in op for op in loads), loads
        elif name == "fp8_row_kernel" or (name == "qgemv_kernel" and kwargs["prefetch"]):  # the first weight tile
            assert loads and all("evict_first" in op for op in loads), (name, loads)
        else:
            assert not loads, (name, loads)
    compiled.append((name, ptx, pdl))
    return kernel


jit.JITFunction.run = compile_only

from nanokyro import lora_kernels, small_batch
from nanokyro.attention import triton_rope_write_kv, triton_write_kv
from nanokyro.quant_formats import FP8, pack_rows
from nanokyro.quant_triton import (FP8_WORDS_CONFIG, dequantise_int4_cuda, qgemv, quantise_rows_fp8_cuda,
                                   scale_outer_cuda)

bf16, K = torch.bfloat16, 4096
x = lambda m, k=K: torch.randn(m, k, dtype=bf16)

# the KV write, into a bf16 and an fp8 cache (llama-3.1-8b's 8 KV heads of 128)
k, v = torch.randn(3, 8, 128, dtype=bf16), torch.randn(3, 8, 128, dtype=bf16)
pages, offsets = torch.zeros(3, dtype=torch.int32), torch.arange(3, dtype=torch.int32)
for cache in (bf16, FP8):
    triton_write_kv()(torch.zeros(4, 2, 16, 8, 128, dtype=cache), k, v, pages, offsets)
    assert ("e4m3" in compiled[-1][1]) == (cache == FP8)
# RoPE and the KV write as one kernel, for the one- and two-row decode graphs: llama-3.1-8b's heads, and D 64
for q_heads, d in ((32, 128), (16, 64)):
    q, k_new, v_new = (torch.randn(2, h, d, dtype=bf16) for h in (q_heads, 8, 8))
    for cache in (bf16, FP8):
        kv = torch.zeros(4, 2, 16, 8, d, dtype=cache)
        triton_rope_write_kv()(kv, q, k_new, v_new, pages[:2], offsets[:2], offsets[:2], torch.zeros(8, d))
        assert compiled[-1][0] == "rope_kv_kernel" and ("e4m3" in compiled[-1][1]) == (cache == FP8)
        assert compiled[-1][2]  # launched with PDL

# FP8 per-channel through the dispatch: one row (gate/up, down's long K, the rest), two, 3-16; a bf16 row reads
# the weight as words (inline PTX), an fp16 row takes the settings by kind of layer
for m in (1, 2, 16):
    for n, k_in, gated in ((256, K, False), (512, K, True), (256, 14336, False)):
        qgemv(x(m, k_in), torch.randn(n, k_in).to(FP8), torch.rand(n, 1), None, None, gated)
        name, ptx, pdl = compiled[-1]
        assert name == ("fp8_row_kernel" if m == 1 else "qgemv_kernel"), (m, n, k_in)
        assert ("cvt.rn.f16x2.e4m3x2 a, l" in ptx) == (m == 1)  # fp8_word_to_f32's inline PTX
        assert pdl == (m <= 2), (m, n, k_in)
        if m == 1:
            qgemv(x(1, k_in).half(), torch.randn(n, k_in).to(FP8), torch.rand(n, 1), None, None, gated)
            assert compiled[-1][0] == "qgemv_kernel" and compiled[-1][2]
# the one-row FP8 kernel reading fp8 tensors, not words (the benchmark's sweep), plain and gated
for gated, x_2d in ((False, False), (True, True)):
    config = FP8_WORDS_CONFIG._replace(words=False, x_2d=x_2d)
    qgemv(x(1), torch.randn(512, K).to(FP8), torch.rand(512, 1), None, None, gated, config)
    name, ptx, pdl = compiled[-1]
    assert name == "fp8_row_kernel" and "cvt.rn.f16x2.e4m3x2 a, l" not in ptx and pdl
# block-wise FP8 (128 x 128 scales), and int4 in the Triton layout (groups of 128), with a bias: PDL at one row
for m in (1, 16):
    qgemv(x(m), torch.randn(256, K).to(FP8), torch.rand(256, K // 128), None, torch.randn(256, dtype=bf16), False)
    assert compiled[-1][0] == "qgemv_kernel" and compiled[-1][2] == (m == 1), m
for m in (1, 4, 16, 64):
    q, scales, zeros = torch.randint(0, 16, (256, K)), torch.rand(256, K // 128, dtype=bf16), torch.rand(256, K // 128, dtype=bf16)
    qgemv(x(m), pack_rows(q), scales, zeros, None, m == 4)
    assert compiled[-1][0] == "qgemv_kernel" and compiled[-1][2] == (m == 1), m
quantise_rows_fp8_cuda(x(5))
scale_outer_cuda(torch.randn(5, 300), torch.rand(5, 1), torch.rand(300, 1), bf16)
dequantise_int4_cuda(pack_rows(q), scales, zeros, bf16)

# the one- and two-row decode graphs' GEMV (plain, gated, with a bias, with LoRA) and RMSNorm; the LoRA kernels
w, lora_a, lora_b = torch.randn(512, K, dtype=bf16), torch.randn(4, 16, K, dtype=bf16), torch.randn(4, 512, 16, dtype=bf16)
start = len(compiled)
for m in (1, 2):
    lora = torch.zeros(m, dtype=torch.int32)
    small_batch.gemv(x(m), w, torch.randn(512, dtype=bf16))
    small_batch.gemv(x(m), w, None, True, lora_kernels.lora_shrink(x(m), lora_a, lora), lora_b, lora)
    small_batch.rms_norm(x(m), x(m), torch.ones(K, dtype=bf16), 1e-5)
    small_batch.rms_norm(x(m), None, torch.ones(K, dtype=bf16), 1e-5)
    for parts, rank in ((bf16, 0), (torch.float32, 1)):  # two values a 32-bit word, or one
        small_batch.all_reduce_rms_norm(x(m).to(parts), x(m).to(parts), torch.ones(K, dtype=parts), 1e-5,
                                        torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), rank, 2)
        # the words tagged with the epoch go out as volatile 16-byte stores of two 8-byte words (each whole on
        # arrival), before the volatile loads that poll for the other rank's; no fence, flag or atomic
        ptx = compiled[-1][1]
        sends, polls = ptx.find("st.volatile.global.v2.b64"), ptx.find("ld.volatile.global.v2.b64")
        assert 0 <= sends < polls, ptx
        assert "fence" not in ptx and "atom." not in ptx
        assert "trap;" in ptx and "%globaltimer" in ptx  # a rank that never sends fails the kernel, in time
        # a row-parallel GEMV that sends its output itself (volatile 8-byte stores; o's shape at TP=2 and down's),
        # then the norm kernel that only receives
        for k_in in (K, 7168):
            small_batch.gemv(x(m, k_in).to(parts), torch.randn(K, k_in, dtype=parts), None, False, None, None, None,
                             torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), rank, 2)  # fmt: skip
            assert compiled[-1][0] == "gemv_kernel" and "st.volatile.global.b64" in compiled[-1][1]
        small_batch.all_reduce_rms_norm(x(m).to(parts), x(m).to(parts), torch.ones(K, dtype=parts), 1e-5,
                                        torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), rank, 2,
                                        sent=True)  # fmt: skip
        assert "st.volatile" not in compiled[-1][1] and "ld.volatile.global.v2.b64" in compiled[-1][1]
lora = torch.zeros(300, dtype=torch.int32)
lora_kernels.lora_expand(x(300, 512), lora_kernels.lora_shrink(x(300), lora_a, lora), lora_b, lora)
# launched with PDL: the GEMV and the norm, not LoRA's kernels
assert all(pdl == (name in ("gemv_kernel", "rms_norm_kernel", "all_reduce_rms_norm_kernel"))
           for name, _, pdl in compiled[start:])  # fmt: skip
small_batch.PDL = False  # the switch: the same kernels without PDL
qgemv(x(1), torch.randn(256, K).to(FP8), torch.rand(256, 1), None, None, False)
small_batch.gemv(x(1), w, None)
assert [name for name, _, pdl in compiled[-2:] if not pdl] == ["fp8_row_kernel", "gemv_kernel"]
assert {name for name, _, pdl in compiled if pdl} == {"rope_kv_kernel", "fp8_row_kernel", "qgemv_kernel", "gemv_kernel",
                                                      "rms_norm_kernel", "all_reduce_rms_norm_kernel"}  # fmt: skip
print(sorted({name for name, _, _ in compiled}), len(compiled))
"""


def test_every_cuda_kernel_compiles_for_hopper():
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", COMPILE_ALL], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    names = out.stdout.strip().rsplit("]", 1)[0]
    for kernel in ("kernel", "rope_kv_kernel", "qgemv_kernel", "_quantise_rows_kernel", "_scale_outer_kernel", "_dequant_int4_kernel",
                   "gemv_kernel", "rms_norm_kernel", "all_reduce_rms_norm_kernel", "shrink",
                   "expand"):  # fmt: skip
        assert f"'{kernel}'" in names, (kernel, out.stdout)


def nvrtc_library() -> str | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (the test extra), if installed."""
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for path in sorted(glob.glob(f"{root}/*/lib/libnvrtc.so.*")):
            return path
    return None


def test_int4_mma_kernels_compile_for_hopper(tmp_path):
    """quant_cuda.py's CUDA source through NVRTC for sm_90 (no GPU needed) in every setting the engine compiles
    (bf16 and fp16, groups of 32 to 128, one to four row tiles of x, gated; PDL, and in two of them without it, as
    on sm_80 or with NANOKYRO_PDL=0): the kernels built, the GEMV and GEMM on the tensor cores (HMMA), and for
    sm_90a the warpgroup GEMM's MMAs (HGMMA, one a 16-feature step), nothing spilled to local
    memory (cuobjdump from Triton's package)."""
    from nanokyro.quant_cuda import compile_cubin

    path = nvrtc_library()
    if path is None:
        pytest.skip("no nvidia-cuda-nvrtc wheel")
    triton = pytest.importorskip("triton")
    nvrtc, cuobjdump = ctypes.CDLL(path), Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    cubin = tmp_path / "k.cubin"
    kernels = ("w4_gemv", "w4_gemm", "w4_dequantise", "w4_wgmma64", "w4_wgmma128")
    settings = itertools.product((0, 1), (32, 64, 128), (1, 2, 3, 4), (0, 1), (1,))
    for f16, group, mt, gated, pdl in [*settings, (0, 128, 1, 0, 0), (1, 64, 2, 1, 0)]:  # and PDL off (sm_80)
        defines = dict(F16=f16, GROUP=group, MT=mt, GATED=gated, PDL=pdl)
        cubin.write_bytes(compile_cubin(defines, "sm_90", nvrtc))
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        assert all(usage.count(f"Function {k}") == 1 for k in kernels), usage
        assert usage.count("LOCAL:0") == len(kernels), (defines, usage)
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
        assert "HMMA.16816.F32" in sass, defines
    for f16, group in [(0, 128), (1, 32)]:  # sm_90a (as the engine builds for the H100/H200): the warpgroup MMAs
        cubin.write_bytes(compile_cubin(dict(F16=f16, GROUP=group, MT=1, GATED=0, PDL=1), "sm_90a", nvrtc))
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        assert usage.count("LOCAL:0") == len(kernels), usage
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
        assert sass.count("HGMMA.64x128x16.F32") == 4 and sass.count("HGMMA.64x64x16.F32") == 4, (f16, group)
