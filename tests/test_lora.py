"""Multi-LoRA: PEFT adapters on tiny random models, mixed with the base model in one batch, against peft's
PeftModel for each adapter alone; the prefix cache kept apart per adapter; slots swapped LRU; bad adapters refused."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
import transformers

from conftest import build_tiny_model, run_in_interpreter
from nanokyro import LLM, SamplingParams
from nanokyro.lora import AdapterError
from nanokyro.request import Failure, UnknownAdapter

# name -> LoraConfig options: different ranks, targets, alpha, rslora, per-module rank and alpha
ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=16, use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"],
                rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 3}),
}  # fmt: skip


def make_adapter(base_dir: str, out_dir: str, seed: int, **options) -> str:
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options)).save_pretrained(out_dir)
    return out_dir


def make_adapters(base_dir: str, root) -> dict[str, str]:
    return {name: make_adapter(base_dir, str(root / name), seed, **opts)
            for seed, (name, opts) in enumerate(ADAPTERS.items(), 1)}  # fmt: skip


def peft_model(base_dir: str, adapter_dir: str | None):
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return (peft.PeftModel.from_pretrained(model, adapter_dir) if adapter_dir else model).eval()


def random_prompts(lens, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def lora_model(request, tmp_path_factory):
    """A tiny model, three adapters made by peft, and each one's (and the base's) HF reference."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = build_tiny_model(request.param, str(root / "base"))
    adapters = make_adapters(base, root)
    refs = {name: peft_model(base, adapters.get(name)) for name in [None, *adapters]}
    return base, adapters, refs


def greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def test_a_batch_mixing_base_and_three_adapters_gives_each_adapters_peft_tokens_and_logits(lora_model):
    base, adapters, refs = lora_model
    llm = LLM(base, dtype="float32", max_loras=3, max_num_batched_tokens=64, max_num_seqs=8, kv_cache_memory=4 << 20,
              lora_modules=adapters)  # fmt: skip
    engine = llm.engine
    # Logits: one prefill step of four prompts under base, qv, all, mlp.
    names = [None, "qv", "all", "mlp"]
    prompts = random_prompts([5, 9, 3, 12], seed=1)
    for p, name in zip(prompts, names):
        engine.add_request(p, SamplingParams(max_tokens=1, lora=name))
    batch = engine.scheduler.schedule()
    assert batch.num_new == [len(p) for p in prompts]
    logits = engine.runner.forward(batch, None, engine.loras.take_loads())
    for row, p, name in zip(logits, prompts, names):
        with torch.no_grad():
            ref = refs[name](torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4)
    engine.fail_all()
    # Greedy tokens: every adapter (and the base) on the same prompt and on prompts of their own, chunked.
    shared = random_prompts([20], seed=2)[0]
    own = random_prompts([7, 30, 2, 15], seed=3)
    jobs = [(shared, n) for n in names] + list(zip(own, names))
    outs = llm.generate([p for p, _ in jobs], [SamplingParams(max_tokens=8, temperature=0, lora=n) for _, n in jobs])
    for out, (p, name) in zip(outs, jobs):
        assert out.token_ids == greedy(refs[name], p, 8), name
    assert len({tuple(o.token_ids) for o in outs[:4]}) > 1  # the adapters do change the output
    assert engine.blocks.all_free() and not engine.requests


def test_a_steps_decodes_are_grouped_by_adapter(lora_model):
    """The LoRA kernels read an adapter once per block of rows: the scheduler puts one adapter's decodes together."""
    base, adapters, _ = lora_model
    llm = LLM(base, dtype="float32", max_loras=3, max_num_seqs=8, kv_cache_memory=4 << 20, lora_modules=adapters)
    engine = llm.engine
    names = ["all", None, "qv", "all", None, "mlp", "qv"]
    for p, name in zip(random_prompts([4] * len(names), seed=4), names):
        engine.add_request(p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, lora=name))
    engine.step()
    engine.finish_in_flight()
    batch = engine.scheduler.schedule()
    assert batch.num_new == [1] * len(names)
    slots = [seq.lora.slot if seq.lora is not None else -1 for seq in batch.seqs]
    assert slots == sorted(slots) and len(set(slots)) == 4
    engine.fail_all()


