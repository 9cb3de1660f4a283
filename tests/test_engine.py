"""The engine end to end on the CPU against HF transformers: logits, greedy output, batching invariance,
chunked prefill, preemption, n > 1, stops, aborts, and that no page ever leaks."""
from __future__ import annotations

import os
import random

import msgspec
import pytest
import torch
import transformers

from conftest import assert_logits_match, assert_no_leak, mixed_params, run_in_interpreter
from nanokyro import LLM, SamplingParams
from nanokyro.request import PromptError

PROMPT_LENS = [1, 3, 17, 32, 64, 100, 150, 200]


def random_prompts(lens, seed=0, vocab=384):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def make_llm(path, **kw):
    opts = dict(dtype="float32", max_num_batched_tokens=512, max_num_seqs=8, kv_cache_memory=16 << 20, page_size=16)
    return LLM(path, **{**opts, **kw})


def test_logits_match_transformers(tiny_model_dir):
    """A batch of prompts of different lengths in one flat forward gives HF's logits at every position."""
    llm = make_llm(tiny_model_dir, enable_prefix_caching=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert_logits_match(llm, hf, random_prompts([5, 40, 1, 77]), tol=1e-4)
    assert_no_leak(llm)


class Fp8KVCache(transformers.DynamicCache):
    """HF's cache with every key and value rounded to float8 e4m3 (clamped to +-448) as it is stored: attention
    then reads what nanokyro's fp8 KV cache holds."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        fp8 = lambda x: x.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)  # noqa: E731
        return super().update(fp8(key_states), fp8(value_states), layer_idx, *args, **kwargs)


class HFWithFp8KV:
    def __init__(self, hf):
        self.hf = hf

    def __call__(self, input_ids):
        return self.hf(input_ids, cache=Fp8KVCache(config=self.hf.config), use_cache=True)


def test_an_fp8_kv_cache_gives_hf_logits_and_tokens_with_keys_and_values_rounded_to_fp8(tiny_model_dir):
    """kv_cache_dtype="fp8": keys and values stored as float8 e4m3 with a scale of 1, a quarter of fp32's bytes.
    Against HF with its cache rounded the same way: the logits of a batch of prompts in one step, and greedy
    tokens through chunked prefill and decode steps. The rounding moves HF's own logits by far more than the
    tolerance, so a cache that was not fp8 would fail."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    fp8 = make_llm(tiny_model_dir, kv_cache_dtype="fp8", enable_prefix_caching=False)
    plain = make_llm(tiny_model_dir)
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.num_pages == 4 * plain.engine.runner.num_pages  # the same 16 MiB
    prompts = random_prompts([5, 40, 1, 77], seed=3)
    with torch.no_grad():
        moved = max((HFWithFp8KV(hf)(torch.tensor([p])).logits - hf(torch.tensor([p])).logits).abs().max().item()
                    for p in prompts)  # fmt: skip
    assert moved > 0.1
    assert_logits_match(fp8, HFWithFp8KV(hf), prompts, tol=1e-3)
    with torch.no_grad():
        refs = [hf.generate(torch.tensor([p]), cache=Fp8KVCache(config=hf.config), max_new_tokens=12,
                            do_sample=False)[0, len(p):].tolist() for p in prompts]  # fmt: skip
    chunked = make_llm(tiny_model_dir, kv_cache_dtype="fp8", max_num_batched_tokens=24)
    outs = chunked.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs
    assert_no_leak(chunked)
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or 'fp8'"):
        make_llm(tiny_model_dir, kv_cache_dtype="int8")


@pytest.fixture(scope="module")
def reference_greedy(llama_dir, hf_llama):
    prompts = random_prompts(PROMPT_LENS, seed=1)
    refs = [hf_llama.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    return prompts, refs


@pytest.mark.parametrize(
    "mode,opts",
    [
        ("one_at_a_time", dict(max_num_seqs=1)),
        ("all_at_once", dict()),
        ("chunked", dict(max_num_batched_tokens=24)),  # every prompt > 23 tokens is split into chunks
        ("preempted", dict(kv_cache_memory=None, num_pages_override=24)),
    ],
)
def test_greedy_matches_transformers_however_batched(llama_dir, reference_greedy, mode, opts):
    prompts, refs = reference_greedy
    pages = opts.pop("num_pages_override", None)
    if pages:  # room for ~2 of the longest sequences at once: the scheduler must preempt and recompute
        from nanokyro.runner import kv_bytes_per_page
        from nanokyro.config import ModelConfig

        opts["kv_cache_memory"] = pages * kv_bytes_per_page(ModelConfig.from_dir(llama_dir), 16, torch.float32)
    llm = make_llm(llama_dir, enable_prefix_caching=False, **opts)
    if mode == "one_at_a_time":
        outs = [llm.generate(p, SamplingParams(max_tokens=24, temperature=0))[0] for p in prompts]
    else:
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
    if mode == "preempted":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm)


def test_chunked_prefill_never_stalls_decodes(llama_dir):
    """While a long prompt is prefilled in chunks, a running decode gets a token every step."""
    llm = make_llm(llama_dir, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()  # the short prompt is prefilled and decoding
    engine.finish_in_flight()  # its first token on the host: the steps below run one at a time
    engine.add_request(random_prompts([150])[0], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    for _ in range(9):  # 150 tokens in chunks of <= 15 (the decode takes one of the 16)
        batch = engine.scheduler.schedule()
        assert batch.num_new[0] == 1 and sum(batch.num_new) <= 16
        assert len(batch.seqs) == 2 and batch.num_new[1] == 15
        out = engine.runner.run(batch)
        engine.scheduler.update(batch, out.token_ids)
    engine.fail_all()
    assert_no_leak(llm)


def test_n_greater_than_one_shares_prompt_pages(llama_dir):
    llm = make_llm(llama_dir, enable_prefix_caching=False)
    engine = llm.engine
    prompt = random_prompts([70])[0]
    rid = engine.add_request(prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))
    seqs = engine.requests[rid]
    while all(s.num_computed == 0 for s in seqs[1:]):
        engine.step()
    shared = set(seqs[0].pages[:4])  # 70 tokens: 4 full pages
    assert all(set(s.pages[:4]) == shared for s in seqs[1:] if s.pages)
    assert all(engine.blocks.ref[p] >= 2 for p in shared)
    engine.fail_all()
    out = llm.generate(prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))[0]
    again = llm.generate(prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # the completions are independent samples
    assert_no_leak(llm)


def test_seed_reproduces_whatever_the_batch(llama_dir):
    llm = make_llm(llama_dir)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    alone = llm.generate([9, 10, 11], params)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 3
    outs = llm.generate([[4, 5], [9, 10, 11], [6] * 40, [7, 8]], [others[0], params, *others[1:]])
    assert outs[1].token_ids == alone
    assert_no_leak(llm)


def test_stop_strings_and_stop_tokens(llama_dir):
    llm = make_llm(llama_dir)
    free = llm.generate([5, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    # stop token: the first generated token that is not the first one
    stop_tok = free.token_ids[3]
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_tok) + 1] and out.finish_reason == "stop"
    # stop string: a piece of the free-running text
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text  # (a model whose text has no such piece here would skip the check silently)
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=20, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop"
    assert_no_leak(llm)


def test_abort_frees_pages_at_any_point(llama_dir):
    llm = make_llm(llama_dir, max_num_batched_tokens=32)
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in random_prompts([120, 10, 60])]
    engine.step()  # one is mid-prefill, one decoding, one waiting
    engine.step()
    deltas = [d for rid in ids for d in engine.abort(rid)]
    assert {d.finish_reason for d in deltas} == {"abort"}
    assert_no_leak(llm)


def test_bad_requests_raise_clearly(llama_dir):
    llm = make_llm(llama_dir, max_model_len=128)
    with pytest.raises(PromptError, match="maximum context length is 128"):
        llm.generate([5] * 120, SamplingParams(max_tokens=10))
    with pytest.raises(PromptError, match="empty"):
        llm.generate([[5], []], SamplingParams())  # nothing of the batch is queued
    with pytest.raises(PromptError, match="token ids"):
        llm.generate([10**6], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert llm.generate([5, 6], SamplingParams(max_tokens=2))[0].token_ids  # still serving
    assert_no_leak(llm)


def test_logprobs_are_the_models(llama_dir, hf_llama):
    llm = make_llm(llama_dir)
    prompt = [5, 6, 7, 8]
    out = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=3, ignore_eos=True))[0]
    ref = torch.log_softmax(hf_llama(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1], -1)
    assert len(out.logprobs) == len(out.token_ids) == 3  # one for every token, the last included
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-4)
        best = ref[i].topk(3)
        assert [t for t, _ in lp.top] == best.indices.tolist()


