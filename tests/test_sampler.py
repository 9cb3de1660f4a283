"""The sampler: filters keep exactly the right tokens, penalties follow their published definitions, seeded rows
reproduce wherever they sit in a batch, draws follow softmax(logits / T), logprobs are the raw distribution's."""
import math

import pytest
import torch
from conftest import run_in_interpreter

from nanokyro.sampler import (
    SampleRow,
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_top_k_top_p_min_p,
    make_generator,
    probabilities,
)


def row(prompt_ids=(), output_ids=(), **params) -> SampleRow:
    p = SamplingParams(**params)
    generator = make_generator(p.seed, "cpu") if p.seed is not None else None
    return SampleRow(p, list(prompt_ids), list(output_ids), generator)


def kept(logits, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """Token ids that survive the filters, for a single row of logits."""
    out = apply_top_k_top_p_min_p(torch.tensor([logits]), torch.tensor([top_k]), torch.tensor([top_p]),
                                  torch.tensor([min_p]))
    return set(torch.isfinite(out[0]).nonzero().flatten().tolist())


def log(probs):
    return [math.log(p) for p in probs]


# --- filters --------------------------------------------------------------------------------------------------

ARGMAX_CHECK = r"""
import torch
from nanokyro.sampler import ARGMAX_CHUNK, chunked_argmax

gen = torch.Generator().manual_seed(0)
V = 5 * ARGMAX_CHUNK + 123  # a partial last chunk
logits = torch.randn(9, V, generator=gen)
logits[1, [7, ARGMAX_CHUNK + 1, V - 1]] = 50.0  # a tie across chunks: the first wins
logits[2, [ARGMAX_CHUNK - 1, ARGMAX_CHUNK]] = 50.0  # a tie across a chunk boundary
logits[3, :] = float("-inf")
logits[3, V - 1] = 0.0  # the maximum in the padded last chunk
logits[4, 100:] = float("-inf")
logits[5, :] = 1.0  # all equal: token 0
logits[6, :] = float("-inf")  # nothing finite: token 0, as torch
logits[7, [ARGMAX_CHUNK + 3, V - 2]] = float("nan")  # NaN is the largest: the first one, as torch
logits[8, :] = float("nan")  # NaN everywhere: token 0, never one past the vocab
for x in (logits, logits.bfloat16(), logits.half()):
    got = chunked_argmax(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1)), (got, x.argmax(dim=-1))
    assert got.tolist()[1:] == [7, ARGMAX_CHUNK - 1, V - 1, x[4, :100].argmax().item(), 0, 0, ARGMAX_CHUNK + 3, 0]
print(len(got))
"""


def test_chunked_argmax_is_the_first_maximum():
    """The Triton argmax used for a few rows on CUDA (in Triton's interpreter) equals torch's, ties (the first one
    wins), rows of -inf or NaN and the model's dtypes all. (The interpreter breaks ties to the left whatever the
    kernel asks: the GPU test checks the ties again.)"""
    assert run_in_interpreter(ARGMAX_CHECK) == "9"


def test_top_k_keeps_the_k_largest_logits():
    logits = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert kept(logits, top_k=3) == {4, 2, 0}
    assert kept(logits, top_k=1) == {4}
    assert kept(logits, top_k=0) == set(range(6))  # off
    assert kept(logits, top_k=100) == set(range(6))  # more than the vocab


def test_top_k_keeps_every_token_tied_with_the_kth():
    assert kept([5.0, 2.0, 2.0, 2.0, 1.0], top_k=2) == {0, 1, 2, 3}
    assert kept([3.0, 3.0, 1.0], top_k=1) == {0, 1}


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p():
    # Dyadic probabilities are exact in fp32, so the boundary cases below are exact too.
    logits = log([0.125, 0.5, 0.0625, 0.25, 0.0625])
    assert kept(logits, top_p=0.01) == {1}
    assert kept(logits, top_p=0.5) == {1}  # 0.5 alone reaches 0.5
    assert kept(logits, top_p=0.74) == {1, 3}
    assert kept(logits, top_p=0.75) == {1, 3}  # mass exactly top_p: no third token
    assert kept(logits, top_p=0.76) == {1, 3, 0}
    assert kept(logits, top_p=0.875) == {1, 3, 0}
    assert kept(logits, top_p=0.9) == {0, 1, 2, 3, 4}  # the two 0.0625s are tied at the cut
    assert kept(logits, top_p=1.0) == {0, 1, 2, 3, 4}


def test_top_p_keeps_tokens_tied_with_the_last_one_needed():
    assert kept(log([0.5, 0.2, 0.2, 0.1]), top_p=0.6) == {0, 1, 2}


def test_top_p_one_keeps_a_long_tail_of_tiny_probabilities():
    # fp32 cumsum saturates at 1 long before the tail ends; top_p = 1 must still cut nothing.
    logits = [20.0] + [-20.0] * 5000
    assert kept(logits, top_p=1.0) == set(range(5001))


def test_top_p_applies_to_the_distribution_top_k_left():
    logits = log([0.5, 0.25, 0.125, 0.125])
    assert kept(logits, top_p=0.6) == {0, 1}
    # top-k 2 renormalises to [2/3, 1/3]: 2/3 alone reaches 0.6.
    assert kept(logits, top_k=2, top_p=0.6) == {0}


def test_min_p_keeps_tokens_above_a_fraction_of_the_top_probability():
    logits = log([0.4, 0.3, 0.19, 0.11])
    assert kept(logits, min_p=0.8) == {0}  # threshold 0.32
    assert kept(logits, min_p=0.5) == {0, 1}  # threshold 0.2
    assert kept(logits, min_p=0.25) == {0, 1, 2, 3}  # threshold 0.1
    assert kept(logits, min_p=0.0) == {0, 1, 2, 3}


def test_filters_read_each_rows_own_parameters():
    logits = torch.tensor([[3.0, 1.0, 4.0, 1.5], [3.0, 1.0, 4.0, 1.5], [3.0, 1.0, 4.0, 1.5]])
    out = apply_top_k_top_p_min_p(logits, torch.tensor([1, 0, 3]), torch.tensor([1.0, 1.0, 1.0]),
                                  torch.tensor([0.0, 0.05, 0.0]))
    finite = torch.isfinite(out)
    assert finite[0].nonzero().flatten().tolist() == [2]
    # min-p 0.05: keep logit >= 4 + ln(0.05) = 1.004, so 1.0 goes.
    assert finite[1].nonzero().flatten().tolist() == [0, 2, 3]
    assert finite[2].nonzero().flatten().tolist() == [0, 2, 3]
    assert torch.equal(out[finite], logits[finite])  # kept logits are untouched


# --- greedy -----------------------------------------------------------------------------------------------------

def test_temperature_zero_takes_the_argmax_in_any_dtype():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)).bfloat16()
    rows = [row(temperature=0), row(temperature=0, seed=3), row(temperature=0, top_k=5, top_p=0.1),
            row(temperature=0), row(temperature=0, min_p=0.9)]
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_greedy_fast_path_returns_only_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 3.0]])
    out = Sampler()(logits, [row(temperature=0), row(temperature=0)])
    assert out.token_ids == [1, 0]
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    rows = [row(temperature=0) if i % 2 == 0 else row(temperature=1.5) for i in range(6)]
    out = Sampler()(logits, rows)
    assert out.token_ids[::2] == logits.argmax(-1)[::2].tolist()