def test_prefix_cache_shares_kv_within_an_adapter_never_across(lora_model):
    base, adapters, refs = lora_model
    llm = LLM(base, dtype="float32", max_loras=2, kv_cache_memory=4 << 20, lora_modules=adapters)
    prompt = random_prompts([40], seed=4)[0]
    p = SamplingParams(max_tokens=4, temperature=0)
    first = llm.generate(prompt, p, lora="qv")[0]
    assert first.num_cached_tokens == 0
    other = llm.generate(prompt, p, lora="all")[0]  # same prompt, another adapter: nothing shared
    assert other.num_cached_tokens == 0 and other.token_ids == greedy(refs["all"], prompt, 4)
    plain = llm.generate(prompt, p)[0]
    assert plain.num_cached_tokens == 0 and plain.token_ids == greedy(refs[None], prompt, 4)
    again = llm.generate(prompt, p, lora="qv")[0]  # same adapter: the cached pages
    assert again.num_cached_tokens == 32 and again.token_ids == first.token_ids == greedy(refs["qv"], prompt, 4)
    llm.engine.cache.clear()  # every tree emptied: the adapters' roots go too
    assert list(llm.engine.cache._roots) == [0] and llm.engine.blocks.all_free()


def test_more_adapters_than_slots_are_swapped_in_lru_and_stay_exact(lora_model):
    base, adapters, refs = lora_model
    llm = LLM(base, dtype="float32", max_loras=1, kv_cache_memory=4 << 20)
    for name, path in adapters.items():
        llm.load_lora(name, path)
    prompts = random_prompts([6, 11, 4, 8, 5], seed=5)
    names = ["qv", "all", None, "mlp", "qv"]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=6, temperature=0, lora=n) for n in names])
    for out, p, name in zip(outs, prompts, names):
        assert out.token_ids == greedy(refs[name], p, 6), name
    stats = llm.engine.stats()
    assert stats.loras_resident == 1 and stats.lora_loads >= 3
    assert stats.lora_requests == {"qv": 2, "all": 1, "mlp": 1}


def test_an_adapter_loaded_mid_decode_leaves_the_running_requests_tokens_as_they_were(lora_model):
    """A load beside the steps of running requests (on CUDA its copies overlap the step in flight): the base and
    "qv" requests decoding meanwhile keep peft's tokens, and the new "mlp" request, in the slot that "all" (on
    more modules, at a higher rank) held until the step before, gets peft's tokens too."""
    base, adapters, refs = lora_model
    llm = LLM(base, dtype="float32", max_loras=2, kv_cache_memory=4 << 20, lora_modules=adapters)
    engine = llm.engine
    prompts = random_prompts([7, 12, 5, 9], seed=8)
    tokens = {}

    def add(prompt, name, n):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, lora=name))
        tokens[rid] = []
        return rid

    running = {add(p, name, 12): (p, name) for p, name in zip(prompts, [None, "qv"])}
    short = add(prompts[2], "all", 3)  # the other slot, given up when it finishes
    while short in engine.requests:
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    slot, loads = engine.loras.entries["all"].slot, engine.loras.num_loads
    assert all(0 < len(tokens[rid]) < 12 for rid in running)  # mid-decode
    late = add(prompts[3], "mlp", 8)
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert engine.loras.num_loads == loads + 1 and engine.loras.entries["mlp"].slot == slot
    for rid, (p, name) in running.items():
        assert tokens[rid] == greedy_n(refs[name], p, 12), name
    assert tokens[short] == greedy_n(refs["all"], prompts[2], 3)
    assert tokens[late] == greedy_n(refs["mlp"], prompts[3], 8)