def test_chat_uses_the_template(llama_dir):
    llm = make_llm(llama_dir)
    conv = [{"role": "user", "content": "Hello"}]
    outs = llm.chat([conv, conv], SamplingParams(max_tokens=4, temperature=0))
    ref = transformers.AutoTokenizer.from_pretrained(llama_dir).apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.apply_chat_template(conv) == ref
    assert outs[0].token_ids == outs[1].token_ids
    single = llm.chat(conv, SamplingParams(max_tokens=4, temperature=0))
    assert len(single) == 1 and single[0].token_ids == outs[0].token_ids


def test_a_step_as_one_attention_row_per_token_gives_the_same_logits(llama_dir):
    """The form in which small prefill steps replay the decode CUDA graphs: each new token its own attention row
    over its sequence's pages. Checked here on the torch backend against the usual per-sequence form."""
    llm = make_llm(llama_dir, max_num_batched_tokens=40)
    engine, runner = llm.engine, llm.engine.runner
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # a decode from now on
    engine.finish_in_flight()  # its first token on the host
    engine.add_request(random_prompts([70])[0], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # 39 of the 70 prompt tokens
    engine.finish_in_flight()
    batch = engine.scheduler.schedule()
    assert batch.num_new == [1, 31] and batch.seqs[1].num_computed == 39
    logits = {}
    with torch.inference_mode():
        for token_rows in (False, True):
            input_ids, positions, meta, rows = runner.prepare(batch, pad_to=40 if token_rows else None,
                                                              token_rows=token_rows)  # fmt: skip
            assert meta.q_lens == ([1] * 40 if token_rows else [1, 31])
            runner.attn.plan(meta)
            logits[token_rows] = runner.model.compute_logits(runner.model(input_ids, positions, runner.attn))[:32]
            assert rows.tolist() == [0, 31]
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    engine.fail_all()
    assert_no_leak(llm)


def test_out_of_range_sampling_values_are_refused_before_they_reach_a_batch(llama_dir):
    for bad in (dict(top_k=2**63), dict(n=129), dict(seed=2**64 - 1, n=2), dict(seed=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    llm = make_llm(llama_dir)
    tiny_t = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True))[0]
    greedy = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert tiny_t.token_ids == greedy.token_ids  # a vanishing temperature is greedy, not inf / nan
    assert_no_leak(llm)


def test_sharded_checkpoint_loads_the_shards_its_index_names(tmp_path, hf_llama):
    """Sharded safetensors with their index; a stray consolidated.safetensors beside them is not read."""
    import shutil

    from safetensors.torch import save_file

    path = str(tmp_path / "sharded")
    hf_llama.save_pretrained(path, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    save_file({"layers.0.attention.wk.weight": torch.zeros(2, 2)}, os.path.join(path, "consolidated.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_llama.name_or_path, name), path)
    llm = make_llm(path)
    prompt = [5, 6, 7, 8]
    ref = hf_llama.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :].tolist()
    assert llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0))[0].token_ids == ref


def test_a_sequence_never_outgrows_the_kv_cache(llama_dir):
    """With no max_tokens, a sequence stops at the cache's capacity instead of preempting itself for ever."""
    from nanokyro.config import ModelConfig
    from nanokyro.runner import kv_bytes_per_page

    llm = make_llm(llama_dir, kv_cache_memory=8 * kv_bytes_per_page(ModelConfig.from_dir(llama_dir), 16, torch.float32))
    assert llm.engine.max_model_len == 8 * 16
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and 3 + len(out.token_ids) == 8 * 16
    assert_no_leak(llm)


def test_closing_the_core_client_ends_every_stream_and_stops_its_process(llama_dir):
    import asyncio

    from nanokyro.client import CoreClient
    from nanokyro.config import EngineConfig

    async def main():
        client = await CoreClient.start(EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20))
        reasons, streaming = [], asyncio.Event()

        async def consume():
            async for batch in client.generate([5, 6, 7], SamplingParams(max_tokens=800, ignore_eos=True), "a"):
                reasons.extend(d.finish_reason for d in batch)
                streaming.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(streaming.wait(), timeout=60)  # closed mid-stream, however fast the machine
        with pytest.raises(ValueError, match="already in use"):  # a library caller's duplicate id
            await anext(client.generate([5], SamplingParams(), "a"))
        await client.close()
        await asyncio.wait_for(task, timeout=10)  # the stream ends instead of waiting for ever
        return reasons, client.process.returncode

    reasons, exit_code = asyncio.run(main())
    assert reasons[-1] == "abort" and 0 < len(reasons) < 800 and exit_code == 0