# --- seeds ------------------------------------------------------------------------------------------------------

def _run(steps_logits, make_rows, position):
    """Tokens of the row at `position` over the steps; make_rows() builds the batch's rows once."""
    sampler, rows, tokens = Sampler(), make_rows(), []
    for logits in steps_logits:
        tokens.append(sampler(logits[: len(rows)], rows).token_ids[position])
    return tokens


def test_seeded_row_gives_the_same_tokens_alone_and_anywhere_in_a_batch():
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(4, 1000, generator=g) for _ in range(30)]
    seeded = dict(temperature=0.8, top_p=0.95, seed=7)

    def shuffled(position, batch_size):
        # The seeded row's logits move with it; its neighbours see the other rows' logits.
        order = [position] + [i for i in range(batch_size) if i != position]
        inverse = [order.index(i) for i in range(batch_size)]
        return [s[:batch_size][inverse] for s in steps]

    alone = _run(steps, lambda: [row(**seeded)], 0)
    at_1 = _run(shuffled(1, 3), lambda: [row(temperature=1.0), row(**seeded), row(temperature=0.5, seed=8)], 1)
    at_3 = _run(shuffled(3, 4), lambda: [row(temperature=1.0, seed=8), row(temperature=1.0), row(temperature=0),
                                         row(**seeded)], 3)
    assert alone == at_1 == at_3
    other_seed = _run(steps, lambda: [row(**{**seeded, "seed": 8})], 0)
    assert other_seed != alone


