"""One step on the device: build the flat batch and page tables, run the model, sample.

The runner owns the KV cache allocation, the attention backend and, on CUDA, the decode CUDA graphs
(`DecodeGraphs`; `enforce_eager` turns them off). Everything it builds per step is made on the host
and crosses to the device in one copy.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time

import numpy as np
import torch

from nanokyro import small_batch
from nanokyro.attention import AttentionMetadata, FlashInferAttention, TorchAttention
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.model import LlamaModel
from nanokyro.sampler import PendingSample, Sampler, SamplerOutput, SampleRow
from nanokyro.scheduler import ScheduledBatch

log = logging.getLogger("nanokyro.runner")

CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * page_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def num_kv_pages(model_cfg: ModelConfig, cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Pages that fit in `kv_cache_memory`, or on CUDA in what `gpu_memory_utilization` leaves after the weights."""
    budget = cfg.kv_cache_memory
    if budget is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_allocated(device)
        # Keep headroom for the largest step's activations, and for the fp32 logits of its sampled rows (at most
        # one per sequence) with the sampler's few copies of them.
        activations = (cfg.max_num_batched_tokens * (model_cfg.hidden_size * 24 + model_cfg.intermediate_size * 8)
                       + cfg.max_num_seqs * model_cfg.vocab_size * 4 * 8)  # fmt: skip
        budget = int(total * cfg.gpu_memory_utilization) - used_by_others - torch.cuda.memory_allocated(device) - activations
    elif budget is None:
        budget = CPU_DEFAULT_KV_BYTES
    pages = budget // kv_bytes_per_page(model_cfg, cfg.page_size, dtype)
    if pages < 2:
        raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 pages; raise kv_cache_memory")
    return int(pages)


def make_attention_backend(name: str, kv_cache: torch.Tensor, cfg: ModelConfig):
    if name == "auto":
        name = "flashinfer" if kv_cache.device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttention(kv_cache, cfg.num_heads, cfg.head_dim)
    if name == "flashinfer":  # imports flashinfer only now, so the CPU path never needs it
        return FlashInferAttention(kv_cache, cfg.num_heads, cfg.head_dim)
    raise ValueError(f"unknown attention backend {name!r} (auto, torch, flashinfer)")


# A step with prompt tokens replays a decode graph (one row per token) while its rows read at most this many
# cached tokens in all; past that, its single prefill pass is cheaper.
SMALL_STEP_KV_TOKENS = 1 << 16
# Decode batch sizes that get a CUDA graph; a decode step of n sequences pads up to the next one.
GRAPH_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


