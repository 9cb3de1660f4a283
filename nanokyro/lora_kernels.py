"""Triton kernels of the batched LoRA delta on CUDA (lora.lora_delta): shrink s = x @ A[slot].T and expand
y + s @ B[slot].T, where each token t has its own adapter slot lora[t] (-1: none).

Both are tiled over blocks of `BLOCK_M` tokens. A block looks at the slots of its tokens and, for each adapter
present, multiplies the block's rows of that adapter against that adapter's matrix (the others masked to zero).
The flat batch lays each sequence's tokens end to end, so a prefill block is almost always one adapter: a
plain tiled GEMM on it, as Punica's SGMV does per segment, without sorting or a segment table. A decode block
holds one token per sequence, each adapter's weights read once per block, as BGMV gathers them per row. Blocks
without adapters cost their slot loads. Everything is a fixed launch over the step's token count, so it goes
into the CUDA graphs with the slots as an input.

The ops are custom ops (opaque to torch.compile, with fake implementations for tracing).
"""
from __future__ import annotations

import functools

import torch

BLOCK_M = 16


@torch.library.custom_op("nanokyro::lora_shrink", mutates_args=())
def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """x [T, K], lora_a [S, R, K], lora [T] -> s [T, R] fp32 (zero for tokens without an adapter)."""
    import triton

    T, K = x.shape
    R = lora_a.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    s = torch.empty(T, R, dtype=torch.float32, device=x.device)
    if T == 0:
        return s
    block_r = 16  # the smallest tl.dot tile: at batch 1 the most programs streaming A at once
    grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(R, block_r))
    _shrink_kernel()[grid](
        x, lora_a, lora, s, T, K, R, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=128 if K >= 128 else 64, IEEE=x.dtype == torch.float32,
        num_warps=4,
    )  # fmt: skip
    return s


@lora_shrink.register_fake
def _(x, lora_a, lora):
    return x.new_empty(x.shape[0], lora_a.shape[1], dtype=torch.float32)


@torch.library.custom_op("nanokyro::lora_expand", mutates_args=())
def lora_expand(y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """y [T, N] + s [T, R] @ lora_b[lora[t]].T ([S, N, R]) per token -> a new [T, N] in y's dtype."""
    import triton

    T, N = y.shape
    R = lora_b.shape[2]
    out = torch.empty_like(y)
    if T == 0:
        return out
    y = y if y.stride(1) == 1 else y.contiguous()
    block_n = 64
    grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(N, block_n))
    _expand_kernel()[grid](
        y, s, lora_b, lora, out, T, N, R, y.stride(0), s.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(R)),
        IEEE=y.dtype == torch.float32, num_warps=4,
    )  # fmt: skip
    return out


@lora_expand.register_fake
def _(y, s, lora_b, lora):
    return torch.empty_like(y)


@functools.cache
def _shrink_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, idx_ptr, s_ptr, T, K, R, x_stride, a_stride0, a_stride1, BLOCK_M: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        m_ok, r_ok = rm < T, rr < R
        idx = tl.load(idx_ptr + rm, mask=m_ok, other=-1)
        lo = tl.min(tl.where(idx >= 0, idx, 1 << 30), 0)
        hi = tl.max(idx, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for slot in range(lo, hi + 1):
            rows = idx == slot
            if tl.sum(rows.to(tl.int32), 0) > 0:
                a_rows = a_ptr + slot * a_stride0 + rr[:, None] * a_stride1
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = rk < K
                    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_stride + rk[None, :],
                                mask=rows[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                    a = tl.load(a_rows + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if IEEE:
                        acc += tl.dot(x, tl.trans(a), input_precision="ieee")
                    else:
                        acc += tl.dot(x, tl.trans(a))
        tl.store(s_ptr + rm[:, None] * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])

    return shrink


@functools.cache
def _expand_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def expand(y_ptr, s_ptr, b_ptr, idx_ptr, out_ptr, T, N, R, y_stride, s_stride, b_stride0, b_stride1,
               out_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
               IEEE: tl.constexpr):  # fmt: skip
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        m_ok, n_ok, r_ok = rm < T, rn < N, rr < R
        idx = tl.load(idx_ptr + rm, mask=m_ok, other=-1)
        lo = tl.min(tl.where(idx >= 0, idx, 1 << 30), 0)
        hi = tl.max(idx, 0)
        y = tl.load(y_ptr + rm[:, None].to(tl.int64) * y_stride + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)  # fmt: skip
        acc = y.to(tl.float32)
        for slot in range(lo, hi + 1):
            rows = idx == slot
            if tl.sum(rows.to(tl.int32), 0) > 0:
                s = tl.load(s_ptr + rm[:, None] * s_stride + rr[None, :], mask=rows[:, None] & r_ok[None, :],
                            other=0.0)  # fmt: skip
                b = tl.load(b_ptr + slot * b_stride0 + rn[:, None] * b_stride1 + rr[None, :],
                            mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
                if IEEE:
                    acc += tl.dot(s, tl.trans(b).to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(s.to(b.dtype), tl.trans(b))
        tl.store(out_ptr + rm[:, None].to(tl.int64) * out_stride + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip

    return expand