def greedy_n(model, prompt, n):
    """Exactly n greedy tokens, past an EOS too (as with ignore_eos: not masked, not stopping); generate() would
    stop at the model's EOS."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_load_unload_and_bad_adapters_are_refused_with_the_field_named(lora_model, tmp_path):
    base, adapters, refs = lora_model
    llm = LLM(base, dtype="float32", max_loras=2, kv_cache_memory=4 << 20)
    prompt = random_prompts([6], seed=6)[0]
    with pytest.raises(UnknownAdapter):
        llm.generate(prompt, SamplingParams(max_tokens=2), lora="qv")
    llm.load_lora("qv", adapters["qv"])
    with pytest.raises(AdapterError, match="already loaded"):
        llm.load_lora("qv", adapters["all"])
    assert llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0), lora="qv")[0].token_ids == greedy(
        refs["qv"], prompt, 3)
    llm.unload_lora("qv")
    with pytest.raises(UnknownAdapter):
        llm.generate(prompt, SamplingParams(max_tokens=2), lora="qv")
    llm.load_lora("qv", adapters["all"])  # the name again, another adapter: no stale weights, no stale KV
    assert llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0), lora="qv")[0].token_ids == greedy(
        refs["all"], prompt, 3)

    def variant(name, **changes):
        path = tmp_path / name
        path.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(os.path.join(adapters["qv"], f), path / f) if f != "adapter_config.json" else None
        with open(os.path.join(adapters["qv"], "adapter_config.json")) as f:
            cfg = json.load(f)
        with open(path / "adapter_config.json", "w") as f:
            json.dump({**cfg, **changes}, f)
        return str(path)

    for field, value in [("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]),
                         ("target_modules", ["embed_tokens"]), ("r", 128)]:  # fmt: skip
        with pytest.raises(AdapterError, match=field):
            llm.load_lora(field, variant(field, **{field: value}))
    with pytest.raises(AdapterError, match="adapter_config.json"):
        llm.load_lora("empty", str(tmp_path))
    assert list(llm.engine.adapters()) == ["qv"]


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_tp2_and_pp2_on_gloo_give_the_tokens_of_one_process(lora_model, layout):
    import multiprocessing

    base, adapters, refs = lora_model
    prompts = random_prompts([9, 14, 5, 20], seed=7)
    names = [None, "qv", "all", "mlp"]
    params = [SamplingParams(max_tokens=6, temperature=0, lora=n) for n in names]
    llm = LLM(base, dtype="float32", max_loras=2, kv_cache_memory=4 << 20, max_num_batched_tokens=16,
              max_num_seqs=4, tensor_parallel_size=layout[0], pipeline_parallel_size=layout[1],
              lora_modules=adapters)  # fmt: skip
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.close()
    for out, p, name in zip(outs, prompts, names):
        assert out.token_ids == greedy(refs[name], p, 6), name
    assert not multiprocessing.active_children()


def test_an_adapter_reloaded_at_its_path_reaches_every_stage_when_the_step_planned_with_it_fails(tmp_path):
    """PP=2 plans a step before the one in flight is sampled. An adapter unloaded and loaded again at the same
    path (new files) is announced to the other stage with the plan that is sent: when sampling fails after that
    plan was built, the next step still tells the other stage, which reads the new files (peft's tokens)."""
    import shutil

    base = build_tiny_model("llama", str(tmp_path / "base"))
    old = make_adapter(base, str(tmp_path / "old"), 1, **ADAPTERS["all"])
    new = make_adapter(base, str(tmp_path / "new"), 7, **ADAPTERS["all"])
    path, prompt = tmp_path / "a", random_prompts([9], seed=3)[0]
    shutil.copytree(old, path)
    llm = LLM(base, dtype="float32", max_loras=2, kv_cache_memory=4 << 20, max_num_batched_tokens=32,
              max_num_seqs=8, pipeline_parallel_size=2, lora_modules={"a": str(path)})  # fmt: skip
    engine, params = llm.engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, lora="a")
    try:
        assert llm.generate([prompt], params)[0].token_ids == greedy(peft_model(base, old), prompt, 8)
        for p in random_prompts([5, 6, 7, 8], seed=1):  # base requests keep two steps in flight
            engine.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        while len(engine._launched) < 2:
            engine.step()
        llm.unload_lora("a")
        shutil.rmtree(path)
        shutil.copytree(new, path)
        llm.load_lora("a", str(path))
        sample_oldest = engine._sample_oldest

        def failing():
            engine._sample_oldest = sample_oldest
            raise RuntimeError("sampling failed")

        engine._sample_oldest = failing
        with pytest.raises(RuntimeError, match="sampling failed"):
            engine.step()  # after planning the next step, whose plan announced the reload
        engine.fail_all(Failure(500, "sampling failed"))  # what the core's loop does with a failed step
        assert llm.generate([prompt], params)[0].token_ids == greedy(peft_model(base, new), prompt, 8)
    finally:
        llm.close()


