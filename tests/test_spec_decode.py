"""Speculative decoding on the CPU: greedy output with a draft model or n-gram drafts is HF transformers' greedy
output, however batched (mixed with rows that do not speculate, chunked, preempted, prefix-cached); the rejection
sampler keeps the model's distribution; rejected drafts leave no page and no prefix-cache entry behind; sampling
options keep their meaning; the server takes `"speculative": false` and shows the counters in /metrics. Under a
grammar (structured outputs) the text it forces is drafted and verified under its masks: greedy output is HF's with
xgrammar's logits processor, sampling keeps the masked distribution, and probing leaves the matcher as it was."""
from __future__ import annotations

import gc
import os
import random

import json
import math

import httpx
import msgspec
import pytest
import torch
import xgrammar as xgr
from prometheus_client.parser import text_string_to_metric_families

from conftest import KEY, ServerThread, assert_no_leak, build_tiny_model
from nanokyro import LLM, SamplingParams
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.grammar import draft_bitmasks, only_allowed
from nanokyro.request import PromptError
from nanokyro.request import SamplingParams as Params
from nanokyro.request import StructuredOutput
from nanokyro.runner import kv_bytes_per_page
from nanokyro.sampler import SampleRow
from nanokyro.scheduler import Sequence
from nanokyro.server import create_app
from nanokyro.spec_decode import Drafts, grammar_drafts, ngram_lookup, rejection_sample, verify

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
    return {"ngram": dict(speculative_method="ngram"), "grammar": dict(speculative_method="grammar"),
            "draft": dict(speculative_model=draft_dir),
            "self": dict(speculative_model=llama_dir),
            "self_small_head": dict(speculative_model=llama_dir, speculative_draft_vocab=200),
            "self_int8": dict(speculative_model=llama_dir, speculative_draft_quantization="int8"),
            "self_int8_small_head": dict(speculative_model=llama_dir, speculative_draft_quantization="int8",
                                         speculative_draft_vocab=200)}[name]  # fmt: skip


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.mark.parametrize("name", ["ngram", "draft", "self", "self_small_head", "self_int8", "self_int8_small_head"])
@pytest.mark.parametrize("mode", ["all_at_once", "mixed", "chunked", "preempted", "prefix_cached"])
def test_greedy_with_speculation_is_transformers_greedy(llama_dir, draft_dir, reference, name, mode):
    """'self' drafts with the model itself (every draft accepted), 'draft' with a smaller random model (nearly
    every one rejected), 'ngram' by prompt lookup, 'self_small_head' with the model scoring only its first 200 of
    384 token ids (its drafts are the model's except where the model's choice lies past them), 'self_int8' with
    the model's weights in int8 (and its head cut, in '_small_head'): each gives HF's greedy output, token for
    token."""
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
    if name == "self_int8":  # a random model's logits are near-flat, so int8 rounding flips about half of its
        # choices here (52% accepted with all prompts at once); a broken int8 matmul would be near chance (1 / 384)
        assert stats.spec_accepted_tokens >= 0.3 * stats.spec_draft_tokens
        # the draft's head multiplies its int8 copy (fbgemm's packed weight), not oneDNN's fp32 one
        assert isinstance(llm.engine.proposer.runner.model.head.head_weight, torch.ScriptObject)
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
    assert stop.strip(), text  # (a model whose text has no such piece here would skip the check silently)
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