def test_overlapped_steps_give_what_serial_steps_give(llama_dir):
    """Pipelined steps (step n launched before step n-1's tokens reach the host) change nothing in the outputs:
    greedy and seeded sampling, penalties, n > 1, logprobs, stop tokens that end sequences early (their one
    extra scheduled token is dropped), max_tokens, and preemption under a small KV cache."""
    from nanokyro.config import ModelConfig
    from nanokyro.runner import kv_bytes_per_page

    prompts = random_prompts([3, 40, 90, 17, 150, 5], seed=3)
    params = mixed_params()
    page_bytes = kv_bytes_per_page(ModelConfig.from_dir(llama_dir), 16, torch.float32)

    def run(overlap: bool, stops: list[int] | None = None, pages: int = 64):
        llm = make_llm(llama_dir, overlap_schedule=overlap, kv_cache_memory=pages * page_bytes)
        ps = [p if stops is None else msgspec.structs.replace(p, stop_token_ids=[stops[i]])
              for i, p in enumerate(params)]  # fmt: skip
        outs = llm.generate(prompts, ps)
        assert_no_leak(llm)
        return [[(o.token_ids, o.finish_reason, o.logprobs) for o in r.outputs] for r in outs], llm

    serial, _ = run(overlap=False)
    assert run(overlap=True)[0] == serial
    # Stop on each sequence's own 5th token: sequences end mid-batch while the next step is already launched.
    stops = [r[0][0][4] if len(r[0][0]) > 4 else r[0][0][0] for r in serial]
    stopped, _ = run(overlap=False, stops=stops)
    assert any(c[1] == "stop" for r in stopped for c in r)
    assert run(overlap=True, stops=stops)[0] == stopped
    squeezed, llm = run(overlap=True, pages=12)  # ~2 long sequences at a time: preemption with steps in flight
    assert llm.engine.scheduler.num_preemptions > 0
    tokens = lambda outs: [[c[:2] for c in r] for r in outs]  # recomputed KV moves logprobs in the last bits
    assert tokens(squeezed) == tokens(serial)