# --- distribution -----------------------------------------------------------------------------------------------

def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token the filters removed"
    expected = n * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum())


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_unseeded_draws_follow_softmax_of_logits_over_temperature():
    torch.manual_seed(0)
    n, temperature = 20000, 0.7
    out = Sampler()(LOGITS.expand(n, -1), [row(temperature=temperature)] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    # 5 degrees of freedom: P(chi2 > 25) ~ 1e-4 for a correct sampler.
    assert _chi_square(counts, (LOGITS.double() / temperature).softmax(-1)) < 25


def test_seeded_draws_follow_the_top_k_renormalised_distribution():
    sampler, r = Sampler(), row(temperature=1.3, top_k=3, seed=123)
    tokens = [sampler(LOGITS[None], [r]).token_ids[0] for _ in range(3000)]
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = torch.zeros(6, dtype=torch.double)
    expected[:3] = (LOGITS[:3].double() / 1.3).softmax(-1)
    assert _chi_square(counts, expected) < 20  # 2 degrees of freedom: P(chi2 > 20) ~ 5e-5


def test_min_p_is_relative_to_the_top_probability_after_temperature():
    torch.manual_seed(0)
    # p1 / p0 = e^(-1/T): 0.37 at T = 1 passes min_p 0.2; 0.14 at T = 0.5 does not.
    logits = torch.tensor([0.0, -1.0]).expand(500, -1)
    hot = Sampler()(logits, [row(temperature=1.0, min_p=0.2)] * 500).token_ids
    cold = Sampler()(logits, [row(temperature=0.5, min_p=0.2)] * 500).token_ids
    assert 1 in hot
    assert set(cold) == {0}


# --- penalties --------------------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
    r = row(prompt_ids=[0, 1], output_ids=[1, 5], repetition_penalty=2.0)
    # seen: 0 (2 -> 1), 1 (-1 -> -2), 5 (0 stays 0); unseen 2, 3, 4 untouched.
    assert apply_penalties(logits, [r]).tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0, 0.0]]


def test_presence_and_frequency_penalties_subtract_per_output_occurrence():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    r = row(prompt_ids=[0], output_ids=[2, 2, 2, 4], frequency_penalty=0.5, presence_penalty=0.25)
    # token 2: 1 - 0.5*3 - 0.25 = -0.75; token 4: 1 - 0.5*1 - 0.25 = 0.25; prompt token 0 is not counted.
    assert apply_penalties(logits, [r]).tolist() == [[1.0, 1.0, -0.75, 1.0, 0.25]]
    rewarded = row(output_ids=[3, 3], frequency_penalty=-1.0, presence_penalty=-0.5)
    assert apply_penalties(logits, [rewarded]).tolist() == [[1.0, 1.0, 1.0, 3.5, 1.0]]


def test_repetition_penalty_applies_before_frequency_penalty():
    logits = torch.tensor([[4.0, 0.0]])
    r = row(output_ids=[0], repetition_penalty=2.0, frequency_penalty=1.0)
    assert apply_penalties(logits, [r]).tolist() == [[4.0 / 2 - 1.0, 0.0]]  # not (4 - 1) / 2


def test_penalties_touch_only_the_rows_that_ask_for_them():
    logits = torch.tensor([[2.5, 1.0, -1.0], [2.0, 1.0, -1.0], [2.0, 1.0, -1.0]])
    rows = [row(output_ids=[0, 2], repetition_penalty=1.25), row(output_ids=[0, 1, 2]),
            row(output_ids=[1, 1], presence_penalty=1.0)]
    assert apply_penalties(logits, rows).tolist() == [[2.0, 1.0, -1.25], [2.0, 1.0, -1.0], [2.0, 0.0, -1.0]]


