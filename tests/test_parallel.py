"""Tensor and pipeline parallelism on the CPU (gloo): every layout gives one process's greedy tokens and HF's
logits, through chunked prefill, the prefix cache and preemption; checkpoints load sharded; a dead worker fails
the engine at once with a clear error, and closing leaves no process."""
from __future__ import annotations

import gc
import json
import multiprocessing
import os
import random
import re
import signal
import threading
import time

import msgspec
import numpy as np
import pytest
import torch
import transformers

from conftest import assert_no_leak, build_tiny_model, mixed_params, run_in_interpreter
from nanokyro import LLM, SamplingParams
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.loader import load
from nanokyro.parallel import Group, PendingLogits, Shard, WorkerError, check
from nanokyro.runner import kv_bytes_per_page

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
PAGES = 24  # per rank: room for about two of the longest sequences at once, so the scheduler preempts


def random_prompts(lens, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model(request, tmp_path_factory):
    """A tiny model with HF's greedy tokens for prompts that share prefixes, and HF itself."""
    path = build_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = random_prompts([150, 100, 40, 3], seed=5)
    prompts = base + [base[0][:120] + [7, 8, 9], base[2] + [11] * 30]  # cached prefixes of the first and third
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist() for p in prompts]
    return path, hf, prompts, refs


def make_llm(path, tp, pp, **kw):
    shard = Shard(0, tp, 0, pp)  # every rank of these layouts holds the same number of layers and KV heads
    page_bytes = kv_bytes_per_page(ModelConfig.from_dir(path), 16, torch.float32, shard)
    opts = dict(dtype="float32", max_num_batched_tokens=24, max_num_seqs=8, kv_cache_memory=PAGES * page_bytes,
                tensor_parallel_size=tp, pipeline_parallel_size=pp)  # fmt: skip
    return LLM(path, **{**opts, **kw})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_one_process_greedy_tokens_and_hf_logits(model, layout):
    path, hf, prompts, refs = model
    llm = make_llm(path, *LAYOUTS[layout])
    try:
        engine = llm.engine
        assert engine.num_pages == PAGES
        # Logits of a prefill step's sampled rows (each prompt's last token) against HF.
        logit_prompts = random_prompts([5, 1, 12], seed=6)
        for p in logit_prompts:
            engine.add_request(p, SamplingParams(max_tokens=1))
        batch = engine.scheduler.schedule()
        assert batch.num_new == [5, 1, 12]
        logits = engine.runner.forward(batch)
        for row, p in zip(logits, logit_prompts):
            torch.testing.assert_close(row.cpu(), hf(torch.tensor([p])).logits[0, -1], atol=1e-4, rtol=1e-4)
        engine.fail_all()
        # Greedy tokens, with prompts chunked (24-token steps), prefixes cached, sequences preempted.
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
        assert [o.token_ids for o in outs] == refs
        assert engine.scheduler.num_preemptions > 0
        assert engine.stats().prefix_cache_hit_tokens > 0
        assert_no_leak(llm)
    finally:
        llm.close()
    assert not multiprocessing.active_children()


def test_tp2_adds_the_attention_output_bias_once(tmp_path):
    """attention_bias=True gives o_proj a bias. Under TP=2 each rank's o_proj returns its part of the sum, which the
    norm after it sums: rank 0's part alone carries the bias, so the logits are HF's."""
    import transformers

    path = build_tiny_model("llama", str(tmp_path), attention_bias=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # HF initialises biases to zero: make them count
        for attn in (layer.self_attn for layer in hf.model.layers):
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    hf.save_pretrained(path)
    llm = make_llm(path, 2, 1)
    try:
        engine = llm.engine
        prompts = random_prompts([7, 3], seed=8)
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=1))
        logits = engine.runner.forward(engine.scheduler.schedule())
        for row, p in zip(logits, prompts):
            torch.testing.assert_close(row.cpu(), hf(torch.tensor([p])).logits[0, -1], atol=1e-4, rtol=1e-4)
        engine.fail_all()
    finally:
        llm.close()


def test_a_step_split_into_micro_batches_gives_the_whole_steps_logits(llama_dir):
    """What pipeline stages overlap: a step's attention rows cut into micro-batches, each run on its own."""
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=64, max_num_seqs=8)
    engine, runner = llm.engine, llm.engine.runner
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    engine.finish_in_flight()  # a decode from now on
    for p in random_prompts([30, 9, 2], seed=7):
        engine.add_request(p, SamplingParams(max_tokens=2))
    batch = engine.scheduler.schedule()
    assert batch.num_new == [1, 30, 9, 2]
    plan = runner.plan(batch)

    def logits(plan):
        input_ids, positions, meta, rows = runner.load(plan)
        runner.attn.plan(meta)
        return runner.model.compute_logits(runner.model(input_ids, positions, runner.attn)[rows])

    with torch.inference_mode():
        whole = logits(plan)
        parts = plan.split(3)
        assert [p.q_lens for p in parts] == [[1, 30], [9], [2]]  # 42 tokens: cut after 14 and 28 of them
        torch.testing.assert_close(torch.cat([logits(p) for p in parts]), whole, atol=1e-5, rtol=1e-5)
    assert plan.split(1) == [plan] and len(plan.split(8)) <= 4  # never more micro-batches than rows
    engine.fail_all()
    assert_no_leak(llm)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_a_dead_worker_fails_the_engine_fast_and_close_leaves_no_process(llama_dir, layout):
    tp, pp = LAYOUTS[layout]
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    workers = llm.engine.runner.parallel.workers.procs
    try:
        assert llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
        os.kill(workers[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"nanokyro-rank1 .* exited with code -9"):
            llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(WorkerError, match="exited with code -9"):  # and every step after it, at once
            llm.generate([5, 6], SamplingParams(max_tokens=4, temperature=0))
        assert time.monotonic() - start < 5
    finally:
        llm.close()
    assert not any(p.is_alive() for p in workers) and not multiprocessing.active_children()


def test_an_llm_dropped_unclosed_stops_its_workers_and_leaves_the_world(llama_dir):
    """A script that ends without close() (bench.py): the runner's finalizer closes the world once the LLM is
    collected, so nothing outlives it (on the GPU it drops the decode graphs first: test_two_gpus_match_one)."""
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)
    workers = llm.engine.runner.parallel.workers.procs
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    del llm
    gc.collect()
    assert not any(p.is_alive() for p in workers) and not multiprocessing.active_children()
    assert not torch.distributed.is_initialized()


