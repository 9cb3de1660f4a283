"""Paged decode attention for the one- and two-row CUDA graphs, as one Triton kernel.

At one row FlashInfer's split-KV decode runs two kernels a layer: the attention over KV chunks, then a merge of
their partial results, each mostly launch and latency at the contexts of a chat (docs/PERFORMANCE.md). Here every
program takes one (row, KV head, split): a contiguous run of the row's pages, for all the query heads that share
the KV head. It writes its partial result (the unnormalised sum, the running max and the softmax denominator),
and the last of the row and head's programs to finish, counted by an atomic, merges the splits. One launch, no
second kernel. The split count is fixed by the graph's grid (about two programs an SM). A split takes whole loop
steps (PAGES_PER_STEP pages), so a short sequence uses few splits; the programs of the others only count
themselves.

It reads the cache in FlashInfer's NHD layout (attention.py) and its page tables (kv_indptr, kv_indices,
kv_last_page_len), after the step's k and v are written. Built on first use: Triton needs a GPU, or its
interpreter on the CPU (tests)."""
from __future__ import annotations

import functools

import torch

from nanokyro.small_batch import pdl_launch, use_pdl

PAGES_PER_STEP = 4  # pages of KV a program reads per loop step (64 tokens at page size 16)
NUM_WARPS = 4
MAX_SPLITS = 64


