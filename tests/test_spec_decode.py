"""Speculative decoding on the CPU: greedy output with a draft model or n-gram drafts is HF transformers' greedy
output, however batched (mixed with rows that do not speculate, chunked, preempted, prefix-cached); the rejection
sampler keeps the model's distribution; rejected drafts leave no page and no prefix-cache entry behind; sampling
options keep their meaning; the server takes `"speculative": false` and shows the counters in /metrics."""
from __future__ import annotations

import gc
import os
import random

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import KEY, ServerThread, assert_no_leak, build_tiny_model
from nanokyro import LLM, SamplingParams
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.request import SamplingParams as Params
from nanokyro.runner import kv_bytes_per_page
from nanokyro.sampler import SampleRow
from nanokyro.server import create_app
from nanokyro.spec_decode import ngram_lookup, rejection_sample

PROMPT_LENS = [1, 3, 17, 40, 64, 100]
MAX_TOKENS = 24


def random_prompts(lens, seed=0, vocab=384):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> str:
    """A smaller random model with the target's vocabulary: its drafts are mostly rejected."""
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("draft")), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip


@pytest.fixture(scope="module")
def reference(llama_dir, hf_llama):
    """HF's greedy continuations, and prompts that repeat themselves (so n-gram drafts get accepted too)."""
    prompts = random_prompts(PROMPT_LENS, seed=3)
    prompts[2] = (prompts[2][:6] * 4)[:17]
    prompts[4] = (prompts[4][:10] * 7)[:64]
    refs = [hf_llama.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
            for p in prompts]  # fmt: skip
    return prompts, refs


def make_llm(path, **kw):
    opts = dict(dtype="float32", max_num_batched_tokens=512, max_num_seqs=8, kv_cache_memory=16 << 20, page_size=16)
    return LLM(path, **{**opts, **kw})


def proposer(name: str, llama_dir: str, draft_dir: str) -> dict:
    return {"ngram": dict(speculative_method="ngram"), "draft": dict(speculative_model=draft_dir),
            "self": dict(speculative_model=llama_dir),
            "self_small_head": dict(speculative_model=llama_dir, speculative_draft_vocab=200)}[name]  # fmt: skip


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.mark.parametrize("name", ["ngram", "draft", "self", "self_small_head"])
@pytest.mark.parametrize("mode", ["all_at_once", "mixed", "chunked", "preempted", "prefix_cached"])
def test_greedy_with_speculation_is_transformers_greedy(llama_dir, draft_dir, reference, name, mode):
    """'self' drafts with the model itself (every draft accepted), 'draft' with a smaller random model (nearly
    every one rejected), 'ngram' by prompt lookup, 'self_small_head' with the model scoring only its first 200 of
    384 token ids (its drafts are the model's except where the model's choice lies past them): each gives HF's
    greedy output, token for token."""
    prompts, refs = reference
    opts = proposer(name, llama_dir, draft_dir)
    params = [GREEDY] * len(prompts)
    if mode == "mixed":  # half the requests do not speculate: both kinds of rows in one step
        params = [GREEDY if i % 2 else Params(max_tokens=MAX_TOKENS, temperature=0, speculative=False)
                  for i in range(len(prompts))]  # fmt: skip
    if mode == "chunked":  # prompts split into chunks, and drafts cut by the budget (5 + 5 > 8)
        opts["max_num_batched_tokens"] = 8
    if mode == "preempted":  # room for ~2 of the longest sequences: speculating ones get preempted and resume
        page = kv_bytes_per_page(ModelConfig.from_dir(llama_dir), 16, torch.float32)
        draft_cfg = ModelConfig.from_dir(opts.get("speculative_model", llama_dir))
        draft_page = kv_bytes_per_page(draft_cfg, 16, torch.float32)
        opts["kv_cache_memory"] = 18 * (page + (draft_page if "speculative_model" in opts else 0))
    llm = make_llm(llama_dir, **opts)
    if mode == "prefix_cached":  # the second time, prompts come from the cache (pages and tree from the first run)
        llm.generate(prompts, params)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == refs
    assert [o.finish_reason for o in outs] == ["stop" if r[-1] == 2 else "length" for r in refs]
    stats = llm.engine.stats()
    assert stats.spec_verify_steps > 0 and stats.spec_draft_tokens > 0
    if name == "self":
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
    if mode == "preempted":
        assert stats.num_preemptions > 0
    if mode == "prefix_cached":
        assert stats.prefix_cache_hit_tokens > 0
    assert_no_leak(llm)