def test_a_pipeline_keeps_a_step_per_stage_in_flight_over_disjoint_sequences(llama_dir, hf_llama):
    """PP=2: rank 0 launches step n + 1 before it waits for step n's logits, so two steps are in flight, and no
    sequence is sampled by both (its next input id is not known until the older one is finished); the step that
    takes step n's sequences next is planned before step n is sampled; step n's logits receive is posted once
    step n + 1's first stage has run, not before; the tokens are still HF's, with prompts chunked (24-token
    steps), prefixes cached and sequences preempted."""
    base = random_prompts([150, 100, 40, 3, 60, 9], seed=5)
    prompts = base + [base[0][:120] + [7, 8, 9], base[2] + [11] * 30]  # cached prefixes of the first and third
    refs = [hf_llama.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
            for p in prompts]  # fmt: skip
    llm = make_llm(llama_dir, 1, 2)
    engine, runner = llm.engine, llm.engine.runner
    in_flight = []  # the sampled sequences of each launched step, whenever the oldest is about to be received
    posted = []  # then, with two steps in flight that sample: whether each one's logits receive is posted
    events, from_device = [], []  # p(lan), s(ample), l(aunch); launches whose input ids read tokens on the device
    receive, plan_step, launch = engine._sample_oldest, runner.plan_step, runner.launch

    def observed_receive():
        in_flight.append([set(step.seqs) for step in engine._launched])
        if len(engine._launched) == 2 and all(isinstance(step.logits, PendingLogits) for step in engine._launched):
            posted.append([step.logits.work is not None for step in engine._launched])
        events.append("s")
        return receive()

    def observed_plan(*args, **kw):
        events.append("p")
        return plan_step(*args, **kw)

    def observed_launch(plan, prev_tokens=None, *args, **kw):
        events.append("l")
        from_device.append(prev_tokens is not None and plan.num_prev_tokens > 0)
        return launch(plan, prev_tokens, *args, **kw)

    engine._sample_oldest, runner.plan_step, runner.launch = observed_receive, observed_plan, observed_launch
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
        assert [o.token_ids for o in outs] == refs
        assert sum(from_device) >= 10  # a sequence goes again before its last token reaches the host
        assert "".join(events).count("psl") >= 10  # planned while the oldest's logits were on their way
        both = [steps for steps in in_flight if len(steps) == 2]
        assert len(both) >= 10 and all(not (a & b) for a, b in both)
        assert any(len(a) >= 2 and len(b) >= 2 for a, b in both)  # the running batch split between the steps
        assert max(map(len, in_flight)) == 2
        assert len(posted) >= 10 and all(p == [True, False] for p in posted)
        assert engine.scheduler.num_preemptions > 0 and engine.stats().prefix_cache_hit_tokens > 0
        assert_no_leak(llm)
    finally:
        llm.close()


def test_max_num_seqs_bounds_each_step_in_flight_not_the_pipeline(llama_dir, hf_llama):
    """PP=2 with max_num_seqs=2: each of the two steps in flight runs two sequences, so four run at once (as
    vLLM's virtual engines do); one process would run two. The tokens are still HF's."""
    prompts = random_prompts([20, 31, 9, 14], seed=8)
    refs = [hf_llama.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
            for p in prompts]  # fmt: skip
    llm = make_llm(llama_dir, 1, 2, max_num_seqs=2)
    engine, in_flight = llm.engine, []
    receive = engine._sample_oldest

    def observed_receive():
        in_flight.append([len(step.seqs) for step in engine._launched])
        return receive()

    engine._sample_oldest = observed_receive
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
        assert [o.token_ids for o in outs] == refs
        assert max(n for steps in in_flight for n in steps) == 2
        assert [2, 2] in in_flight
        assert_no_leak(llm)
    finally:
        llm.close()


def test_a_pipeline_without_overlap_runs_one_step_at_a_time(llama_dir, hf_llama):
    """overlap_schedule=False: each step is finished before the next is launched (the baseline of the pipelined
    schedule, on the same build), with HF's tokens."""
    prompts = random_prompts([40, 3, 17], seed=8)
    refs = [hf_llama.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
            for p in prompts]  # fmt: skip
    llm = make_llm(llama_dir, 1, 2, overlap_schedule=False)
    try:
        engine = llm.engine
        ids = [engine.add_request(p, SamplingParams(max_tokens=6, temperature=0)) for p in prompts]
        outs = {rid: [] for rid in ids}
        while engine.has_work():
            for out in engine.step():
                outs[out.request_id] += out.token_ids
            assert not engine._launched and engine._in_flight is None
        assert [outs[rid] for rid in ids] == refs
    finally:
        llm.close()


