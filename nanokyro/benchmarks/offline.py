"""Offline runs against the engine core in this process: throughput of the recipe, batch-1 decode latency, time to
first token with a cold and a cached prefix, decode step time under JSON-schema constraints, and how much of
a full-batch decode step the GPU sits idle.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from nanokyro import LLM, SamplingParams
from nanokyro.benchmarks.workload import sync
from nanokyro.profiling import kernel_busy_s


def run_offline(llm: LLM, prompts, out_lens, loras: list[str] | None = None) -> float:
    """Seconds for the whole workload; with `loras`, request i runs under adapter loras[i % len(loras)]."""
    lora = (lambda i: loras[i % len(loras)]) if loras else (lambda i: None)  # noqa: E731
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, lora=lora(i))
              for i, n in enumerate(out_lens)]
    device = llm.engine.runner.device
    # Warm-up (kernels, allocator, the compiled transformer with and without adapters).
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True, lora=loras[0] if loras else None)] * 2)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    sync(device)
    elapsed = time.perf_counter() - start
    got = [len(o.token_ids) for o in outs]
    assert got == out_lens, "every request must produce exactly its output length"
    return elapsed


def run_latency(llm: LLM, prompt: list[int], out_len: int, trials: int = 3, lora: str | None = None) -> float:
    """Seconds per decode step of one request (its prefill step excluded): the median of `trials` runs."""
    engine = llm.engine
    llm.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True, lora=lora))  # warm-up

    def one_run() -> float:
        engine.add_request(prompt, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True, lora=lora))
        engine.step()  # the prefill, which samples the first token
        sync(engine.runner.device)
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        sync(engine.runner.device)
        return (time.perf_counter() - start) / (out_len - 1)  # one decode step per token after the first

    return float(np.median([one_run() for _ in range(trials)]))


def run_prefix_cache(llm: LLM, prefix_len: int, seed: int, trials: int = 3) -> dict:
    """Time to first token of a request whose prefix_len-token prefix is new, then of one that shares it.

    Each trial draws a fresh prefix: the cold request computes all of it, the warm one (same prefix, another
    suffix) finds it in the prefix cache. Medians over the trials, after a warm-up trial."""
    engine = llm.engine
    rng = np.random.default_rng(seed)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        sync(engine.runner.device)
        start = time.perf_counter()
        engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        cached = 0
        while engine.has_work():
            for d in engine.step():
                cached = d.num_cached_tokens
        return time.perf_counter() - start, cached

    cold, warm = [], []
    for _ in range(trials + 1):
        prefix = rng.integers(0, engine.vocab_size, prefix_len).tolist()
        cold.append(ttft(prefix + rng.integers(0, engine.vocab_size, 16).tolist()))
        warm.append(ttft(prefix + rng.integers(0, engine.vocab_size, 16).tolist()))
    cold_s, warm_s = np.median([t for t, _ in cold[1:]]), np.median([t for t, _ in warm[1:]])
    return {"prefix_len": prefix_len, "cold_ttft_s": float(cold_s), "cached_ttft_s": float(warm_s),
            "cached_tokens": warm[-1][1], "ttft_speedup": float(cold_s / warm_s)}  # fmt: skip


# A schema whose outputs run long (at least 256 records), so constrained rows keep decoding while timed.
RECORDS_SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 256, "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "kind": {"enum": ["a", "b", "c"]}, "score": {"type": "number"}},
        "required": ["name", "kind", "score"]}}},
    "required": ["records"],
}  # fmt: skip


def run_structured(llm: LLM, prompts: list[list[int]], fraction: float, steps: int) -> dict:
    """Decode step time with `fraction` of the batch constrained by a JSON schema, against none constrained.

    Both runs admit the same prompts, prefill them all, then time `steps` decode steps of the full batch."""
    from nanokyro.request import StructuredOutput

    engine = llm.engine
    constrained = round(fraction * len(prompts))

    def step_time(structured: StructuredOutput | None) -> tuple[float, int]:
        for i, p in enumerate(prompts):
            s = structured if i < constrained else None
            engine.add_request(p, SamplingParams(max_tokens=steps + 8, temperature=1.0, ignore_eos=True, structured=s))
        while engine.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in engine.scheduler.running):
            engine.step()
        sync(engine.runner.device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(engine.runner.device)
        elapsed, still_running = (time.perf_counter() - start) / steps, len(engine.scheduler.running)
        engine.fail_all()
        return elapsed, still_running

    schema = StructuredOutput(json=RECORDS_SCHEMA)
    step_time(schema)  # warm-up: compiles the grammar, captures graphs
    plain_s, _ = step_time(None)
    constrained_s, running = step_time(schema)
    return {"batch": len(prompts), "constrained": constrained, "plain_step_s": plain_s,
            "constrained_step_s": constrained_s, "overhead": constrained_s / plain_s - 1,
            "running_at_end": running}  # fmt: skip


def run_decode_idle(llm: LLM, prompts: list[list[int]], steps: int = 20, warmup: int = 3) -> dict:
    """Wall and GPU-busy time per decode step of the whole batch, and the fraction of the step the GPU is idle.

    Admits every prompt with room to decode to the model's length and steps until each one is decoding (none
    waiting, no prompt tokens left). Then `warmup` steps run in the profiler's warm-up cycle (which takes the
    cost of starting CUPTI out of the timed steps) and `steps` steps are timed and profiled, synchronising only
    before the first and after the last: a step's host work that overlaps the GPU's is not serialised, and the
    idle time is the host's share that the GPU could not hide. On a CPU only the wall time is measured (busy and
    idle are None), and so with the engine's step profiler on (profile_dir): torch runs one profiler at a time
    (a second takes over the first's session), and that one reports each rank's busy time."""
    engine = llm.engine
    sched, device = engine.scheduler, engine.runner.device
    if len(prompts) > engine.cfg.max_num_seqs:
        raise ValueError(f"{len(prompts)} prompts can't all decode at once: max_num_seqs is {engine.cfg.max_num_seqs}")
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=engine.max_model_len - len(p), temperature=0, ignore_eos=True))
    while sched.waiting or any(s.num_computed < s.num_prompt_tokens for s in sched.running):
        engine.step()
    cuda = device.type == "cuda" and engine.cfg.profile_dir is None
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA], schedule=torch.profiler.schedule(wait=0, warmup=1, active=1)
    ) if cuda else contextlib.nullcontext()  # fmt: skip
    with profiler:
        for _ in range(warmup):
            engine.step()
        batch = len(sched.running)
        sync(device)
        if cuda:
            profiler.step()  # warm-up cycle over: record from here
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        wall_s = time.perf_counter() - start
    running = len(sched.running)
    engine.fail_all()
    busy_s = kernel_busy_s(profiler.events()) if cuda else None
    return {"batch": batch, "steps": steps, "step_wall_ms": wall_s / steps * 1e3,
            "step_gpu_busy_ms": None if busy_s is None else busy_s / steps * 1e3,
            "gpu_idle_fraction": None if busy_s is None else 1 - busy_s / wall_s,
            "running_at_end": running}  # fmt: skip


def run_lora_load_stall(llm: LLM, lora: str, batch: int = 8, warmup: int = 16, after: int = 12, seed: int = 0
                        ) -> dict:  # fmt: skip
    """How long loading an adapter holds up the streams decoding beside it, in steps of theirs.

    `batch` base-model streams decode; after `warmup` steps a short request for `lora` (registered, not resident)
    arrives, and the longest gap between consecutive tokens of the base streams over the next `after` steps is
    taken against their median gap before it. The same request again, its adapter now resident, is the control:
    its gap is the cost of a prefill row with an adapter in the step, without the load. The stall is the
    difference, in steps (each run's gaps counted in its own median step). Both runs have the same prompts, so
    the adapter's request must give the same tokens in both. A first run with a resident adapter (if any) warms
    those steps' code paths up."""
    engine = llm.engine
    rng = np.random.default_rng(seed)
    if engine.loras is None or lora not in engine.loras.entries:
        raise ValueError(f"{lora!r} is not a registered adapter")
    if engine.loras.entries[lora].slot >= 0:
        raise ValueError(f"{lora!r} is resident already: nothing to load")
    # The same prompts in every run: the adapter's tokens with the load must be those with it resident.
    base_prompts = [rng.integers(0, engine.vocab_size, 32).tolist() for _ in range(batch)]
    lora_prompt = rng.integers(0, engine.vocab_size, 16).tolist()

    def longest_gap(lora: str) -> tuple[float, float, int, list[int]]:
        """(median gap before the request, longest gap after it, adapter loads meanwhile, the request's tokens)."""
        if engine.cache is not None:  # nothing cached from the run before: the same prefill work in each run
            engine.cache.clear()
        base = {engine.add_request(p, SamplingParams(max_tokens=warmup + after + 8, temperature=0, ignore_eos=True))
                for p in base_prompts}  # fmt: skip
        while engine.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in engine.scheduler.running):
            engine.step()
        sync(engine.runner.device)
        times, loads, steps, late, tokens = [], engine.loras.num_loads, 0, None, []
        while engine.has_work() and steps < warmup + after:
            if steps == warmup:  # the gaps so far are the baseline
                late = engine.add_request(lora_prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                                      lora=lora))  # fmt: skip
            outs = engine.step()
            tokens += [t for o in outs if o.request_id == late for t in o.token_ids]
            if any(o.request_id in base and o.token_ids for o in outs):
                times.append(time.perf_counter())
                steps += 1
        loads = engine.loras.num_loads - loads
        engine.fail_all()
        gaps = np.diff(times)
        return float(np.median(gaps[: warmup - 1])), float(gaps[warmup - 1 :].max()), loads, tokens

    resident = [e.name for e in engine.loras.entries.values() if e.slot >= 0]
    if resident:
        longest_gap(resident[0])  # warm-up
    step_s, load_gap_s, loads, load_tokens = longest_gap(lora)  # the adapter is loaded
    resident_step_s, resident_gap_s, resident_loads, resident_tokens = longest_gap(lora)  # the control: resident
    assert loads == 1 and resident_loads == 0, "the first request loads the adapter, the second finds it resident"
    return {"stall_batch": batch, "base_step_ms": step_s * 1e3, "load_gap_ms": load_gap_s * 1e3,
            "resident_gap_ms": resident_gap_s * 1e3, "load_gap_steps": load_gap_s / step_s,
            "resident_gap_steps": resident_gap_s / resident_step_s,
            "load_stall_steps": load_gap_s / step_s - resident_gap_s / resident_step_s,
            # False would mean the step that loads read the slot before its copies were done
            "load_tokens_match": load_tokens == resident_tokens and len(load_tokens) == 4}  # fmt: skip
