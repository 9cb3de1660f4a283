"""Triton kernels for decode steps of one or two rows on CUDA: GEMV linear layers, a one-kernel RMSNorm, and under
tensor parallelism the all-reduce, residual add and RMSNorm as one kernel (a row-parallel layer's GEMV sending
its part to the other ranks itself).

At batch 1 a decode step is the weights read once, so its speed is how fast each projection streams its weight.
For [1, K] x [K, N], cuBLAS picks split-K kernels that stream llama-3.1-8b's projections at 2.1-2.9 TB/s on an
H100; the GEMV below, one program per few output features reading their rows once with no split, reaches
2.5-3.2 TB/s on the same shapes (docs/PERFORMANCE.md). From four rows up cuBLAS is faster. What is left of the
step is ~14 small kernels per layer, and the norms are two of them each as torch.compile writes them.

The model's layers call `linear` and `rms_norm` (and, for a layer with LoRA adapters, `lora_linear`: the GEMV
adds each row's adapter delta in its epilogue, before the MLP's activation). They are the plain torch ops unless `enable()` is on, which the
CUDA-graph runner turns on while it traces and captures the graphs of buckets of at most `MAX_ROWS` rows.
torch.compile guards on the switch, so those buckets get a compiled forward of their own and every other step
keeps cuBLAS and inductor's kernels. The kernels sit behind custom ops, so the compiled graph stays whole; their
Python launch cost is paid once, at capture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

MAX_ROWS = 2
# (block_n, block_k, num_warps) of the GEMV by row count: the best single setting over llama-3.1-8b's five
# projection shapes in a sweep on an H100 (.device/bench_gemv.py; docs/PERFORMANCE.md). gemv_config refines the
# one-row setting by shape.
GEMV_CONFIG = {1: (4, 4096, 4), 2: (8, 2048, 4)}
_enabled = False

# Programmatic dependent launch (PDL, sm_90+) of the one- and two-row decode steps' own kernels: this module's
# GEMV and RMSNorms (fused with the all-reduce or not), quant_triton's one-row FP8 GEMV (and qgemv_kernel at one
# or two rows), attention's RoPE + KV write. A kernel launched so may start while the kernel before it in the
# stream still runs; its launch and prologue (and in the FP8 GEMVs its first weight tile's loads) then overlap
# that kernel's tail. The rules each one keeps:
# - gdc_wait() before it reads anything an earlier kernel wrote (x, the residual, q/k/v, positions, LoRA's partial
#   sums) and before it writes anything (an earlier kernel may still read that buffer). Only constant data
#   (weights, scales, the norm's weight) may be loaded before the wait.
# - gdc_wait() unconditionally, even where it needs nothing of its predecessor: the kernel after it waits only for
#   it, so it must not finish before the one before it has (the order is transitive only so).
# - gdc_launch_dependents() right after the wait: the next kernel's programs are scheduled once every program of
#   this grid has called it, so they load their first weights during this grid's last wave. Not in the RoPE + KV
#   write, whose next kernel is FlashInfer's attention (attention.py says why).
# FlashInfer launches its attention with PDL itself (its default on sm_90+); NANOKYRO_PDL covers nanokyro's own
# kernels only. Inductor's, cuBLAS and NCCL kernels launch without it: a PDL kernel after one of them starts when
# it ends. The kernels take `pdl` as a constexpr (Triton's interpreter knows no gdc_*) and the launch
# `pdl_launch(pdl)`. NANOKYRO_PDL=0, or PDL = False before the graphs are captured, turns it off.
PDL = os.environ.get("NANOKYRO_PDL", "1") != "0"
# A TP group's all-reduce, residual add and RMSNorm as one kernel in steps of up to FUSED_ROWS rows
# (all_reduce_rms_norm), summed in place and normalised from the symmetric buffer above that; 0: the all-reduce,
# then the norm as torch.compile writes it.
FUSE_ALL_REDUCE = os.environ.get("NANOKYRO_FUSE_ALL_REDUCE", "1") != "0"
# Under PDL a GEMV's programs start before the kernel ahead of them ends (a norm, attention: HBM idle), and wait;
# they first ask the L2 for their first weight tile (prefetch.global.L2: no registers, nothing waited for), so its
# bytes stream in during the wait instead of after it. 0: no prefetch.
GEMV_PREFETCH = os.environ.get("NANOKYRO_GEMV_PREFETCH", "1") != "0"


@contextlib.contextmanager
def enable():
    """Route `linear` and `rms_norm` through the kernels below while the enclosed code traces or captures a step
    of at most MAX_ROWS rows."""
    global _enabled
    _enabled = True
    try:
        yield
    finally:
        _enabled = False


def on(x: torch.Tensor) -> bool:
    """Whether x's layer should take the kernels below: inside `enable()`, on CUDA."""
    return _enabled and x.is_cuda