class ModelRunner:
    def __init__(self, model: LlamaModel, cfg: EngineConfig, num_pages: int):
        self.model, self.cfg = model, cfg
        mc = model.cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.page_size = cfg.page_size
        # One page past the block manager's: padding rows of graph-replayed decodes write and read only it.
        self.scratch_page = num_pages
        self.kv_cache = torch.zeros(
            mc.num_layers, num_pages + 1, 2, cfg.page_size, mc.num_kv_heads, mc.head_dim, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip
        self.attn = make_attention_backend(cfg.attention_backend, self.kv_cache, mc)
        self.sampler = Sampler()
        self._inputs_copied: torch.cuda.Event | None = None  # recorded once the last step's inputs are on the device
        self.graphs = None
        if self.device.type == "cuda" and not cfg.enforce_eager and isinstance(self.attn, FlashInferAttention):
            self.graphs = DecodeGraphs(self, cfg.max_num_seqs)

    def prepare(self, batch: ScheduledBatch, pad_to: int | None = None, token_rows: bool = False):
        """Host-side step inputs -> (input_ids, positions, AttentionMetadata, logits row indices) on the device.

        With `token_rows`, every new token is an attention row of its own, as in a decode: the token at position
        p reads its sequence's pages up to p. The step writes all its k/v before attention reads, so this is the
        same causal attention, in the form the decode graphs run. With `pad_to`, extra one-token rows fill the
        batch up to that size: token 0 at position 0, writing and reading only the scratch page, never sampled.
        """
        ps = self.page_size
        # Plain lists, not numpy per sequence: at 256 decodes a step, per-sequence array calls cost milliseconds.
        ids, pos, slot_pages, slot_offsets, kv_indices = [], [], [], [], []
        q_lens, kv_lens, page_counts, sample_rows = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start, end = seq.num_computed, seq.num_computed + n
            pages = seq.pages
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slot_pages += [pages[p // ps] for p in range(start, end)]
            slot_offsets += [p % ps for p in range(start, end)]
            for kv_len in range(start + 1, end + 1) if token_rows else (end,):
                used = (kv_len + ps - 1) // ps
                kv_indices += pages[:used]
                q_lens.append(kv_len - start if not token_rows else 1), kv_lens.append(kv_len), page_counts.append(used)
            if batch.samples[i]:
                sample_rows.append(len(ids) - 1)
        qo_indptr = [0, *itertools.accumulate(q_lens)]
        pad = (pad_to or len(q_lens)) - len(q_lens)
        if pad:
            ids += [0] * pad
            pos += [0] * pad
            slot_pages += [self.scratch_page] * pad
            slot_offsets += [0] * pad
            kv_indices += [self.scratch_page] * pad
            q_lens += [1] * pad
            kv_lens += [1] * pad
            page_counts += [1] * pad
            qo_indptr += range(qo_indptr[-1] + 1, qo_indptr[-1] + pad + 1)
        parts = [
            ids, pos, slot_pages, slot_offsets, kv_indices, sample_rows, qo_indptr,
            [0, *itertools.accumulate(page_counts)], [(n - 1) % ps + 1 for n in kv_lens],
        ]  # fmt: skip
        # Everything as int32 in one pinned buffer: one async copy to the device, and the host views below
        # (pinned too) give FlashInfer's plan() its CSR arrays without a sync.
        flat_list = itertools.chain.from_iterable(parts)
        host = torch.from_numpy(np.fromiter(flat_list, dtype=np.int32, count=sum(map(len, parts))))
        if self.device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(self.device, non_blocking=True)
        sizes = [len(p) for p in parts]
        input_ids, positions, pages, offsets, kv_idx, rows, *_ = flat.split(sizes)
        *_, qo_host, kv_ptr_host, last_len_host = host.split(sizes)
        meta = AttentionMetadata(
            kv_indices=kv_idx, slot_pages=pages, slot_offsets=offsets, q_lens=q_lens, kv_lens=kv_lens,
            qo_indptr=qo_host, kv_indptr=kv_ptr_host, kv_last_page_len=last_len_host,
        )  # fmt: skip
        return input_ids, positions, meta, rows

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Launch the step's model pass; returns the logits of its sampled rows, on the device. The host waits
        only for the previous step's inputs to have reached the device, not for its kernels.

        A sequence whose last token is still a placeholder (-(row + 1): row `row` of the step in flight, not yet on
        the host) reads that token from `prev_tokens`, that step's sampled tokens on the device."""
        if self._inputs_copied is not None:  # FlashInfer's plan() reuses a pinned buffer the last step copied from
            self._inputs_copied.synchronize()
        bucket = self.graphs.bucket(batch) if self.graphs is not None else None
        input_ids, positions, meta, rows = self.prepare(batch, pad_to=bucket, token_rows=bucket is not None)
        if any(s.token_ids[-1] < 0 for s in batch.seqs):
            lookup = prev_tokens[(-input_ids - 1).clamp_(min=0)].to(input_ids.dtype)
            input_ids = torch.where(input_ids < 0, lookup, input_ids)
        if bucket is not None:
            self.graphs.load(input_ids, positions, meta)
        else:
            self.attn.plan(meta)
        if self.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()
        if bucket is not None:
            return self.graphs.replay(bucket)[rows]  # padding rows are dropped here
        if self.graphs is not None:
            hidden = self.graphs.hidden_states(input_ids, positions)
        else:
            hidden = self.model(input_ids, positions, self.attn)
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> PendingSample:
        """Launch sampling for the batch's sampled rows. A grammar that the previous step's token terminated (its
        sequence ends when that step is finished, and this token is dropped) is left out: it has no next mask."""
        sampled = batch.sampled
        if not sampled:
            return PendingSample.empty(self.device)
        live = lambda m: m is not None and not m.is_terminated()  # noqa: E731
        # Token lists are copied only where a penalty reads them: for every row of every step that costs ms.
        rows = [SampleRow(s.params, *((s.prompt_ids, s.output_ids) if s.params.penalised else ([], [])), s.generator,
                          s.matcher if live(s.matcher) else None) for s in sampled]  # fmt: skip
        return self.sampler.sample(logits, rows)

    def run(self, batch: ScheduledBatch) -> SamplerOutput:
        """One whole step, synchronously: what the engine's pipelined step does, for tests and tools."""
        return self.sample(batch, self.forward(batch)).result()


class DecodeGraphs:
    """Decode steps as CUDA graphs. The transformer is compiled by torch.compile, with the token dimension
    dynamic and FlashInfer attention as a custom op, so it is one graph; with the logits of every row it is
    captured once per batch-size bucket, largest first, all in one memory pool. Steps that replay no graph
    (prefill, mixed) run the same compiled transformer; the one- and two-row buckets have their own, with GEMV
    linear layers and one-kernel norms (small_batch.py). A step copies its inputs into the static buffers, plans
    the bucket's FlashInfer wrapper (its fixed buffers) and replays."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int):
        self.model, self.attn = runner.model, runner.attn
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.attn.enable_graphs(self.buckets)
        # Only the transformer is compiled (dynamic token count): graphs replay it for decodes, and prefill and
        # mixed steps run it without a graph, as fused kernels rather than one launch per op.
        self.hidden = torch.compile(self._hidden, fullgraph=True, dynamic=True)
        max_bs, device = self.buckets[-1], runner.device
        with torch.inference_mode():  # like every step's inputs, so the compiled code's guards match both
            self.input_ids = torch.zeros(max_bs, dtype=torch.int32, device=device)  # [max_bs]
            self.positions = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [bucket, vocab], written by each replay
        start = time.perf_counter()
        self.capture(runner)
        self.startup_s = time.perf_counter() - start  # compiles (and FlashInfer's JIT, if not cached) + captures
        log.info("CUDA graphs: compiled and captured %d buckets (1..%d) in %.1f s", len(self.buckets), max_bs,
                 self.startup_s)  # fmt: skip

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions, self.attn.op)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of every row; what each bucket's graph captures. Buckets of at most small_batch.MAX_ROWS rows run
        linear layers and norms as Triton kernels of their own, through a second compiled transformer
        (torch.compile guards on the switch; small_batch.py)."""
        with small_batch.enable() if input_ids.shape[0] <= small_batch.MAX_ROWS else contextlib.nullcontext():
            return self.model.compute_logits(self.hidden(input_ids, positions))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The compiled transformer for a step that replays no graph (attention already planned)."""
        # Fresh tensors, as in capture (the step's inputs are views into one buffer, at varying offsets), marked
        # unbacked so every token count runs the same compiled code: no recompiles, no 0/1 specialisation.
        input_ids, positions = input_ids.clone(), positions.clone()
        for t in (input_ids, positions):
            torch._dynamo.decorators.mark_unbacked(t, 0)
        return self.hidden(input_ids, positions)

    def bucket(self, batch: ScheduledBatch) -> int | None:
        """The bucket a step replays, or None. Decodes fit as they are; a step with prompt tokens fits as one row
        per token (prepare's token_rows), worth it while those rows re-read little KV: a short cached-prefix
        tail or n > 1 sibling costs a few GB of reads at most, against the host time of a step run op by op."""
        rows = sum(batch.num_new)
        if rows > self.buckets[-1]:
            return None
        reread = sum(n * (s.num_computed + n) for s, n in zip(batch.seqs, batch.num_new) if n > 1)
        if reread > SMALL_STEP_KV_TOKENS:
            return None
        return next(b for b in self.buckets if b >= rows)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Fill the static inputs and the attention plan of the bucket of this padded step; returns the bucket."""
        bs = input_ids.shape[0]
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.attn.plan(meta, graph_bucket=bs)
        return bs

    def replay(self, bucket: int) -> torch.Tensor:
        """Run the loaded step's graph; returns its logits buffer [bucket, vocab], rewritten by the next replay."""
        self.graphs[bucket].replay()
        return self.logits[bucket]

    @torch.inference_mode()
    def capture(self, runner: ModelRunner) -> None:
        pool = None
        for bs in reversed(self.buckets):
            # An all-padding batch: every row reads and writes only the scratch page.
            self.load(*runner.prepare(ScheduledBatch([], []), pad_to=bs)[:3])
            args = (self.input_ids[:bs], self.positions[:bs])
            for t in args:  # one compile for every bucket: no 0/1 specialisation of the batch size
                torch._dynamo.decorators.mark_unbacked(t, 0)
            self.forward(*args)  # compiles on the first bucket (and on the first small one); warms up the rest
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self.forward(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