def test_rejection_sampling_keeps_the_target_distribution():
    """Drafts drawn from q, accepted with min(1, p/q), else replaced from the residual: the emitted token is
    distributed as p (chi-square over a 6-token vocabulary, 40000 draws; the 0.1% critical value for 5 degrees of
    freedom is 20.5). The draft alone would be far off."""
    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    q = torch.tensor([0.05, 0.1, 0.4, 0.05, 0.3, 0.1])
    n = 40000
    drafts = torch.multinomial(q, n, replacement=True).tolist()
    rows = [SampleRow(Params(temperature=1.0), [], [])] * n
    accept, resampled = rejection_sample(p.expand(n, -1).clone(), q.expand(n, -1).clone(), drafts, rows)
    emitted = torch.tensor([d if a else r for d, a, r in zip(drafts, accept, resampled)])
    counts = torch.bincount(emitted, minlength=6).double()
    expected = p.double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (counts / n, p)
    draft_chi2 = ((torch.bincount(torch.tensor(drafts), minlength=6).double() - expected) ** 2 / expected).sum()
    assert draft_chi2 > 1000
    assert 0.3 < sum(accept) / n < 0.7  # sum(min(p, q)) = 0.48: both branches are exercised


def test_one_hot_drafts_and_greedy_rows_verify_exactly():
    """n-gram drafts are one-hot q: accepted with probability p(d); a greedy row (p one-hot) accepts exactly its
    argmax and otherwise emits it."""
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the last row has no draft: q = 0
    rows = [SampleRow(Params(temperature=0), [], [])] * 2 + [SampleRow(Params(temperature=1.0), [], [])]
    for _ in range(20):
        accept, resampled = rejection_sample(p, q, [1, 0, 0], rows)
        assert accept[:2] == [True, False] and resampled[1] == 1


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the latest 3-gram match
    assert ngram_lookup([5, 6, 5], 4) == [6, 5]  # a 1-gram, and only what exists
    assert ngram_lookup([1, 2, 3], 2) == []
    assert ngram_lookup([4], 2) == []


def test_rejected_drafts_leave_no_pages_and_never_enter_the_prefix_cache(llama_dir, draft_dir, reference):
    """A random draft is rejected at nearly every step; afterwards every page is free, and every path in the
    radix tree is a prefix of a real sequence (prompt + output), so no rejected token was cached."""
    prompts, refs = reference
    llm = make_llm(llama_dir, speculative_model=draft_dir, num_speculative_tokens=5)
    outs = llm.generate(prompts, GREEDY)
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens - stats.spec_accepted_tokens > 100
    assert_no_leak(llm)
    sequences = [tuple(p + o.token_ids) for p, o in zip(prompts, outs)]
    cache = llm.engine.cache
    assert cache.num_nodes > 0
    for node in cache._nodes():
        path, at = [], node
        while at is not cache.root:
            path[:0] = at.key
            at = at.parent
        assert any(s[: len(path)] == tuple(path) for s in sequences)


@pytest.mark.parametrize("name", ["ngram", "self"])
def test_logprobs_penalties_and_stops_keep_their_meaning(llama_dir, draft_dir, name):
    """Greedy with logprobs (the model's raw ones, top 3), a repetition penalty and a stop token: the same tokens,
    logprobs and finish as without speculation."""
    prompts = random_prompts([12, 30], seed=5)
    prompts[1] = (prompts[1][:5] * 6)[:30]
    plain = make_llm(llama_dir)
    spec = make_llm(llama_dir, **proposer(name, llama_dir, draft_dir))
    free = plain.generate(prompts[1], GREEDY)[0].token_ids
    cases = [Params(max_tokens=16, temperature=0, logprobs=3, ignore_eos=True),
             Params(max_tokens=16, temperature=0, repetition_penalty=1.3, ignore_eos=True),
             Params(max_tokens=16, temperature=0, stop_token_ids=[free[9]], ignore_eos=True),
             Params(max_tokens=16, temperature=0, repetition_penalty=1e-300, ignore_eos=True),  # 0 in fp32
             Params(max_tokens=16, temperature=0, repetition_penalty=1e300, ignore_eos=True)]  # inf in fp32  # fmt: skip
    for params in cases:
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            if params.logprobs is not None:
                for lw, lg in zip(w.logprobs, g.logprobs):
                    assert lg.token_id == lw.token_id and lg.logprob == pytest.approx(lw.logprob, abs=1e-4)
                    assert [t for t, _ in lg.top] == [t for t, _ in lw.top]
    # A stop string inside a step's several tokens: the same text, and the tokens end where it ends.
    text = plain.generate(prompts[1], GREEDY)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        params = Params(max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
        w, g = plain.generate(prompts[1], params)[0], spec.generate(prompts[1], params)[0]
        assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, "stop")
    assert spec.engine.stats().spec_verify_steps > 0
    assert_no_leak(spec)


