"""Speculative decoding: a proposer guesses each sequence's next k tokens, the model scores all k + 1 positions in
one forward, and `verify` keeps the longest prefix of the guesses the model agrees with, plus one token of its own.

Two proposers, with one interface: `reserve(seq, k)` gives the draft tokens to append before the step is scheduled
(the scheduler then gives the sequence k + 1 new tokens and the pages for them), and `fill(seqs, num_drafts)`
makes them final once the pages exist, returning `Drafts`: the tokens and the draft's distributions (None: one-hot).
- `NgramProposer` (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's last
  n tokens (n = 3, 2, 1). Free, on the host; good on code, edits and summaries that repeat their context.
- `DraftModelProposer`: a smaller model with the same vocabulary, its own `ModelRunner` whose KV cache has the
  target's pages (the same page ids, the same page tables). Each sequence tracks `num_draft_computed`, the tokens
  whose draft KV is in its pages: the first draft pass catches up from there (prompt, tokens of steps that did
  not speculate) and k - 1 one-token passes follow, each reading the token before it on the device. Pages a
  sequence shares (the prefix cache) get their draft KV rewritten with the same values. The draft's KV only
  affects how often drafts are accepted, never what the engine outputs.

Verification is lossless. Greedy rows accept a draft while it equals the model's argmax (the same processing as
without speculation: penalties, then argmax). Sampled rows use rejection sampling: draft d drawn from q is kept
with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from max(0, p - q) normalised,
and after k acceptances from p. p and q come from sampler.probabilities, so temperature, top-k/p, min-p and
penalties mean what they mean without speculation; n-gram drafts are one-hot q.

Under a grammar (structured outputs), a sequence drafts the text the grammar forces next, which xgrammar finds (its
jump-forward string: a JSON key with its quotes, a closing bracket), tokenised as the model's tokenizer writes it,
then the n-gram proposer's drafts after it; the draft model does not draft for it. `grammar.draft_bitmasks` cuts the
drafts before the first token the grammar rejects, adds the tokens it allows alone (the stop token after the last
bracket) and makes the grammar's mask of every row the verify step scores, by accepting the drafts into the matcher
and rolling it back. `verify` applies those masks first, as the sampler does: the model's distribution is then the
one it samples from without speculation, and a draft the grammar alone allows is accepted for sure. A forced text
the model would split into other tokens is rejected like any wrong draft. With `speculative_method="grammar"` only
such sequences speculate.

On CUDA both run through the decode graphs: each draft pass replays the draft runner's graph of its batch size,
and the verify step the model's graph of (k + 1) x batch rows, one attention row per token (runner.plan's
token_rows).

In the engine (core.py), a step with speculating rows runs un-overlapped: the step in flight is finished first, so
every token is on the host when drafts are proposed, and the verify step's tokens are received before it returns
(one wait for the device per step: the drafts reach the verify step on the device). Speculation pays at small
batch, where the device waits on the host least, so the engine speculates only while at most
`speculative_max_batch` sequences run. A sequence whose speculative steps gain nothing twice in a row (no draft
found, none accepted) decodes plainly, overlapped, for 2, 4, 8, then 16 tokens before it tries again
(core.py `_missed`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nanokyro.grammar import apply_bitmask, draft_bitmasks, forced_text
from nanokyro.layers import VocabParallelEmbedding, pack_head
from nanokyro.quant import int8_head
from nanokyro.request import TokenLogprob
from nanokyro.sampler import SampleRow, apply_penalties, argmax, draw, probabilities
from nanokyro.scheduler import ScheduledBatch, Sequence


def _sample_row(seq: Sequence, num_tokens: int) -> SampleRow:
    """The sampling row of `seq` at the position after its first num_tokens tokens (drafts included)."""
    ids = (seq.prompt_ids, seq.token_ids[seq.num_prompt_tokens : num_tokens]) if seq.params.penalised else ([], [])
    return SampleRow(seq.params, *ids, seq.generator, None)


@dataclass
class Drafts:
    """What `fill` proposed: the draft tokens [sum(num_drafts)] in sequence order (a list, or a tensor on the
    device that the verify step's placeholder ids read), and their distributions q [same, vocab] (None: one-hot)."""

    tokens: list[int] | torch.Tensor
    probs: torch.Tensor | None = None

    def then(self, tokens: list[int]) -> Drafts:
        """These drafts followed by one-hot ones on the host (constrained sequences' drafts, after a draft model's)."""
        if not tokens:
            return self
        if not isinstance(self.tokens, torch.Tensor):
            return Drafts(self.tokens + tokens, None)  # one-hot, as every list's
        more = torch.tensor(tokens).to(self.tokens.device, non_blocking=True)  # not waiting for the draft passes
        probs = self.probs
        if probs is not None:
            probs = torch.cat([probs, F.one_hot(more, probs.shape[-1]).to(probs.dtype)])
        return Drafts(torch.cat([self.tokens, more]), probs)


class NgramProposer:
    """Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def reserve(self, seq: Sequence, k: int) -> list[int]:
        return ngram_lookup(seq.token_ids, k, self.max_n, self.min_n)

    def fill(self, seqs: list[Sequence], num_drafts: list[int]) -> Drafts:
        return Drafts([t for s, k in zip(seqs, num_drafts) for t in s.token_ids[s.num_tokens - k :]])  # one-hot


def ngram_lookup(token_ids: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens, longest n first."""
    if k <= 0 or len(token_ids) < 2:
        return []
    ids = np.asarray(token_ids)
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every n-gram that has a successor
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return ids[start : start + k].tolist()
    return []


@dataclass
class GrammarDrafts:
    """A constrained sequence's drafts, and its grammar's mask of each position the verify step scores."""

    tokens: list[int]
    forced: list[bool]  # per token: the grammar forced it (else the n-gram proposer proposed it)
    mask: torch.Tensor  # [len(tokens) + 1, ceil(vocab / 32)] int32, on the host


def grammar_drafts(seq: Sequence, tokenizer, k: int, vocab_size: int, ngram: NgramProposer | None) -> GrammarDrafts:
    """Drafts for a sequence under a grammar: first the text the grammar forces next, tokenised as the model's
    tokenizer writes it (the model may split it otherwise: verification decides, as for any draft), then, with the
    n-gram proposer, what followed the last n-gram; the grammar then cuts them before the first token it rejects
    and adds the tokens it allows alone (grammar.draft_bitmasks). Costs microseconds, with no model."""
    text = forced_text(seq.matcher)
    forced = tokenizer.encode(text, add_special_tokens=False)[:k] if text else []
    more = ngram_lookup(seq.token_ids + forced, k - len(forced), ngram.max_n, ngram.min_n) if ngram else []
    tokens, kept, mask = draft_bitmasks(seq.matcher, forced + more, k, vocab_size)
    flags = [j < len(forced) or j >= kept for j in range(len(tokens))]
    return GrammarDrafts(tokens, flags, mask)


@dataclass
class _DraftView:
    """A sequence as the draft runner sees it: its tokens up to one draft pass's end and the draft's progress."""

    token_ids: list[int]
    num_computed: int
    pages: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def shrink_lm_head(model, num_tokens: int, quantization: str | None = None) -> None:
    """Make `model` (a draft) score only its first num_tokens token ids: an LM head of those rows (a copy when the
    head is the input embedding, which keeps every row), in int8 with `quantization` "int8" as the rest of the
    draft. Its drafts are then never other tokens, and its q is 0 there; the model verifying them still scores the
    whole vocabulary."""
    head = model.head
    if not 0 < num_tokens <= head.vocab_size:
        raise ValueError(f"speculative_draft_vocab must be in [1, {head.vocab_size}], got {num_tokens}")
    small = VocabParallelEmbedding(num_tokens, head.weight.shape[1], head.tp)
    small.weight = torch.nn.Parameter(head.head_rows[:num_tokens].clone(), requires_grad=False)
    if quantization == "int8":
        int8_head(small)
    else:
        pack_head(small)
    model.lm_head = small


class DraftModelProposer:
    """Drafts from a smaller model run by its own ModelRunner over the target's page ids."""

    def __init__(self, runner):
        self.runner = runner
        self.vocab_size = runner.model_cfg.vocab_size

    def reserve(self, seq: Sequence, k: int) -> list[int]:
        return [0] * k  # slots: fill() writes the drafts once the scheduler has given them pages

    @torch.inference_mode()
    def prefill(self, batch: ScheduledBatch) -> None:
        """The draft's KV of the prompt chunks in a step of the model, computed beside them: otherwise a sequence's
        first speculative step catches up on its whole prompt, which lands in decode time (about 1 s of a 64-token
        run on the CPU pair). Only for sequences the draft model drafts for (no grammar, not opted out); the
        catch-up in `fill` still covers the rest (a cached prefix, a preempted sequence)."""
        views, ends = [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            end = seq.num_computed + n
            if (seq.params.speculative and seq.matcher is None and end <= seq.num_prompt_tokens
                    and seq.num_draft_computed < end):  # fmt: skip
                views.append(_DraftView(seq.token_ids[:end], seq.num_draft_computed, seq.pages))
                ends.append((seq, end))
        if views:
            self.runner.forward(ScheduledBatch(views, [v.num_tokens - v.num_computed for v in views]))
            for seq, end in ends:
                seq.num_draft_computed = end

    @torch.inference_mode()
    def fill(self, seqs: list[Sequence], num_drafts: list[int]) -> Drafts:
        """Draft each sequence's last num_drafts tokens. They stay on the device, where the verify step reads them:
        the slots get placeholders -(i + 1) for row i of the drafts (real ids when a row is penalised, whose
        penalties read them on the host)."""
        ends = [s.num_tokens - k for s, k in zip(seqs, num_drafts)]  # each sequence's real tokens
        greedy = all(s.params.greedy and not s.params.penalised for s in seqs)
        steps, passes, qs, prev = [], [], [], None
        for j in range(max(num_drafts)):
            live = [i for i, k in enumerate(num_drafts) if k > j]
            if j == 0:  # catch up on every token the draft has not seen, and draft the first
                views = [_DraftView(seqs[i].token_ids[: ends[i]], seqs[i].num_draft_computed, seqs[i].pages)
                         for i in live]  # fmt: skip
            else:  # the token drafted last step, read on the device from row `row` of that step
                row = {i: r for r, i in enumerate(steps[-1])}
                views = [_DraftView([*seqs[i].token_ids[: ends[i] + j - 1], -(row[i] + 1)], ends[i] + j - 1,
                                    seqs[i].pages) for i in live]  # fmt: skip
            batch = ScheduledBatch(views, [v.num_tokens - v.num_computed for v in views])
            logits = self.runner.forward(batch, prev)
            if logits.shape[-1] < self.vocab_size:  # a shrunk head: the rest of the vocabulary is never drafted
                logits = F.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))
            if greedy:
                prev = argmax(logits.float())
            else:
                rows = [_sample_row(seqs[i], ends[i]) for i in live]
                qs.append(probabilities(logits, rows))
                prev = draw(qs[-1], rows)
            steps.append(live)
            passes.append(prev)
        tokens = torch.cat(passes)
        # Pass j's rows are in `tokens` after the earlier passes'; reorder them into sequence order.
        at, offsets = 0, []
        for live in steps:
            offsets.append({i: at + r for r, i in enumerate(live)})
            at += len(live)
        order = torch.tensor([offsets[j][i] for i, k in enumerate(num_drafts) for j in range(k)], device=tokens.device)
        tokens = tokens[order]
        values = tokens.tolist() if any(s.params.penalised for s in seqs) else None
        at = 0
        for seq, end, k in zip(seqs, ends, num_drafts):
            seq.token_ids[end:] = values[at : at + k] if values is not None else range(-at - 1, -at - k - 1, -1)
            seq.num_draft_computed = end + k - 1  # the last draft's KV is not written: nothing reads it yet
            at += k
        return Drafts(tokens, None if greedy else torch.cat(qs)[order])