def test_three_stages_keep_three_steps_in_flight_and_give_hf_tokens(tmp_path):
    """PP=3 (a middle stage that receives and sends hidden states): three steps in flight, HF's tokens."""
    path = build_tiny_model("llama", str(tmp_path), num_hidden_layers=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts([90, 40, 3, 9, 20], seed=1)
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
            for p in prompts]  # fmt: skip
    llm = LLM(path, dtype="float32", max_num_batched_tokens=24, max_num_seqs=8, kv_cache_memory=4 << 20,
              pipeline_parallel_size=3)  # fmt: skip
    engine = llm.engine
    depths, receive = [], engine._sample_oldest

    def observed_receive():
        depths.append(len(engine._launched))
        return receive()

    engine._sample_oldest = observed_receive
    try:
        assert [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))] == refs
        assert max(depths) == 3
        assert_no_leak(llm)
    finally:
        llm.close()


def test_pipelined_steps_give_one_process_outputs_for_every_kind_of_request(llama_dir):
    """Seeded sampling, penalties, n > 1, logprobs, a grammar, stop strings and stop tokens, and max_tokens give
    the same outputs through PP=2's pipelined steps as in one process, also when sequences are preempted."""
    from nanokyro.request import StructuredOutput

    prompts = random_prompts([3, 40, 90, 17, 150, 5, 30], seed=3)
    regex = StructuredOutput(regex="[a-z]{3,6}[0-9]{2}")
    params = [*mixed_params(), SamplingParams(max_tokens=20, temperature=0.7, seed=3, structured=regex)]

    def engine(pp: int) -> LLM:
        page_bytes = kv_bytes_per_page(ModelConfig.from_dir(llama_dir), 16, torch.float32, Shard(0, 1, 0, pp))
        return make_llm(llama_dir, 1, pp, max_num_batched_tokens=64, kv_cache_memory=16 * page_bytes)

    def run(llm: LLM, params: list[SamplingParams]):
        outs = llm.generate(prompts, params)
        assert_no_leak(llm)
        logprobs = [o.logprobs for r in outs for o in r.outputs]  # None where a request asked for none
        return [[(o.token_ids, o.text, o.finish_reason) for o in r.outputs] for r in outs], logprobs

    one_llm, piped_llm = engine(1), engine(2)
    try:
        (one, one_logprobs), (piped, piped_logprobs) = run(one_llm, params), run(piped_llm, params)
        assert one[6][0][2] == "stop" and re.fullmatch("[a-z]{3,6}[0-9]{2}", one[6][0][1])
        assert piped == one and piped_llm.engine.scheduler.num_preemptions > 0
        assert any(a is not None for a in one_logprobs)
        for a, b in zip(one_logprobs, piped_logprobs, strict=True):
            assert (a is None) == (b is None)
            if a is None:
                continue
            assert [t.token_id for t in a] == [t.token_id for t in b]
            np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b], atol=1e-4)
        # Stop on the greedy sequence's 5th token, and another at a piece of its text.
        stopped = list(params)
        stopped[0] = msgspec.structs.replace(params[0], stop_token_ids=[one[0][0][0][4]])
        stopped[5] = msgspec.structs.replace(params[5], stop=[one[5][0][1][4:6]])
        one_stopped = run(one_llm, stopped)[0]
        assert one_stopped[0][0][2] == "stop" and one_stopped[5][0][2] == "stop"
        assert run(piped_llm, stopped)[0] == one_stopped
    finally:
        one_llm.close()
        piped_llm.close()


def test_a_worker_that_dies_while_starting_fails_the_start_fast(llama_dir):
    result = {}

    def start():
        try:
            result["llm"] = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=start)
    thread.start()
    while not (children := multiprocessing.active_children()):
        time.sleep(0.01)
    os.kill(children[0].pid, signal.SIGKILL)  # before it joins the group, or while it loads: either must fail fast
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert isinstance(result.get("error"), WorkerError) and "exited with code -9" in str(result["error"])
    assert not multiprocessing.active_children()


def test_layouts_the_model_or_machine_cannot_take_are_refused_before_anything_starts(llama_dir):
    mc = ModelConfig.from_dir(llama_dir)  # 4 heads, 2 KV heads, 2 layers
    for opts, message in [
        (dict(tensor_parallel_size=3), "tensor_parallel_size 3 does not divide the model's 4 attention heads"),
        (dict(pipeline_parallel_size=3), "pipeline_parallel_size 3 is deeper than the model's 2 layers"),
        (dict(tensor_parallel_size=2, device="cuda"), "2 ranks on this node but only 0 GPUs"),
    ]:
        if "device" in opts and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=message):
            check(EngineConfig(model=llama_dir, **opts), mc)
    with pytest.raises(ValueError, match="does not divide"):
        LLM(llama_dir, tensor_parallel_size=3)
    assert not multiprocessing.active_children()


# -- sharded loading, in one process: each rank's shard of the checkpoint, and nothing more --------------------