def test_seeded_sampling_with_speculation_is_reproducible_and_n_gt_1_works(llama_dir):
    """Sampled requests (temperature, top-k, top-p, a seed, n = 3) speculate too, reproducibly, with no leak."""
    llm = make_llm(llama_dir, speculative_model=llama_dir)
    params = Params(n=3, max_tokens=20, temperature=0.8, top_k=50, top_p=0.95, seed=11, ignore_eos=True)
    prompt = random_prompts([20], seed=9)[0]
    first = [o.token_ids for o in llm.generate(prompt, params)[0].outputs]
    again = [o.token_ids for o in llm.generate(prompt, params)[0].outputs]
    assert first == again and all(len(t) == 20 for t in first)
    stats = llm.engine.stats()
    # The draft is the model itself with the same processing: p == q, so every draft is accepted.
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens > 0
    # So too at the edges of the parameters' ranges (a penalty of 0 and a temperature of inf in fp32): p and q stay
    # finite distributions, equal, and the drafts are all accepted still.
    extreme = Params(n=3, max_tokens=20, temperature=1e300, top_p=1e-300, repetition_penalty=1e-300, seed=11,
                     ignore_eos=True)  # fmt: skip
    assert all(len(o.token_ids) == 20 for o in llm.generate(prompt, extreme)[0].outputs)
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens
    assert_no_leak(llm)


def test_speculation_turns_off_for_large_batches_and_grammar_rows(llama_dir):
    llm = make_llm(llama_dir, speculative_method="ngram", speculative_max_batch=2)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6]] * 4
    llm.generate(prompts, Params(max_tokens=4, temperature=0, ignore_eos=True))
    assert llm.engine.stats().spec_verify_steps == 0  # four running > 2
    structured = Params(max_tokens=8, temperature=0, structured={"choice": ["yes", "no"]})
    llm.generate([5, 6, 7], structured)
    assert llm.engine.stats().spec_verify_steps == 0
    assert_no_leak(llm)


def test_bad_speculative_options_are_refused(llama_dir, draft_dir, tmp_path):
    bad = [(dict(speculative_method="medusa"), "speculative_method"),
           (dict(speculative_method="draft"), "needs a speculative_model"),
           (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens")]
    bad.append((dict(speculative_method="ngram", speculative_draft_vocab=10), "speculative_draft_vocab"))
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            make_llm(llama_dir, **kw)
    other = build_tiny_model("llama", str(tmp_path / "other"), vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(llama_dir, speculative_model=other)
    with pytest.raises(ValueError, match=r"speculative_draft_vocab must be in \[1, 384\]"):
        make_llm(llama_dir, speculative_model=draft_dir, speculative_draft_vocab=1000)


def test_server_takes_speculative_false_and_shows_the_counters(llama_dir):
    cfg = EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=4,
                       speculative_model=llama_dir)  # fmt: skip
    srv = ServerThread(create_app(cfg, api_key=KEY))
    try:
        client = srv.client()
        prompt = [5, 6, 7, 8] * 6
        off = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True, "speculative": False})  # fmt: skip
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)}
        assert families["nanokyro_spec_decode_num_drafts"].samples[0].value == 0
        on = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
        assert on.choices[0].text == off.choices[0].text
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)}
        drafts = families["nanokyro_spec_decode_num_draft_tokens"].samples[0].value
        accepted = families["nanokyro_spec_decode_num_accepted_tokens"].samples[0].value
        steps = families["nanokyro_spec_decode_num_drafts"].samples[0].value
        assert steps > 0 and drafts == accepted > 0  # the model drafting for itself
        mean = families["nanokyro_spec_decode_mean_accepted_length"].samples[0].value
        assert mean == pytest.approx(1 + accepted / steps)
        with pytest.raises(openai_bad_request()):
            client.completions.create(model=srv.model, prompt=prompt, max_tokens=4, extra_body={"speculative": "x"})
    finally:
        srv.stop()


