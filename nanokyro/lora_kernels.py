"""Triton kernels of the batched LoRA delta on CUDA (lora.lora_delta): shrink s = x @ A[slot].T and expand
y + s @ B[slot].T, where each token t has its own adapter slot lora[t] (-1: none).

Both are tiled over blocks of `BLOCK_M` tokens. A block looks at the slots of its tokens and, for each adapter
present, multiplies the block's rows of that adapter against that adapter's matrix (the others masked to zero).
The flat batch lays each sequence's tokens end to end, and the scheduler orders a step's sequences by adapter, so
a block is almost always one adapter: a plain tiled GEMM on it, as Punica's SGMV does per segment, without a
segment table. Blocks without adapters cost their slot loads. Everything is a fixed launch over the step's token
count, so it goes into the CUDA graphs with the slots as an input.

The shrink also splits K: at decode a block is one to a few tokens, and the rank is 16 to 192 rows, so without
the split a handful of programs would each stream thousands of columns of A one tile after another (latency-bound:
8 to 112 dependent loads). Each split writes its partial sums; the expand adds them up as it reads s.

The ops are custom ops (opaque to torch.compile, with fake implementations for tracing).
"""
from __future__ import annotations

import functools

import torch

BLOCK_M = 16
BLOCK_K = 128
SPLIT_K = 512  # columns of x and A per shrink program (a multiple of BLOCK_K)


def num_splits(K: int) -> int:
    """How many partial sums the shrink writes for K input features (from K alone: shapes stay static)."""
    return -(-K // SPLIT_K)


@torch.library.custom_op("nanokyro::lora_shrink", mutates_args=())
def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """x [T, K], lora_a [S, R, K], lora [T] -> partial sums s [splits, T, R] fp32 (zero for tokens without an
    adapter); x @ A[slot].T is their sum over the first dimension."""
    import triton

    T, K = x.shape
    R = lora_a.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    s = torch.empty(num_splits(K), T, R, dtype=torch.float32, device=x.device)
    if T == 0:
        return s
    # Few tokens: 16 rank rows per program, for the most programs streaming A at once. Many: x read fewer times.
    block_r = 16 if T <= 4 * BLOCK_M else min(64, max(16, triton.next_power_of_2(R)))
    grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(R, block_r), num_splits(K))
    _shrink_kernel()[grid](
        x, lora_a, lora, s, T, K, R, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, IEEE=x.dtype == torch.float32,
        num_warps=4,
    )  # fmt: skip
    return s


@lora_shrink.register_fake
def _(x, lora_a, lora):
    return x.new_empty(num_splits(x.shape[1]), x.shape[0], lora_a.shape[1], dtype=torch.float32)


@torch.library.custom_op("nanokyro::lora_expand", mutates_args=())
def lora_expand(y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """y [T, N] + s.sum(0) [T, R] @ lora_b[lora[t]].T ([S, N, R]) per token -> a new [T, N] in y's dtype."""
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
        y, s, lora_b, lora, out, T, N, R, s.shape[0], y.stride(0), lora_b.stride(0), lora_b.stride(1),
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
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        split = tl.program_id(2)
        m_ok, r_ok = rm < T, rr < R
        idx = tl.load(idx_ptr + rm, mask=m_ok, other=-1)
        lo = tl.min(tl.where(idx >= 0, idx, 1 << 30), 0)
        hi = tl.max(idx, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for slot in range(lo, hi + 1):
            rows = idx == slot
            if tl.sum(rows.to(tl.int32), 0) > 0:
                a_rows = a_ptr + slot * a_stride0 + rr[:, None] * a_stride1
                for k0 in range(split * SPLIT_K, (split + 1) * SPLIT_K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = rk < K
                    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_stride + rk[None, :],
                                mask=rows[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                    a = tl.load(a_rows + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if IEEE:
                        acc += tl.dot(x, tl.trans(a), input_precision="ieee")
                    else:
                        acc += tl.dot(x, tl.trans(a))
        out = s_ptr + split * T * R + rm[:, None] * R + rr[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & r_ok[None, :])

    return shrink


@functools.cache
def _expand_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def expand(y_ptr, s_ptr, b_ptr, idx_ptr, out_ptr, T, N, R, SPLITS, y_stride, b_stride0, b_stride1,
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
        if hi >= 0:  # some row of the block has an adapter: its s is the sum of the shrink's partials
            s_all = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
            s_ok = (idx >= 0)[:, None] & r_ok[None, :]
            for split in range(SPLITS):
                s_all += tl.load(s_ptr + split * T * R + rm[:, None] * R + rr[None, :], mask=s_ok,
                                 other=0.0)  # fmt: skip
            for slot in range(lo, hi + 1):
                rows = idx == slot
                if tl.sum(rows.to(tl.int32), 0) > 0:
                    s = tl.where(rows[:, None], s_all, 0.0)
                    b = tl.load(b_ptr + slot * b_stride0 + rn[:, None] * b_stride1 + rr[None, :],
                                mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
                    if IEEE:
                        acc += tl.dot(s, tl.trans(b).to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(s.to(b.dtype), tl.trans(b))
        tl.store(out_ptr + rm[:, None].to(tl.int64) * out_stride + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip

    return expand
