"""Paged attention: the step's page-table metadata, the KV write, and the backends that read it.

KV cache: one tensor `[num_layers, num_pages, 2, page_size, num_kv_heads, head_dim]`; layer l's view
`kv[l]` is FlashInfer's NHD paged layout (`[:, 0]` keys, `[:, 1]` values), in the model's dtype or in float8
e4m3 (`kv_cache_dtype="fp8"`, scale 1: k and v clamped to +-448 and rounded as they are written). The step's
metadata is in FlashInfer's CSR form (qo_indptr, kv_indptr/kv_indices/kv_last_page_len), so both backends plan
from the same tensors. The torch backend runs anywhere and is the reference the FlashInfer backend is tested against.
In the one- and two-row decode graphs the FlashInfer backend also applies RoPE to q and k, in the kernel that writes
k and v (RotaryEmbedding.in_kv_write says when: a backend says whether it can in `rotates_in_kv_write`, and the
torch backend cannot). There that kernel is decode_attention.py's, which also attends, split-KV, in one launch
where FlashInfer's decode takes three with `triton_rope_write_kv` (NANOKYRO_TRITON_DECODE=0: those three).

FlashInfer is imported only when its backend is built (CUDA), so the CPU path never needs it. Its attention is
also a `torch.library` custom op (`nanokyro::flashinfer_attention`), so `torch.compile` keeps a decode forward
whole and the runner can capture it as one CUDA graph per batch-size bucket.
"""
from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanokyro.decode_attention import DecodeAttention
from nanokyro.layers import rope
from nanokyro.quant_formats import FP8, FP8_MAX
from nanokyro.small_batch import MAX_ROWS, pdl_launch, use_pdl


@dataclass
class AttentionMetadata:
    """One step's page tables, for B attention rows (sequences) and T new tokens, int32, in FlashInfer's CSR form.
    The backends plan from the host arrays; the kernels read the device ones."""

    kv_indices: torch.Tensor  # [num_pages_used] on the device: pages of row b are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    slot_pages: torch.Tensor  # [T] on the device: the page each new token's k/v go to
    slot_offsets: torch.Tensor  # [T] on the device: and the offset in that page
    q_lens: list[int]  # [B] new tokens of each row
    kv_lens: list[int]  # [B] tokens in cache after this step's write
    # Host arrays (pinned on CUDA): FlashInfer's plan() reads them without a device sync.
    qo_indptr: torch.Tensor  # [B+1] new tokens of row b are qo_indptr[b]:qo_indptr[b+1]
    kv_indptr: torch.Tensor  # [B+1]
    kv_last_page_len: torch.Tensor  # [B] tokens in each row's last page (1..page_size)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor) -> None:
    """Store the new tokens' k, v [T, Hkv, D] into one layer's paged cache kv [P, 2, page_size, Hkv, D]."""
    k, v = stored(k, kv.dtype), stored(v, kv.dtype)
    kv, k, v = bytes_of(kv), bytes_of(k), bytes_of(v)
    kv[pages, 0, offsets] = k
    kv[pages, 1, offsets] = v


