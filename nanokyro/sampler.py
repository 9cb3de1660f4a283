"""Sampling: one batched pass from the step's logits to its next tokens."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from nanokyro.grammar import GrammarMatcher, TokenBitmask
from nanokyro.request import SamplingParams


@dataclass
class SampleRow:
    """One row of the step's logits and what the sampler needs to know about its request."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]  # tokens generated so far, before this step
    generator: torch.Generator | None = None  # per request, from make_generator, when params.seed is set
    matcher: GrammarMatcher | None = None  # its grammar's state, when params.structured is set


def make_generator(seed: int, device) -> torch.Generator:
    """A request's own random stream: its draws then depend only on its seed and how many steps it has run."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None] | None = None  # the sampled token's; None where the row did not ask
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per row, its k best (id, logprob), descending


class Sampler:
    """From the step's logits [num_rows, vocab] to one token per row, in one batched pass.

    Order: constrained rows' grammar masks; penalties; then greedy rows take the argmax; sampled rows go through
    temperature, top-k, top-p and min-p, and draw by the exponential race. Logprobs are of the raw model
    distribution (after a grammar's mask), as vLLM reports them. Whatever the parameters, the token drawn is one the
    grammar allows: penalties and temperature keep allowed logits finite and masked ones -inf (`_bounded`), and each
    filter keeps at least the row's best token.
    """

    def __init__(self):
        self.bitmask = TokenBitmask()  # constrained rows' allowed tokens, reused every step

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        return self.sample(logits, rows).result()

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> PendingSample:
        """Launch the sampling; the tokens stay on the device and start their way to the host."""
        params = [row.params for row in rows]
        constrained = any(row.matcher is not None for row in rows)
        want_logprobs = any(p.logprobs is not None for p in params)
        penalised, greedy = any(p.penalised for p in params), all(p.greedy for p in params)
        if constrained or want_logprobs or penalised or not greedy:  # masks, penalties and softmax in fp32; a
            logits = logits.float()  # plain argmax reads the model's dtype as it is (the same argmax)
        if constrained:  # grammar first: logprobs are of what may be sampled
            self.bitmask.apply(logits, [row.matcher for row in rows])
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if penalised:
            logits = apply_penalties(logits, rows)
        tokens = argmax(logits) if greedy else _sample(logits, rows)
        return PendingSample.start(tokens, raw_logprobs, params)


ARGMAX_CHUNK = 4096


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) for [rows, vocab], the first maximum of each row. For a few rows on CUDA torch reduces
    each row in one thread block or two, at batch 1 the biggest kernel outside the model (docs/PERFORMANCE.md):
    chunked_argmax spreads a row over the GPU in two Triton kernels."""
    R, V = logits.shape
    if not logits.is_cuda or R > 8 or V <= 4 * ARGMAX_CHUNK:
        return logits.argmax(dim=-1)
    return chunked_argmax(logits)


def chunked_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax of [rows, vocab] (any float dtype): the first maximum of each ARGMAX_CHUNK-token chunk, a program
    each, then each row's first best chunk. A row with NaN gets its first NaN, as from torch (but for a row that
    also holds +inf, which may come first)."""
    import triton

    R, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    chunks = triton.cdiv(V, ARGMAX_CHUNK)
    best = torch.empty(R, chunks, dtype=torch.float32, device=logits.device)
    at = torch.empty(R, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    chunk_max, best_chunk = _argmax_kernels()
    chunk_max[(R, chunks)](logits, best, at, V, logits.stride(0), chunk=ARGMAX_CHUNK, num_warps=8)
    best_chunk[(R,)](best, at, out, chunks, chunk=ARGMAX_CHUNK, block=triton.next_power_of_2(chunks))
    return out


@functools.cache
def _argmax_kernels():
    """chunked_argmax's kernels, built on first use (Triton needs a GPU, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_max_kernel(x_ptr, best_ptr, at_ptr, V, stride, chunk: tl.constexpr):
        row, c = tl.program_id(0), tl.program_id(1)
        cols = c * chunk + tl.arange(0, chunk)
        x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        # NaN is the largest, as torch's argmax has it: Triton's comparisons would let the padding's -inf win
        x = tl.where(x != x, float("inf"), x)
        best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(best_ptr + row * tl.num_programs(1) + c, best)
        tl.store(at_ptr + row * tl.num_programs(1) + c, at)

    @triton.jit
    def best_chunk_kernel(best_ptr, at_ptr, out_ptr, chunks, chunk: tl.constexpr, block: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, block)
        best = tl.load(best_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
        _, first = tl.max(best, 0, return_indices=True, return_indices_tie_break_left=True)
        at = tl.load(at_ptr + row * chunks + first)
        tl.store(out_ptr + row, first.to(tl.int64) * chunk + at)

    return chunk_max_kernel, best_chunk_kernel


def _filtered(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1 or p.min_p > 0


FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _per_row(values: list, device, dtype=torch.float32) -> torch.Tensor:
    """One parameter of every row as a [num_rows] tensor on the logits' device."""
    # non_blocking: a blocking copy from the host waits for the whole stream, i.e. for the step in flight. From
    # pageable memory the copy is staged at once, so the source may go right away.
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _token_index(token_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row token lists into (row, token) index pairs, each [total_tokens]."""
    lengths = torch.tensor([len(ids) for ids in token_lists])
    row_idx = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    token_idx = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    return row_idx.to(device, non_blocking=True), token_idx.to(device, non_blocking=True)  # as in _per_row


def _factors(values: list[float], device) -> torch.Tensor:
    """Positive divisors/multipliers (temperatures, repetition penalties) as fp32 [num_rows], kept inside fp32's
    normal range: 1e-300 would round to 0 and 1e300 to inf, and 0 or inf times a logit can make NaN."""
    return _per_row([min(max(v, FLOAT32_TINY), FLOAT32_MAX) for v in values], device)


def _bounded(processed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`processed` (from `logits` by a penalty or temperature) with every token `logits` allows kept finite and
    every token it masks (-inf: a grammar's, or a filter's) kept at -inf. An extreme penalty or temperature can
    overflow an allowed logit to +-inf; left so, a row could have no allowed token left to draw (all -inf) or
    several at +inf (softmax gives NaN), and the draw would land on a token the grammar forbids."""
    return processed.clamp(-FLOAT32_MAX, FLOAT32_MAX).masked_fill_(logits == float("-inf"), float("-inf"))


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition penalty (HF/CTRL) over prompt + output tokens, then presence and frequency penalties
    (OpenAI) over output tokens. logits [num_rows, vocab] fp32; returns a new tensor, whose masked (-inf) tokens
    stay masked and whose others stay finite however large the penalties."""
    params = [row.params for row in rows]
    before = logits
    if any(p.repetition_penalty != 1 for p in params):
        seen = torch.zeros_like(logits, dtype=torch.bool)
        rows_idx, tokens_idx = _token_index(
            [r.prompt_ids + r.output_ids if r.params.repetition_penalty != 1 else [] for r in rows], logits.device)
        seen[rows_idx, tokens_idx] = True
        penalty = _factors([p.repetition_penalty for p in params], logits.device)[:, None]
        # Dividing a negative logit would raise it, so negatives are multiplied: both make the token less likely.
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
        counts = torch.zeros_like(logits)
        rows_idx, tokens_idx = _token_index(
            [r.output_ids if r.params.presence_penalty or r.params.frequency_penalty else [] for r in rows],
            logits.device)
        counts.index_put_((rows_idx, tokens_idx), torch.ones(rows_idx.shape, device=logits.device), accumulate=True)
        frequency = _per_row([p.frequency_penalty for p in params], logits.device)[:, None]
        presence = _per_row([p.presence_penalty for p in params], logits.device)[:, None]
        logits = logits - frequency * counts - presence * (counts > 0)
    return _bounded(logits, before)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token that top-k, top-p or min-p drops; returns a new tensor.

    logits [num_rows, vocab] (after temperature); top_k [num_rows] int (0 = off); top_p, min_p [num_rows] float.
    Top-p works on the distribution top-k left (renormalised) and keeps the smallest set whose mass reaches
    top_p; min-p keeps tokens with prob >= min_p * max prob. Each filter is a cut-off value, and tokens tied
    with a cut-off are kept, so the kept set never depends on how the sort orders ties.
    """
    vocab = logits.shape[-1]
    ordered = logits.sort(dim=-1, descending=True).values  # [num_rows, vocab]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()
    kth = ordered.gather(-1, (k - 1)[:, None])  # [num_rows, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    # The first position whose cumulative mass reaches top_p closes the set. fp32 rounding can leave the
    # total just under 1 (hence the clamp) or reach 1 before the tail's tiny probs (hence top_p = 1 is no cut).
    last = (cumulative < top_p[:, None]).sum(dim=-1).clamp(max=vocab - 1)
    pth = torch.where(top_p[:, None] < 1, ordered.gather(-1, last[:, None]), float("-inf"))
    # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); log(0) = -inf keeps everything.
    mth = ordered[:, :1] + torch.log(min_p)[:, None]
    cutoff = torch.maximum(torch.maximum(kth, pth), mth)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _tempered(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Logits divided by each row's temperature (1 for greedy rows), with top-k, top-p and min-p applied. Tokens
    `logits` masks stay masked; every row keeps at least one of the others."""
    device = logits.device
    scaled = logits / _factors([1.0 if p.greedy else p.temperature for p in params], device)[:, None]
    if any(p.penalised for p in params):  # penalties may leave logits near fp32's limit, which a division overflows
        scaled = _bounded(scaled, logits)
    if any(_filtered(p) for p in params if not p.greedy):
        scaled = apply_top_k_top_p_min_p(
            scaled,
            _per_row([p.top_k for p in params], device, torch.long),
            _per_row([p.top_p for p in params], device),
            _per_row([p.min_p for p in params], device),
        )
    return scaled


def _sample(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Tokens [num_rows] for a batch with at least one sampled row; greedy rows still take the argmax."""
    params = [row.params for row in rows]
    device = logits.device
    probs = _tempered(logits, params).softmax(dim=-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i, and the noise
    # can come from each request's own generator, unlike torch.multinomial over the whole batch.
    sampled = probs.div_(_exponential_noise(probs, rows)).argmax(dim=-1)
    if not any(p.greedy for p in params):
        return sampled
    greedy = _per_row([p.greedy for p in params], device, torch.bool)
    return torch.where(greedy, argmax(logits), sampled)


def probabilities(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The distribution each row samples from [num_rows, vocab] fp32: penalties, then temperature, top-k, top-p and
    min-p; a greedy row is one-hot at its argmax. Speculative decoding's verification (spec_decode.py) compares
    the model's and the draft's distributions made by this same processing."""
    logits = logits.float()
    if any(row.params.penalised for row in rows):
        logits = apply_penalties(logits, rows)
    params = [row.params for row in rows]
    device = logits.device
    probs = torch.zeros_like(logits)
    if not all(p.greedy for p in params):
        probs = _tempered(logits, params).softmax(dim=-1)
    if any(p.greedy for p in params):
        one_hot = torch.zeros_like(logits).scatter_(-1, argmax(logits)[:, None], 1.0)
        probs = torch.where(_per_row([p.greedy for p in params], device, torch.bool)[:, None], one_hot, probs)
    return probs


def draw(probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """One token per row of `probs` [num_rows, vocab] (not necessarily normalised), by the exponential race."""
    return (probs / _exponential_noise(probs, rows, all_rows=True)).argmax(dim=-1)


def _exponential_noise(probs: torch.Tensor, rows: list[SampleRow], all_rows: bool = False) -> torch.Tensor:
    """Exp(1) noise like probs: one batched draw for unseeded rows; each seeded row redraws its own from its
    generator, so its tokens do not depend on its neighbours or its position in the batch (greedy rows too with
    `all_rows`)."""
    noise = torch.empty_like(probs)
    if any(row.generator is None for row in rows):
        noise.exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None and (all_rows or not row.params.greedy):
            noise[i].exponential_(generator=row.generator)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # a draw of exactly 0 would make 0/0 = nan win


@dataclass
class PendingSample:
    """A step's sampled tokens: on the device, where the next step's input ids read them, and on their way to
    the host with any logprobs, in one non-blocking copy. `result()` waits for that copy only."""

    tokens: torch.Tensor  # [num_rows] on the sampling device
    host: torch.Tensor  # [num_rows] ids, or [num_rows, 2 + 2k]: id, its logprob, k best ids, their logprobs
    params: list[SamplingParams]
    k: int  # top logprobs per row in `host`
    copied: torch.cuda.Event | None  # None on the CPU, where the copy is done when it returns

    @classmethod
    def start(cls, tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, params: list[SamplingParams]) -> PendingSample:
        k, packed = 0, tokens
        if raw_logprobs is not None:
            k = min(max(p.logprobs or 0 for p in params), raw_logprobs.shape[-1])
            columns = [tokens.float()[:, None], raw_logprobs.gather(-1, tokens[:, None])]
            if k:
                top = raw_logprobs.topk(k, dim=-1)  # sorted, descending
                columns += [top.indices.float(), top.values]
            packed = torch.cat(columns, dim=1)  # token ids are exact in fp32 (< 2**24)
        if packed.device.type != "cuda":
            return cls(tokens, packed, params, k, None)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(tokens, host, params, k, copied)

    @classmethod
    def empty(cls, device) -> PendingSample:
        return cls(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long), [], 0, None)

    def result(self) -> SamplerOutput:
        if self.copied is not None:
            self.copied.synchronize()
        if self.host.dim() == 1:
            return SamplerOutput(self.host.tolist())
        k = self.k
        token_ids, logprobs, top_logprobs = [], [], []
        for p, row in zip(self.params, self.host.tolist()):
            token_ids.append(int(row[0]))
            logprobs.append(row[1] if p.logprobs is not None else None)
            n = min(p.logprobs or 0, k)
            top_logprobs.append([(int(i), lp) for i, lp in zip(row[2:2 + n], row[2 + k:2 + k + n])])
        return SamplerOutput(token_ids, logprobs, top_logprobs)
