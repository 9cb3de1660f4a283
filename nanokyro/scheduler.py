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
from nanokyro.sampler import SamplingParams

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
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    leader: Sequence | None = None  # n > 1: siblings borrow the leader's prompt pages once computed
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in `pages`
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


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence computes this step

    def samples(self, i: int) -> bool:
        """Sequence i reaches its last token this step, so it gets a next token."""
        return self.seqs[i].num_computed + self.num_new[i] == self.seqs[i].num_tokens

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, cache=None):
        self.blocks, self.cache = blocks, cache
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        chosen: dict[Sequence, int] = {}
        # Running sequences: decodes first, then prompt chunks, each oldest first.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            budget = self.max_tokens - sum(chosen.values())
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self._grow_or_preempt(seq, n, chosen):
                chosen[seq] = n
        # New requests, in arrival order, while pages, budget and seats last. None after a preemption.
        if self.num_preemptions == getattr(self, "_preemptions_seen", 0):
            self._admit(chosen)
        self._preemptions_seen = self.num_preemptions
        return ScheduledBatch(list(chosen), list(chosen.values()))

    def _admit(self, chosen: dict[Sequence, int]) -> None:
        skipped = []
        while self.waiting and len(self.running) < self.max_seqs:
            budget = self.max_tokens - sum(chosen.values())
            if budget == 0:
                break
            seq = self.waiting.popleft()
            if seq.leader is not None and seq.leader.status is Status.RUNNING and seq.leader.num_computed < seq.num_prompt_tokens:
                skipped.append(seq)  # wait for the leader's prompt pages rather than compute them twice
                continue
            self._share_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            try:
                self._grow(seq, n)
            except OutOfPages:
                self.blocks.release(seq.pages)
                seq.pages, seq.num_computed = [], 0
                self.waiting.appendleft(seq)
                break
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed
                seq.first_scheduled_time = time.monotonic()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen[seq] = n
        self.waiting.extendleft(reversed(skipped))

    def _share_prefix(self, seq: Sequence) -> None:
        """Start `seq` from KV that already exists: its leader's prompt pages (n > 1) or the prefix cache.

        Only whole pages are shared, and never the last prompt token: it is recomputed to get the logits."""
        leader = seq.leader
        if leader is not None and leader.status is Status.RUNNING and leader.num_computed >= seq.num_prompt_tokens:
            shared = leader.pages[: (seq.num_tokens - 1) // self.blocks.page_size]
            self.blocks.incref(shared)
            seq.pages, seq.num_computed = list(shared), len(shared) * self.blocks.page_size

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
                chosen.pop(victim, None)
                if victim is seq:
                    return False

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._free(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self._free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _free(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.pages)
        seq.pages = []

    def update(self, batch: ScheduledBatch, tokens: list[int]) -> list[Sequence]:
        """Advance each scheduled sequence past this step; append the sampled tokens. Returns the sampled ones."""
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
        for seq, token in zip(sampled, tokens):
            seq.token_ids.append(token)
        return sampled