def bytes_of(x: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as its bytes (torch's indexing kernels are not built for fp8 on every device); others as
    they are."""
    return x.view(torch.uint8) if x.dtype == FP8 else x


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """k or v as a cache of `dtype` holds it (fp8: clamped to its range, then rounded)."""
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def triton_write_kv():
    """write_kv as one Triton kernel, for CUDA: one program per token copies its k and v rows into its slot,
    reading them where they are (strided views of the qkv projection). Indexing as in write_kv costs two index
    kernels plus the copies that make k and v contiguous, ~11 µs per layer at batch 1 on an H100 against ~1.2 µs
    (0.3 ms of a llama-3.1-8b decode step; docs/PERFORMANCE.md). Built on first use: Triton needs a GPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(k_ptr, v_ptr, kv_ptr, pages_ptr, offsets_ptr, k_stride, v_stride, page_stride, half_stride,
               slot_stride, row: tl.constexpr, block: tl.constexpr, clamp: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        page = tl.load(pages_ptr + t).to(tl.int64)  # page * page_stride overflows int32 in a large cache
        slot = kv_ptr + page * page_stride + tl.load(offsets_ptr + t).to(tl.int64) * slot_stride
        cols = tl.arange(0, block)
        mask = cols < row
        k = tl.load(k_ptr + t * k_stride + cols, mask=mask)
        v = tl.load(v_ptr + t * v_stride + cols, mask=mask)
        if clamp > 0:  # an fp8 cache: to its range, as `stored` does (a float constexpr is no `if` condition)
            k = tl.minimum(tl.maximum(k.to(tl.float32), -clamp), clamp)
            v = tl.minimum(tl.maximum(v.to(tl.float32), -clamp), clamp)
        tl.store(slot + cols, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(slot + half_stride + cols, v.to(kv_ptr.dtype.element_ty), mask=mask)

    def write(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor) -> None:
        T, Hkv, D = k.shape
        k, v = (x if x.stride(2) == 1 and x.stride(1) == D else x.contiguous() for x in (k, v))  # rows whole
        kernel[(T,)](k, v, kv, pages, offsets, k.stride(0), v.stride(0), kv.stride(0), kv.stride(1), kv.stride(2),
                     row=Hkv * D, block=triton.next_power_of_2(Hkv * D),
                     clamp=FP8_MAX if kv.dtype == FP8 else 0.0)  # fmt: skip

    return write


def rope_write_kv(kv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                  offsets: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """RoPE of q [T, H, D] and k [T, Hkv, D] (layers.rope), then write_kv of the rotated k and v; returns the rotated
    q. What triton_rope_write_kv does in one kernel, op by op."""
    q, k = rope(cos_sin, positions, q, k)
    write_kv(kv, k, v, pages, offsets)
    return q


def triton_rope_write_kv():
    """rope_write_kv as one Triton kernel, for CUDA's one- and two-row decode graphs, where each small kernel's
    launch costs more than its work: RoPE and the KV write there were two kernels per layer, the second reading
    the rotated k back. One program per (token, head): a q head is rotated into the returned q [T, H, D]
    (contiguous, as the attention kernel takes it); a KV head's k is rotated and stored with its v into the token's
    slot. q, k and v are read where they are (strided views of the qkv projection, or the qk-norm's outputs). The
    rotation is RotaryEmbedding's: fp32 from the cos/sin table, rounded to the activations' dtype, then (an fp8
    cache) clamped and rounded as `stored` does. Built on first use: Triton needs a GPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kv_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, kv_ptr, pages_ptr, offsets_ptr, positions_ptr, cos_sin_ptr,
                       q_stride, q_head_stride, k_stride, k_head_stride, v_stride, v_head_stride, page_stride,
                       half_stride, slot_stride, head_stride, num_heads, half_dim: tl.constexpr, block: tl.constexpr,
                       clamp: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        # PDL (small_batch.py): the wait first, as every load below is the step's data (q, k, v; the positions that
        # index cos/sin). No gdc_launch_dependents(): the next kernel is FlashInfer's attention, which FlashInfer
        # launches with PDL itself; started early, it could read q_out and the KV cache before they are written
        # unless its own wait comes before those reads, and where that wait sits is FlashInfer's choice. Without
        # the call it starts as this grid's programs exit, as it does after a kernel launched without PDL.
        if pdl:
            tl.extra.cuda.gdc_wait()
        t, h = tl.program_id(0), tl.program_id(1)
        kv_head = h - num_heads  # >= 0: a KV head
        cols = tl.arange(0, block)
        mask = cols < half_dim
        row = cos_sin_ptr + tl.load(positions_ptr + t) * (2 * half_dim)  # the token's table row: cos, then sin
        cos = tl.load(row + cols, mask=mask)
        sin = tl.load(row + half_dim + cols, mask=mask)
        head = tl.where(kv_head < 0, q_ptr + t * q_stride + h * q_head_stride,
                        k_ptr + t * k_stride + kv_head * k_head_stride)  # fmt: skip
        x1 = tl.load(head + cols, mask=mask).to(tl.float32)
        x2 = tl.load(head + half_dim + cols, mask=mask).to(tl.float32)
        r1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        r2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        if kv_head < 0:  # a query head, into q_out [T, H, D]
            out = q_out_ptr + (t * num_heads + h) * (2 * half_dim)
            tl.store(out + cols, r1, mask=mask)
            tl.store(out + half_dim + cols, r2, mask=mask)
        else:  # the rotated k and v as it is, into the token's slot
            page = tl.load(pages_ptr + t).to(tl.int64)  # page * page_stride overflows int32 in a large cache
            offset = tl.load(offsets_ptr + t).to(tl.int64)
            slot = kv_ptr + page * page_stride + offset * slot_stride + kv_head * head_stride
            v_cols = tl.arange(0, 2 * block)
            v_mask = v_cols < 2 * half_dim
            v = tl.load(v_ptr + t * v_stride + kv_head * v_head_stride + v_cols, mask=v_mask)
            k1, k2 = r1, r2  # (new names: a value defined before a runtime `if` keeps its type in it)
            if clamp > 0:  # an fp8 cache: to its range, as `stored` does (a float constexpr is no `if` condition)
                k1 = tl.minimum(tl.maximum(k1.to(tl.float32), -clamp), clamp)
                k2 = tl.minimum(tl.maximum(k2.to(tl.float32), -clamp), clamp)
                v = tl.minimum(tl.maximum(v.to(tl.float32), -clamp), clamp)
            tl.store(slot + cols, k1.to(kv_ptr.dtype.element_ty), mask=mask)
            tl.store(slot + half_dim + cols, k2.to(kv_ptr.dtype.element_ty), mask=mask)
            tl.store(slot + half_stride + v_cols, v.to(kv_ptr.dtype.element_ty), mask=v_mask)

    def write(kv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
              offsets: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
        (T, H, D), Hkv = q.shape, k.shape[1]
        # The kernel reads a token's cos and sin at cos_sin + position * D. Host checks: in a CUDA graph they run
        # once, at capture.
        assert cos_sin.dim() == 2 and cos_sin.shape[1] == D and cos_sin.is_contiguous(), (cos_sin.shape, D)
        assert cos_sin.dtype == torch.float32 and positions.shape == (T,), (cos_sin.dtype, positions.shape)
        q, k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k, v))  # each head's D values whole
        q_out, pdl = torch.empty(T, H, D, dtype=q.dtype, device=q.device), use_pdl()
        rope_kv_kernel[(T, H + Hkv)](
            q, k, v, q_out, kv, pages, offsets, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), H,
            half_dim=D // 2, block=triton.next_power_of_2(D // 2), clamp=FP8_MAX if kv.dtype == FP8 else 0.0,
            pdl=pdl, num_warps=1, **pdl_launch(pdl),
        )  # fmt: skip
        return q_out

    return write


class TorchAttention:
    """Reference backend: gathers each sequence's pages into a padded batch and runs masked SDPA."""

    rotates_in_kv_write = False  # q and k come rotated (RotaryEmbedding.in_kv_write)

    def __init__(self, kv_cache: torch.Tensor, num_heads: int, head_dim: int):
        self.kv_cache = kv_cache
        self.num_heads, self.scale = num_heads, head_dim**-0.5

    def plan(self, meta: AttentionMetadata) -> None:
        """Build the gather indices and causal mask once per step; every layer reuses them."""
        device = self.kv_cache.device
        page_size = self.kv_cache.shape[3]
        q_lens, kv_lens = meta.q_lens, meta.kv_lens
        num_pages = [(n + page_size - 1) // page_size for n in kv_lens]
        max_q, max_pages = max(q_lens), max(num_pages)
        # page_table[b, j]: j-th page of sequence b (0 where past the end; those keys are masked out)
        table = torch.zeros(len(q_lens), max_pages, dtype=torch.long)
        indices, start = meta.kv_indices.cpu().long(), 0
        for b, n in enumerate(num_pages):
            table[b, :n] = indices[start : start + n]
            start += n
        # Each new token's (sequence, row) in the padded query batch.
        seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
        starts = torch.tensor([0] + q_lens[:-1]).cumsum(0)
        row_of_token = torch.arange(sum(q_lens)) - starts[seq_of_token]
        # Query i of sequence b sits at absolute position kv_len - q_len + i and sees keys 0..that position.
        q_pos = (torch.tensor(kv_lens) - torch.tensor(q_lens))[:, None] + torch.arange(max_q)[None, :]
        key_pos = torch.arange(max_pages * page_size)
        mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, max_kv]; also hides keys >= kv_len
        self.page_table = table.to(device)
        self.seq_of_token, self.row_of_token = seq_of_token.to(device), row_of_token.to(device)
        self.mask = mask[:, None].to(device)  # broadcast over heads
        self.max_q = max_q
        self.slots = meta.slot_pages, meta.slot_offsets

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.kv_cache[layer]
        write_kv(kv, k, v, *self.slots)
        B, H = self.page_table.shape[0], self.num_heads
        Hkv, D = k.shape[1], k.shape[2]
        cache = bytes_of(kv)
        keys = cache[self.page_table, 0].view(kv.dtype).to(q.dtype).reshape(B, -1, Hkv, D).transpose(1, 2)
        values = cache[self.page_table, 1].view(kv.dtype).to(q.dtype).reshape(B, -1, Hkv, D).transpose(1, 2)
        q_pad = q.new_zeros(B, self.max_q, H, D)
        q_pad[self.seq_of_token, self.row_of_token] = q
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys, values, attn_mask=self.mask, scale=self.scale, enable_gqa=H != Hkv
        )  # [B, H, max_q, D]
        return out.transpose(1, 2)[self.seq_of_token, self.row_of_token]


WORKSPACE_BYTES = 256 << 20  # FlashInfer's float scratch for split-KV partial results, shared by all wrappers
FLASHINFER_BACKEND = "fa2"  # compiles in ~25 s per head_dim; "auto" picks fa3 on Hopper (~80 s)
# The one- and two-row decode graphs attend with decode_attention.DecodeAttention; 0: FlashInfer's decode wrapper
TRITON_DECODE = os.environ.get("NANOKYRO_TRITON_DECODE", "1") != "0"

_backends: dict[int, weakref.ref] = {}  # handle -> FlashInferAttention, for the custom op to find its state
_handles = itertools.count()


@torch.library.custom_op("nanokyro::flashinfer_attention", mutates_args=())
def flashinfer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, handle: int,
                         positions: torch.Tensor | None = None, cos_sin: torch.Tensor | None = None
                         ) -> torch.Tensor:  # fmt: skip
    """One layer's attention through a planned FlashInferAttention: writes k, v [T, Hkv, D] into its pages and
    returns [T, H, D]; with `positions` and `cos_sin`, q and k are rotated first (FlashInferAttention.__call__).
    The KV cache and page tables are the backend's state, not arguments, so a compiled graph neither copies the
    cache nor sees it as mutated; CUDA-graph replays read the buffers plan() refilled."""
    return _backends[handle]()(layer, q, k, v, positions, cos_sin)


@flashinfer_attention.register_fake
def _(q, k, v, layer, handle, positions=None, cos_sin=None):
    return torch.empty_like(q)


class FlashInferAttention:
    """FlashInfer paged attention: the decode wrapper for all-decode steps, the prefill wrapper (causal) for
    prefill and mixed steps, and per batch-size bucket a decode wrapper with fixed buffers for CUDA graphs."""

    rotates_in_kv_write = True  # given the positions and cos/sin table, __call__ rotates q and k as it writes k, v

    def __init__(self, kv_cache: torch.Tensor, num_heads: int, head_dim: int, dtype: torch.dtype):
        import flashinfer

        self.flashinfer = flashinfer
        self.kv_cache = kv_cache  # [L, P, 2, page_size, Hkv, D], in the queries' `dtype` or fp8 (scale 1)
        self.dtype = dtype
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads, self.page_size = kv_cache.shape[4], kv_cache.shape[3]
        device = kv_cache.device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=FLASHINFER_BACKEND)
        # Tensor-core decode (meant for GQA) runs the prefill kernels: one JIT module per head_dim for both.
        # Not yet measured against the CUDA-core decode kernel at batch 1 (docs/PERFORMANCE.md).
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=True, backend=FLASHINFER_BACKEND
        )
        # Triton handles fp8 from compute capability 8.9 (Ada, Hopper) up; before that, indexing writes the bytes,
        # and FlashInfer reads them.
        self.fp8_triton = kv_cache.dtype != FP8 or torch.cuda.get_device_capability(device) >= (8, 9)
        self.write_kv = triton_write_kv() if self.fp8_triton else write_kv
        self.rope_write_kv = triton_rope_write_kv() if self.fp8_triton else rope_write_kv
        self.graph_decode: dict[int, object] = {}  # bucket -> wrapper whose buffers a CUDA graph reads
        self.attend, self.slots = None, None  # the planned step's attention: (q, kv) -> out
        self.decode_kernel = None  # or, planned for a one- or two-row graph, DecodeAttention with its tables bound
        self.handle = next(_handles)
        _backends[self.handle] = weakref.ref(self)

    def op(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
           cos_sin: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """This backend as the custom op: what a compiled model calls in place of `self`."""
        return torch.ops.nanokyro.flashinfer_attention(q, k, v, layer, self.handle, positions, cos_sin)

    def enable_graphs(self, buckets: list[int]) -> None:
        """One CUDA-graph decode wrapper per batch-size bucket. Their page-table buffers and the slot buffer are
        shared (one graph runs at a time, and plan() refills them right before it), sized for the largest
        bucket with every sequence spanning the whole cache."""
        device, max_bs = self.kv_cache.device, max(buckets)
        self.graph_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
        self.graph_indices = torch.zeros(max_bs * self.kv_cache.shape[1], dtype=torch.int32, device=device)
        self.graph_last_page_len = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.graph_slots = torch.zeros(2, max_bs, dtype=torch.int32, device=device)  # [pages; offsets]
        self.graph_decode = {
            bs: self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, backend=FLASHINFER_BACKEND,
                paged_kv_indptr_buffer=self.graph_indptr[: bs + 1], paged_kv_indices_buffer=self.graph_indices,
                paged_kv_last_page_len_buffer=self.graph_last_page_len[:bs],
            )
            if bs > MAX_ROWS or not self.triton_decodes()
            else DecodeAttention(bs, self.num_heads, self.num_kv_heads, self.head_dim, device)
            for bs in buckets
        }  # fmt: skip

    def triton_decodes(self) -> bool:
        """Whether the one- and two-row graphs attend with DecodeAttention: switched on, a cache Triton reads, and
        the power-of-two sizes its tiles take (head_dim, the page size)."""
        powers_of_two = all(n & (n - 1) == 0 for n in (self.head_dim, self.page_size))
        return TRITON_DECODE and self.fp8_triton and powers_of_two

    def plan(self, meta: AttentionMetadata, graph_bucket: int | None = None) -> None:
        """Plan the step on the host. With `graph_bucket`, meta is a decode batch padded to that bucket and the
        plan goes into the fixed buffers that the bucket's captured graph reads."""
        kw = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads, page_size=self.page_size,
                  q_data_type=self.dtype, kv_data_type=self.kv_cache.dtype)  # fmt: skip
        pages = (meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len)
        self.decode_kernel = None
        if graph_bucket is not None:
            self.graph_slots[0, :graph_bucket].copy_(meta.slot_pages, non_blocking=True)
            self.graph_slots[1, :graph_bucket].copy_(meta.slot_offsets, non_blocking=True)
            self.slots = self.graph_slots[0, :graph_bucket], self.graph_slots[1, :graph_bucket]
            wrapper = self.graph_decode[graph_bucket]
            if isinstance(wrapper, DecodeAttention):  # no plan: the page tables into the buffers the graph reads
                bound = (*self.slots, *self._graph_tables(meta, graph_bucket))
                self.decode_kernel = lambda q, k, v, kv, *rope: wrapper(q, k, v, kv, *bound, *rope)
            else:
                wrapper.plan(*pages, head_dim=self.head_dim, **kw)
                self.attend = wrapper.run
        elif meta.is_decode:
            self.attend = self.decode.run
            self.decode.plan(*pages, head_dim=self.head_dim, **kw)
            self.slots = meta.slot_pages, meta.slot_offsets
        else:
            self.attend = self.prefill.run
            self.prefill.plan(meta.qo_indptr, *pages, head_dim_qk=self.head_dim, causal=True, **kw)
            self.slots = meta.slot_pages, meta.slot_offsets

    def _graph_tables(self, meta: AttentionMetadata, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's page tables copied into the graphs' buffers (what FlashInfer's plan does for its wrappers)."""
        indptr, last = self.graph_indptr[: bucket + 1], self.graph_last_page_len[:bucket]
        indptr.copy_(meta.kv_indptr, non_blocking=True)
        self.graph_indices[: meta.kv_indices.numel()].copy_(meta.kv_indices, non_blocking=True)
        last.copy_(meta.kv_last_page_len, non_blocking=True)
        return indptr, self.graph_indices, last

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor | None = None, cos_sin: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
        """Write k, v and attend. With `positions` [T] and `cos_sin` (RotaryEmbedding's table), q and k come
        unrotated and are rotated here, as k and v are written (RotaryEmbedding.in_kv_write)."""
        kv = self.kv_cache[layer]
        if self.decode_kernel is not None:  # the rotation and the KV write in the attention's kernel
            return self.decode_kernel(q, k, v, kv, positions, cos_sin)
        if positions is None:
            self.write_kv(kv, k, v, *self.slots)
        else:
            q = self.rope_write_kv(kv, q, k, v, *self.slots, positions, cos_sin)
        return self.attend(q, kv)  # [T, H, D]
