"""Paged decode attention for the one- and two-row CUDA graphs, as one Triton kernel.

At one row FlashInfer's split-KV decode runs two kernels a layer: the attention over KV chunks, then a merge of
their partial results, each mostly launch and latency at the contexts of a chat (docs/PERFORMANCE.md). Here every
program takes one (row, KV head, split): a contiguous run of the row's pages, for all the query heads that share
the KV head. It writes its partial result (the unnormalised sum, the running max and the softmax denominator),
and the last of the row and head's programs to finish, counted by an atomic, merges the splits. One launch, no
second kernel. The split count is fixed by the graph's grid (about two programs an SM). A split takes whole loop
steps (PAGES_PER_STEP pages), so a short sequence uses few splits; the programs of the others only count
themselves.

The step's k and v go into the cache in the same kernel, rotated with q by RoPE where the model asks it
(RotaryEmbedding.in_kv_write): what attention.triton_rope_write_kv does before FlashInfer's kernels, one launch
fewer. Every program rotates its query heads; the program of the split that holds the row's last token rotates
that KV head's new k and writes k and v into their slot, then reads them back with the rest. It reads the cache in
FlashInfer's NHD layout (attention.py) and its page tables (kv_indptr, kv_indices, kv_last_page_len). Built on
first use: Triton needs a GPU, or its interpreter on the CPU (tests)."""
from __future__ import annotations

import functools

import torch