def num_splits(rows: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits of each row's KV: about two programs an SM over rows x KV heads x splits."""
    return max(1, min(MAX_SPLITS, 2 * num_sms // (rows * num_kv_heads)))


class DecodeAttention:
    """The kernel for steps of `rows` rows, with its scratch: partial sums [rows, Hkv, splits, group rows, D] and
    (max, denominator) pairs in fp32, and a counter per (row, KV head), which the merging program sets back to 0, so
    that the next layer and graph replays reuse it. `splits`: by default num_splits on this GPU."""

    def __init__(self, rows: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 splits: int | None = None):  # fmt: skip
        import triton

        if splits is None:
            splits = num_splits(rows, num_kv_heads, torch.cuda.get_device_properties(device).multi_processor_count)
        self.num_heads, self.num_kv_heads, self.head_dim, self.splits = num_heads, num_kv_heads, head_dim, splits
        self.group = num_heads // num_kv_heads
        self.block_g = max(16, triton.next_power_of_2(self.group))  # tl.dot takes at least 16 rows
        parts = rows * num_kv_heads * splits * self.block_g
        self.partial = torch.empty(parts, head_dim, dtype=torch.float32, device=device)
        self.max_sum = torch.empty(parts, 2, dtype=torch.float32, device=device)
        self.counts = torch.zeros(rows * num_kv_heads, dtype=torch.int32, device=device)

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 kv_last_page_len: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """q [B, H, D] (rotated) against one layer's cache kv [P, 2, page_size, Hkv, D], with the step's page
        tables on the device; returns [B, H, D]."""
        import triton

        q = q.contiguous()
        B, H, D = q.shape
        assert H == self.num_heads and D == self.head_dim, q.shape
        out, pdl = torch.empty_like(q), use_pdl()
        _decode_kernel()[(B, self.num_kv_heads, self.splits)](
            q, kv, kv_indptr, kv_indices, kv_last_page_len, out, self.partial, self.max_sum, self.counts,
            D**-0.5, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), H, self.num_kv_heads, self.splits,
            group=self.group, block_g=self.block_g, head_dim=D, page=kv.shape[2], pages_per_step=PAGES_PER_STEP,
            block_s=triton.next_power_of_2(self.splits), pdl=pdl, num_warps=NUM_WARPS, **pdl_launch(pdl),
        )  # fmt: skip
        return out


@functools.cache
def _decode_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(q_ptr, kv_ptr, indptr_ptr, indices_ptr, last_ptr, out_ptr, part_ptr, ml_ptr, count_ptr, scale,
                      page_stride, half_stride, slot_stride, head_stride, num_heads, num_kv_heads, splits,
                      group: tl.constexpr, block_g: tl.constexpr, head_dim: tl.constexpr, page: tl.constexpr,
                      pages_per_step: tl.constexpr, block_s: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """Program (b, h, s): row b's query heads h * group ... against KV head h over split s of its pages; the
        last program of (b, h) to finish merges the splits into out [B, H, D]."""
        # PDL (small_batch.py): everything below reads the step's data (q, the page tables, the KV just written)
        if pdl:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(indptr_ptr + b)
        num_pages = tl.load(indptr_ptr + b + 1) - first
        kv_len = (num_pages - 1) * page + tl.load(last_ptr + b)
        # Whole loop steps a split: a short row takes fewer splits (128 tokens: 2 of 64), and the rest stay empty
        per_split = tl.cdiv(tl.cdiv(num_pages, splits), pages_per_step) * pages_per_step
        active = tl.cdiv(num_pages, per_split)
        p_start = s * per_split
        p_end = tl.minimum(p_start + per_split, num_pages)

        g, d = tl.arange(0, block_g), tl.arange(0, head_dim)
        g_ok = g < group
        heads = b * num_heads + h * group + g  # this KV head's query heads, rows of q and out
        pair = b * num_kv_heads + h
        # Partial results by (pair, query head, split): for one head, the splits' rows are adjacent for the merge
        rows = (pair * block_g + g) * splits + s
        if s < active:
            q = tl.load(q_ptr + heads[:, None] * head_dim + d[None, :], mask=g_ok[:, None], other=0.0)
            m = tl.full([block_g], float("-inf"), tl.float32)
            denom = tl.zeros([block_g], tl.float32)
            acc = tl.zeros([block_g, head_dim], tl.float32)
            t = tl.arange(0, pages_per_step * page)
            for p in range(p_start, p_end, pages_per_step):
                ordinal = p + t // page  # each token's page among the row's
                token = ordinal * page + t % page
                ok = token < kv_len  # (a split ends on a loop step's edge, or the row's last page)
                page_id = tl.load(indices_ptr + first + ordinal, mask=ok, other=0).to(tl.int64)
                slot = kv_ptr + page_id * page_stride + (t % page) * slot_stride + h * head_stride
                k = tl.load(slot[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(q.dtype)
                scores = tl.dot(q, tl.trans(k)) * scale  # [block_g, tokens], fp32
                scores = tl.where(ok[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                weights = tl.exp(scores - m_new[:, None])
                alpha = tl.exp(m - m_new)
                denom = denom * alpha + tl.sum(weights, 1)
                v = tl.load(slot[:, None] + half_stride + d[None, :], mask=ok[:, None], other=0.0).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(weights.to(q.dtype), v)
                m = m_new
            tl.store(part_ptr + rows[:, None] * head_dim + d[None, :], acc, mask=g_ok[:, None])
            tl.store(ml_ptr + rows * 2, m, mask=g_ok)
            tl.store(ml_ptr + rows * 2 + 1, denom, mask=g_ok)
        tl.debug_barrier()  # every thread's stores before the count that releases them
        done = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel")
        if done == splits - 1:  # the last of (b, h) to finish: merge the active splits (at least one)
            sp = tl.arange(0, block_s)
            sp_ok = sp < active
            both = sp_ok[:, None] & g_ok[None, :]
            ml_rows = (pair * block_g + g[None, :]) * splits + sp[:, None]  # [block_s, block_g]
            ms = tl.load(ml_ptr + ml_rows * 2, mask=both, other=float("-inf"), cache_modifier=".cg")
            ds = tl.load(ml_ptr + ml_rows * 2 + 1, mask=both, other=0.0, cache_modifier=".cg")
            top = tl.max(ms, 0)  # [block_g]
            scales = tl.where(both, tl.exp(ms - top[None, :]), 0.0)
            scales = scales / tl.where(g_ok, tl.sum(scales * ds, 0), 1.0)[None, :]  # each split's share
            for i in tl.static_range(group):  # one query head at a time: its splits' sums as one [splits, D] tile
                share = tl.sum(tl.where(g[None, :] == i, scales, 0.0), 1)  # [block_s]
                part_rows = (pair * block_g + i) * splits + sp
                parts = tl.load(part_ptr + part_rows[:, None] * head_dim + d[None, :], mask=sp_ok[:, None],
                                other=0.0, cache_modifier=".cg")  # fmt: skip
                merged = tl.sum(parts * share[:, None], 0)  # [D]
                tl.store(out_ptr + (b * num_heads + h * group + i) * head_dim + d,
                         merged.to(out_ptr.dtype.element_ty))  # fmt: skip
            tl.atomic_xchg(count_ptr + pair, 0)  # for the next layer or replay

    return decode_kernel