def use_pdl() -> bool:
    """Whether to launch the kernels listed above with PDL now: PDL on, and Triton compiling for CUDA sm_90+."""
    return PDL and _pdl_target()


def pdl_launch(pdl: bool) -> dict:
    """A launch's keywords for `pdl`: none when off, as Triton builds without PDL (ROCm's, older CUDA ones) refuse
    the keyword itself, even as False."""
    return {"launch_pdl": True} if pdl else {}


def triton_interprets() -> bool:
    """Whether Triton runs the kernels in its interpreter: TRITON_INTERPRET read as Triton reads its flags (1, true,
    on, yes or y, in any case), not only as 1."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


@functools.cache
def _pdl_target() -> bool:
    """Whether Triton's target (the one it compiles the kernels for) has PDL: CUDA, sm_90 or later, and a Triton
    with gdc_wait whose launcher takes launch_pdl; never in the interpreter."""
    if triton_interprets():
        return False
    import triton
    import triton.language as tl

    target = triton.runtime.driver.active.get_current_target()
    if target.backend != "cuda" or target.arch < 90 or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    from triton.backends.nvidia.compiler import CUDAOptions  # importable: the target is CUDA

    return "launch_pdl" in {field.name for field in dataclasses.fields(CUDAOptions)}


NO_SEND = (None, None, 0, 1)  # gemv's bufs, epochs, rank and size for a GEMV that sends nothing


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, send: tuple | None = None
           ) -> torch.Tensor:  # fmt: skip
    """x @ weight.T (+ bias); `send` (a TP group's `fused`, in the small graphs only): the GEMV also sends its output
    to the group's other ranks for the all_reduce_rms_norm after it (see there)."""
    if not on(x):
        return F.linear(x, weight, bias)
    return torch.ops.nanokyro.gemv(x, weight, bias, False, None, None, None, *(send or NO_SEND))


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """The MLP's activation of a stacked [gate | up] output [..., 2N]: silu(gate) * up [..., N]."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_linear(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for the stacked weight gate_up [2N, K], as one kernel."""
    return torch.ops.nanokyro.gemv(x, gate_up, None, gated=True)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, lora_s: torch.Tensor,
                lora_b: torch.Tensor, lora: torch.Tensor, send: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """`linear` (or, `gated`, `silu_and_mul_linear`) plus each row's LoRA delta lora_s.sum(0) @ lora_b[lora].T,
    added in the GEMV's epilogue: the shrink's partial sums `lora_s` come from lora_kernels.lora_shrink."""
    return torch.ops.nanokyro.gemv(x, weight, bias, gated, lora_s, lora_b, lora, *(send or NO_SEND))


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """RMSNorm.forward of x [T, N] as one kernel: rounds where it does (the sum and the normalised value to x's
    dtype, then times weight)."""
    out, new_residual = torch.ops.nanokyro.rms_norm(x, residual, weight, eps)
    return out if residual is None else (out, new_residual)


def gemv_config(M: int, K: int, gated: bool) -> tuple[int, int, int]:
    """GEMV_CONFIG[M], with two shape rules at one row from a sweep on an H200 over llama-3.1-8b's projections
    whole and as TP=2 shards (docs/PERFORMANCE.md, session 20): an ungated projection of at most 4096 inputs
    (qkv, o) takes two output rows a program, twice the programs to spread over the SMs; a row past 8192 inputs
    (down at TP=1) is read in 2048-wide steps."""
    block_n, block_k, num_warps = GEMV_CONFIG[M]
    if M == 1 and not gated and K <= 4096:
        block_n = 2
    if M == 1 and K > 8192:
        block_k = 2048
    return block_n, block_k, num_warps


@torch.library.custom_op("nanokyro::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False,
         lora_s: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, lora: torch.Tensor | None = None,
         bufs: torch.Tensor | None = None, epochs: torch.Tensor | None = None, rank: int = 0, size: int = 1
         ) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ weight [N, K].T (+ bias) for M ≤ MAX_ROWS. `gated`: weight stacks gate and up [2N, K], and
    the result is silu(x @ gate.T) * (x @ up.T) [M, N], the MLP's activation fused into the GEMV. With `lora`
    (each row's adapter slot, -1 none), each row also gets lora_s.sum(0)[m] @ lora_b[lora[m]].T, before the
    activation (lora_s [splits, M, R] fp32, lora_b [slots, N or 2N, R]). With `bufs` (a TP group's fused slots,
    epochs, rank and size; not gated), the result is also this rank's part of all_reduce_rms_norm's sum: the
    GEMV sends it to the other ranks as that kernel would, which then only receives (its `sent`)."""
    import triton

    from nanokyro.lora_kernels import lora_expand

    M, K = x.shape
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    if M > MAX_ROWS or weight.stride(1) != 1:  # larger M: cuBLAS
        assert bufs is None, "only the GEMV sends"
        y = F.linear(x, weight, bias)
        y = y if lora is None else lora_expand(y, lora_s, lora_b, lora)
        return silu_and_mul(y) if gated else y
    x = x if x.stride(1) == 1 else x.contiguous()
    y = x.new_empty(M, N)
    block_n, block_k, num_warps = gemv_config(M, K, gated)
    block_n = block_n // 2 if gated else block_n  # the same weight tile: half gate rows, half up rows
    pdl = use_pdl()
    has_lora = lora is not None
    if has_lora:
        splits, R, b_stride0, b_stride1 = lora_s.shape[0], lora_b.shape[2], lora_b.stride(0), lora_b.stride(1)
    else:  # the kernel's LoRA pointers go unused: any tensor will do
        lora_s = lora_b = lora = x
        splits, R, b_stride0, b_stride1 = 0, 1, 0, 0
    send = bufs is not None
    assert not (send and gated), "a part to send is a row-parallel layer's output, never gate/up's"
    assert not send or N * y.element_size() % 4 == 0, "a part travels as 32-bit words"
    _gemv_kernel()[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        lora_s, lora_b, lora, splits, b_stride0, b_stride1, R, bufs if send else x, epochs if send else x,
        has_bias=bias is not None, gated=gated, has_lora=has_lora, block_m=triton.next_power_of_2(M),
        block_n=block_n, block_k=min(block_k, triton.next_power_of_2(K)), block_r=triton.next_power_of_2(R),
        block_s=triton.next_power_of_2(max(splits, 1)), pdl=pdl, send=send, rank=rank, size=size, rows=FUSED_ROWS,
        hidden=FUSED_HIDDEN, asm=not triton_interprets(), prefetch=pdl and GEMV_PREFETCH and not triton_interprets(),
        num_warps=num_warps, num_stages=1, **pdl_launch(pdl),
    )  # fmt: skip
    return y


@gemv.register_fake
def _(x, weight, bias, gated=False, lora_s=None, lora_b=None, lora=None, bufs=None, epochs=None, rank=0, size=1):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if gated else weight.shape[0])


@torch.library.custom_op("nanokyro::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(normalised x + residual, x + residual) for x [T, N]; without a residual, (normalised x, empty)."""
    import triton

    T, N = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty_like(x)
    if residual is None:  # the kernel's residual pointers go unused: any tensor will do
        residual, new_residual, has_residual = x, x.new_empty(0), False
    else:
        residual, new_residual, has_residual = residual.contiguous(), torch.empty_like(x), True
    block, pdl = triton.next_power_of_2(N), use_pdl()
    _rms_norm_kernel()[(T,)](
        x, residual, weight, out, new_residual if has_residual else out, N, x.stride(0), eps,
        has_residual=has_residual, block=block, pdl=pdl, num_warps=min(max(block // 256, 1), 16), **pdl_launch(pdl),
    )  # fmt: skip
    return out, new_residual


@_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0)


# The tail of a TP group's symmetric buffer that all_reduce_rms_norm uses (parallel.Group sets it up): on every rank,
# two slots of FUSED_ROWS rows x ranks (the sender) of up to FUSED_HIDDEN 32-bit words of a part (two bf16 values,
# or one fp32), each sent as 8 bytes with its epoch (fused_data_bytes). Steps of more rows sum in the buffer's
# head and then normalise (parallel.all_reduce_rms_norm).
FUSED_ROWS = 16
FUSED_HIDDEN = 16384
# How long all_reduce_rms_norm waits for a peer's part before it fails the kernel: longer than the ranks can drift
# apart while they compile the same graphs at start-up (the first fused call after a compile waits for the slowest
# rank's), short enough that a lost peer (parallel.py's watcher acts first) does not hang a GPU for good.
POLL_LIMIT_S = 120


def fused_data_bytes(size: int) -> int:
    """Bytes of all_reduce_rms_norm's slots for a group of `size` ranks."""
    return 2 * FUSED_ROWS * size * FUSED_HIDDEN * 8


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        bufs: torch.Tensor, epochs: torch.Tensor, rank: int, size: int, sent: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """rms_norm(sum of x over the TP group's ranks, residual) as one kernel, for the GPUs of one node: x [T, N]
    (T ≤ FUSED_ROWS) is this rank's partial sum (a row-parallel projection's), and each rank writes it into the
    others' buffers over NVLink. Every rank sums the parts in rank order, in fp32, so all of them get the same bits
    (with two ranks, those of the all-reduce and then rms_norm). `bufs`: every rank's slots in its symmetric buffer
    (int64 addresses); `epochs` [FUSED_ROWS]: how many times each row has gone through, on this rank (int32).

    No barrier and no flag of its own (NCCL's LL protocol): each 32-bit word of a part travels in one 8-byte store
    with the call's epoch in its upper half, into slot epoch % 2 of every other rank, and a rank reads a peer's
    part once every word it polls carries the epoch. The stores and the polling loads are volatile (strong, system
    scope), and a strong aligned 8-byte access is single-copy atomic, so a word with the epoch holds that call's
    data, and nothing waits for a write to be acknowledged: one crossing of NVLink a call, where reading the peers'
    parts after their flags takes a flag's crossing and a read's round trip. A rank rewrites a
    slot two calls later, which it reaches only after it has received every other rank's part of the call in
    between, which each sends only after it has read this slot. Behind parallel.py's custom op, which keeps these
    buffers out of the compiled graph.

    `sent`: the GEMV that computed x already sent it (gemv's `bufs`), as its programs finished, so this kernel
    only receives: the peers' words cross NVLink while the GEMV's last programs still run, and the kernel waits
    for them without a send of its own first."""
    import triton

    T, N = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    assert N * x.element_size() % 4 == 0 and x.data_ptr() % 4 == 0, "a part travels as 32-bit words"
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    block, pdl = max(triton.next_power_of_2(N), 4), use_pdl()  # (at least two words: the stores go in pairs)
    _all_reduce_rms_norm_kernel()[(T,)](
        x, residual, weight, out, new_residual, bufs, epochs, N, eps, rank=rank, size=size, rows=FUSED_ROWS,
        hidden=FUSED_HIDDEN, block=block, send=not sent, asm=not triton_interprets(), pdl=pdl,
        poll_limit_ns=POLL_LIMIT_S * 10**9,
        num_warps=min(max(block // 256, 1), 16), **pdl_launch(pdl),
    )  # fmt: skip
    return out, new_residual


@functools.cache
def _gemv_kernel():
    """Each program computes `block_n` output features for all (≤ block_m) rows: it streams those weight rows
    once, `block_k` columns at a time, and keeps an fp32 sum per (row, feature). Built on first use: Triton
    needs a GPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, x_stride, w_stride, y_stride, s_ptr, lb_ptr, idx_ptr,
                    SPLITS, lb_stride0, lb_stride1, R, bufs_ptr, epochs_ptr, has_bias: tl.constexpr,
                    gated: tl.constexpr, has_lora: tl.constexpr, block_m: tl.constexpr, block_n: tl.constexpr,
                    block_k: tl.constexpr, block_r: tl.constexpr, block_s: tl.constexpr, pdl: tl.constexpr,
                    send: tl.constexpr, rank: tl.constexpr, size: tl.constexpr, rows: tl.constexpr,
                    hidden: tl.constexpr, asm: tl.constexpr, prefetch: tl.constexpr):  # fmt: skip
        """y = x @ w.T (+ b) (+ each row's LoRA delta); `gated`: w is [gate; up], 2N rows, and y = silu(x @
        gate.T) * (x @ up.T), rounded as the unfused ops round (gate and up to y's dtype first). `send`: y's words
        also go to every other rank's slot as all_reduce_rms_norm_kernel sends them (tagged with the row's next
        epoch; `asm`: volatile 8-byte stores by inline PTX, not in the interpreter). `prefetch` (GEMV_PREFETCH): the
        first weight tile's 128-byte lines asked of the L2 before the PDL wait."""
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rm = tl.arange(0, block_m)
        n_ok, m_ok = rn < N, rm < M
        w_rows = w_ptr + rn[:, None].to(tl.int64) * w_stride  # [block_n, 1]
        acc = tl.zeros((block_m, block_n), tl.float32)
        up = tl.zeros((block_m, block_n), tl.float32)
        if prefetch:  # a line a lane, asked for and not waited for: no register holds them (a load would)
            per_line: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # weights a 128-byte line
            lines = tl.arange(0, max(block_k // per_line, 1)) * per_line
            first = w_rows + lines[None, :]  # [block_n, lines]
            ok = n_ok[:, None] & (lines < K)[None, :]
            for half in tl.static_range(2 if gated else 1):  # gated: the up rows' tile too
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }", "=r,l,r",
                    [(first + half * N * w_stride).to(tl.int64, bitcast=True), ok.to(tl.int32)], dtype=tl.int32,
                    is_pure=False, pack=1)  # fmt: skip
        if pdl:  # before any load: a first weight tile loaded ahead of the loop would take registers from it
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if has_lora:  # loaded before the weights stream, used after it: their latency hides behind theirs
            idx = tl.load(idx_ptr + rm, mask=m_ok, other=-1)
            rr, sp = tl.arange(0, block_r), tl.arange(0, block_s)
            s_ok = (idx >= 0)[:, None] & (rr < R)[None, :]
            parts = tl.load(s_ptr + sp[:, None, None] * M * R + rm[None, :, None] * R + rr[None, None, :],
                            mask=(sp < SPLITS)[:, None, None] & s_ok[None, :, :], other=0.0)  # fmt: skip
            b_rows = lb_ptr + tl.maximum(idx, 0)[:, None, None] * lb_stride0 + rn[None, :, None] * lb_stride1
            b_ok = s_ok[:, None, :] & n_ok[None, :, None]
            b = tl.load(b_rows + rr[None, None, :], mask=b_ok, other=0.0)
            if gated:
                b_up = tl.load(b_rows + N * lb_stride1 + rr[None, None, :], mask=b_ok, other=0.0)
        for k0 in range(0, K, block_k):
            rk = k0 + tl.arange(0, block_k)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * x_stride + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x = x[:, None, :].to(tl.float32)
            # The weight is read once per step: keep it from evicting what is reused (activations, KV).
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            acc += tl.sum(x * w[None, :, :].to(tl.float32), 2)
            if gated:
                u = tl.load(w_rows + N * w_stride + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")  # fmt: skip
                up += tl.sum(x * u[None, :, :].to(tl.float32), 2)
        if has_bias:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if has_lora:  # s = the shrink's partial sums added up; each row's B rows gathered by its slot
            s = tl.sum(parts, 0)
            acc += tl.sum(s[:, None, :] * b.to(tl.float32), 2)
            if gated:
                up += tl.sum(s[:, None, :] * b_up.to(tl.float32), 2)
        if gated:
            gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = gate * tl.sigmoid(gate) * up.to(y_ptr.dtype.element_ty).to(tl.float32)
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * y_stride + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])
        if send:  # the words of this program's outputs (two bf16 values a word, the first low, or one fp32)
            per_word: tl.constexpr = 32 // out.dtype.primitive_bitwidth
            if per_word == 2:
                low, high = tl.split(tl.reshape(out.to(tl.int16, bitcast=True), (block_m, block_n // 2, 2)))
                bits = (high.to(tl.int32) << 16) | (low.to(tl.int32) & 0xFFFF)
            else:
                bits = out.to(tl.int32, bitcast=True)
            epoch = tl.load(epochs_ptr + rm, mask=m_ok, other=0) + 1  # the coming all_reduce_rms_norm's
            tagged = (epoch.to(tl.int64)[:, None] << 32) | (bits.to(tl.int64) & 0xFFFFFFFF)
            words = tl.program_id(0) * (block_n // per_word) + tl.arange(0, block_n // per_word)
            ok = m_ok[:, None] & (words < N // per_word)[None, :]
            slot = (((epoch & 1) * rows + rm) * size + rank) * hidden  # as sender `rank`, in that kernel's layout
            for p in tl.static_range(size):
                if p != rank:
                    outbox = tl.load(bufs_ptr + p).to(tl.pointer_type(tl.int64)) + slot[:, None] + words[None, :]
                    if asm:
                        tl.inline_asm_elementwise(
                            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.volatile.global.b64 [$1], $2; "
                            "mov.u32 $0, 0; }", "=r,l,l,r",
                            [outbox.to(tl.int64, bitcast=True), tagged, ok.to(tl.int32)], dtype=tl.int32,
                            is_pure=False, pack=1)  # fmt: skip
                    else:
                        tl.store(outbox, tagged, mask=ok)

    return gemv_kernel


@functools.cache
def _rms_norm_kernel():
    """One program per row, the whole row in registers: add the residual, reduce, scale, store both."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, N, x_stride, eps, has_residual: tl.constexpr,
                        block: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, block)
        ok = cols < N
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)  # constant: before `pdl`'s wait (PDL above)
        if pdl:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0)
        if has_residual:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * N + cols, x, mask=ok)
        xf = x.to(tl.float32)
        normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)).to(x.dtype)
        tl.store(out_ptr + row * N + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=ok)

    return rms_norm_kernel


@functools.cache
def _all_reduce_rms_norm_kernel():
    """One program per row: send this rank's part to every other rank (its words tagged with the epoch), receive
    theirs, sum every rank's part, then the residual add and the norm as rms_norm_kernel (the same rounding)."""
    import triton
    import triton.language as tl

    @triton.jit
    def all_reduce_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, bufs_ptr, epochs_ptr, N, eps,
                                   rank: tl.constexpr, size: tl.constexpr, rows: tl.constexpr, hidden: tl.constexpr,
                                   block: tl.constexpr, send: tl.constexpr, asm: tl.constexpr, pdl: tl.constexpr,
                                   poll_limit_ns: tl.constexpr):  # fmt: skip
        """`send`: send this rank's part (else its GEMV did); `asm`: the sends as inline PTX (volatile stores, which
        tl.store cannot make) and the polls timed by the GPU's clock; not in the interpreter. A rank waits for a
        peer's part up to `poll_limit_ns` (a peer still compiling at start-up, say), then traps."""
        row = tl.program_id(0)
        cols = tl.arange(0, block)
        ok = cols < N
        dtype = x_ptr.dtype.element_ty
        per_word: tl.constexpr = 32 // dtype.primitive_bitwidth  # values a 32-bit word holds: 2 (bf16) or 1
        tl.static_assert(per_word <= 2, "16- or 32-bit values")
        words = tl.arange(0, block // per_word)
        words_ok = words < N // per_word
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)  # constant: before `pdl`'s wait
        if pdl:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        epoch = tl.load(epochs_ptr + row) + 1
        part = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0)
        bits = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + row * (N // per_word) + words, mask=words_ok, other=0)
        tagged = (epoch.to(tl.int64) << 32) | (bits.to(tl.int64) & 0xFFFFFFFF)
        slot = ((epoch & 1) * rows + row) * size  # this row's senders in this call's slot (& 1: an epoch may wrap)
        for p in tl.static_range(size):
            if send and p != rank:  # into rank p's buffer, as sender `rank`
                outbox = tl.multiple_of(tl.load(bufs_ptr + p).to(tl.pointer_type(tl.int64)), 16)
                outbox += (slot + rank) * hidden
                if asm:  # two words a 16-byte store (from an even word: aligned), each a strong 8-byte access
                    even, odd = tl.split(tl.reshape(tagged, (block // per_word // 2, 2)))
                    pairs = tl.arange(0, block // per_word // 2) * 2
                    tl.inline_asm_elementwise(
                        "{ .reg .pred p; setp.ne.b32 p, $4, 0; @p st.volatile.global.v2.b64 [$1], {$2, $3}; "
                        "mov.u32 $0, 0; }", "=r,l,l,l,r",
                        [(outbox + pairs).to(tl.int64, bitcast=True), even, odd, (pairs < N // per_word).to(tl.int32)],
                        dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
                else:
                    tl.store(outbox + words, tagged, mask=words_ok)
        mine = tl.multiple_of(tl.load(bufs_ptr + rank).to(tl.pointer_type(tl.int64)), 16)
        total = tl.zeros((block,), tl.float32)
        for p in tl.static_range(size):  # in rank order on every rank: the same sum everywhere
            if p == rank:
                total += part.to(tl.float32)
            else:
                inbox = mine + (slot + p) * hidden + words
                got = tl.load(inbox, mask=words_ok, other=epoch.to(tl.int64) << 32, volatile=True)
                spins, start = 0, tl.zeros((), tl.int64)
                if asm:  # the GPU's nanosecond clock (the interpreter has none, and no time limit)
                    start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                                      is_pure=False, pack=1)  # fmt: skip
                while tl.min(((got >> 32).to(tl.int32) == epoch).to(tl.int32), 0) == 0:
                    got = tl.load(inbox, mask=words_ok, other=epoch.to(tl.int64) << 32, volatile=True)
                    spins += 1
                    if asm and spins % 4096 == 0:  # now and then, the time since the first poll
                        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                                        is_pure=False, pack=1)  # fmt: skip
                        if now - start > poll_limit_ns:  # rank p is gone: fail (trap) rather than hang
                            tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
                low = got.to(tl.int32)  # the word's 32 bits of data
                if per_word == 2:  # two values a word, the first in its low half (little-endian)
                    pair = tl.join((low & 0xFFFF).to(tl.int16), (low >> 16).to(tl.int16))
                    values = tl.reshape(pair, (block,)).to(dtype, bitcast=True)
                else:
                    values = low.to(dtype, bitcast=True)
                total += values.to(tl.float32)
        tl.store(epochs_ptr + row, epoch)
        x = (total.to(dtype).to(tl.float32) + tl.load(r_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(dtype)
        tl.store(res_out_ptr + row * N + cols, x, mask=ok)
        xf = x.to(tl.float32)
        normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)).to(dtype)
        tl.store(out_ptr + row * N + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(dtype), mask=ok)

    return all_reduce_rms_norm_kernel