@dataclass
class Verified:
    """One sequence's verify step: its accepted drafts then the model's own token, and their logprobs if asked."""

    tokens: list[int]
    num_accepted: int
    logprobs: list[TokenLogprob] | None = None


def verify(logits: torch.Tensor, seqs: list[Sequence], num_drafts: list[int], drafts: Drafts,
           masks: list[torch.Tensor | None] | None = None) -> list[Verified]:  # fmt: skip
    """Accept or reject each sequence's drafts (its last num_drafts[i] token slots).

    logits: [sum(num_drafts) + len(seqs), vocab], sequence i's k_i + 1 rows in order: row j scores the position
    after its j-th draft (row 0: after its last real token). masks[i]: a constrained sequence's grammar bitmask of
    those rows (GrammarDrafts.mask), applied first, as the sampler applies it: the model's distribution is then
    the one it samples from without speculation, and a draft the grammar alone allows is accepted for sure."""
    if masks is not None and any(m is not None for m in masks):
        logits = logits.to(torch.float32, copy=True)
        masked, parts, at = [], [], 0
        for mask, k in zip(masks, num_drafts):
            if mask is not None:
                masked += range(at, at + k + 1)
                parts.append(mask[: k + 1])  # the budget may have cut the drafts it was made for
            at += k + 1
        apply_bitmask(logits, torch.cat(parts), masked)
    rows, is_draft = [], []
    for seq, k in zip(seqs, num_drafts):
        end = seq.num_tokens - k
        rows += [_sample_row(seq, end + j) for j in range(k + 1)]
        is_draft += [True] * k + [False]
    device = logits.device
    draft_rows = torch.tensor([r for r, x in enumerate(is_draft) if x], dtype=torch.long, device=device)
    d = torch.zeros(len(rows), dtype=torch.long, device=device)  # each row's draft; 0 in the rows after the last
    d[draft_rows] = torch.as_tensor(drafts.tokens, device=device)
    if all(r.params.greedy for r in rows):
        chosen = argmax(apply_penalties(logits.float(), rows) if any(r.params.penalised for r in rows) else logits)
        host = torch.cat([chosen, d]).tolist()  # the one wait for the device
        resampled, d_host = host[: len(rows)], host[len(rows) :]
        accept = [c == x for c, x in zip(resampled, d_host)]
    else:
        q = torch.zeros(len(rows), logits.shape[-1], device=device)
        if len(draft_rows):
            q[draft_rows] = drafts.probs.float() if drafts.probs is not None else F.one_hot(
                d[draft_rows], logits.shape[-1]).float()  # fmt: skip
        accept, resampled = rejection_sample(probabilities(logits, rows), q, d, rows)
        d_host = d.tolist()
    out, at = [], 0
    for seq, k in zip(seqs, num_drafts):
        a = next((j for j in range(k) if not accept[at + j]), k)
        out.append(Verified(d_host[at : at + a] + [resampled[at + a]], a))
        at += k + 1
    if any(s.params.logprobs is not None for s in seqs):
        _add_logprobs(out, logits, seqs, num_drafts)
    return out


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: list[int] | torch.Tensor, rows: list[SampleRow]
                     ) -> tuple[list[bool], list[int]]:  # fmt: skip
    """For each row: whether draft drafts[r] ~ q[r] is accepted under p[r], and the token drawn from the normalised
    residual max(0, p - q) (what the row emits if it rejects). A row with q = 0 (no draft) always "rejects"
    and draws from p: the token after the last accepted draft. p, q: [rows, vocab]."""
    device = p.device
    d = torch.as_tensor(drafts, device=device)[:, None]
    uniform = torch.empty(len(rows), device=device)
    if any(r.generator is None for r in rows):
        uniform.uniform_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            uniform[i : i + 1].uniform_(generator=r.generator)
    accept = uniform * q.gather(-1, d)[:, 0] < p.gather(-1, d)[:, 0]  # u < p/q without dividing by q
    residual = (p - q).clamp_min_(0)
    # p == q to rounding, where the draft was still rejected: the residual is all zeros; p is the right law.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    return accept.tolist(), draw(residual, rows).tolist()


def _add_logprobs(out: list[Verified], logits: torch.Tensor, seqs: list[Sequence], num_drafts: list[int]) -> None:
    """Each emitted token's logprob under the model's raw distribution at its row, with the row's top ones."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    at = 0
    for v, seq, k in zip(out, seqs, num_drafts):
        n = seq.params.logprobs
        if n is not None:
            rows = raw[at : at + len(v.tokens)]
            chosen = rows.gather(-1, torch.tensor(v.tokens, device=raw.device)[:, None])[:, 0].tolist()
            top = rows.topk(n, dim=-1) if n else None
            v.logprobs = [TokenLogprob(t, lp, list(zip(top.indices[j].tolist(), top.values[j].tolist())) if n else [])
                          for j, (t, lp) in enumerate(zip(v.tokens, chosen))]  # fmt: skip
        at += k + 1