def expected_shard(state: dict[str, torch.Tensor], mc: ModelConfig, shard: Shard) -> dict[str, torch.Tensor]:
    """What each parameter of `shard` must hold, sliced by hand from the full HF tensors."""
    tp, r, d = shard.tp_size, shard.tp_rank, mc.head_dim
    hq, hkv = mc.num_heads // tp, max(1, mc.num_kv_heads // tp)
    kv0 = r * mc.num_kv_heads // tp  # with fewer KV heads than ranks, rank r reads KV head r // (tp // kv)
    inter = mc.intermediate_size // tp
    rows = -(-mc.vocab_size // tp)

    def vocab(w):
        part = w[r * rows: (r + 1) * rows]
        return torch.cat([part, part.new_zeros(rows - len(part), *w.shape[1:])])

    want = {}
    layers = shard.layers(mc.num_layers)
    for local, i in enumerate(layers):
        hf, ours = f"model.layers.{i}.", f"layers.{local}."
        q, k, v = (state[hf + f"self_attn.{n}_proj.weight"] for n in "qkv")
        want[ours + "self_attn.qkv_proj.weight"] = torch.cat(
            [q[r * hq * d: (r + 1) * hq * d], k[kv0 * d: (kv0 + hkv) * d], v[kv0 * d: (kv0 + hkv) * d]])
        if mc.qkv_bias:
            q, k, v = (state[hf + f"self_attn.{n}_proj.bias"] for n in "qkv")
            want[ours + "self_attn.qkv_proj.bias"] = torch.cat(
                [q[r * hq * d: (r + 1) * hq * d], k[kv0 * d: (kv0 + hkv) * d], v[kv0 * d: (kv0 + hkv) * d]])
        o = state[hf + "self_attn.o_proj.weight"]
        want[ours + "self_attn.o_proj.weight"] = o[:, r * hq * d: (r + 1) * hq * d]
        gate, up = state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]
        want[ours + "mlp.gate_up_proj.weight"] = torch.cat([gate[r * inter: (r + 1) * inter],
                                                            up[r * inter: (r + 1) * inter]])  # fmt: skip
        want[ours + "mlp.down_proj.weight"] = state[hf + "mlp.down_proj.weight"][:, r * inter: (r + 1) * inter]
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            if hf + norm + ".weight" in state:
                want[ours + norm + ".weight"] = state[hf + norm + ".weight"]
    if shard.first_stage:
        want["embed_tokens.weight"] = vocab(state["model.embed_tokens.weight"])
    if shard.last_stage:
        want["norm.weight"] = state["model.norm.weight"]
        if not (mc.tie_word_embeddings and shard.first_stage):
            want["lm_head.weight"] = vocab(state.get("lm_head.weight", state["model.embed_tokens.weight"]))
    return want


def loaded_params(model) -> dict[str, torch.Tensor]:
    """The model's parameters by name; CPU linear weights are packed for oneDNN at load, so as the dense tensors
    they hold."""
    return {n: p.to_dense() if p.is_mkldnn else p for n, p in model.named_parameters()}


def assert_shards_hold_their_slices(cfg: EngineConfig, mc: ModelConfig, state, tp: int, pp: int) -> None:
    """Every rank's parameters are exactly its slices (hence of the shard's size, not the model's)."""
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            shard = Shard(tp_rank, tp, pp_rank, pp)
            model = load(cfg, shard, Group(tp_rank, tp), torch.device("cpu"), with_tokenizer=False)[0]
            params = loaded_params(model)
            want = expected_shard(state, mc, shard)
            assert set(params) == set(want)
            for name, w in want.items():
                assert params[name].shape == w.shape and torch.equal(params[name], w), name


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_safetensors_checkpoint_loads_sharded(arch, tie, tmp_path):
    path = build_tiny_model(arch, str(tmp_path), tie_word_embeddings=tie)
    state = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    mc = ModelConfig.from_dir(path)
    cfg = EngineConfig(model=path, dtype="float32")
    assert_shards_hold_their_slices(cfg, mc, state, tp=2, pp=2)
    assert_shards_hold_their_slices(cfg, mc, state, tp=4, pp=1)  # 2 KV heads over 4 ranks: each held twice


def test_dummy_weights_are_shards_of_one_model():
    """Every rank draws its dummy shard from the same full random model: TP changes nothing but the layout."""
    from conftest import TINY
    from nanokyro.loader import build_model, dummy_weights, load_weights, wanted

    cpu, f32 = torch.device("cpu"), torch.float32
    mc = ModelConfig.from_hf({**TINY, "model_type": "qwen2"})
    state = {("" if n == "lm_head.weight" else "model.") + n: w
             for n, w in dummy_weights(mc, 0, cpu, f32, lambda name: True)}  # fmt: skip
    for shard in (Shard(1, 2, 1, 2), Shard(3, 4, 0, 1)):
        model = build_model(mc, cpu, f32, shard, Group(shard.tp_rank, shard.tp_size))
        load_weights(model, dummy_weights(mc, 0, cpu, f32, wanted(model)))
        params = loaded_params(model)
        for name, w in expected_shard(state, mc, shard).items():
            assert torch.equal(params[name], w), name


def test_gguf_checkpoint_loads_sharded(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from test_gguf import gguf_name, llama_cpp_permute, train_byte_level_bpe, write_gguf

    tokens, merges = train_byte_level_bpe()
    hf_cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    state = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().state_dict()
    tensors = {}
    for name, w in state.items():
        w = w.numpy()
        if "q_proj" in name or "k_proj" in name:
            w = llama_cpp_permute(w, 4 if "q_proj" in name else 2)
        tensors[gguf_name(name)] = (np.ascontiguousarray(w), Q.F32)  # F32: the shards compare exactly
    path = write_gguf(tmp_path / "tiny.gguf", "llama", {
        "llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 2,
    }, tensors)  # fmt: skip
    cfg = EngineConfig(model=path, dtype="float32")
    from nanokyro.loader import read_config

    mc = read_config(cfg)
    assert (mc.num_heads, mc.num_kv_heads, mc.num_layers) == (4, 2, 2)
    assert_shards_hold_their_slices(cfg, mc, state, tp=2, pp=2)
    assert_shards_hold_their_slices(cfg, mc, state, tp=4, pp=1)


def test_tp2_and_pp2_through_the_multi_process_server_give_one_process_tokens(llama_dir, hf_llama):
    """The server's engine core (a process of its own) starting its own ranks: greedy text over HTTP equals HF's
    tokens decoded, for a tensor-parallel and a pipeline-parallel core."""
    from conftest import ServerThread
    from nanokyro.server import create_app
    from nanokyro.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(llama_dir)
    prompts = random_prompts([150, 40, 3], seed=6)
    refs = [hf_llama.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
            for p in prompts]  # fmt: skip
    for tp, pp in ((2, 1), (1, 2)):
        cfg = EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=tp,
                           pipeline_parallel_size=pp)  # fmt: skip
        srv = ServerThread(create_app(cfg))
        try:
            client = srv.client(key="none")
            for prompt, ref in zip(prompts, refs):
                out = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0)
                assert out.choices[0].text == tok.decode(ref) and out.usage.completion_tokens == len(ref), (tp, pp)
        finally:
            srv.stop()