@pytest.mark.parametrize("mode", [[], ["--latency"]])
def test_bench_runs_the_workload_on_the_base_and_on_random_adapters(tmp_path, mode):
    from test_bench import run_bench

    base = build_tiny_model("llama", str(tmp_path / "base"))
    r = run_bench(tmp_path, "--model", base, "--num-prompts", "6", "--input-len", "5-20", "--output-len", "4-8",
                  "--num-loras", "3", "--lora-rank", "4", *mode)  # fmt: skip
    assert r["base_tokens_per_s"] > 0 and r["lora_tokens_per_s"] > 0
    assert r["lora_ratio"] == pytest.approx(r["lora_tokens_per_s"] / r["base_tokens_per_s"])
    # The load-stall figure: gaps between the base streams' tokens, around a load and with the adapter resident.
    assert r["stall_batch"] == 8 and r["base_step_ms"] > 0
    assert r["load_gap_steps"] > 0 and r["resident_gap_steps"] > 0
    assert r["load_stall_steps"] == pytest.approx(r["load_gap_steps"] - r["resident_gap_steps"])
    assert r["load_tokens_match"]


KERNEL_CHECK = """
import torch
from nanokyro import lora_kernels, small_batch
from nanokyro.lora import lora_delta_reference

torch.manual_seed(0)
worst = 0.0
for T, K, R, N in [(1, 4096, 48, 96), (2, 1000, 16, 64), (3, 512, 8, 40)]:  # K in whole splits and not
    x, a = torch.randn(T, K), torch.randn(3, R, K) / K**0.5
    b, y = torch.randn(3, N, R) * 0.1, torch.randn(T, N)
    lora = torch.tensor([1, -1, 2][:T], dtype=torch.int32)
    s = lora_kernels.lora_shrink(x, a, lora)
    assert s.shape[0] == lora_kernels.num_splits(K)
    ref = lora_delta_reference(y, x, a, b, lora)
    worst = max(worst, (lora_kernels.lora_expand(y, s, b, lora) - ref).abs().max().item())
for T, K, N, gated in [(1, 5000, 24, False), (2, 600, 20, True)]:  # the decode graphs' GEMV with the delta
    x, w = torch.randn(T, K), torch.randn(2 * N if gated else N, K) / K**0.5
    a, b = torch.randn(3, 16, K) / K**0.5, torch.randn(3, w.shape[0], 16) * 0.1
    lora = torch.tensor([2, 0][:T], dtype=torch.int32)
    got = small_batch.gemv(x, w, None, gated, lora_kernels.lora_shrink(x, a, lora), b, lora)
    full = lora_delta_reference(x @ w.T, x, a, b, lora)
    worst = max(worst, (got - (small_batch.silu_and_mul(full) if gated else full)).abs().max().item())
print(worst)
"""


def test_triton_kernels_match_the_torch_reference_in_the_interpreter():
    """The CUDA kernels (shrink, split over K; expand; the decode graphs' GEMV that adds the delta in its
    epilogue, gated or not) run by Triton's interpreter on the CPU, against the torch reference."""
    assert float(run_in_interpreter(KERNEL_CHECK)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 50, 700])
@pytest.mark.parametrize("shape", [(4096, 48, 6144), (14336, 16, 4096), (64, 8, 128)])  # K, rank slots, N
def test_triton_kernels_match_the_torch_reference(dtype, num_tokens, shape):
    from nanokyro.lora import lora_delta, lora_delta_reference

    K, R, N = shape
    S = 4
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, K, device="cuda", generator=g).to(dtype)
    a = (torch.randn(S, R, K, device="cuda", generator=g) / K**0.5).to(dtype)
    b = (torch.randn(S, N, R, device="cuda", generator=g) * 0.1).to(dtype)
    y = torch.randn(num_tokens, N, device="cuda", generator=g).to(dtype)
    for pattern in ("segments", "rows"):  # prefill-like runs of one adapter; decode-like, each row its own
        if pattern == "segments":
            lora = torch.arange(num_tokens, device="cuda") * 5 // max(num_tokens, 1) - 1  # -1, 0, 1, 2, 3 in runs
        else:
            lora = torch.randint(-1, S, (num_tokens,), device="cuda", generator=g)
        lora = lora.to(torch.int32)
        got = lora_delta(y, x, a, b, lora)
        ref = lora_delta_reference(y.float(), x.float(), a.float(), b.float(), lora)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_with_adapters_match_eager_and_peft_logits(tmp_path):
    """Decode batches mixing adapters and the base (8 rows padded; 1 row, the small-batch kernels) replayed as CUDA
    graphs give the eager forward's logits, and peft's (fp32, CPU) within bf16 error."""
    # head_dim 128, as the GPU tests' other models: FlashInfer compiles one kernel variant for all of them.
    base = build_tiny_model("llama", str(tmp_path / "base"), hidden_size=256, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=128)  # fmt: skip
    adapters = make_adapters(base, tmp_path)
    refs = {name: peft_model(base, adapters.get(name)) for name in [None, *adapters]}
    llm = LLM(base, dtype="bfloat16", max_loras=3, max_num_seqs=8, kv_cache_memory=1 << 28, lora_modules=adapters)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.graphs is not None
    for names, bucket in ([[None, "qv", "all", "mlp", "all", "qv"], 8], [["all"], 1]):
        decode_against_eager_and_peft(engine, runner, refs, names, bucket)