# Parameters at the edges of what SamplingParams accepts: in fp32, 1e-300 rounds to 0 and 1e300 to inf.
EXTREMES = [
    dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300), dict(temperature=1e300),
    dict(top_p=1e-300, repetition_penalty=1e300), dict(top_p=1e-300, repetition_penalty=1e-300),
    dict(top_k=1, temperature=1e-5, repetition_penalty=1e-300), dict(min_p=1.0, repetition_penalty=1e-40),
    dict(temperature=0, repetition_penalty=1e-300), dict(temperature=0, repetition_penalty=1e300),
    dict(temperature=2, presence_penalty=-2, frequency_penalty=-2, repetition_penalty=1e-300),
]  # fmt: skip


@pytest.mark.parametrize("params", EXTREMES, ids=str)
def test_extreme_parameters_only_ever_draw_tokens_a_mask_allows(params):
    """Rows masked as a grammar masks them (-inf outside 1 to 34 allowed tokens), every token seen, so the penalty
    reaches allowed and masked ones: whatever the parameters, each draw is an allowed token, and the distribution
    speculative decoding verifies with is finite, sums to 1 and puts nothing on a masked token."""
    torch.manual_seed(0)
    vocab, sizes = 64, (1, 2, 3, 5, 8, 13, 21, 34)
    allowed = [set(torch.randperm(vocab)[:k].tolist()) for k in sizes]
    mask = torch.full((len(sizes), vocab), float("-inf"))
    for i, tokens in enumerate(allowed):
        mask[i, list(tokens)] = 0.0
    logits = torch.randn(len(sizes), vocab) * 5 + mask  # positive and negative logits among the allowed
    rows = [row(prompt_ids=range(vocab), output_ids=[i, i], seed=i, **params) for i in range(len(sizes))]
    sampler = Sampler()
    for _ in range(20):
        tokens = sampler(logits.clone(), rows).token_ids
        assert all(t in a for t, a in zip(tokens, allowed)), (tokens, params)
    probs = probabilities(logits, rows)
    assert torch.isfinite(probs).all() and (probs[mask.isinf()] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(sizes)))


# --- logprobs ---------------------------------------------------------------------------------------------------

def test_logprobs_are_the_raw_log_softmax_and_top_logprobs_the_k_best():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    rows = [row(output_ids=[0, 1], temperature=0.7, repetition_penalty=1.3, logprobs=3),
            row(temperature=0, logprobs=0), row(temperature=1.0)]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    assert out.logprobs[1] == pytest.approx(raw[1].max().item(), abs=1e-6)
    assert out.logprobs[2] is None
    best = raw[0].topk(3)
    assert [i for i, _ in out.top_logprobs[0]] == best.indices.tolist()
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


# --- everything together ----------------------------------------------------------------------------------------

def test_mixed_batch_of_greedy_sampled_seeded_and_penalised_rows():
    logits = torch.tensor([
        [1.0, 3.0, 2.0, 0.0],  # greedy -> 1
        [1.0, 3.0, 2.0, 0.0],  # greedy, repetition 2 on token 1: 3 -> 1.5 < 2 -> 2
        [1.0, 3.0, 2.0, 0.0],  # sampled with top-k 1 -> 1
        [1.0, 3.0, 2.0, 0.0],  # sampled, presence 1.5 on token 1 and top-k 1: 3 -> 1.5 < 2 -> 2
        [0.5, 0.4, 0.3, 0.2],  # seeded, compared with the same row sampled alone
    ])
    seeded = dict(temperature=1.0, seed=99)
    rows = [row(temperature=0), row(prompt_ids=[1], temperature=0, repetition_penalty=2.0),
            row(temperature=0.9, top_k=1), row(output_ids=[1], temperature=0.9, top_k=1, presence_penalty=1.5),
            row(**seeded, logprobs=1)]
    out = Sampler()(logits, rows)
    alone = Sampler()(logits[4:], [row(**seeded)])
    assert out.token_ids == [1, 2, 1, 2, alone.token_ids[0]]
    assert out.logprobs[:4] == [None] * 4
    assert out.top_logprobs[4] == [(0, pytest.approx(torch.log_softmax(logits[4], -1)[0].item(), abs=1e-6))]