def test_two_torchrun_nodes_on_one_host_serve_the_tokens_of_one_process(llama_dir, hf_llama):
    """`torchrun` started twice, as two nodes of one rank each (node 0 serves HTTP, node 1 runs its TP shard),
    answers with HF's greedy tokens; stopping node 0 stops node 1, and nothing is left running."""
    import subprocess
    import sys

    import httpx

    from nanokyro.tokenizer import Tokenizer
    from nanokyro.uvicorn_server import free_port

    def gpu(rank: int) -> dict:  # on a host with GPUs, each "node" sees one of its own (NCCL takes one rank a GPU)
        return {"CUDA_VISIBLE_DEVICES": str(rank)} if torch.cuda.device_count() >= 2 else {}

    http_port, master_port = free_port(), free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", str(master_port), "serve.py", "--model", llama_dir,
         "--dtype", "float32", "--tensor-parallel-size", "2", "--kv-cache-memory", str(16 << 20), "--host",
         "127.0.0.1", "--port", str(http_port)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", **gpu(rank)}, start_new_session=True,
    ) for rank in (0, 1)]  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        while True:
            assert all(n.poll() is None for n in nodes), "a node exited while starting"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the two nodes did not start serving"
            time.sleep(0.5)
        tok = Tokenizer.from_dir(llama_dir)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        for prompt in random_prompts([40, 3], seed=7):
            ref = hf_llama.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
            out = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 10,
                                                            "temperature": 0}, timeout=60).json()  # fmt: skip
            assert out["choices"][0]["text"] == tok.decode(ref.tolist())
        # Stop rank 0's serve.py (torchrun's child: torchrun itself exits 1 on a signal of its own).
        with open(f"/proc/{nodes[0].pid}/task/{nodes[0].pid}/children") as f:
            for pid in f.read().split():
                os.kill(int(pid), signal.SIGINT)
        for n in nodes:
            n.wait(timeout=60)
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait()
    assert [n.returncode for n in nodes] == [0, 0]
    time.sleep(1)
    for n in nodes:  # no engine core or worker left behind in either node's process group
        with pytest.raises(ProcessLookupError):
            os.killpg(n.pid, 0)


def _logits_rank(rank: int, port: int, sent, results) -> None:
    """One rank of a PP=2 world on gloo. Rank 1, the last stage, sends two steps' logits and says so at once; rank
    0 posts its receives only after hearing it, then reports what it received."""
    import torch.distributed as dist

    from nanokyro.parallel import _init

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    par = _init(EngineConfig(device="cpu", pipeline_parallel_size=2), rank, 2, 0, store)
    if rank == 1:
        for step in (1, 2):
            par.send_logits(torch.full((3, 5), float(step)))
        sent.set()
        for work, _ in par._logits_sent:
            work.wait()
    else:
        unwaited = sent.wait(60)
        pending = [par.recv_logits(3, 5, torch.float32) for _ in (1, 2)]
        results.put((unwaited, [p.wait().tolist() for p in pending]))
    dist.destroy_process_group()


def test_the_last_stage_sends_its_logits_without_waiting_for_rank_0():
    """The last stage's next step need not wait for its logits to reach rank 0 (an H200 profile: 0.1 ms of every
    step, and its next hidden states' receive queued behind the send): its sends return before rank 0 has posted
    a receive, and rank 0 still gets every step's logits, in order."""
    from nanokyro.uvicorn_server import free_port

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    sent, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_logits_rank, args=(rank, port, sent, results), daemon=True) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        unwaited, received = results.get(timeout=120)
        assert unwaited, "the last stage's send waited for rank 0's receive"
        assert received == [[[1.0] * 5] * 3, [[2.0] * 5] * 3]
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()


FUSED_WORDS_CHECK = r"""
import torch
from nanokyro import small_batch
from nanokyro.small_batch import FUSED_HIDDEN, FUSED_ROWS

torch.manual_seed(0)
cases = 0
# (parts' dtype, values a row, rows, ranks, this rank, the epochs before): two values a 32-bit word (fp16: the
# interpreter truncates bf16) or one; rows not a power of two long; 2-4 ranks; epochs through int32's wrap and 0
for dtype, N, T, size, rank, start in ((torch.float16, 64, 3, 2, 0, 0), (torch.float32, 100, 1, 2, 1, 0),
                                        (torch.float16, 96, 2, 4, 2, 0), (torch.float32, 48, 2, 3, 1, 2**31 - 2),
                                        (torch.float16, 40, 1, 2, 0, -2)):  # fmt: skip
    words = N * dtype.itemsize // 4
    bufs = [torch.zeros(small_batch.fused_data_bytes(size) // 8, dtype=torch.int64) for _ in range(size)]
    addrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    epochs = torch.full((FUSED_ROWS,), start, dtype=torch.int32)
    weight = torch.randn(N).to(dtype)
    for call in range(3):  # both slots, and the first again
        epoch = (start + 1 + call + 2**31) % 2**32 - 2**31  # as int32 counts
        slot = lambda r, sender: (((epoch & 1) * FUSED_ROWS + r) * size + sender) * FUSED_HIDDEN
        parts, residual = [torch.randn(T, N).to(dtype) for _ in range(size)], torch.randn(T, N).to(dtype)
        for p in range(size):  # the others' parts, as they would have sent them into this rank's buffer
            for r in range(T if p != rank else 0):
                bits = parts[p][r].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
                bufs[rank][slot(r, p) : slot(r, p) + words] = (epoch << 32) | bits
        out, new_res = small_batch.all_reduce_rms_norm(parts[rank], residual, weight, 1e-5, addrs, epochs, rank, size)
        total = torch.zeros(T, N)
        for part in parts:  # in rank order
            total += part.float()
        want_out, want_res = small_batch.rms_norm(total.to(dtype), residual, weight, 1e-5)
        assert torch.equal(new_res, want_res) and torch.equal(out, want_out), (dtype, N, epoch)
        for p in range(size):  # and this rank's part went to every other rank, tagged with the epoch
            for r in range(T if p != rank else 0):
                sent = bufs[p][slot(r, rank) : slot(r, rank) + words]
                assert ((sent >> 32) == epoch).all()
                assert torch.equal((sent & 0xFFFFFFFF).to(torch.int32).view(dtype), parts[rank][r])
        assert (epochs[:T] == epoch).all() and (epochs[T:] == start).all()
        cases += 1
print(cases)
"""