PLACEHOLDER_CHECK = r"""
import torch
from nanokyro.runner import _fill_placeholders_kernel

prev = torch.tensor([101, 202, 303, 404, 505], dtype=torch.long)[:4]  # the step in flight's tokens, by row
for n, block in ((7, 8), (2500, 1024)):  # one program; several, the last one partial
    ids = torch.randint(0, 50, (n,), dtype=torch.int32)
    ids[::3] = -torch.randint(1, 5, (len(ids[::3]),), dtype=torch.int32)  # -(row + 1)
    want = torch.where(ids < 0, prev[(-ids - 1).clamp(min=0)].to(ids.dtype), ids)
    ids[1], want[1] = -5, 0  # a row past the step's: never read (id 0)
    got = torch.full_like(ids, -7)
    _fill_placeholders_kernel()[((n + block - 1) // block,)](ids, prev, got, n, len(prev), block=block)
    assert torch.equal(got, want), (got, want)
print(int((ids < 0).sum()))
"""


def test_placeholders_take_the_tokens_of_their_rows_in_one_kernel():
    """runner.fill_placeholders' CUDA kernel (in Triton's interpreter) gives what its torch lookup gives."""
    assert run_in_interpreter(PLACEHOLDER_CHECK) == "835"


def test_a_step_returns_the_tokens_of_the_step_before(llama_dir):
    """With overlap the host reads step n-1's tokens after launching step n; without it, step n's own."""
    for overlap, first in ((True, 0), (False, 1)):
        engine = make_llm(llama_dir, overlap_schedule=overlap).engine
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(engine.step()) == first  # the prefill samples the first token
        counts = []
        while engine.has_work():
            counts.append(len(engine.step()))
        assert sum(counts) + first == 3 and not engine.requests


def test_a_sequence_done_by_length_frees_its_pages_before_its_last_token_arrives(llama_dir):
    """With overlap, the last token reaches the host a step after it is sampled; the pages must not wait for it,
    or a newer sequence gets preempted (3 pages: A's 2 pages are needed by B while A's last token is in flight)."""
    from nanokyro.config import ModelConfig
    from nanokyro.runner import kv_bytes_per_page

    page_bytes = kv_bytes_per_page(ModelConfig.from_dir(llama_dir), 16, torch.float32)
    for overlap in (False, True):
        llm = make_llm(llama_dir, overlap_schedule=overlap, kv_cache_memory=3 * page_bytes, enable_prefix_caching=False)
        a, b = random_prompts([15, 8], seed=4)
        outs = llm.generate([a, b], [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
                                     SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)])  # fmt: skip
        assert [len(o.token_ids) for o in outs] == [9, 16]
        assert llm.engine.scheduler.num_preemptions == 0, overlap
        assert_no_leak(llm)