@torch.inference_mode()
def decode_against_eager_and_peft(engine, runner, refs, names: list[str | None], bucket: int) -> None:
    """One decode step of sequences under `names`, replayed in the bucket's graph and run eagerly."""
    rel_err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    for p, name in zip(random_prompts([5 + 3 * i for i in range(len(names))], seed=9), names):
        engine.add_request(p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, lora=name))
    engine.step()  # the prefills (the compiled transformer, with adapters)
    engine.finish_in_flight()
    batch = engine.scheduler.schedule()
    assert batch.num_new == [1] * len(names)
    input_ids, positions, meta, rows, lora = runner._load(runner.plan(batch, pad_to=bucket, token_rows=True))
    graphed = runner.graphs.replay(runner.graphs.load(input_ids, positions, meta, lora))[rows].float()
    input_ids, positions, meta, rows, lora = runner._load(runner.plan(batch))
    runner.attn.plan(meta)
    eager = runner.model.compute_logits(runner.model(input_ids, positions, runner.attn, lora=lora)[rows]).float()
    for row, seq in enumerate(batch.seqs):  # the scheduler orders the batch by adapter, not as added
        name = seq.lora.name if seq.lora is not None else None
        assert rel_err(graphed[row], eager[row]) < 2e-2, name
        # bf16 against peft's fp32: the engine in bf16 lands 1.3-6.5% from peft on these rows (the same on the CPU's
        # torch reference as on CUDA; 1e-6 in fp32), while an adapter moves these logits by 38-113%: a missing or
        # wrong adapter fails this bound, bf16 rounding does not.
        ref = refs[name](torch.tensor([seq.token_ids])).logits[0, -1]
        assert rel_err(graphed[row].cpu(), ref) < 0.15, name
    engine.fail_all()


# -- over HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    from conftest import KEY, ServerThread
    from nanokyro.config import EngineConfig
    from nanokyro.server import create_app

    root = tmp_path_factory.mktemp("lora-http")
    base = build_tiny_model("llama", str(root / "base"))
    adapters = make_adapters(base, root)
    cfg = EngineConfig(model=base, dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=8, max_loras=1,
                       lora_modules={"qv": adapters["qv"]})  # fmt: skip
    srv = ServerThread(create_app(cfg, api_key=KEY))
    yield srv, base, adapters, root
    srv.stop()


