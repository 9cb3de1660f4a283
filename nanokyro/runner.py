"""One step on the device: build the flat batch and page tables, run the model, sample.

The runner owns the model (this rank's shard), the KV cache allocation, the attention backend and, on CUDA, the
decode CUDA graphs (`DecodeGraphs`; `enforce_eager` turns them off). A step is first made into a `StepPlan`, a
plain description of it (token ids, positions, page tables, sampled rows) built on the host, which crosses to
the device in one copy. With more than one rank (parallel.py), rank 0's runner sends each plan to the others,
whose runners (`serve`) run the same step on their shards; rank 0 alone samples.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import time
import weakref
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from nanokyro import small_batch
from nanokyro.attention import AttentionMetadata, FlashInferAttention, TorchAttention
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.loader import load
from nanokyro.lora import AdapterSlots, read_adapter
from nanokyro.parallel import Parallel, PendingLogits, Shard, WorkerError, start
from nanokyro.profiling import StepProfiler
from nanokyro.sampler import PendingSample, Sampler, SamplerOutput, SampleRow, argmax
from nanokyro.scheduler import ScheduledBatch

log = logging.getLogger("nanokyro.runner")


class StepTimer:
    """Throwaway instrumentation (branch steptime, not for main): with NANOKYRO_TIME_STEPS=1, a CUDA event and a
    host clock at each milestone of a decode step on this rank's stream; every 100 bucket-1 replays, the mean
    time between consecutive milestones on the GPU and on the host, printed with the rank."""

    def __init__(self) -> None:
        import os

        self.on = os.environ.get("NANOKYRO_TIME_STEPS") == "1"
        self.marks: list[tuple[str, torch.cuda.Event, float]] = []
        self.replays, self.rank = 0, 0

    def mark(self, name: str) -> None:
        if self.on:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event, time.perf_counter()))

    def replayed(self, bucket: int) -> None:
        if not self.on:
            return
        if bucket != 1:
            self.marks.clear()
            return
        self.replays += 1
        if self.replays % 100:
            return
        self.marks[-1][1].synchronize()
        sums: dict[str, list[float]] = {}
        for (a, ea, ha), (b, eb, hb) in zip(self.marks, self.marks[1:]):
            gpu_host = sums.setdefault(f"{a}>{b}", [0.0, 0.0, 0])
            gpu_host[0] += ea.elapsed_time(eb) * 1000
            gpu_host[1] += (hb - ha) * 1e6
            gpu_host[2] += 1
        print(f"[steptime rank {self.rank}] " + " | ".join(
            f"{k}: gpu {g / n:.1f} host {h / n:.1f} us (n {n})" for k, (g, h, n) in sums.items()), flush=True)
        self.marks = self.marks[-1:]


STEP_TIMER = StepTimer()

CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype, shard: Shard = Shard()) -> int:
    """Bytes of one page over the layers of `shard`'s stage and its KV heads (the whole model by default)."""
    layers = len(shard.layers(cfg.num_layers))
    return layers * 2 * page_size * shard.num_kv_heads(cfg) * cfg.head_dim * dtype.itemsize


def num_kv_pages(model_cfg: ModelConfig, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 shard: Shard = Shard(), extra_page_bytes: int = 0) -> int:  # fmt: skip
    """Pages that fit in `kv_cache_memory`, or on CUDA in what `gpu_memory_utilization` leaves after the weights,
    on this rank."""
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
    pages = budget // (kv_bytes_per_page(model_cfg, cfg.page_size, dtype, shard) + extra_page_bytes)
    if pages < 2:
        raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 pages; raise kv_cache_memory")
    return int(pages)


def make_attention_backend(name: str, kv_cache: torch.Tensor, num_heads: int, head_dim: int, dtype: torch.dtype):
    """`dtype`: the queries' (the model's); the cache may hold fp8."""
    if name == "auto":  # FlashInfer's kernels take half precision only
        half = dtype in (torch.float16, torch.bfloat16)
        name = "flashinfer" if kv_cache.device.type == "cuda" and half else "torch"
    if name == "torch":
        return TorchAttention(kv_cache, num_heads, head_dim)
    if name == "flashinfer":  # imports flashinfer only now, so the CPU path never needs it
        return FlashInferAttention(kv_cache, num_heads, head_dim, dtype)
    raise ValueError(f"unknown attention backend {name!r} (auto, torch, flashinfer)")


# A step with prompt tokens replays a decode graph (one row per token) while its rows read at most this many
# cached tokens in all; past that, its single prefill pass is cheaper.
SMALL_STEP_KV_TOKENS = 1 << 16
# Decode batch sizes that get a CUDA graph; a decode step of n sequences pads up to the next one.
GRAPH_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