def test_every_sent_part_is_received_as_sent(monkeypatch):
    """The model's wiring of the parts that row-parallel GEMVs send in the one- and two-row graphs
    (RowParallelLinear.part) and the norms told so (`sent`), on the CPU with the small graphs' switch forced on and
    the GPU-only calls recorded instead of run. On a GPU a norm told `sent` for a part nobody sent polls until it
    traps, so every TP=2 layout's pipeline stage (first, middle, last; a stage of one layer) must tell each norm
    `sent` exactly when the GEMV before it sent: dense layers send, quantised ones do not, and a non-last stage's
    last part, summed by an all-reduce, was not sent. The first stage's first norm also sums the embedding's
    parts (with a zero residual)."""
    import types

    import torch.nn.functional as F

    from nanokyro import small_batch
    from nanokyro.model import LlamaModel

    events = []

    def linear(x, weight, bias=None, send=None):
        events.append(("gemv", send is not None))
        return F.linear(x, weight, bias)

    def norm(x, residual, weight, eps):  # (normed, sum) as the kernels return them
        return (x, x) if residual is None else (x + residual, x + residual)

    def fused(group, x, residual, weight, eps, sent=False):
        events.append(("norm", sent))
        return x + residual, x + residual

    def all_reduce(group, x):
        events.append(("all_reduce", None))
        return x

    monkeypatch.setattr(small_batch, "on", lambda x: True)
    monkeypatch.setattr(small_batch, "linear", linear)
    monkeypatch.setattr(small_batch, "silu_and_mul_linear", lambda x, w: small_batch.silu_and_mul(F.linear(x, w)))
    monkeypatch.setattr(small_batch, "rms_norm", lambda x, residual, weight, eps: norm(x, residual, weight, eps)[
        0 if residual is None else slice(None)])  # fmt: skip
    monkeypatch.setattr(Group, "all_reduce_rms_norm", fused)
    monkeypatch.setattr(Group, "all_reduce", all_reduce)

    class Attention:  # attends nothing: returns q, which has the o projection's input shape
        rotates_in_kv_write = False

        def __call__(self, layer_idx, q, k, v):
            return q

    cfg = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=8)  # fmt: skip
    quantised = types.SimpleNamespace(matmul=lambda layer, x, bias, gated: linear(x, layer.weight, bias))
    seen = set()
    for pp, pp_rank in ((1, 0), (3, 0), (3, 1), (3, 2), (4, 1)):
        tp = Group(0, 2)
        tp.fused = (torch.zeros(2, dtype=torch.int64), torch.zeros(16, dtype=torch.int32), 0, 2)
        model = LlamaModel(cfg, Shard(0, 2, pp_rank, pp), tp)
        for p in model.parameters():
            p.data.normal_(0, 0.1)
        model.layers[0].self_attn.o_proj.quant = quantised  # a quantised layer's part is never sent
        if len(model.layers) > 1:
            model.layers[1].mlp.down_proj.quant = quantised
        events.clear()
        intermediate = None if pp_rank == 0 else (torch.randn(2, 32), torch.randn(2, 32))
        model(torch.tensor([3, 5]), torch.tensor([7, 8]), Attention(), intermediate)
        if pp_rank == 0:  # the embedding's parts are summed by the first norm, not by an all-reduce of their own
            assert events[0] == ("norm", False), events
        pairs = [(a, b) for a, b in zip(events, events[1:]) if b[0] in ("norm", "all_reduce")]
        assert pairs and all(a == ("gemv", b[1] or False) for a, b in pairs), (pp, pp_rank, events)
        assert (pairs[-1][1][0] == "all_reduce") == (pp_rank < pp - 1), events  # (the final norm on the last)
        seen.update(b[1] for a, b in pairs)
    assert seen == {True, False, None}  # parts sent and not, to norms and to an all-reduce