def test_adapters_over_http_load_use_unload_reload_with_vllms_api(lora_server):
    import httpx
    import openai

    from test_server import engine_idle, metrics

    srv, base, adapters, root = lora_server
    client, tok = srv.client(), srv.core.tokenizer
    prompt = random_prompts([8], seed=10)[0]

    def complete(model, **kw):
        return client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, **kw)

    def change(path, body):
        return client.post(path, body=body, cast_to=httpx.Response)

    def expected(name):
        return tok.decode(greedy(peft_model(base, adapters.get(name)), prompt, 6))

    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {srv.model, "qv"} and cards["qv"].parent == srv.model and cards["qv"].root == adapters["qv"]
    assert complete("qv").choices[0].text == complete(f"{srv.model}:qv").choices[0].text == expected("qv")
    assert complete("qv").model == "qv"  # a response names the model as the request did
    assert complete(srv.model).choices[0].text == expected(None)
    with pytest.raises(openai.NotFoundError, match="all"):
        complete("all")
    # Load: a second adapter (one slot: swapped with the first, LRU), then bad ones, refused with the reason.
    assert change("/load_lora_adapter", {"lora_name": "all", "lora_path": adapters["all"]}).status_code == 200
    assert complete("all").choices[0].text == expected("all") and complete("qv").choices[0].text == expected("qv")
    with pytest.raises(openai.BadRequestError, match="adapter_config.json"):
        change("/load_lora_adapter", {"lora_name": "bad", "lora_path": str(root)})
    dora = root / "dora"
    dora.mkdir()
    os.link(os.path.join(adapters["mlp"], "adapter_model.safetensors"), dora / "adapter_model.safetensors")
    with open(os.path.join(adapters["mlp"], "adapter_config.json")) as f:
        (dora / "adapter_config.json").write_text(json.dumps({**json.load(f), "use_dora": True}))
    with pytest.raises(openai.BadRequestError, match="use_dora"):
        change("/load_lora_adapter", {"lora_name": "dora", "lora_path": str(dora)})
    with pytest.raises(openai.BadRequestError, match="lora_path"):
        change("/load_lora_adapter", {"lora_name": "x"})
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").post("/load_lora_adapter", body={"lora_name": "mlp", "lora_path": adapters["mlp"]},
                                     cast_to=httpx.Response)  # fmt: skip
    assert complete(srv.model).choices[0].text == expected(None)  # still serving
    assert set(m.id for m in client.models.list().data) == {srv.model, "qv", "all"}
    # Unload while a request uses it: 409, and the request goes on untouched.
    stream = client.completions.create(model="all", prompt=prompt, max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    text = next(iter(stream)).choices[0].text
    with pytest.raises(openai.ConflictError, match="in use"):
        change("/unload_lora_adapter", {"lora_name": "all"})
    text += "".join(c.choices[0].text for c in stream)
    long = client.completions.create(model="all", prompt=prompt, max_tokens=200, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    assert text == long
    assert engine_idle(srv)
    assert change("/unload_lora_adapter", {"lora_name": "all"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete("all")
    with pytest.raises(openai.NotFoundError):
        change("/unload_lora_adapter", {"lora_name": "all"})
    assert change("/load_lora_adapter", {"lora_name": "all", "lora_path": adapters["mlp"]}).status_code == 200
    assert complete("all").choices[0].text == expected("mlp")  # the name again, another adapter
    m = metrics(srv.url)
    assert m["nanokyro_lora_requests_total{lora_name=all}"] == 4
    assert m["nanokyro_lora_requests_total{lora_name=qv}"] == 4
    assert m["nanokyro_lora_adapters_resident{}"] == 1 and m["nanokyro_lora_adapter_loads_total{}"] >= 4


def test_an_adapter_on_a_gguf_base_gives_peft_tokens(tmp_path):
    """The base from a GGUF file (llama.cpp's q/k row order, undone by the loader); the adapter made by peft on
    the HF model the file was written from."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from test_gguf import gguf_name, llama_cpp_permute, train_byte_level_bpe, write_gguf

    tokens, merges = train_byte_level_bpe()
    hf_cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      initializer_range=0.2)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
    hf.save_pretrained(str(tmp_path / "hf"))
    tensors = {}
    for name, w in hf.state_dict().items():
        w = w.numpy()
        if "q_proj" in name or "k_proj" in name:
            w = llama_cpp_permute(w, 4 if "q_proj" in name else 2)
        tensors[gguf_name(name)] = (np.ascontiguousarray(w), Q.F32)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", {
        "llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 2,
    }, tensors)  # fmt: skip
    adapter = make_adapter(str(tmp_path / "hf"), str(tmp_path / "lora"), 12, **ADAPTERS["all"])
    llm = LLM(path, dtype="float32", kv_cache_memory=4 << 20, max_loras=1, lora_modules={"all": adapter})
    prompt = random_prompts([10], seed=12)[0]
    out, base = llm.generate([prompt, prompt], [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, lora=n)
                                                for n in ("all", None)])  # fmt: skip
    ref = peft_model(str(tmp_path / "hf"), adapter).generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                                             eos_token_id=None)[0, len(prompt):].tolist()  # fmt: skip
    assert out.token_ids == ref != base.token_ids


def test_an_adapter_on_an_awq_base_gives_peft_tokens_on_the_dequantised_model(tmp_path):
    """LoRA over a quantised layer (quant.py: its weight packed, no dense `weight`): the adapter's delta is added
    after the 4-bit matmul, as peft adds it after the dequantised model's."""
    import peft
    from test_quant import SHAPE, quantised_checkpoint, reference

    base = build_tiny_model("llama", str(tmp_path / "base"), **SHAPE)
    path, deq = quantised_checkpoint(base, str(tmp_path / "awq"), "awq", group=64)
    adapter = make_adapter(base, str(tmp_path / "lora"), 5, **ADAPTERS["all"])
    plain = reference(base, deq)
    prompt = random_prompts([12], seed=5)[0]
    without = greedy(plain, prompt, 8)
    ref = peft.PeftModel.from_pretrained(plain, adapter).eval()
    llm = LLM(path, dtype="float32", kv_cache_memory=4 << 20, max_loras=1, lora_modules={"all": adapter})
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), lora="all")[0]
    assert out.token_ids == greedy(ref, prompt, 8) != without


@pytest.mark.parametrize("spec", [dict(speculative_method="ngram"), "self-draft"])
def test_speculative_decoding_under_an_adapter_gives_peft_tokens(tmp_path, spec):
    """Speculation verifies with the request's adapter (the draft model proposes from its base weights): greedy
    output is still peft's, for an adapter row mixed with a base row."""
    base = build_tiny_model("llama", str(tmp_path / "base"))
    adapter = make_adapter(base, str(tmp_path / "lora"), 7, **ADAPTERS["all"])
    spec = dict(speculative_model=base) if spec == "self-draft" else spec
    prompt = random_prompts([9], seed=7)[0] * 3  # repeats itself: n-gram drafts get accepted too
    refs = [greedy(peft_model(base, a), prompt, 16) for a in (adapter, None)]
    llm = LLM(base, dtype="float32", kv_cache_memory=4 << 20, max_loras=1, lora_modules={"all": adapter}, **spec)
    outs = llm.generate([prompt, prompt], [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, lora=n)
                                           for n in ("all", None)])  # fmt: skip
    assert [o.token_ids for o in outs] == refs
    assert llm.engine.stats().spec_draft_tokens > 0


def test_an_adapter_admitted_in_a_speculative_step_is_loaded_first(tmp_path):
    """A request whose adapter is not resident, admitted while another request speculates (a step that verifies
    drafts), has its adapter loaded in that step: peft's tokens."""
    base = build_tiny_model("llama", str(tmp_path / "base"))
    adapter = make_adapter(base, str(tmp_path / "lora"), 7, **ADAPTERS["all"])
    prompt = random_prompts([9], seed=7)[0] * 3  # repeats itself: n-gram drafts
    late_prompt = random_prompts([6], seed=9)[0]
    llm = LLM(base, dtype="float32", kv_cache_memory=4 << 20, max_loras=1, lora_modules={"all": adapter},
              speculative_method="ngram")  # fmt: skip
    engine = llm.engine
    tokens = {engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)): []}
    while not engine._speculating():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    late = engine.add_request(late_prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, lora="all"))
    tokens[late] = []
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert engine.stats().spec_draft_tokens > 0
    first = next(iter(tokens))
    assert tokens[first] == greedy_n(peft_model(base, None), prompt, 24)
    assert tokens[late] == greedy_n(peft_model(base, adapter), late_prompt, 6)


def test_a_failed_step_forgets_what_the_slots_hold_so_the_next_use_loads_again(lora_model):
    """A step that fails after taking its adapter loads may not have run them: the engine then loads the adapter
    again rather than trusting the slot, and the request gets peft's tokens."""
    base, adapters, refs = lora_model
    llm = LLM(base, dtype="float32", max_loras=1, kv_cache_memory=4 << 20, lora_modules={"qv": adapters["qv"]})
    engine, prompt = llm.engine, random_prompts([6], seed=5)[0]
    engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, lora="qv"))
    batch = engine.scheduler.schedule()
    assert engine.loras.take_loads() == [(0, engine.loras.entries["qv"].path)]  # handed to a step that then fails
    engine.fail_all(Failure(500, "the step failed"))
    assert batch.seqs and engine.loras.entries["qv"].slot == -1
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, lora="qv"))[0]
    assert out.token_ids == greedy(refs["qv"], prompt, 4)