from nanokyro.quant_formats import FP8, FP8_MAX
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

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, slot_pages: torch.Tensor,
                 slot_offsets: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 kv_last_page_len: torch.Tensor, positions: torch.Tensor | None = None,
                 cos_sin: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The step's k, v [B, Hkv, D] into their slots of one layer's cache kv [P, 2, page_size, Hkv, D], then q
        [B, H, D] against the cache, with the step's page tables on the device; returns [B, H, D]. With
        `positions` [B] and `cos_sin` (RotaryEmbedding's table), q and k are rotated first, as RotaryEmbedding
        rotates them (fp32, rounded to their dtype); into an fp8 cache k and v are clamped as attention.stored
        does."""
        import triton

        B, H, D = q.shape
        assert H == self.num_heads and D == self.head_dim, q.shape
        rotate = positions is not None
        if rotate:  # host checks, as attention.triton_rope_write_kv's: in a CUDA graph they run once, at capture
            assert cos_sin.dim() == 2 and cos_sin.shape[1] == D and cos_sin.is_contiguous(), (cos_sin.shape, D)
            assert cos_sin.dtype == torch.float32 and positions.shape == (B,), (cos_sin.dtype, positions.shape)
        q, k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k, v))  # each head's D values whole
        out, pdl = torch.empty(B, H, D, dtype=q.dtype, device=q.device), use_pdl()
        _decode_kernel()[(B, self.num_kv_heads, self.splits)](
            q, k, v, kv, slot_pages, slot_offsets, positions if rotate else slot_pages, cos_sin if rotate else q,
            kv_indptr, kv_indices, kv_last_page_len, out, self.partial, self.max_sum, self.counts, D**-0.5,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv.stride(0), kv.stride(1),
            kv.stride(2), kv.stride(3), H, self.num_kv_heads, self.splits, group=self.group, block_g=self.block_g,
            head_dim=D, page=kv.shape[2], pages_per_step=PAGES_PER_STEP, block_s=triton.next_power_of_2(self.splits),
            rotate=rotate, clamp=FP8_MAX if kv.dtype == FP8 else 0.0, pdl=pdl, num_warps=NUM_WARPS,
            **pdl_launch(pdl),
        )  # fmt: skip
        return out


@functools.cache
def _decode_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(q_ptr, k_ptr, v_ptr, kv_ptr, slot_pages_ptr, slot_offsets_ptr, positions_ptr, cos_sin_ptr,
                      indptr_ptr, indices_ptr, last_ptr, out_ptr, part_ptr, ml_ptr, count_ptr, scale, q_stride,
                      q_head_stride, k_stride, k_head_stride, v_stride, v_head_stride, page_stride, half_stride,
                      slot_stride, head_stride, num_heads, num_kv_heads, splits, group: tl.constexpr,
                      block_g: tl.constexpr, head_dim: tl.constexpr, page: tl.constexpr, pages_per_step: tl.constexpr,
                      block_s: tl.constexpr, rotate: tl.constexpr, clamp: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """Program (b, h, s): row b's query heads h * group ... against KV head h over split s of its pages; the
        last program of (b, h) to finish merges the splits into out [B, H, D]. Heads are taken in halves (RoPE
        rotates one against the other), so a score is two dots over head_dim / 2."""
        # PDL (small_batch.py): everything below reads the step's data (q, k, v, positions, the page tables)
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

        half: tl.constexpr = head_dim // 2
        g, dh, d = tl.arange(0, block_g), tl.arange(0, half), tl.arange(0, head_dim)
        g_ok = g < group
        pair = b * num_kv_heads + h
        # Partial results by (pair, query head, split): for one head, the splits' rows are adjacent for the merge
        rows = (pair * block_g + g) * splits + s
        if s < active:
            q_rows = q_ptr + b * q_stride + (h * group + g)[:, None] * q_head_stride
            q1 = tl.load(q_rows + dh[None, :], mask=g_ok[:, None], other=0.0)
            q2 = tl.load(q_rows + half + dh[None, :], mask=g_ok[:, None], other=0.0)
            if rotate:  # RotaryEmbedding's rotation: fp32 from the token's cos/sin row, rounded to q's dtype
                cs = cos_sin_ptr + tl.load(positions_ptr + b) * head_dim
                cos, sin = tl.load(cs + dh), tl.load(cs + half + dh)
                x1, x2 = q1.to(tl.float32), q2.to(tl.float32)
                q1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(q_ptr.dtype.element_ty)
                q2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(q_ptr.dtype.element_ty)
            if s == active - 1:  # the split holding the row's last token: the step's k and v into their slot
                slot = (kv_ptr + tl.load(slot_pages_ptr + b).to(tl.int64) * page_stride  # int64: a large cache
                        + tl.load(slot_offsets_ptr + b).to(tl.int64) * slot_stride + h * head_stride)  # fmt: skip
                new_k = k_ptr + b * k_stride + h * k_head_stride
                new_k1, new_k2 = tl.load(new_k + dh).to(tl.float32), tl.load(new_k + half + dh).to(tl.float32)
                new_v = tl.load(v_ptr + b * v_stride + h * v_head_stride + d).to(tl.float32)
                if rotate:  # rounded to k's dtype as RotaryEmbedding rounds
                    r1 = (new_k1 * cos - new_k2 * sin).to(k_ptr.dtype.element_ty).to(tl.float32)
                    r2 = (new_k2 * cos + new_k1 * sin).to(k_ptr.dtype.element_ty).to(tl.float32)
                    new_k1, new_k2 = r1, r2
                if clamp > 0:  # an fp8 cache: to its range, as `stored` does (a float constexpr is no `if` condition)
                    new_k1 = tl.minimum(tl.maximum(new_k1, -clamp), clamp)
                    new_k2 = tl.minimum(tl.maximum(new_k2, -clamp), clamp)
                    new_v = tl.minimum(tl.maximum(new_v, -clamp), clamp)
                tl.store(slot + dh, new_k1.to(kv_ptr.dtype.element_ty))
                tl.store(slot + half + dh, new_k2.to(kv_ptr.dtype.element_ty))
                tl.store(slot + half_stride + d, new_v.to(kv_ptr.dtype.element_ty))
                tl.debug_barrier()  # the loop below reads the slot back, from other threads
            m = tl.full([block_g], float("-inf"), tl.float32)
            denom = tl.zeros([block_g], tl.float32)
            acc = tl.zeros([block_g, head_dim], tl.float32)
            t = tl.arange(0, pages_per_step * page)
            for p in range(p_start, p_end, pages_per_step):
                ordinal = p + t // page  # each token's page among the row's
                ok = ordinal * page + t % page < kv_len  # (a split ends on a loop step's edge, or the row's end)
                page_id = tl.load(indices_ptr + first + ordinal, mask=ok, other=0).to(tl.int64)
                tokens = kv_ptr + page_id * page_stride + (t % page) * slot_stride + h * head_stride
                k1 = tl.load(tokens[:, None] + dh[None, :], mask=ok[:, None], other=0.0).to(q1.dtype)
                k2 = tl.load(tokens[:, None] + half + dh[None, :], mask=ok[:, None], other=0.0).to(q1.dtype)
                scores = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * scale  # [block_g, tokens], fp32
                scores = tl.where(ok[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                weights = tl.exp(scores - m_new[:, None])
                alpha = tl.exp(m - m_new)
                denom = denom * alpha + tl.sum(weights, 1)
                v = tl.load(tokens[:, None] + half_stride + d[None, :], mask=ok[:, None], other=0.0).to(q1.dtype)
                acc = acc * alpha[:, None] + tl.dot(weights.to(q1.dtype), v)
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