SENT_PARTS_CHECK = r"""
import torch
from nanokyro import small_batch
from nanokyro.small_batch import FUSED_HIDDEN, FUSED_ROWS

torch.manual_seed(1)
cases = 0
# (dtype, rows, outputs, inputs, ranks, the epochs before): every rank's row-parallel GEMV sends its part, then
# every rank's norm kernel only receives; ranks run one after the other (the sends all come before the polls)
for dtype, M, N, K, size, start in ((torch.float16, 1, 100, 64, 2, 0), (torch.float16, 2, 100, 48, 3, 2**31 - 2),
                                     (torch.float32, 1, 36, 80, 2, -2), (torch.float32, 2, 24, 32, 2, 0)):  # fmt: skip
    per_word = 4 // dtype.itemsize
    bufs = [torch.zeros(small_batch.fused_data_bytes(size) // 8, dtype=torch.int64) for _ in range(size)]
    addrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    epochs = [torch.full((FUSED_ROWS,), start, dtype=torch.int32) for _ in range(size)]
    weight = torch.randn(N).to(dtype)
    for call in range(3):  # both slots, and the first again
        epoch = (start + 1 + call + 2**31) % 2**32 - 2**31  # as int32 counts
        xs = [torch.randn(M, K).to(dtype) for _ in range(size)]
        ws = [(torch.randn(N, K) / K**0.5).to(dtype) for _ in range(size)]
        residual = torch.randn(M, N).to(dtype)
        parts = [small_batch.gemv(xs[r], ws[r], None, False, None, None, None, addrs, epochs[r], r, size)
                 for r in range(size)]  # fmt: skip
        for r in range(size):  # each GEMV's output is the plain GEMV's, and it sent those bits, tagged
            assert torch.equal(parts[r], small_batch.gemv(xs[r], ws[r], None))
            for p in range(size):
                for m in range(M if p != r else 0):
                    at = (((epoch & 1) * FUSED_ROWS + m) * size + r) * FUSED_HIDDEN
                    words = bufs[p][at : at + N // per_word]
                    assert ((words >> 32) == epoch).all(), (dtype, M, epoch)
                    assert torch.equal((words & 0xFFFFFFFF).to(torch.int32).view(dtype), parts[r][m])
        total = torch.zeros(M, N)
        for part in parts:  # in rank order
            total += part.float()
        want_out, want_res = small_batch.rms_norm(total.to(dtype), residual, weight, 1e-5)
        for r in range(size):
            out, new_res = small_batch.all_reduce_rms_norm(parts[r], residual, weight, 1e-5, addrs, epochs[r], r,
                                                           size, sent=True)  # fmt: skip
            assert torch.equal(new_res, want_res) and torch.equal(out, want_out), (dtype, M, epoch, r)
            assert (epochs[r][:M] == epoch).all() and (epochs[r][M:] == start).all()
        cases += 1
print(cases)
"""


def test_gemv_sent_parts_in_the_interpreter():
    """A row-parallel GEMV that sends its output itself (RowParallelLinear.sends), run by Triton's interpreter for
    2 and 3 ranks in turn: each rank's output is the plain GEMV's, its words reach every other rank's slot tagged
    with the next epoch as the fused kernel would send them, and the norm kernels that then only receive (`sent`)
    give the all-reduce then rms_norm, bit for bit, over three calls (both slots, through int32's wrap), for one
    and two rows, fp16 and fp32 parts, outputs not a whole number of a program's."""
    assert run_in_interpreter(SENT_PARTS_CHECK) == "12"


def test_fused_all_reduce_words_in_the_interpreter():
    """The fused all-reduce + RMSNorm kernel's protocol, run by Triton's interpreter as one rank of 2-4, the others'
    words written beforehand into this rank's buffer as they send them: it sends its own part to every other rank
    as 32-bit words tagged with the call's epoch, in the slot of the epoch's parity; reads the others' once tagged;
    and gives the all-reduce then rms_norm, bit for bit, over three calls (both slots), for fp16 and fp32 parts,
    rows not a power of two long, and epochs through int32's wrap."""
    assert run_in_interpreter(FUSED_WORDS_CHECK) == "15"