class _WirePlan(msgspec.Struct, array_like=True):
    data: bytes
    sizes: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    bucket: int | None
    num_prev_tokens: int
    lora_loads: list[tuple[int, str]] = []
    lora_reads: list[str] = []
    lora_drops: list[str] = []


@dataclass
class StepPlan:
    """One step as plain data, the same for every rank: the int32 host buffer of its parts (input ids,
    positions, slot pages, slot offsets, kv page indices, sampled rows, each token's LoRA slot (empty: no
    adapter in the step), qo_indptr, kv_indptr, last page lengths) and their sizes, each attention row's new and
    cached token counts, the CUDA-graph bucket it replays (or None), how many of the previous step's tokens its
    placeholder ids read (0: none), and the adapters to put in LoRA slots first, as (slot, path). With more ranks,
    rank 0's plans also carry the adapters registered (to read and stage) and unregistered since its last plan."""

    host: torch.Tensor
    sizes: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    bucket: int | None = None
    num_prev_tokens: int = 0
    lora_loads: list[tuple[int, str]] = field(default_factory=list)
    lora_reads: list[str] = field(default_factory=list)
    lora_drops: list[str] = field(default_factory=list)

    def split(self, n: int) -> list[StepPlan]:
        """The step as up to n micro-batches of whole attention rows, cut where the tokens divide evenly; each
        is a plan of its own (sampled rows in order), run by a pipeline's stages one after another."""
        rows = len(self.q_lens)
        ids, pos, pages, offsets, kv_idx, sampled, lora, qo, kv_ptr, last_len = self.host.split(self.sizes)
        qo_list = qo.tolist()
        bounds = [0]
        for k in range(1, n):  # cut k: the first row past the last cut that starts at or past k/n of the tokens
            r = next((r for r in range(bounds[-1] + 1, rows) if qo_list[r] * n >= k * qo_list[-1]), rows)
            if r == rows:
                break
            bounds.append(r)
        bounds.append(rows)
        if len(bounds) <= 2:
            return [self]
        plans = []
        for r0, r1 in zip(bounds, bounds[1:]):
            t0, t1, p0, p1 = qo_list[r0], qo_list[r1], int(kv_ptr[r0]), int(kv_ptr[r1])
            mine = sampled[(sampled >= t0) & (sampled < t1)] - t0
            parts = [ids[t0:t1], pos[t0:t1], pages[t0:t1], offsets[t0:t1], kv_idx[p0:p1], mine, lora[t0:t1],
                     qo[r0:r1 + 1] - t0, kv_ptr[r0:r1 + 1] - p0, last_len[r0:r1]]  # fmt: skip
            plans.append(StepPlan(torch.cat(parts), [len(p) for p in parts], self.q_lens[r0:r1], self.kv_lens[r0:r1],
                                  None, self.num_prev_tokens))  # fmt: skip
        return plans

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(_WirePlan(self.host.numpy().tobytes(), self.sizes, self.q_lens, self.kv_lens,
                                                self.bucket, self.num_prev_tokens, self.lora_loads, self.lora_reads,
                                                self.lora_drops))  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        w = msgspec.msgpack.decode(data, type=_WirePlan)
        host = torch.frombuffer(bytearray(w.data), dtype=torch.int32)
        return cls(host, w.sizes, w.q_lens, w.kv_lens, w.bucket, w.num_prev_tokens, [tuple(x) for x in w.lora_loads],
                   w.lora_reads, w.lora_drops)