def test_speculation_turns_off_for_large_batches(llama_dir):
    """Past speculative_max_batch running sequences no step speculates; at the limit they do (the model drafts for
    itself, so every sequence that may speculate has a draft)."""
    llm = make_llm(llama_dir, speculative_model=llama_dir, speculative_max_batch=2)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6]] * 4
    params = Params(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate(prompts, params)
    assert llm.engine.stats().spec_verify_steps == 0  # four running > 2
    llm.generate(prompts[:2], params)
    assert llm.engine.stats().spec_verify_steps > 0  # two running: the same prompts speculate
    assert_no_leak(llm)


def test_bad_speculative_options_are_refused(llama_dir, draft_dir, tmp_path):
    bad = [(dict(speculative_method="medusa"), "speculative_method"),
           (dict(speculative_method="draft"), "needs a speculative_model"),
           (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
           (dict(speculative_method="grammar", speculative_model=draft_dir), "'grammar' takes no speculative_model")]
    bad.append((dict(speculative_method="ngram", speculative_draft_vocab=10), "speculative_draft_vocab"))
    bad += [(dict(speculative_model=draft_dir, speculative_draft_quantization="int4"), "takes 'int8'"),
            (dict(speculative_method="ngram", speculative_draft_quantization="int8"), "with a speculative_model"),
            (dict(quantization="int8"), "speculative_draft_quantization='int8'")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            make_llm(llama_dir, **kw)
    other = build_tiny_model("llama", str(tmp_path / "other"), vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(llama_dir, speculative_model=other)
    with pytest.raises(ValueError, match=r"speculative_draft_vocab must be in \[1, 384\]"):
        make_llm(llama_dir, speculative_model=draft_dir, speculative_draft_vocab=1000)
    cuda = EngineConfig(model=llama_dir, device="cuda", speculative_model=draft_dir,
                        speculative_draft_quantization="int8")  # fmt: skip
    with pytest.raises(ValueError, match="CPU only"):  # checked before anything is loaded
        cuda.spec_method()


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
        assert families["nanokyro_spec_decode_num_forced_tokens"].samples[0].value == 0  # no grammar here
        with pytest.raises(openai_bad_request()):
            client.completions.create(model=srv.model, prompt=prompt, max_tokens=4, extra_body={"speculative": "x"})
    finally:
        srv.stop()


def openai_bad_request():
    import openai

    return openai.BadRequestError


# The directory ../shared/models/fetch_qwen_coder_pair.sh filled (target.gguf, draft.gguf), e.g. /work/models/qwen.
PAIR_DIR = os.environ.get("NANOKYRO_SPEC_PAIR", "")
PAIR = (os.path.join(PAIR_DIR, "target.gguf"), os.path.join(PAIR_DIR, "draft.gguf"))


@pytest.mark.skipif(not (PAIR_DIR and all(map(os.path.exists, PAIR))),
                    reason="set NANOKYRO_SPEC_PAIR to the directory that fetch_qwen_coder_pair.sh filled")
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



def test_a_draft_with_fewer_positions_bounds_the_context(llama_dir, tmp_path):
    """A draft whose RoPE table is shorter than the model's (max_position_embeddings 48 against 1024) caps the
    engine's context: a request past it is refused as one past the model's would be, and one up to it runs to
    its last position (before, the draft's table lookup raised IndexError there)."""
    short = build_tiny_model("llama", str(tmp_path / "short"), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=48)  # fmt: skip
    llm = make_llm(llama_dir, speculative_model=short)
    assert llm.engine.max_model_len == 48
    prompt = random_prompts([40], seed=5)[0]
    with pytest.raises(PromptError, match="maximum context length is 48 tokens"):
        llm.generate([prompt], SamplingParams(max_tokens=9, temperature=0))
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert (len(out.token_ids), out.finish_reason) == (8, "length")
    assert_no_leak(llm)

# -- structured outputs: what the grammar forces, drafted for free ---------------------------------------------

# Fixed keys (forced text) between free values that a random model finishes quickly.
RECORD = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "size", "tags", "ok"],
}


def hf_grammar_greedy(hf_model, model_dir: str, schema: dict, prompt: list[int], max_new: int) -> list[int]:
    """transformers' greedy output under xgrammar's own logits processor, the schema compiled as nanokyro compiles
    it (compact JSON) against the HF tokenizer."""
    import transformers
    from xgrammar.contrib.hf import LogitsProcessor

    info = xgr.TokenizerInfo.from_huggingface(transformers.AutoTokenizer.from_pretrained(model_dir),
                                              vocab_size=hf_model.config.vocab_size, stop_token_ids=[2])  # fmt: skip
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=2,
                            logits_processor=[LogitsProcessor(grammar)])  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def grammar_reference(llama_dir, hf_llama, reference):
    prompts = reference[0][:3]
    return prompts, [hf_grammar_greedy(hf_llama, llama_dir, RECORD, p, 64) for p in prompts]


@pytest.mark.parametrize("name", ["ngram", "self", "draft", "grammar", "ngram_chunked"])
def test_greedy_under_a_grammar_with_forced_drafts_is_transformers_greedy(llama_dir, draft_dir, reference,
                                                                           grammar_reference, name):  # fmt: skip
    """Constrained rows draft the JSON keys and brackets their schema forces (n-gram drafts after them; with a
    draft model, beside its drafts for the unconstrained rows of the same steps; with the "grammar" method, the
    only rows that speculate; chunked: drafts and their masks cut by the token budget): greedy output is HF's
    under xgrammar's logits processor and the engine's own without speculation, token for token, with the same
    logprobs (of the masked distribution), and forced drafts were verified and accepted."""
    prompts, refs = reference
    constrained, grammar_refs = grammar_reference
    opts = proposer(name.removesuffix("_chunked"), llama_dir, draft_dir)
    if name.endswith("_chunked"):
        opts["max_num_batched_tokens"] = 8
    llm = make_llm(llama_dir, **opts)
    json_params = Params(max_tokens=64, temperature=0, logprobs=2, structured=StructuredOutput(json=RECORD))
    plain = llm.generate(constrained, msgspec.structs.replace(json_params, speculative=False))
    assert llm.engine.stats().spec_verify_steps == 0
    outs = llm.generate(constrained + prompts[3:], [json_params] * 3 + [GREEDY] * (len(prompts) - 3))
    assert [o.token_ids for o in outs[:3]] == grammar_refs == [o.token_ids for o in plain]
    assert [o.token_ids for o in outs[3:]] == refs[3:]
    for out, want in zip(outs[:3], plain):
        assert out.finish_reason == "stop" and set(json.loads(out.text)) == set(RECORD["properties"])
        for lg, lw in zip(out.logprobs, want.logprobs):
            assert lg.logprob == pytest.approx(lw.logprob, abs=1e-4)
            assert [t for t, _ in lg.top] == [t for t, _ in lw.top]
    stats = llm.engine.stats()
    assert stats.spec_forced_tokens > 0 and stats.spec_forced_accepted_tokens > stats.spec_forced_tokens / 2
    assert stats.spec_draft_tokens >= stats.spec_forced_tokens
    assert stats.spec_accepted_tokens >= stats.spec_forced_accepted_tokens
    if name == "grammar":  # no proposer: every draft was forced
        assert stats.spec_draft_tokens == stats.spec_forced_tokens
    assert_no_leak(llm)


def mask_of(matcher, vocab: int) -> torch.Tensor:
    row = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(row)
    return row[0]


def allowed_ids(mask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (mask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # bit b of word w: token 32 w + b
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def accepted(matcher, text: str, tokenizer):
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert matcher.accept_token(token)
    return matcher


def test_probing_a_grammar_leaves_its_matcher_unchanged(llama_dir):
    """grammar_drafts looks ahead (accepting the forced text's tokens, filling each position's mask) and rolls
    back: the matcher then allows what it allowed before, and each mask row is the state a matcher reaches by
    accepting the drafts before it. A finished grammar allows its stop token alone: drafted with no proposal."""
    llm = make_llm(llama_dir)
    engine = llm.engine
    tok, vocab = engine.tokenizer, engine.vocab_size
    compiled = engine.grammars.compile(StructuredOutput(json=RECORD))
    matcher = xgr.GrammarMatcher(compiled)
    forced = matcher.find_jump_forward_string()
    before = mask_of(matcher, vocab)
    drafts = grammar_drafts(Sequence("r", 0, [5, 6, 7], 3, GREEDY, matcher=matcher), tok, 4, vocab, None)
    assert forced.startswith('{"color"') and len(drafts.tokens) > 1 and all(drafts.forced)
    assert forced.startswith(tok.decode(drafts.tokens))
    assert torch.equal(mask_of(matcher, vocab), before) and matcher.find_jump_forward_string() == forced
    replay = xgr.GrammarMatcher(compiled)
    assert drafts.mask.shape[0] == len(drafts.tokens) + 1
    for j, token in enumerate(drafts.tokens):
        assert torch.equal(mask_of(replay, vocab), drafts.mask[j]) and replay.accept_token(token)
    assert torch.equal(mask_of(replay, vocab), drafts.mask[-1])
    done = accepted(xgr.GrammarMatcher(engine.grammars.compile(StructuredOutput(choice=["red"]))), "red", tok)
    tokens, kept, mask = draft_bitmasks(done, [], 4, vocab)
    assert kept == 0 and len(tokens) == 1 and tokens[0] in engine.eos_ids and mask.shape[0] == 2
    assert only_allowed(mask[0]) == tokens[0] and allowed_ids(mask[0], vocab) == tokens
    assert not done.is_terminated() and torch.equal(mask_of(done, vocab), mask[0])


def test_sampling_under_a_grammar_keeps_the_masked_distribution(llama_dir):
    """Verification masks each row as the sampler does. A draft the grammar alone allows is then accepted whatever
    the model's logits and the draw (the masked distribution is one-hot on it); a draft among several allowed
    tokens is accepted with the masked probability, and the emitted token is distributed as the masked softmax
    (chi-square over the allowed tokens, 6000 seeded rows in one verify call)."""
    llm = make_llm(llama_dir)
    engine, tok, vocab = llm.engine, llm.tokenizer, llm.engine.vocab_size
    params = Params(temperature=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(6000)]
    # Forced alone: the last letter of the only choice, then its stop token.
    matcher = accepted(xgr.GrammarMatcher(engine.grammars.compile(StructuredOutput(choice=["red"]))), "re", tok)
    tokens, _, mask = draft_bitmasks(matcher, [], 2, vocab)
    assert len(tokens) == 2 and tokens[1] in engine.eos_ids and only_allowed(mask[0]) == tokens[0]
    seqs = [Sequence("r", 0, [5, 6, *tokens], 2, params, generator=g) for g in gens[:200]]
    logits = (torch.randn(200, 3, vocab) * 4).flatten(0, 1)
    out = verify(logits, seqs, [2] * 200, Drafts(tokens * 200), [mask] * 200)
    assert all(v.num_accepted == 2 and v.tokens[:2] == tokens for v in out)
    # Several allowed: a draft among them, one-hot, against the masked model distribution.
    choices = ["red", "rex", "ray", "rut", "rim"]
    matcher = accepted(xgr.GrammarMatcher(engine.grammars.compile(StructuredOutput(choice=choices))), "r", tok)
    allowed = allowed_ids(mask_of(matcher, vocab), vocab)
    assert len(allowed) >= 5
    draft = allowed[0]
    _, _, mask = draft_bitmasks(matcher, [draft], 1, vocab)
    torch.manual_seed(0)
    row = torch.randn(vocab)
    p = torch.softmax(row[allowed], dim=0).double()
    n = len(gens)
    seqs = [Sequence("r", 0, [5, 6, draft], 2, params, generator=g) for g in gens]
    out = verify(torch.stack([row, torch.randn(vocab)]).repeat(n, 1), seqs, [1] * n, Drafts([draft] * n), [mask] * n)
    emitted = torch.tensor([v.tokens[0] for v in out])
    assert set(emitted.tolist()) <= set(allowed)
    counts = torch.tensor([(emitted == t).sum().item() for t in allowed], dtype=torch.float64)
    chi2 = ((counts - p * n) ** 2 / (p * n)).sum().item()
    assert chi2 < chi2_critical(len(allowed) - 1), (counts / n, p)
    rate = sum(v.num_accepted for v in out) / n
    assert abs(rate - p[0].item()) < 4 * math.sqrt(p[0].item() * (1 - p[0].item()) / n)


def chi2_critical(dof: int) -> float:
    """The chi-square value exceeded with probability 0.1% (Wilson-Hilferty)."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampled_rows_under_a_grammar_beside_sampled_draft_model_rows(llama_dir):
    """One step verifies a draft model's sampled drafts (their q from the draft) and constrained rows' forced
    one-hot drafts together: the constrained outputs are valid objects of the schema, the forced drafts were
    accepted, seeded runs repeat, and no page is left behind."""
    llm = make_llm(llama_dir, speculative_model=llama_dir)
    json_params = Params(max_tokens=64, temperature=1.0, seed=1, n=2, structured=StructuredOutput(json=RECORD))
    free = Params(max_tokens=24, temperature=1.0, seed=2, ignore_eos=True)
    prompts = random_prompts([5, 9, 14], seed=8)
    runs = [llm.generate(prompts, [json_params, free, json_params]) for _ in range(2)]
    assert [[c.token_ids for c in r.outputs] for r in runs[0]] == [[c.token_ids for c in r.outputs] for r in runs[1]]
    for out in (runs[0][0], runs[0][2]):
        for c in out.outputs:
            record = json.loads(c.text)
            assert record["color"] in ("red", "green", "blue") and 0 <= record["size"] <= 99
    stats = llm.engine.stats()
    assert stats.spec_forced_accepted_tokens > 0 and stats.spec_draft_tokens > stats.spec_forced_tokens
    assert_no_leak(llm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_forced_drafts_under_a_grammar(llama_dir):
    """On the GPU (fp32, torch backend): constrained greedy output with forced drafts, with n-gram and with a
    self-draft beside an unconstrained row, is the output without speculation; the masks reach the device."""
    params = Params(max_tokens=64, temperature=0, structured=StructuredOutput(json=RECORD))
    prompts = random_prompts([5, 17, 40], seed=3)
    opts = dict(dtype="float32", attention_backend="torch", enforce_eager=True, kv_cache_memory=64 << 20,
                max_num_seqs=8)  # fmt: skip
    want = [o.token_ids for o in LLM(llama_dir, **opts).generate(prompts, params)]
    for kw in (dict(speculative_method="ngram"), dict(speculative_model=llama_dir)):
        llm = LLM(llama_dir, **opts, **kw)
        outs = llm.generate(prompts + [prompts[0]], [params] * 3 + [GREEDY])
        assert [o.token_ids for o in outs[:3]] == want
        assert llm.engine.stats().spec_forced_accepted_tokens > 0
        assert_no_leak(llm)


def test_bench_compares_speculation_with_an_engine_built_without_it(llama_dir):
    """bench.py --plain-engine: the baseline is a second engine without speculation (its CPU weights laid out
    for one row, the speculating one's for k + 1), and both give the same greedy tokens."""
    from nanokyro.benchmarks.speculative import run_speculative

    opts = dict(dtype="float32", kv_cache_memory=16 << 20)
    spec = LLM(llama_dir, speculative_model=llama_dir, num_speculative_tokens=3, **opts)  # drafts itself
    plain = LLM(llama_dir, **opts)
    r = run_speculative(spec, [5, 6, 7, 8] * 8, 16, [], 0, trials=1, plain=plain)
    assert r["baseline"] == "a plain engine" and r["same_greedy_tokens"] == r["output_tokens"] == 16
    assert r["verify_steps"] > 0 and r["acceptance_rate"] == 1.0
