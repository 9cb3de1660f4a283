"""Iteration-level scheduling: which sequences run this step, and how many new tokens each.

Every step packs, under `max_num_batched_tokens` and `max_num_seqs`: first the running decodes (one token
each), then the rest of running prompts (chunked prefill), then new requests in arrival order. When pages
run out, the newest running sequence is preempted by recompute: its pages are freed and it waits at the
front of the queue; its tokens so far are kept, so it resumes with the same output.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from nanokyro.block_manager import BlockManager, OutOfPages
from nanokyro.grammar import GrammarMatcher
from nanokyro.request import SamplingParams

_seq_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion: the prompt and the tokens generated so far, with its pages and progress."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + output; a sampled token not yet on the host is a placeholder -(row + 1)
    num_prompt_tokens: int
    params: SamplingParams
    max_len: int = 1 << 62  # prompt + max_tokens, capped by the context: reaching it ends the sequence
    generator: torch.Generator | None = None
    matcher: GrammarMatcher | None = None  # structured output: advanced by the engine with each sampled token
    leader: Sequence | None = None  # n > 1: siblings borrow the leader's prompt pages once computed
    cache_node: object | None = None  # prefix cache: the deepest tree node of this sequence's pages
    lora: object | None = None  # its LoRA adapter (lora.LoRAEntry: name, slot, prefix-cache key), None: the base
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in `pages`
    num_draft_computed: int = 0  # speculative decoding: tokens whose draft-model KV is in `pages`
    spec_misses: int = 0  # speculative steps in a row that accepted no draft (or found none)
    spec_resume_at: int = 0  # after misses, the sequence decodes plainly until it has this many tokens
    pages: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None  # prompt tokens not computed at first admission
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_known(self) -> int:
        """Tokens before the placeholders at the end (at most the last two: steps in flight)."""
        n = len(self.token_ids)
        while n and self.token_ids[n - 1] < 0:
            n -= 1
        return n


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence computes this step
    # speculative decoding: draft tokens at the end of each sequence's new tokens, all sampled (verified) rows
    num_drafts: list[int] | None = None
    # samples[i]: sequence i reaches its last token this step, so it gets a next token. Fixed when the batch is
    # made: the runner's sampled rows and the placeholders update appends must agree, whatever changes between.
    samples: list[bool] = field(init=False)

    def __post_init__(self):
        self.samples = [s.num_computed + n == s.num_tokens for s, n in zip(self.seqs, self.num_new)]

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a next token, in the order of the step's sampled rows."""
        return [s for s, samples in zip(self.seqs, self.samples) if samples]

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, cache=None, loras=None):
        self.blocks, self.cache = blocks, cache
        self.loras = loras  # lora.LoRARegistry: a sequence with an adapter is admitted once its adapter has a slot
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache, at first admission
        self.prefix_hit_tokens = 0  # of those, tokens served from it

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, busy: set[Sequence] | frozenset = frozenset(), max_step_seqs: int | None = None
                 ) -> ScheduledBatch:  # fmt: skip
        """busy: sequences left out of this step (a pipeline's steps in flight sample them); max_step_seqs: at most
        this many sequences in the step (max_num_seqs still bounds the running ones over all steps)."""
        chosen: dict[Sequence, int] = {}
        self._preempted, self._budget = False, self.max_tokens
        self._busy, self._step_seqs = busy, max_step_seqs or self.max_seqs
        self._release_done()
        # Running sequences: decodes first, then prompt chunks, each oldest first. One that has sampled its last
        # token (max_len) only waits for that token to reach the host and finish it.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            if seq.status is not Status.RUNNING or self._budget == 0 or seq.num_tokens >= seq.max_len:
                continue
            if seq in busy or len(chosen) >= self._step_seqs:
                continue
            n = min(seq.num_tokens - seq.num_computed, self._budget)
            if self._grow_or_preempt(seq, n, chosen):
                chosen[seq] = n
                self._budget -= n
        # New requests, in arrival order, while pages, budget and seats last. None after a preemption.
        if self.waiting and not self._preempted:
            self._admit(chosen)
        seqs = list(chosen)
        if self.loras is not None:  # one adapter's decodes side by side: the LoRA kernels read it once per block
            seqs.sort(key=lambda s: (chosen[s] > 1, s.lora.slot if s.lora is not None else -1))
        return ScheduledBatch(seqs, [chosen[s] for s in seqs])

    def _release_done(self) -> None:
        """A sequence that has sampled its last token (max_len) computes nothing more: its pages go back now,
        not when that token reaches the host a step later, so that newer sequences need not be preempted."""
        for seq in self.running:
            if seq.num_tokens >= seq.max_len and seq.pages:
                self._cache_pages(seq)
                self._release_pages(seq)

    def _admit(self, chosen: dict[Sequence, int]) -> None:
        skipped = []
        computing = {self._next_page_key(s) for s in self.running} - {None}
        while (self.waiting and len(self.running) < self.max_seqs and self._budget > 0
               and len(chosen) < self._step_seqs):  # fmt: skip
            seq = self.waiting.popleft()
            if seq in self._busy:  # preempted while a step in flight samples it: its last token is not known yet
                skipped.append(seq)
                continue
            if seq.lora is not None and not self.loras.acquire(seq.lora, {s.lora for s in self.running}):
                skipped.append(seq)  # every LoRA slot serves running sequences: wait for one to free up
                continue
            self._share_prefix(seq)
            key = self._next_page_key(seq)
            if self._leader_computing(seq) or (key is not None and key in computing):
                self._free(seq)  # its next page is being computed by another sequence: share it next step
                seq.num_computed = 0
                skipped.append(seq)
                continue
            n = min(seq.num_tokens - seq.num_computed, self._budget)
            try:
                self._grow(seq, n)
            except OutOfPages:
                self._free(seq)
                seq.num_computed = 0
                self.waiting.appendleft(seq)
                break
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed
                seq.first_scheduled_time = time.monotonic()
                if self.cache is not None:  # (pages shared from an n > 1 leader are not cache hits)
                    self.prefix_queried_tokens += seq.num_prompt_tokens
                    self.prefix_hit_tokens += seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen[seq] = n
            self._budget -= n
            computing.add(key)
        self.waiting.extendleft(reversed(skipped))

    def _share_prefix(self, seq: Sequence) -> None:
        """Start `seq` from KV that already exists: the prefix cache, or else its leader's prompt (n > 1).

        Only whole pages are shared, and never the last token: it is recomputed to get the logits."""
        ps, limit = self.blocks.page_size, seq.num_tokens - 1
        if self.cache is not None:
            pages, seq.cache_node = self.cache.match(seq.token_ids, limit, seq.lora.key if seq.lora else 0)
        elif seq.leader is not None and seq.leader.status is Status.RUNNING and not self._leader_computing(seq):
            pages = seq.leader.pages[: min(limit, seq.num_prompt_tokens) // ps]
        else:
            pages = []
        self.blocks.incref(pages)
        seq.pages, seq.num_computed = list(pages), len(pages) * ps

    def _leader_computing(self, seq: Sequence) -> bool:
        """Without the cache, n > 1 siblings wait for the leader's prompt pages rather than compute them."""
        leader = seq.leader
        return (self.cache is None and leader is not None and leader.status is Status.RUNNING
                and leader.num_computed < seq.num_prompt_tokens)  # fmt: skip

    def _next_page_key(self, seq: Sequence):
        """With the cache: which full page a prefilling sequence computes next, as (tree node, its tokens).

        Two sequences with the same key would compute the same KV; the later one waits a step and shares."""
        ps = self.blocks.page_size
        page = seq.num_computed // ps
        if seq.cache_node is None or (page + 1) * ps > seq.num_tokens - 1:
            return None
        return id(seq.cache_node), tuple(seq.token_ids[page * ps : (page + 1) * ps])

    def _grow(self, seq: Sequence, n: int) -> None:
        """Give `seq` the pages to hold n more tokens, or raise OutOfPages."""
        need = self.blocks.pages_for(seq.num_computed + n) - len(seq.pages)
        if need > 0:
            seq.pages += self.blocks.allocate(need)

    def _grow_or_preempt(self, seq: Sequence, n: int, chosen: dict[Sequence, int]) -> bool:
        while True:
            try:
                self._grow(seq, n)
                return True
            except OutOfPages:
                victim = self.running[-1]  # newest
                self.preempt(victim)
                self._budget += chosen.pop(victim, 0)
                if victim is seq:
                    return False

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._preempted = True
        self._free(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.FINISHED:
            return
        del seq.token_ids[seq.num_known :]  # tokens still in flight are dropped
        if seq.status is Status.WAITING:
            if seq in self.waiting:  # not while _admit holds it aside (a step failing mid-admission)
                self.waiting.remove(seq)
        else:
            self._cache_pages(seq)
            self._free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _free(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._release_pages(seq)

    def _release_pages(self, seq: Sequence) -> None:
        self.blocks.release(seq.pages)  # pages the prefix cache holds stay there, evictable
        seq.pages, seq.cache_node, seq.num_draft_computed = [], None, 0

    def update(self, batch: ScheduledBatch, tokens: list[int]) -> list[Sequence]:
        """Advance each scheduled sequence past this step; append the sampled tokens (or their placeholders).
        Returns the sampled sequences."""
        sampled = batch.sampled
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            self._cache_pages(seq)
        for seq, token in zip(sampled, tokens):
            seq.token_ids.append(token)
        return sampled

    def update_verified(self, seq: Sequence, num_drafts: int, tokens: list[int], num_accepted: int) -> None:
        """After a verify step (spec_decode.py): the drafts, the last num_drafts token ids, give way to `tokens`
        (the accepted drafts, then the model's own). Only the accepted drafts' KV is kept: num_computed is rewound
        past the rejected ones, pages past the tokens are released, and only then are full pages cached, so a
        rejected token never enters the prefix cache."""
        end = seq.num_tokens - num_drafts
        del seq.token_ids[end:]
        seq.token_ids += tokens
        seq.num_computed = end + min(num_accepted, len(tokens) - 1)  # the last token's KV is computed next step
        seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed)
        keep = self.blocks.pages_for(seq.num_tokens)
        if len(seq.pages) > keep:
            self.blocks.release(seq.pages[keep:])
            del seq.pages[keep:]
        self._cache_pages(seq)

    def _cache_pages(self, seq: Sequence) -> None:
        """Put the sequence's newly filled pages in the prefix cache: full pages whose tokens are all computed
        and known (a placeholder's page waits until its token arrives)."""
        num_tokens = min(seq.num_computed, seq.num_known)
        if seq.cache_node is not None and num_tokens // self.blocks.page_size > seq.cache_node.depth:
            seq.cache_node = self.cache.insert(seq.token_ids, num_tokens, seq.pages, seq.cache_node)