class ModelRunner:
    """Built with only the engine config on rank 0: it starts the other ranks (if any), loads this rank's shard
    and sizes the KV cache to what every rank can hold. The other ranks build theirs from their `Parallel` and
    `serve`. `close()` stops them."""

    def __init__(self, cfg: EngineConfig, parallel: Parallel | None = None, extra_page_bytes: int = 0,
                 num_pages: int | None = None):  # fmt: skip
        """extra_page_bytes: what one page costs elsewhere (a speculative draft model's KV cache of the same pages),
        counted when sizing this one. num_pages: this many pages, not sized from memory; 0 defers the allocation
        to `allocate_kv` (a draft model is loaded before its target sizes their caches)."""
        self.cfg, self.is_driver = cfg, parallel is None
        self.parallel = par = start(cfg) if parallel is None else parallel
        try:
            self._build(cfg, par, extra_page_bytes, num_pages)
        except BaseException as e:
            failure = par.workers.wait_failure(1.0) if par.workers is not None else None
            par.close(abort=True)
            if failure is not None:  # a worker died while loading: that, not this rank's broken collective
                raise WorkerError(failure) from e
            raise
        if self.is_driver and par.world_size > 1:  # no worker outlives an engine that was never closed
            weakref.finalize(self, close_world, par, self.graphs.graphs if self.graphs is not None else {})

    def _build(self, cfg: EngineConfig, par: Parallel, extra_page_bytes: int, num_pages: int | None) -> None:
        self.model, self.tokenizer, self.model_name = load(cfg, par.shard, par.tp, par.device, self.is_driver)
        self.model_cfg = mc = self.model.cfg
        self.shard = par.shard
        self.device = par.device
        self.dtype = cfg.torch_dtype()
        # LoRA slot buffers before the KV cache is sized: they are weights too.
        self.lora_slots = (AdapterSlots(self.model, cfg.max_loras, cfg.max_lora_rank, self.dtype, self.device)
                           if cfg.max_loras else None)  # fmt: skip
        # path -> lora.StagedAdapter: on rank 0 the core's registry stages each adapter it registers; the other
        # ranks stage theirs on `_lora_reader` when a plan says (a Future until done).
        self.lora_host = {}
        self._lora_told: dict = {}  # rank 0: lora_host as the other ranks last heard of it
        self._lora_reader: concurrent.futures.ThreadPoolExecutor | None = None
        self.page_size = cfg.page_size
        self.kv_dtype = cfg.kv_torch_dtype()
        self.page_bytes = kv_bytes_per_page(mc, cfg.page_size, self.kv_dtype, par.shard)
        if num_pages is None:
            pages = num_kv_pages(mc, cfg, self.device, self.kv_dtype, par.shard, extra_page_bytes)
            num_pages = par.min(pages) if par.world_size > 1 else pages
        if num_pages:
            self.allocate_kv(num_pages)

    def allocate_kv(self, num_pages: int) -> None:
        """The KV cache of `num_pages` pages (and a scratch page), its attention backend, and the decode graphs."""
        cfg, par, mc = self.cfg, self.parallel, self.model_cfg
        self.num_pages = num_pages
        # One page past the block manager's: padding rows of graph-replayed decodes write and read only it.
        self.scratch_page = self.num_pages
        self.kv_cache = torch.zeros(
            len(self.model.layers), self.num_pages + 1, 2, cfg.page_size, par.shard.num_kv_heads(mc), mc.head_dim,
            dtype=self.kv_dtype, device=self.device,
        )  # fmt: skip
        log.info("KV cache: %d pages of %d tokens in %s, %.2f GB", num_pages, cfg.page_size,
                 str(self.kv_dtype).removeprefix("torch."), self.kv_cache.nbytes / 1e9)  # fmt: skip
        self.attn = make_attention_backend(cfg.attention_backend, self.kv_cache, par.shard.num_heads(mc), mc.head_dim,
                                           self.dtype)  # fmt: skip
        self.sampler = Sampler()
        self._inputs_copied: torch.cuda.Event | None = None  # recorded once the last step's inputs are on the device
        self.graphs = None
        if self.device.type == "cuda" and not cfg.enforce_eager and isinstance(self.attn, FlashInferAttention):
            self.graphs = DecodeGraphs(self, cfg.max_num_seqs)
        if self.device.type == "cuda":
            self.warm_up()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the Triton kernels that steps run outside the model (the few rows' argmax in the model's dtype
        and in fp32, the placeholders' fill) now, not in the first requests' steps."""
        if self.is_driver:
            logits = torch.zeros(1, self.model_cfg.vocab_size, dtype=self.dtype, device=self.device)
            argmax(logits), argmax(logits.float())
        if self.shard.first_stage:
            ids = torch.tensor([-1], dtype=torch.int32, device=self.device)
            fill_placeholders(ids, torch.zeros(1, dtype=torch.long, device=self.device))

    def close(self) -> None:
        """Stop the other ranks' processes (rank 0); a no-op with one rank, and when already closed."""
        if self.parallel.world_size > 1:
            self.release_graphs()
        if self.is_driver:
            self.parallel.close()

    def release_graphs(self) -> None:
        """Drop the decode graphs: before the process groups go (`reset_graphs`)."""
        if self.graphs is not None:
            reset_graphs(self.graphs.graphs)
            self.graphs = None

    def plan(self, batch: ScheduledBatch, pad_to: int | None = None, token_rows: bool = False) -> StepPlan:
        """The step's plain description, built on the host from the scheduled sequences.

        With `token_rows`, every new token is an attention row of its own, as in a decode: the token at position
        p reads its sequence's pages up to p. The step writes all its k/v before attention reads, so this is the
        same causal attention, in the form the decode graphs run. With `pad_to`, extra one-token rows fill the
        batch up to that size: token 0 at position 0, writing and reading only the scratch page, never sampled.
        """
        ps = self.page_size
        # Plain lists, not numpy per sequence: at 256 decodes a step, per-sequence array calls cost milliseconds.
        ids, pos, slot_pages, slot_offsets, kv_indices, lora = [], [], [], [], [], []
        # (A speculative draft model holds no adapter slots: it drafts for every sequence with its base weights.)
        with_lora = self.lora_slots is not None and any(s.lora is not None for s in batch.seqs)
        q_lens, kv_lens, page_counts, sample_rows = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start, end = seq.num_computed, seq.num_computed + n
            pages = seq.pages
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slot_pages += [pages[p // ps] for p in range(start, end)]
            slot_offsets += [p % ps for p in range(start, end)]
            if with_lora:
                lora += [seq.lora.slot if seq.lora is not None else -1] * n
            for kv_len in range(start + 1, end + 1) if token_rows else (end,):
                used = (kv_len + ps - 1) // ps
                kv_indices += pages[:used]
                q_lens.append(kv_len - start if not token_rows else 1), kv_lens.append(kv_len), page_counts.append(used)
            if batch.samples[i]:  # the last token's row; with drafts, theirs and the one before them too
                sample_rows += range(len(ids) - 1 - (batch.num_drafts[i] if batch.num_drafts else 0), len(ids))
        qo_indptr = [0, *itertools.accumulate(q_lens)]
        pad = (pad_to or len(q_lens)) - len(q_lens)
        if pad:
            ids += [0] * pad
            pos += [0] * pad
            slot_pages += [self.scratch_page] * pad
            slot_offsets += [0] * pad
            kv_indices += [self.scratch_page] * pad
            q_lens += [1] * pad
            lora += [-1] * pad if with_lora else []
            kv_lens += [1] * pad
            page_counts += [1] * pad
            qo_indptr += range(qo_indptr[-1] + 1, qo_indptr[-1] + pad + 1)
        parts = [
            ids, pos, slot_pages, slot_offsets, kv_indices, sample_rows, lora, qo_indptr,
            [0, *itertools.accumulate(page_counts)], [(n - 1) % ps + 1 for n in kv_lens],
        ]  # fmt: skip
        # Everything as int32 in one buffer (pinned on CUDA): one async copy to the device, and its host views
        # give FlashInfer's plan() its CSR arrays without a sync.
        flat_list = itertools.chain.from_iterable(parts)
        host = torch.from_numpy(np.fromiter(flat_list, dtype=np.int32, count=sum(map(len, parts))))
        return StepPlan(host, [len(p) for p in parts], q_lens, kv_lens, pad_to if token_rows else None)

    def load(self, plan: StepPlan):
        """A plan's tensors on the device -> (input_ids, positions, AttentionMetadata, logits row indices)."""
        return self._load(plan)[:4]

    def _load(self, plan: StepPlan):
        """load's tensors, and each token's LoRA slot [T] (None: no adapter in the step)."""
        host = plan.host
        if self.device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(self.device, non_blocking=True)
        sizes = plan.sizes
        input_ids, positions, pages, offsets, kv_idx, rows, lora, *_ = flat.split(sizes)
        *_, qo_host, kv_ptr_host, last_len_host = host.split(sizes)
        meta = AttentionMetadata(
            kv_indices=kv_idx, slot_pages=pages, slot_offsets=offsets, q_lens=plan.q_lens, kv_lens=plan.kv_lens,
            qo_indptr=qo_host, kv_indptr=kv_ptr_host, kv_last_page_len=last_len_host,
        )  # fmt: skip
        return input_ids, positions, meta, rows, lora if len(lora) else None

    def prepare(self, batch: ScheduledBatch, pad_to: int | None = None, token_rows: bool = False):
        """Host-side step inputs -> (input_ids, positions, AttentionMetadata, logits row indices) on the device."""
        return self.load(self.plan(batch, pad_to, token_rows))

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None,
                lora_loads: list[tuple[int, str]] = (), wait: bool = True) -> torch.Tensor | PendingLogits:  # fmt: skip
        """Launch the step's model pass; returns the logits of its sampled rows, on the device (plan_step, then
        launch)."""
        plan = self.plan_step(batch, lora_loads, len(prev_tokens) if prev_tokens is not None else 0)
        return self.launch(plan, prev_tokens, wait)

    def plan_step(self, batch: ScheduledBatch, lora_loads: list[tuple[int, str]] = (),
                  num_prev_tokens: int = 0) -> StepPlan:  # fmt: skip
        """forward's host half: the step's plan, padded to its decode graph's bucket if it replays one.
        `lora_loads`: (slot, adapter path) to fill before the step, on every rank. `num_prev_tokens`: how many
        tokens the step in flight samples, which this step's placeholders read (launch's `prev_tokens`)."""
        bucket = self.graphs.bucket(batch) if self.graphs is not None else None
        plan = self.plan(batch, pad_to=bucket, token_rows=bucket is not None)
        plan.lora_loads = list(lora_loads)
        if any(s.token_ids[-1] < 0 for s in batch.seqs):
            plan.num_prev_tokens = num_prev_tokens
        return plan

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev_tokens: torch.Tensor | None = None,
               wait: bool = True) -> torch.Tensor | PendingLogits:  # fmt: skip
        """Launch a planned step. The host waits only for the previous step's inputs to have reached the device,
        not for its kernels. In a pipeline, without `wait`, rank 0 returns once its stage is launched: the logits
        are a PendingLogits (or None when the step samples no row), received from the last stage when waited for.

        A sequence whose last token is still a placeholder (-(row + 1): row `row` of the step in flight, not yet on
        the host) reads that token from `prev_tokens`, that step's sampled tokens on the device. With more ranks,
        the plan goes to the others first (and the previous tokens to those that embed); a rank that died makes
        this raise parallel.WorkerError."""
        if self.parallel.world_size == 1:
            return self._execute(plan, prev_tokens)
        if self.lora_slots is not None:  # here, not when planned: a plan may be dropped (a step failing first)
            plan.lora_reads, plan.lora_drops = self._lora_changes()
        with self.parallel.guard():
            self.parallel.send_plan(plan.encode())
            if plan.num_prev_tokens:
                self.parallel.broadcast_tokens(prev_tokens)
            logits = self._execute(plan, prev_tokens)
        return logits.wait() if wait and isinstance(logits, PendingLogits) else logits

    def _execute(self, plan: StepPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor | PendingLogits | None:
        """Every rank's part of a step: the logits of its sampled rows on rank 0 (on their way there from the last
        stage in a pipeline; and on every rank of the last stage), None on the ranks of earlier stages."""
        self._load_loras(plan)
        if self.shard.pp_size > 1:
            return self._stage(plan, prev_tokens)
        input_ids, positions, rows, lora = self._prepare(plan, prev_tokens)
        bucket = plan.bucket
        if bucket is not None:
            STEP_TIMER.mark("graph")
            out = self.graphs.replay(bucket)[rows]  # padding rows are dropped here
            STEP_TIMER.mark("after")
            STEP_TIMER.replayed(bucket)
            return out
        if self.graphs is not None:
            hidden = self.graphs.hidden_states(input_ids, positions, lora)
        else:
            hidden = self.model(input_ids, positions, self.attn, lora=lora)
        return self.model.compute_logits(hidden[rows])

    def _prepare(self, plan: StepPlan, prev_tokens: torch.Tensor | None):
        """The plan's tensors on the device, placeholder ids replaced by the previous step's tokens, and its
        attention planned (into its bucket's graph buffers if it replays one) -> (input_ids, positions, logits row
        indices, each token's LoRA slot)."""
        STEP_TIMER.mark("prep")
        if self._inputs_copied is not None:  # FlashInfer's plan() reuses a pinned buffer the last step copied from
            self._inputs_copied.synchronize()
        input_ids, positions, meta, rows, lora = self._load(plan)
        if plan.num_prev_tokens and self.shard.first_stage:
            input_ids = fill_placeholders(input_ids, prev_tokens)
        if plan.bucket is not None:
            self.graphs.load(input_ids, positions, meta, lora)
        else:
            self.attn.plan(meta)
        self._record_inputs_copied()
        return input_ids, positions, rows, lora

    def _load_loras(self, plan: StepPlan) -> None:
        """Fill LoRA slots with staged adapters before the step that first uses them (AdapterSlots.before_step
        says why that is safe beside the step in flight). The other ranks first start staging the adapters
        registered since the last plan, and forget the unregistered."""
        if self.lora_slots is None:
            return
        if not self.is_driver and (plan.lora_reads or plan.lora_drops):
            for path in plan.lora_drops:
                self.lora_host.pop(path, None)
            if plan.lora_reads and self._lora_reader is None:
                self._lora_reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nanokyro-lora")
            for path in plan.lora_reads:
                self.lora_host[path] = self._lora_reader.submit(self._read_lora, path)
        loads = [(slot, self._staged_lora(path)) for slot, path in plan.lora_loads]
        used = []
        if self.device.type == "cuda" and plan.sizes[6]:  # each token's slot
            used = [s for s in torch.unique(plan.host.split(plan.sizes)[6]).tolist() if s >= 0]
        self.lora_slots.before_step(loads, used)

    def _read_lora(self, path: str):
        return self.lora_slots.stage(read_adapter(path, self.model_cfg, self.lora_slots.max_rank))

    def _staged_lora(self, path: str):
        """The staged adapter at `path`: waits for its reading if it is not done (a load in the plan right after
        the registration), reads it now if this rank never heard of it."""
        staged = self.lora_host.get(path)
        if isinstance(staged, concurrent.futures.Future):
            staged = self.lora_host[path] = staged.result()
        return staged if staged is not None else self._read_lora(path)

    def _lora_changes(self) -> tuple[list[str], list[str]]:
        """Rank 0: the adapter paths registered and unregistered since the last plan sent (a path registered
        again is both: its files are read again)."""
        host, told = self.lora_host, self._lora_told
        if len(host) == len(told) and all(host.get(p) is s for p, s in told.items()):
            return [], []
        drops = [p for p, s in told.items() if host.get(p) is not s]
        reads = [p for p, s in host.items() if told.get(p) is not s]
        self._lora_told = dict(host)
        return reads, drops

    def _record_inputs_copied(self) -> None:
        if self.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()

    def _stage(self, plan: StepPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor | PendingLogits | None:
        """A pipeline stage's part of a step, as up to pp_size micro-batches in flight: for each, the hidden states
        and residual from the stage before (unless the first), this stage's layers, and on to the next, so stage
        s runs micro-batch i while stage s + 1 runs micro-batch i - 1. The last stage sends all the sampled rows'
        logits to rank 0 at the end, in one message: one per micro-batch would wait on rank 0, still sending.
        Rank 0 returns with those logits pending (parallel.recv_logits), free to launch the next step (core.py)."""
        par, mc = self.parallel, self.model_cfg
        logits = []
        # Only steps with prompt tokens are cut: a decode-only step is bound by reading the weights, which each
        # micro-batch would read again. (Not yet measured on GPUs.)
        prefill = any(n > 1 for n in plan.q_lens)
        graphs = self.graphs
        for mb in plan.split(self.shard.pp_size) if prefill else [plan]:
            input_ids, positions, rows, lora = self._prepare(mb, prev_tokens)
            bucket = mb.bucket  # a decode graph to replay: received in, and sent from, its static buffers
            before = None  # [2, T, hidden]: the stage before's hidden states and residual
            if not self.shard.first_stage:
                into = graphs.received(bucket) if bucket is not None else None
                before = par.recv_hidden(len(input_ids), mc.hidden_size, self.dtype, into)
            if bucket is not None:
                out = graphs.replay(bucket)  # every row's logits, or its [2, bucket, hidden] for the next stage
                if self.shard.last_stage:
                    logits.append(out[rows])
                else:
                    par.send_hidden(out)
                continue
            if graphs is not None:
                out = graphs.hidden_states(input_ids, positions, lora, before)
            else:
                out = self.model(input_ids, positions, self.attn, before, lora)
            if self.shard.last_stage:
                logits.append(self.model.compute_logits(out[rows]))
            else:
                par.send_hidden(*out)
        num_sampled = plan.sizes[5]
        if not self.shard.last_stage:
            return par.recv_logits(num_sampled, mc.vocab_size, self.dtype) if par.rank == 0 and num_sampled else None
        logits = torch.cat(logits)
        if par.sends_logits and num_sampled:
            par.send_logits(logits)
        return logits

    def serve(self) -> None:
        """A rank other than 0: run each step rank 0 plans, until it sends the stop. Each plan run is a step of
        this rank's profile (profiling.py), written at the stop if its window is still open (a spawned worker
        runs no atexit handlers)."""
        par = self.parallel
        profiler = StepProfiler(self.cfg, par.rank)
        while (data := par.recv_plan()) is not None:
            with profiler.step(), torch.inference_mode():
                STEP_TIMER.rank = par.rank
                STEP_TIMER.mark("plan")
                plan = StepPlan.decode(data)
                prev_tokens = None
                if plan.num_prev_tokens and self.shard.first_stage:
                    prev_tokens = torch.empty(plan.num_prev_tokens, dtype=torch.long, device=self.device)
                    par.broadcast_tokens(prev_tokens)
                self._execute(plan, prev_tokens)
        profiler.close()

    def sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> PendingSample:
        """Launch sampling for the batch's sampled rows."""
        return self.draw(logits, self.sample_rows(batch))

    def sample_rows(self, batch: ScheduledBatch) -> list[SampleRow]:
        """What the sampler needs of each sampled row, read now (before the step's placeholders are appended). A
        grammar that the previous step's token terminated (its sequence ends when that step is finished, and this
        token is dropped) is left out: it has no next mask."""
        live = lambda m: m is not None and not m.is_terminated()  # noqa: E731
        # Token lists are copied only where a penalty reads them: for every row of every step that costs ms.
        return [SampleRow(s.params, *((s.prompt_ids, s.output_ids) if s.params.penalised else ([], [])), s.generator,
                          s.matcher if live(s.matcher) else None) for s in batch.sampled]  # fmt: skip

    @torch.inference_mode()
    def draw(self, logits: torch.Tensor | None, rows: list[SampleRow]) -> PendingSample:
        """Launch sampling of `rows` from their logits."""
        sample = self.sampler.sample(logits, rows) if rows else PendingSample.empty(self.device)
        STEP_TIMER.mark("sampled")
        return sample

    def run(self, batch: ScheduledBatch) -> SamplerOutput:
        """One whole step, synchronously: what the engine's pipelined step does, for tests and tools."""
        return self.sample(batch, self.forward(batch)).result()


def fill_placeholders(input_ids: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """input_ids with each placeholder -(row + 1) replaced by prev_tokens[row], the step in flight's token of that
    row. On CUDA one Triton kernel: torch's lookup and select are seven, on the path from one step's sampled tokens
    to the next step's start."""
    if not input_ids.is_cuda:
        lookup = prev_tokens[(-input_ids - 1).clamp(min=0)].to(input_ids.dtype)
        return torch.where(input_ids < 0, lookup, input_ids)
    import triton

    out, n, prev_tokens = torch.empty_like(input_ids), input_ids.numel(), prev_tokens.contiguous()
    _fill_placeholders_kernel()[(triton.cdiv(n, 1024),)](input_ids, prev_tokens, out, n, len(prev_tokens), block=1024)
    return out


@functools.cache
def _fill_placeholders_kernel():
    """fill_placeholders' kernel: one variant for every step (its sizes not specialised on), so that it compiles
    once, at start-up (ModelRunner.warm_up)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n", "rows"])
    def fill_placeholders_kernel(ids_ptr, prev_ptr, out_ptr, n, rows, block: tl.constexpr):
        i = tl.program_id(0) * block + tl.arange(0, block)
        ok = i < n
        ids = tl.load(ids_ptr + i, mask=ok, other=0)
        row = -ids - 1
        prev = tl.load(prev_ptr + row, mask=ok & (ids < 0) & (row < rows), other=0)  # (a row past them: id 0)
        tl.store(out_ptr + i, tl.where(ids < 0, prev.to(ids.dtype), ids), mask=ok)

    return fill_placeholders_kernel


def reset_graphs(graphs: dict[int, torch.cuda.CUDAGraph]) -> None:
    """Drop captured graphs. Before the process groups go: a graph that captured an NCCL collective keeps its
    communicator from going, and destroying or aborting it then waits for ever (pytorch/pytorch#115388)."""
    for graph in graphs.values():
        graph.reset()
    graphs.clear()


def close_world(par: Parallel, graphs: dict[int, torch.cuda.CUDAGraph]) -> None:
    """Rank 0's close of a runner collected unclosed, or left to the process's exit: its decode graphs (the
    runner's dict, filled at capture), then the world. Closing the world alone left the graphs alive, and on two
    H200s each unclosed TP=2 bench run's NCCL abort then outlasted its timeout, and the exit aborted (rc 134)."""
    reset_graphs(graphs)
    par.close()


class DecodeGraphs:
    """Decode steps as CUDA graphs. The transformer is compiled by torch.compile, with the token dimension
    dynamic and FlashInfer attention as a custom op, so it is one graph; with the logits of every row it is
    captured once per batch-size bucket, largest first, all in one memory pool. Steps that replay no graph
    (prefill, mixed) run the same compiled transformer; the one- and two-row buckets have their own, with GEMV
    linear layers and one-kernel norms (small_batch.py). A step copies its inputs into the static buffers, plans
    the bucket's FlashInfer wrapper (its fixed buffers) and replays.

    A pipeline stage's graphs run its layers: a stage after the first reads the hidden states and residual that
    the stage before sends, received into a static buffer (`received`), in place of embedding the input ids; a
    stage before the last outputs its own, stacked [2, bucket, hidden], the buffer sent to the next stage (the
    send is waited for on the stream before the next replay rewrites it). The sends and receives stay outside
    the graphs."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int):
        self.model, self.attn = runner.model, runner.attn
        self.first_stage, self.last_stage = runner.shard.first_stage, runner.shard.last_stage
        self.with_lora = runner.lora_slots is not None  # then every graph takes each row's adapter slot
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.attn.enable_graphs(self.buckets)
        # Only the transformer is compiled (dynamic token count): graphs replay it for decodes, and prefill and
        # mixed steps run it without a graph, as fused kernels rather than one launch per op.
        self.hidden = torch.compile(self._hidden, fullgraph=True, dynamic=True)
        max_bs, device = self.buckets[-1], runner.device
        with torch.inference_mode():  # like every step's inputs, so the compiled code's guards match both
            self.input_ids = torch.zeros(max_bs, dtype=torch.int32, device=device)  # [max_bs]
            self.positions = torch.zeros(max_bs, dtype=torch.int32, device=device)
            self.lora = torch.full((max_bs,), -1, dtype=torch.int32, device=device) if self.with_lora else None
            # A stage after the first: what the stage before sends, [2, bucket, hidden] at the start (received()).
            hidden = runner.model_cfg.hidden_size
            self._received = (None if self.first_stage else
                              torch.zeros(2 * max_bs * hidden, dtype=runner.dtype, device=device))  # fmt: skip
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # bucket -> [bucket, vocab] (a stage before the last: [2, bucket, hidden]), written by each replay
        self.logits: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        self.capture(runner)
        self.startup_s = time.perf_counter() - start  # compiles (and FlashInfer's JIT, if not cached) + captures
        log.info("CUDA graphs: compiled and captured %d buckets (1..%d) in %.1f s", len(self.buckets), max_bs,
                 self.startup_s)  # fmt: skip

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, lora: torch.Tensor | None = None,
                received: torch.Tensor | None = None):  # fmt: skip
        """The stage's layers: final hidden states [T, hidden] on the last stage, else (hidden, residual)."""
        before = (received[0], received[1]) if received is not None else None
        return self.model(input_ids, positions, self.attn.op, before, lora)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lora: torch.Tensor | None = None,
                received: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits of every row (a stage before the last: its hidden states and residual, [2, T, hidden]); what
        each bucket's graph captures. Buckets of at most small_batch.MAX_ROWS rows run linear layers and norms as
        Triton kernels of their own, through a second compiled transformer (torch.compile guards on the switch;
        small_batch.py)."""
        with small_batch.enable() if input_ids.shape[0] <= small_batch.MAX_ROWS else contextlib.nullcontext():
            out = self.hidden(input_ids, positions, lora, received)
            return self.model.compute_logits(out) if self.last_stage else torch.stack(out)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, lora: torch.Tensor | None = None,
                      received: torch.Tensor | None = None):  # fmt: skip
        """The compiled transformer for a step that replays no graph (attention already planned); `received`: a
        later stage's input [2, T, hidden]."""
        # Fresh tensors, as in capture (the step's inputs are views into one buffer, at varying offsets), marked
        # unbacked so every token count runs the same compiled code: no recompiles, no 0/1 specialisation.
        input_ids, positions = input_ids.clone(), positions.clone()
        lora = lora.clone() if lora is not None else None
        self._mark_unbacked(input_ids, positions, lora, received)
        return self.hidden(input_ids, positions, lora, received)

    @staticmethod
    def _mark_unbacked(input_ids: torch.Tensor, positions: torch.Tensor, lora: torch.Tensor | None,
                       received: torch.Tensor | None) -> None:  # fmt: skip
        """Mark the token dimension of the transformer's inputs unbacked: one compile for every token count, no
        0/1 specialisation."""
        for t in (input_ids, positions, lora):
            if t is not None:
                torch._dynamo.decorators.mark_unbacked(t, 0)
        if received is not None:  # [2, T, hidden]
            torch._dynamo.decorators.mark_unbacked(received, 1)

    def received(self, bucket: int) -> torch.Tensor:
        """A later stage's static input of `bucket` rows, [2, bucket, hidden]: the receive writes it, the graph
        reads it. A view from the buffer's start, so every bucket's input has the same layout as a fresh tensor."""
        return self._received[: self._received.numel() // self.buckets[-1] * bucket].view(2, bucket, -1)

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

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             lora: torch.Tensor | None = None) -> int:  # fmt: skip
        """Fill the static inputs and the attention plan of the bucket of this padded step; returns the bucket."""
        bs = input_ids.shape[0]
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        if self.with_lora:
            self.lora[:bs].copy_(lora) if lora is not None else self.lora[:bs].fill_(-1)
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
            args = (self.input_ids[:bs], self.positions[:bs], self.lora[:bs] if self.with_lora else None,
                    self.received(bs) if not self.first_stage else None)  # fmt: skip
            self._mark_unbacked(*args)  # one compile for every bucket
            self.forward(*args)  # compiles on the first bucket (and on the first small one); warms up the rest
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self.forward(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