def _all_reduce_worker(rank: int, port: int) -> None:
    """One of two ranks: Group.all_reduce (symmetric memory for small messages, NCCL past SYMM_BYTES) equals NCCL's
    all-reduce at every size, eagerly and replayed in a CUDA graph with new inputs; and so does the all-reduce
    with the residual add and RMSNorm (Group.all_reduce_rms_norm) at every size, and 32 of them in one graph, and
    16 of them after GEMVs that send their outputs themselves."""
    import torch.distributed as dist

    from nanokyro import small_batch
    from nanokyro.parallel import SYMM_BYTES

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, device_id=device)
    group = Group(rank, 2, dist.group.WORLD, device)
    assert group.symm is not None, "no symmetric memory between the two GPUs"
    for rows in (1, 16, 64, SYMM_BYTES // (4096 * 2) + 1):  # one-shot, two-shot, NCCL
        gen = torch.Generator(device).manual_seed(rank)
        x = torch.randn(rows, 4096, dtype=torch.bfloat16, device=device, generator=gen)
        ref = x.clone()
        dist.all_reduce(ref)
        torch.testing.assert_close(group.all_reduce(x), ref)
        graph, static = torch.cuda.CUDAGraph(), torch.zeros_like(x)
        group.all_reduce(static)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            out = group.all_reduce(static)
        static.copy_(x * 2)
        graph.replay()
        torch.testing.assert_close(out, ref * 2)
        graph.reset()  # before the group goes: a live graph holding an NCCL collective would keep it (#115388)
    # The all-reduce, residual add and RMSNorm through the buffer (one kernel up to FUSED_ROWS rows; two-shot in
    # place, then the norm; NCCL, then the norm): the all-reduce and then rms_norm, and the same bits on both ranks,
    # eagerly and over graph replays that take both slots in turn
    same = torch.Generator(device).manual_seed(7)  # the norm's weight and the residual: the same on both ranks
    weight = torch.randn(4096, dtype=torch.bfloat16, device=device, generator=same)
    for rows in (1, 2, small_batch.FUSED_ROWS, 64, SYMM_BYTES // (4096 * 2) + 1):
        gen = torch.Generator(device).manual_seed(10 + rank)
        parts = [torch.randn(rows, 4096, dtype=torch.bfloat16, device=device, generator=gen) for _ in range(4)]
        residual = torch.randn(rows, 4096, dtype=torch.bfloat16, device=device, generator=same)
        refs = [small_batch.rms_norm(group.all_reduce(p), residual, weight, 1e-5) for p in parts]
        outs = [group.all_reduce_rms_norm(parts[0], residual, weight, 1e-5)]
        graph, static = torch.cuda.CUDAGraph(), parts[0].clone()
        with torch.cuda.graph(graph):
            fused = group.all_reduce_rms_norm(static, residual, weight, 1e-5)
        for p in parts[1:]:
            static.copy_(p)
            graph.replay()
            outs.append(tuple(t.clone() for t in fused))
        for (out, res), (ref_out, ref_res) in zip(outs, refs):
            torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
            torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
            theirs = torch.empty(2, *out.shape, dtype=out.dtype, device=device)
            dist.all_gather_into_tensor(theirs, out)
            assert torch.equal(theirs[0], theirs[1])
        graph.reset()
    # 32 calls back to back in one graph, as a decode step makes 64 (each call's slot taken again two calls later,
    # launched with PDL), with fp32 parts of rows not a power of two long, over replays with new inputs
    weight = torch.randn(5120, device=device, generator=same)
    residual = torch.randn(3, 5120, device=device, generator=same)
    statics = [torch.zeros(3, 5120, device=device) for _ in range(32)]
    group.all_reduce_rms_norm(statics[0], residual, weight, 1e-5)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused = [group.all_reduce_rms_norm(static, residual, weight, 1e-5) for static in statics]
    gen = torch.Generator(device).manual_seed(20 + rank)
    for _ in range(4):
        for static in statics:
            static.copy_(torch.randn(3, 5120, device=device, generator=gen))
        refs = [small_batch.rms_norm(group.all_reduce(static.clone()), residual, weight, 1e-5) for static in statics]
        graph.replay()
        for (out, res), (ref_out, ref_res) in zip(fused, refs):
            torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
            torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    graph.reset()
    # A row-parallel GEMV that sends its output itself, then the norm kernel that only receives
    # (RowParallelLinear.sends): down's shape at TP=2, 16 pairs in one graph (PDL), over replays with new inputs
    weight = torch.randn(4096, dtype=torch.bfloat16, device=device, generator=same)
    gen = torch.Generator(device).manual_seed(30 + rank)
    w = torch.randn(4096, 7168, dtype=torch.bfloat16, device=device, generator=gen) / 85
    for rows in (1, 2):
        residual = torch.randn(rows, 4096, dtype=torch.bfloat16, device=device, generator=same)
        statics = [torch.zeros(rows, 7168, dtype=torch.bfloat16, device=device) for _ in range(16)]
        sent = lambda x: group.all_reduce_rms_norm(small_batch.gemv(x, w, None, False, None, None, None, *group.fused),
                                                   residual, weight, 1e-5, sent=True)  # fmt: skip
        sent(statics[0])  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused = [sent(static) for static in statics]
        gen = torch.Generator(device).manual_seed(40 + rank)
        for _ in range(3):
            for static in statics:
                static.copy_(torch.randn(rows, 7168, dtype=torch.bfloat16, device=device, generator=gen))
            refs = [small_batch.rms_norm(group.all_reduce(small_batch.gemv(s, w, None)), residual, weight, 1e-5)
                    for s in statics]  # fmt: skip
            graph.replay()
            for (out, res), (ref_out, ref_res) in zip(fused, refs):
                torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
                torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        graph.reset()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_all_reduce_through_symmetric_memory_equals_nccl_on_two_gpus():
    from nanokyro.uvicorn_server import free_port

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_all_reduce_worker, args=(rank, port), daemon=True) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        p.kill()
    assert codes == [0, 0]


LOST_PEER = r"""
import time

import torch

from nanokyro import small_batch

small_batch.POLL_LIMIT_S = 2
x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
slots = torch.zeros(small_batch.fused_data_bytes(2) // 8, dtype=torch.int64, device="cuda")
addrs = torch.tensor([slots.data_ptr()] * 2, dtype=torch.int64, device="cuda")
epochs = torch.zeros(small_batch.FUSED_ROWS, dtype=torch.int32, device="cuda")
small_batch.all_reduce_rms_norm(x, x, torch.ones(4096, dtype=x.dtype, device="cuda"), 1e-5, addrs, epochs, 0, 2,
                                sent=True)  # rank 1 of two never sends: nothing will arrive
start = time.perf_counter()
try:
    torch.cuda.synchronize()
except RuntimeError:
    print(f"{time.perf_counter() - start:.1f}")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_all_reduce_fails_when_a_peer_never_sends():
    """A rank whose peer never sends its part waits POLL_LIMIT_S (here 2 s) by the GPU's clock, then fails the
    kernel (trap) rather than hang the GPU; in a process of its own, as a trap ends its CUDA context."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LOST_PEER], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip(), ("the kernel did not fail", out.stderr[-2000:])
    waited = float(out.stdout.split()[-1])
    assert 1.0 < waited < 10.0, (out.stdout, out.stderr[-2000:])


def test_layout_agreement_counts_each_differing_reference_token_once(llama_dir, tmp_path):
    """The teacher-forced agreement benchmark: TP=2 on gloo agrees with one process on every token (fp32), and
    a token planted last in two prompts' references counts once each (planted earlier, it would change the
    context of every reference token after it)."""
    from nanokyro.benchmarks import layout_agreement

    ref = tmp_path / "ref.json"
    common = ["--model", llama_dir, "--dtype", "float32", "--num-prompts", "3", "--output-len", "8",
              "--kv-cache-memory", str(16 << 20)]  # fmt: skip
    layout_agreement.main(common + ["--write", str(ref)])
    tokens = json.loads(ref.read_text())
    assert layout_agreement.main(common + ["--read", str(ref), "--tensor-parallel-size", "2"])["agreement"] == 1.0
    for i in (0, 2):
        tokens[i][-1] = (tokens[i][-1] + 1) % 384
    ref.write_text(json.dumps(tokens))
    result = layout_agreement.main(common + ["--read", str(ref)])
    assert (result["flips"], result["tokens"]) == (2, 24)
    assert not multiprocessing.active_children()
