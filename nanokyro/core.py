"""The engine core: the model, pages and queues, and the step loop, pipelined with the device. Token ids in, token
ids out: text (detokenisation, stop strings) is the caller's, in output.py.

A step is pipelined with the device: schedule step n and launch it (model and sampling), then, while the GPU
runs it, bring step n-1's tokens to the host, check their stops and report them. Step n's tokens stay on the
device, where step n+1 reads them as input ids; on the host they are placeholders until then. A sequence that
stops at step n-1 was already scheduled in step n: that extra token is dropped. Rows whose sampling reads the
host's view of earlier tokens (grammars, penalties) wait for step n-1 before sampling, and a small step's first
tokens are read before the next launch (time to first token at low load). With pipeline parallelism the steps
in flight are instead one per stage, over disjoint sequences (`_pipelined_step`).

`EngineCore` runs in the offline `LLM`'s process, and in a process of its own for the server (core_process.py).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import traceback
import weakref
from dataclasses import dataclass, field

import torch

from nanokyro.block_manager import BlockManager
from nanokyro.config import EngineConfig
from nanokyro.grammar import GrammarCompiler, accept_tokens, forced_text
from nanokyro.radix_cache import RadixCache
from nanokyro.request import (
    EngineStats, Failure, Limits, PromptError, Ready, SamplingParams, SeqOutput, TokenLogprob, UnknownAdapter,
)  # fmt: skip
from nanokyro.loader import read_config
from nanokyro.lora import AdapterError, LoRARegistry
from nanokyro.parallel import PendingLogits
from nanokyro.profiling import StepProfiler
from nanokyro.quant_formats import quant_config
from nanokyro.runner import ModelRunner, StepPlan
from nanokyro.sampler import PendingSample, SampleRow, SamplerOutput, make_generator
from nanokyro.scheduler import ScheduledBatch, Scheduler, Sequence, Status
from nanokyro.spec_decode import DraftModelProposer, Drafts, NgramProposer, grammar_drafts, shrink_lm_head, verify

log = logging.getLogger("nanokyro")

SPEC_MAX_BACKOFF = 16  # tokens a sequence whose drafts keep failing decodes plainly before it speculates again
EAGER_FIRST_TOKEN_SEQS = 4  # a launched step of at most this many sequences has its first tokens read at once


@dataclass
class _Step:
    """A launched step: its sampled sequences, where each one's placeholder sits, and the tokens on their way;
    once received on the host, the tokens, which rows are still live, and whether each grammar took its token.
    A pipeline's step is sampled only when it is finished: until then `sample` is None, and `logits` and `rows`
    are what it samples from."""

    seqs: list[Sequence]
    positions: list[int]
    sample: PendingSample | None
    out: SamplerOutput | None = None
    live: list[int] = field(default_factory=list)
    accepted: dict[int, bool] = field(default_factory=dict)
    logits: PendingLogits | torch.Tensor | None = None
    rows: list[SampleRow] = field(default_factory=list)


@dataclass
class _Scheduled:
    """A pipeline's step, scheduled and (unless its sampling waits for the step before's tokens on the host)
    planned, not launched yet."""

    batch: ScheduledBatch
    loads: list[tuple[int, str]]
    rows: list[SampleRow] = field(default_factory=list)
    plan: StepPlan | None = None


class AdapterInUse(RuntimeError):
    """Unloading an adapter that unfinished requests use (the server answers 409; they are left alone)."""


class EngineCore:
    """Owns the model, pages and queues; `step()` advances every scheduled sequence by one step."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        if cfg.max_num_batched_tokens < cfg.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({cfg.max_num_seqs}), or some running sequences would get no token each step")  # fmt: skip
        # Loads the model (with tensor/pipeline parallelism: starts the other ranks) and sizes the KV cache; a
        # speculative draft model first, so that the target's sizing counts the draft's weights and its KV pages.
        self.spec_method = cfg.spec_method()
        cfg.kv_torch_dtype()  # a bad kv_cache_dtype is refused before any weights load
        if cfg.quantize_lm_head:  # and an LM head in FP8 without FP8 layers (the checkpoint's config says)
            quant_config(read_config(cfg).quantization_config, cfg.quantization, lm_head=True)
        self.profiler = StepProfiler(cfg, rank=0)  # and bad profile_steps
        draft = self._load_draft(cfg) if self.spec_method == "draft" else None
        self.runner = ModelRunner(cfg, extra_page_bytes=draft.page_bytes if draft is not None else 0)
        self.proposer = None
        if draft is not None:
            if draft.model_cfg.vocab_size != self.runner.model_cfg.vocab_size:
                raise ValueError(f"the speculative model's vocabulary ({draft.model_cfg.vocab_size} tokens) is not "
                                 f"the model's ({self.runner.model_cfg.vocab_size}): it needs the same tokenizer")
            if cfg.speculative_draft_vocab is not None:  # before the graphs capture the head
                shrink_lm_head(draft.model, cfg.speculative_draft_vocab, cfg.speculative_draft_quantization)
            draft.allocate_kv(self.runner.num_pages)
            self.proposer = DraftModelProposer(draft)
        elif self.spec_method == "ngram":
            self.proposer = NgramProposer()
        self.spec_verify_steps = self.spec_draft_tokens = self.spec_accepted_tokens = 0
        self.spec_forced_tokens = self.spec_forced_accepted_tokens = 0  # drafts a grammar forced, and accepted
        self.tokenizer = self.runner.tokenizer
        self.model_name = cfg.served_model_name or self.runner.model_name
        mc = self.runner.model_cfg
        self.num_pages = self.runner.num_pages
        # A sequence longer than the whole cache could never be resumed after preempting itself. A draft's
        # positions are bounded by its own RoPE table, which may be shorter than the model's.
        positions = mc.max_position_embeddings
        if draft is not None:
            positions = min(positions, draft.model_cfg.max_position_embeddings)
        max_model_len = min(cfg.max_model_len or positions, positions)
        self.max_model_len = min(max_model_len, self.num_pages * cfg.page_size)
        self.vocab_size = mc.vocab_size
        self.limits = Limits(self.max_model_len, mc.vocab_size, self.num_pages, cfg.page_size)
        self.blocks = BlockManager(self.num_pages, cfg.page_size)
        self.cache = RadixCache(self.blocks) if cfg.enable_prefix_caching else None
        self.loras = None
        if cfg.max_loras:
            self.loras = LoRARegistry(cfg.max_loras, cfg.max_lora_rank, mc, host=self.runner.lora_host,
                                      stage=self.runner.lora_slots.stage)
            for name, path in cfg.lora_modules.items():
                self.loras.register(name, path)
        elif cfg.lora_modules:
            raise ValueError("lora_modules needs max_loras >= 1 (adapters resident on the device at once)")
        self.lora_requests: dict[str, int] = {}  # adapter name -> requests, since start
        # Pipeline parallelism: up to pp_size launched steps over disjoint sequences, oldest first (_pipelined_step);
        # without overlap, one step at a time, each finished before the next is launched.
        self.pipeline_depth = cfg.pipeline_parallel_size if cfg.overlap_schedule else 1
        # max_num_seqs bounds a step; a pipeline's pp_size steps in flight run that many each (vLLM's virtual engines)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_batched_tokens, cfg.max_num_seqs * self.pipeline_depth,
                                   self.cache, self.loras)  # fmt: skip
        self.eos_ids = set(self.tokenizer.eos_token_ids if self.tokenizer else mc.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, sorted(self.eos_ids))
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._ids = itertools.count()
        self._in_flight: _Step | None = None  # the launched step whose tokens have not reached the host yet
        self._launched: collections.deque[_Step] = collections.deque()
        if cfg.profile_dir is not None:  # an engine never closed (a script's LLM) writes its open window at exit
            weakref.finalize(self, self.profiler.close)

    @staticmethod
    def _load_draft(cfg: EngineConfig) -> ModelRunner:
        """The draft model's runner, its KV cache not yet allocated. Its LM head stays as its quantisation leaves
        it (quantize_lm_head is the model's: a draft may be in int8, or unquantised while the model is FP8)."""
        draft_cfg = dataclasses.replace(cfg, model=cfg.speculative_model, speculative_model=None,
                                        speculative_method=None, served_model_name=None, max_loras=0,
                                        lora_modules={},  # drafts propose without adapters
                                        quantization=cfg.speculative_draft_quantization or cfg.quantization,
                                        speculative_draft_quantization=None, quantize_lm_head=False)  # fmt: skip
        return ModelRunner(draft_cfg, num_pages=0)

    def ready(self) -> Ready:
        """What the frontend learns at start-up."""
        spec = self.tokenizer.spec() if self.tokenizer is not None else None
        return Ready(self.model_name, self.limits, spec, self.adapters(), self.cfg.max_loras)

    # -- LoRA adapters --------------------------------------------------------------------------------------

    def adapters(self) -> dict[str, str]:
        """The registered LoRA adapters: name -> path."""
        return {e.name: e.path for e in self.loras.entries.values()} if self.loras is not None else {}

    def load_lora(self, name: str, path: str, adapter=None) -> None:
        """Register a PEFT LoRA directory under `name` (its weights read now, or given as lora.LoRARegistry.read
        returned them); AdapterError (naming what is wrong) if it can't serve."""
        if self.loras is None:
            raise AdapterError("LoRA is off: start the engine with max_loras >= 1 (--max-loras)")
        self.loras.register(name, path, adapter)

    def unload_lora(self, name: str) -> None:
        """Forget an adapter. UnknownAdapter if it is not loaded; AdapterInUse while a request uses it."""
        entry = self.loras.entries.get(name) if self.loras is not None else None
        if entry is None:
            raise UnknownAdapter(name)
        if entry.num_requests:
            raise AdapterInUse(f"the LoRA adapter {name!r} is in use by {entry.num_requests} unfinished request(s)")
        self.loras.unregister(name)

    # -- requests -------------------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError (or ValueError for a bad grammar) when the request can't be served."""
        self.limits.validate(prompt_ids, params)
        if params.lora is not None and (self.loras is None or params.lora not in self.loras.entries):
            raise UnknownAdapter(params.lora)
        if params.structured is not None:
            self.grammars.compile(params.structured)  # cached; a ValueError names what is wrong in it

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        self.validate(prompt_ids, params)
        return self.enqueue(prompt_ids, params, request_id)

    def enqueue(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request whose prompt is validated (and grammar compiled)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise PromptError(f"request id {request_id!r} is already in use", param="request_id")
        seqs = []
        device = self.runner.device
        lora = None
        if params.lora is not None:
            lora = self.loras.entries.get(params.lora)
            if lora is None:  # unloaded since it was validated
                raise UnknownAdapter(params.lora)
            lora.num_requests += 1
            self.lora_requests[lora.name] = self.lora_requests.get(lora.name, 0) + 1
        max_len = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        for i in range(params.n):
            gen = make_generator(params.seed + i, device) if params.seed is not None else None
            seq = Sequence(request_id, i, list(prompt_ids), len(prompt_ids), params, max_len, gen,
                           leader=seqs[0] if seqs else None, lora=lora)  # fmt: skip
            if params.structured is not None:
                seq.matcher = self.grammars.matcher(params.structured)  # one per completion
            seqs.append(seq)
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str, index: int | None = None, reason: str = "abort", error: Failure | None = None
              ) -> list[SeqOutput]:  # fmt: skip
        """End a request's unfinished completions (or only completion `index`), freeing their pages."""
        seqs = self.requests.get(request_id, [])
        outs = []
        for seq in seqs:
            if seq.status is not Status.FINISHED and index in (None, seq.index):
                self.scheduler.finish(seq, reason)
                outs.append(self._output(seq, [], None, reason, error))
        self._forget_if_done(request_id)
        return outs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None or bool(self._launched)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        loras = self.loras
        return EngineStats(len(sched.running), len(sched.waiting), self.blocks.num_used, self.blocks.num_pages,
                           sched.num_preemptions, sched.prefix_queried_tokens, sched.prefix_hit_tokens,
                           dict(self.lora_requests), loras.num_resident if loras else 0,
                           loras.num_loads if loras else 0,
                           self.spec_verify_steps, self.spec_draft_tokens, self.spec_accepted_tokens,
                           self.spec_forced_tokens, self.spec_forced_accepted_tokens)  # fmt: skip

    # -- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[SeqOutput]:
        """Launch the next step, and return what the one before it produced (with `overlap_schedule` off: what
        this one produced). A call that finds a small step with first tokens in flight only finishes that step.
        Each call is a step of rank 0's profile (profiling.py)."""
        with self.profiler.step():
            return self._step()

    def _step(self) -> list[SeqOutput]:
        if self.pipeline_depth > 1:
            return self._pipelined_step()
        if self._first_tokens_in_flight():
            return self.finish_in_flight()  # published now; the next call launches the next step
        if self._speculating():
            outs = self.finish_in_flight()  # un-overlapped: drafts are proposed from tokens on the host
            return outs + self._speculative_step()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self.finish_in_flight()
        prev = self._in_flight
        loads = self.loras.take_loads() if self.loras is not None else []
        logits = self.runner.forward(batch, prev.sample.tokens if prev is not None else None, loads)
        if isinstance(self.proposer, DraftModelProposer) and len(batch.seqs) <= self.cfg.speculative_max_batch:
            self.proposer.prefill(batch)  # the draft's prompt KV beside the model's, while it may speculate after
        if prev is not None and any(s.matcher is not None or s.params.penalised for s in batch.sampled):
            self._receive(prev)  # masks and penalties read step n-1's tokens on the host; its stops can wait
        sample = self.runner.sample(batch, logits)
        sampled = self.scheduler.update(batch, [-(row + 1) for row in range(len(sample.tokens))])
        self._in_flight = _Step(sampled, [s.num_tokens - 1 for s in sampled], sample)
        outs = self._finish(prev) if prev is not None else []
        return outs if self.cfg.overlap_schedule else outs + self.finish_in_flight()

    # -- pipeline parallelism: a step per stage in flight -----------------------------------------------------

    def _pipelined_step(self) -> list[SeqOutput]:
        """With pp_size stages: launch steps until pp_size are in flight or no sequence is free to run, then
        sample the oldest, launch its sequences again at once, and only then bring its tokens to the host, check
        their stops and report them. Rank 0's runner returns once stage 0's part of a step is launched, so stage 0
        runs step n + 1 while the last stage runs step n; rank 0 samples step n on its device and reads those
        tokens there as the next step's input ids (placeholders, as in the overlapped schedule), so the
        host's handling of step n overlaps the stages' work instead of holding stage 0 up. The step that takes
        step n's sequences next is scheduled and planned before step n's logits arrive: when they do, stage 0 has
        finished step n + 1, and waits only for the sampling and the launch. As in the overlapped schedule, a
        sequence that stopped at step n was already launched again: that extra token is dropped, and rows whose
        sampling reads the host's view of earlier tokens (grammars, penalties) wait for step n's tokens first.

        A step samples no sequence that a step in flight samples (its next input id is not known yet): the
        running sequences take turns, split evenly between the steps, and new ones join any step. A prompt's
        chunks that sample nothing may follow each other in consecutive steps: each stage runs the steps in
        order, so a chunk's KV is written before the next reads it."""
        self._fill_pipeline()
        if not self._launched:
            return []
        ahead = self._schedule(self._launched[0])  # while the oldest's logits are on their way
        step = self._sample_oldest()
        if ahead is not None:
            self._launch(ahead, step)
        self._fill_pipeline(step)
        return self._finish(step)

    def _sample_oldest(self) -> _Step:
        """Take the oldest pipelined step off the queue and launch its sampling once its logits are here."""
        step = self._launched.popleft()
        logits = step.logits.wait() if isinstance(step.logits, PendingLogits) else step.logits
        step.sample, step.logits = self.runner.draw(logits, step.rows), None
        return step

    def _fill_pipeline(self, prev: _Step | None = None) -> None:
        """Launch steps until pp_size are in flight; `prev`: the step just sampled, its tokens still on the device."""
        while len(self._launched) < self.pipeline_depth and (ahead := self._schedule(prev)) is not None:
            self._launch(ahead, prev)

    def _schedule(self, prev: _Step | None) -> _Scheduled | None:
        """Schedule a step of the sequences that no other step in flight samples, and plan it; None if there was
        none. `prev`: the step that is sampled before this one launches (it may still be in flight now); its
        sequences may go again, reading its tokens on the device. A step whose sampling reads the host's view of
        those tokens (grammars, penalties) is planned at its launch, once they are there."""
        sched = self.scheduler
        busy = {seq for step in self._launched if step is not prev for seq in step.seqs}
        # an even share of what may run, at most max_num_seqs (sched.max_seqs is that times the depth)
        share = -(-min(sched.max_seqs, len(sched.running) + len(sched.waiting)) // self.pipeline_depth)
        batch = sched.schedule(busy, share)
        if not batch.seqs:
            return None
        ahead = _Scheduled(batch, self.loras.take_loads() if self.loras is not None else [])
        if prev is None or not any(s.matcher is not None or s.params.penalised for s in batch.sampled):
            self._plan(ahead, prev)
        return ahead

    def _plan(self, ahead: _Scheduled, prev: _Step | None) -> None:
        # The rows before this step's placeholders are appended: penalties read the tokens so far.
        ahead.rows = self.runner.sample_rows(ahead.batch)
        ahead.plan = self.runner.plan_step(ahead.batch, ahead.loads, len(prev.rows) if prev is not None else 0)

    def _launch(self, ahead: _Scheduled, prev: _Step | None) -> None:
        """Launch a scheduled step; its sequences' placeholders read `prev`'s tokens, sampled by now, on the device."""
        if ahead.plan is None:
            self._receive(prev)  # masks and penalties read its tokens on the host
            self._plan(ahead, prev)
        prev_tokens = prev.sample.tokens if prev is not None else None
        step = _Step([], [], None, logits=self.runner.launch(ahead.plan, prev_tokens, wait=False), rows=ahead.rows)
        self._launched.append(step)  # at once: whatever fails next, its logits are the next that rank 0 receives
        step.seqs = self.scheduler.update(ahead.batch, [-(row + 1) for row in range(len(ahead.rows))])
        step.positions = [s.num_tokens - 1 for s in step.seqs]

    # -- speculative decoding (spec_decode.py) ---------------------------------------------------------------

    def _speculating(self) -> bool:
        """Whether this step speculates: a speculative method, a small running batch, and a sequence that may."""
        running = self.scheduler.running
        return (self.spec_method is not None and 0 < len(running) <= self.cfg.speculative_max_batch
                and any(self._may_speculate(s) for s in running))  # fmt: skip

    def _may_speculate(self, seq: Sequence) -> bool:
        """A running decode that asks for speculation, with room for a draft and the token after it. A sequence
        under a grammar drafts what the grammar forces (with the n-gram proposer, its drafts after them), verified
        under the grammar's masks (spec_decode.grammar_drafts): it speculates whenever the grammar forces text (found
        in microseconds; with a step in flight, from the state before its token, so the text may turn out to be
        that token), else as any sequence does, while its proposer is not backing off; with the "grammar" method,
        only sequences under a grammar speculate."""
        if not (seq.status is Status.RUNNING and seq.params.speculative and seq.num_tokens - seq.num_computed == 1
                and seq.num_tokens + 1 < seq.max_len):  # fmt: skip
            return False
        if seq.matcher is not None and forced_text(seq.matcher):
            return True
        proposes = isinstance(self.proposer, NgramProposer) if seq.matcher is not None else self.proposer is not None
        return proposes and seq.num_tokens >= seq.spec_resume_at

    @staticmethod
    def _missed(seq: Sequence) -> None:
        """A speculative step of `seq` gained nothing (no draft, or none accepted). From the second in a row, it
        backs off: 2, 4, 8, then 16 tokens of plain, overlapped decoding before it tries again, so a sequence the
        proposer cannot predict costs little."""
        seq.spec_misses += 1
        if seq.spec_misses >= 2:
            seq.spec_resume_at = seq.num_tokens + min(1 << (seq.spec_misses - 1), SPEC_MAX_BACKOFF)

    def _propose(self) -> tuple[dict, dict]:
        """Each sequence that may speculate reserves its drafts at its end: {seq: how many}, and {seq: its
        GrammarDrafts} for those under a grammar. A sequence with none counts a miss."""
        k = self.cfg.num_speculative_tokens
        reserved, grammar = {}, {}
        for seq in self.scheduler.running:
            if not self._may_speculate(seq):
                continue
            room = min(k, seq.max_len - seq.num_tokens - 1)
            if seq.matcher is not None:
                ngram = self.proposer if isinstance(self.proposer, NgramProposer) else None
                grammar[seq] = grammar_drafts(seq, self.tokenizer, room, self.vocab_size, ngram)
                drafts = grammar[seq].tokens
            else:
                drafts = self.proposer.reserve(seq, room)
            if drafts:
                seq.token_ids += drafts
                reserved[seq] = len(drafts)
            else:
                self._missed(seq)
        return reserved, grammar

    def _drafts(self, batch: ScheduledBatch, grammar: dict) -> tuple[list[Sequence], list[int], Drafts]:
        """The step's speculating sequences, their draft counts and their drafts, in verification order: the draft
        model's first (on the device, read through placeholders), then those on the host (n-gram, a grammar's)."""
        spec = [(s, d) for s, d in zip(batch.seqs, batch.num_drafts) if d]
        by_draft_model = isinstance(self.proposer, DraftModelProposer)
        by_model = [(s, d) for s, d in spec if by_draft_model and s not in grammar]
        on_host = [(s, d) for s, d in spec if not by_draft_model or s in grammar]
        seqs, num_drafts = [s for s, _ in by_model + on_host], [d for _, d in by_model + on_host]
        drafts = self.proposer.fill(seqs[: len(by_model)], num_drafts[: len(by_model)]) if by_model else Drafts([])
        return seqs, num_drafts, drafts.then([t for s, d in on_host for t in s.token_ids[s.num_tokens - d :]])

    def _speculative_step(self) -> list[SeqOutput]:
        """One un-overlapped step in which the speculating sequences verify their drafts (k + 1 rows each) and the
        others decode or prefill as usual, all in one forward."""
        reserved, grammar = self._propose()
        batch = self.scheduler.schedule()
        # The token budget may cut a sequence's drafts, or preemption all of them: drop what is not computed.
        num_new = dict(zip(batch.seqs, batch.num_new))
        for seq, num in reserved.items():
            keep = max(num_new.get(seq, 0) - 1, 0)
            del seq.token_ids[seq.num_tokens - (num - keep) :]
            reserved[seq] = keep
        batch.num_drafts = [reserved.get(s, 0) for s in batch.seqs]
        batch.__post_init__()  # which sequences sample, now their drafts are settled
        if not batch.seqs:
            return []
        rows, plain_rows, row = {}, [], 0
        for seq, d, samples in zip(batch.seqs, batch.num_drafts, batch.samples):
            if samples:
                if d:
                    rows[seq] = range(row, row + d + 1)
                else:
                    plain_rows.append(row)
                row += d + 1
        spec_seqs, num_drafts, drafts = self._drafts(batch, grammar)
        on_device = isinstance(drafts.tokens, torch.Tensor)
        loads = self.loras.take_loads() if self.loras is not None else []  # a sequence admitted now may need one
        logits = self.runner.forward(batch, drafts.tokens if on_device else None, loads)
        # The others: sampled, updated and finished as in a plain step, at once.
        plain = ScheduledBatch([s for s, d in zip(batch.seqs, batch.num_drafts) if not d],
                               [n for n, d in zip(batch.num_new, batch.num_drafts) if not d])  # fmt: skip
        outs = []
        if plain.seqs:
            sample = self.runner.sample(plain, logits[plain_rows])
            sampled = self.scheduler.update(plain, [-(r + 1) for r in range(len(sample.tokens))])
            outs = self._finish(_Step(sampled, [s.num_tokens - 1 for s in sampled], sample))
        if spec_seqs:
            spec_rows = [r for s in spec_seqs for r in rows[s]]
            masks = [grammar[s].mask if s in grammar else None for s in spec_seqs]
            verified = verify(logits[spec_rows], spec_seqs, num_drafts, drafts, masks)
            for seq, num, v in zip(spec_seqs, num_drafts, verified):
                outs.append(self._accept(seq, num, v, grammar[seq].forced[:num] if seq in grammar else []))
        return outs

    def _accept(self, seq: Sequence, num_drafts: int, v, forced: list[bool]) -> SeqOutput:
        """Append a verified sequence's tokens up to the first that ends it (advancing its grammar), and report
        them. forced: which drafts its grammar forced."""
        self.spec_verify_steps += 1
        self.spec_draft_tokens += num_drafts
        self.spec_accepted_tokens += v.num_accepted
        self.spec_forced_tokens += sum(forced)
        self.spec_forced_accepted_tokens += sum(forced[: v.num_accepted])
        start, reason, tokens = seq.num_tokens - num_drafts, None, v.tokens
        for j, token in enumerate(tokens):
            accepted = seq.matcher.accept_token(token) if seq.matcher is not None else True
            reason = self._stop_reason(seq, token, start + j + 1, accepted)
            if reason is not None:
                tokens = tokens[: j + 1]
                break
        self.scheduler.update_verified(seq, num_drafts, tokens, v.num_accepted)
        if v.num_accepted:
            seq.spec_misses = 0
        else:
            self._missed(seq)
        logprobs = v.logprobs[: len(tokens)] if v.logprobs is not None else None
        if reason is not None:
            self.scheduler.finish(seq, reason)
        out = self._output(seq, tokens, logprobs, reason)
        if reason is not None:
            self._forget_if_done(seq.request_id)
        return out

    def _first_tokens_in_flight(self) -> bool:
        """Whether the launched step holds a request's first token and is small. At low load the host, not the
        device, is the slower side of a step: launching the next step before reporting that token would delay it
        by the launch (1.7 ms of time to first token on qwen3-0.6b), so a step() returns it alone. A large batch
        keeps the overlap: its steps are the device's to wait for."""
        step = self._in_flight
        return step is not None and len(step.seqs) <= EAGER_FIRST_TOKEN_SEQS and any(
            pos == seq.num_prompt_tokens for seq, pos in zip(step.seqs, step.positions))  # fmt: skip

    def finish_in_flight(self) -> list[SeqOutput]:
        """Wait for the launched step(s) and return their outputs (the engine is then in step with the host)."""
        step, self._in_flight = self._in_flight, None
        outs = self._finish(step) if step is not None else []
        while self._launched:
            outs += self._finish(self._sample_oldest())
        return outs

    def _receive(self, step: _Step) -> None:
        """Bring a launched step's tokens to the host: in place of their placeholders, and into the grammars.
        Sequences finished or aborted since the step was launched are skipped."""
        if step.out is not None:
            return
        step.out = out = step.sample.result()
        step.live = [i for i, seq in enumerate(step.seqs) if seq.status is not Status.FINISHED]
        for i in step.live:
            step.seqs[i].token_ids[step.positions[i]] = out.token_ids[i]
        constrained = [i for i in step.live if step.seqs[i].matcher is not None]
        step.accepted = dict(zip(constrained, accept_tokens([step.seqs[i].matcher for i in constrained],
                                                            [out.token_ids[i] for i in constrained])))  # fmt: skip

    def _finish(self, step: _Step) -> list[SeqOutput]:
        """Receive a launched step's tokens and check their stops. A row whose handling raises fails its own
        request only."""
        self._receive(step)
        out, outs = step.out, []
        for i in step.live:
            seq, token = step.seqs[i], out.token_ids[i]
            if seq.status is Status.FINISHED:  # its request failed on an earlier row of this step
                continue
            try:
                reason = self._stop_reason(seq, token, step.positions[i] + 1, step.accepted.get(i, True))
                logprobs = None
                if out.logprobs is not None and seq.params.logprobs is not None:
                    top = out.top_logprobs[i] if out.top_logprobs is not None else []
                    logprobs = [TokenLogprob(token, out.logprobs[i], top[: seq.params.logprobs])]
            except Exception as e:
                log.error("request %s failed: %s", seq.request_id, traceback.format_exc())
                outs += self.abort(seq.request_id, reason="error",
                                   error=Failure(500, f"request failed inside the engine: {e!r}"))  # fmt: skip
                continue
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outs.append(self._output(seq, [token], logprobs, reason))
            if reason is not None:
                self._forget_if_done(seq.request_id)
        return outs

    def _stop_reason(self, seq: Sequence, token: int, num_tokens: int, grammar_accepted: bool) -> str | None:
        """Why `seq` ends at `token` (its num_tokens-th), if it does. Stop strings are the caller's to find."""
        params = seq.params
        if not grammar_accepted:  # its mask allowed only what the grammar accepts: a bug if it happens
            log.error("request %s: the grammar rejected token %d", seq.request_id, token)
            return "abort"
        if (seq.matcher is not None and seq.matcher.is_terminated()) or token in params.stop_token_ids or (
                token in self.eos_ids and not params.ignore_eos):  # fmt: skip
            return "stop"  # the stop token (also the one that ends a grammar) is in token_ids, not in the text
        return "length" if num_tokens >= seq.max_len else None

    def _output(self, seq: Sequence, token_ids, logprobs, reason, error=None) -> SeqOutput:
        queue_time = (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
        return SeqOutput(seq.request_id, seq.index, token_ids, logprobs, reason, seq.num_prompt_tokens,
                         seq.num_cached_tokens or 0, queue_time, error)  # fmt: skip

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.requests.get(request_id)
        if seqs is not None and all(s.status is Status.FINISHED for s in seqs):
            del self.requests[request_id]
            if seqs[0].lora is not None:
                seqs[0].lora.num_requests -= 1

    def close(self) -> None:
        """Write the profile if its window is still open, and stop the other ranks' processes, if any."""
        self.profiler.close()
        self.runner.close()

    def fail_all(self, error: Failure | None = None) -> list[SeqOutput]:
        """End every request, freeing its pages: after an error inside a step (`error`), or to drop all work."""
        self._in_flight = None
        while self._launched:  # the logits on their way are taken, so that the next step's are the next received
            logits = self._launched.popleft().logits
            if isinstance(logits, PendingLogits):
                with contextlib.suppress(Exception):  # a dead worker: the world is broken anyway
                    logits.wait()
        if error is not None and self.loras is not None:  # the failed step's adapter loads may not have run
            self.loras.forget_slots()
        reason = "abort" if error is None else "error"
        return [out for rid in list(self.requests) for out in self.abort(rid, reason=reason, error=error)]