def openai_bad_request():
    import openai

    return openai.BadRequestError


PAIR = ("/work/models/target.gguf", "/work/models/draft.gguf")


@pytest.mark.skipif(not (os.environ.get("NANOKYRO_SPEC_PAIR") and all(map(os.path.exists, PAIR))),
                    reason="set NANOKYRO_SPEC_PAIR=1 with the Qwen2.5-Coder 1.5B/0.5B GGUF pair in /work/models")
def test_greedy_speculation_on_a_real_pair_matches_plain_greedy():
    """Opt-in (slow): the real draft/target pair gives, with a draft model and with n-gram drafts, exactly what
    the target alone gives, and the draft is mostly accepted on code."""
    prompt = "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n"
    params = Params(max_tokens=32, temperature=0, ignore_eos=True)
    opts = dict(dtype="float32", kv_cache_memory=256 << 20, max_num_seqs=4)
    llm = LLM(PAIR[0], **opts, speculative_model=PAIR[1])
    plain_params = Params(max_tokens=32, temperature=0, ignore_eos=True, speculative=False)
    want = llm.generate(prompt, plain_params)[0].token_ids
    assert llm.generate(prompt, params)[0].token_ids == want
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens > stats.spec_draft_tokens / 3
    del llm  # one 1.5B model in fp32 at a time
    gc.collect()
    llm = LLM(PAIR[0], **opts, speculative_method="ngram")
    assert llm.generate(prompt, params)[0].token_ids == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speculation_with_graphs_and_without():
    """On the GPU: in fp32 through the torch backend (no graphs), greedy with a self-draft and with n-gram drafts
    is greedy without; in bf16 through FlashInfer and the decode graphs, the model drafting for itself is
    mostly accepted (its drafts run one-token graphs, the verify step a k + 1-row one: bf16 rounding may differ
    and flip a near-tie) and no page leaks."""
    prompt = torch.randint(0, 151936, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    params = Params(max_tokens=48, temperature=0, ignore_eos=True)
    opts = dict(load_format="dummy", kv_cache_memory=1 << 30, max_num_seqs=8)
    eager = dict(opts, dtype="float32", attention_backend="torch", enforce_eager=True)
    want = LLM("qwen3-0.6b", **eager).generate(prompt, params)[0].token_ids
    for kw in (dict(speculative_model="qwen3-0.6b"), dict(speculative_method="ngram")):
        llm = LLM("qwen3-0.6b", **eager, **kw)
        assert llm.generate(prompt, params)[0].token_ids == want
        assert_no_leak(llm)
        del llm
    llm = LLM("qwen3-0.6b", dtype="bfloat16", speculative_model="qwen3-0.6b", **opts)
    assert llm.engine.runner.graphs is not None and llm.engine.proposer.runner.graphs is not None
    llm.generate([prompt, prompt[:20]], params)
    stats = llm.engine.stats()
    # Random weights have many near-ties, where the 1-row and the k + 1-row graphs' rounding can disagree; a
    # wrong draft KV or page would accept next to nothing.
    assert stats.spec_accepted_tokens > 0.5 * stats.spec_draft_tokens
    assert_no_leak(llm)


def test_the_draft_prefills_the_prompt_beside_the_model(llama_dir, draft_dir):
    """The draft's KV of the prompt is computed in the model's prefill step (prompt time), not caught up in the
    first speculative step (decode time); a request that opts out of speculation costs the draft nothing."""
    llm = make_llm(llama_dir, speculative_model=draft_dir, overlap_schedule=False)
    engine = llm.engine
    first, second = random_prompts([40, 40], seed=11)
    on = engine.add_request(first, SamplingParams(max_tokens=4, temperature=0))
    off = engine.add_request(second, SamplingParams(max_tokens=4, temperature=0, speculative=False))
    engine.step()  # both prompts in one step
    (seq_on,), (seq_off,) = engine.requests[on], engine.requests[off]
    assert seq_on.num_computed == seq_off.num_computed == 40
    assert (seq_on.num_draft_computed, seq_off.num_draft_computed) == (40, 0)
    engine.fail_all()
    assert_no_leak(llm)
