"""Speculative decoding, measured in one engine: its `speculative=False` requests are the baseline, so the runs
with and without speculation share the weights, the KV cache and the compiled graphs. Or, given `plain`, against
an engine built without speculation (on the CPU, whose weights are laid out for one row rather than a verify's).

- batch 1, greedy: decode tokens/s with and without speculation, the acceptance rate and the mean accepted length
  (tokens per verify step: accepted drafts + 1);
- the step costs behind it: a verify step of k + 1 tokens and a draft model's one-token pass, each against a plain
  one-token decode step of the model (the same sequence, forward only, `reps` back to back), and the speed-up they
  predict with the measured accepted length: len * t_decode / (t_verify + k * t_draft);
- a batch of N (default 64) with speculation allowed against none: at that size the engine does not speculate
  (speculative_max_batch), and this measures what that costs.

With a JSON schema (`structured`), the batch-1 request is constrained by it: its drafts are the text the grammar
forces (then the proposer's), and the drafts the grammar forced are counted apart.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from nanokyro import LLM, SamplingParams, StructuredOutput
from nanokyro.benchmarks.workload import sync
from nanokyro.scheduler import ScheduledBatch
from nanokyro.spec_decode import DraftModelProposer, _DraftView


COUNTERS = ("spec_verify_steps", "spec_draft_tokens", "spec_accepted_tokens", "spec_forced_tokens",
            "spec_forced_accepted_tokens")  # fmt: skip


def decode_seconds_per_token(llm: LLM, prompt: list[int], out_len: int, speculative: bool,
                             structured: dict | None = None) -> tuple[float, dict, list[int]]:  # fmt: skip
    """Seconds per output token after the first (one request, greedy; under a JSON schema, if given), the
    speculation counters it moved, and its tokens."""
    engine = llm.engine
    before = engine.stats()
    engine.add_request(prompt, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True,
                                              speculative=speculative,
                                              structured=StructuredOutput(json=structured) if structured else None))
    tokens = []
    while not tokens:  # until the first token is on the host
        tokens += [t for out in engine.step() for t in out.token_ids]
    sync(engine.runner.device)
    start = time.perf_counter()
    while engine.has_work():
        tokens += [t for out in engine.step() for t in out.token_ids]
    sync(engine.runner.device)
    elapsed = time.perf_counter() - start
    after = engine.stats()
    moved = {k: getattr(after, k) - getattr(before, k) for k in COUNTERS}
    return elapsed / (len(tokens) - 1), moved, tokens


def _time(fn, device, reps: int) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


@torch.inference_mode()
def step_costs(llm: LLM, prompt: list[int], k: int, reps: int = 20) -> dict:
    """Seconds of the model's forward for a one-token decode and a k + 1-token verify of a sequence of the prompt's
    length, and of the draft model's one-token pass, if any (pages borrowed from the block manager)."""
    engine = llm.engine
    runner, blocks = engine.runner, engine.blocks
    n = len(prompt) + k + 1
    pages = blocks.allocate(blocks.pages_for(n))
    try:
        ids = prompt + [prompt[-1]] * (k + 1)
        decode = ScheduledBatch([_DraftView(ids[: len(prompt)], len(prompt) - 1, pages)], [1])
        verify = ScheduledBatch([_DraftView(ids[: len(prompt) + k], len(prompt) - 1, pages)], [k + 1])
        verify.num_drafts = [k]
        out = {"decode_step_s": _time(lambda: runner.forward(decode), runner.device, reps),
               "verify_step_s": _time(lambda: runner.forward(verify), runner.device, reps)}
        if isinstance(engine.proposer, DraftModelProposer):
            draft = engine.proposer.runner
            out["draft_step_s"] = _time(lambda: draft.forward(decode), draft.device, reps)
    finally:
        blocks.release(pages)
    return out


def run_speculative(llm: LLM, prompt: list[int], out_len: int, batch_prompts: list[list[int]], batch_out_len: int,
                    trials: int = 3, structured: dict | None = None, plain: LLM | None = None) -> dict:  # fmt: skip
    """Batch-1 decode with speculation against without: the same engine with it turned off per request, or
    `plain`, an engine built without it (on the CPU its weights are laid out for one row, not for a verify's)."""
    engine = llm.engine
    k = engine.cfg.num_speculative_tokens
    without = plain or llm
    llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up, both paths
    without.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, speculative=False))
    base_runs, runs = [], []
    for _ in range(trials):  # alternating, so that a machine whose load drifts weighs on both alike
        base_runs.append(decode_seconds_per_token(without, prompt, out_len, False, structured))
        runs.append(decode_seconds_per_token(llm, prompt, out_len, True, structured))
    base, spec = [r[0] for r in base_runs], [r[0] for r in runs]
    counts = runs[-1][1]
    plain_ids, spec_ids = base_runs[-1][2], runs[-1][2]
    steps, drafts, accepted = counts["spec_verify_steps"], counts["spec_draft_tokens"], counts["spec_accepted_tokens"]
    result = {
        "method": engine.spec_method, "num_speculative_tokens": k, "prompt_tokens": len(prompt),
        "baseline": "a plain engine" if plain is not None else "speculation off",
        "output_tokens": len(runs[-1][2]), "structured": structured is not None,
        "plain_tokens_per_s": 1 / float(np.median(base)), "spec_tokens_per_s": 1 / float(np.median(spec)),
        "trial_speedups": [b / s for b, s in zip(base, spec)],  # each trial's, for the spread
        "acceptance_rate": accepted / drafts if drafts else 0.0,
        "mean_accepted_length": (accepted / steps + 1) if steps else 1.0,
        # Greedy output with and without speculation: the same tokens up to here (all of them on a CPU in fp32; in
        # bf16 the verify step's kernels round differently from a decode's, and a near-tie can flip).
        "same_greedy_tokens": next((i for i, (a, b) in enumerate(zip(plain_ids, spec_ids)) if a != b), len(plain_ids)),
        "forced_draft_tokens": counts["spec_forced_tokens"],
        "forced_accepted_tokens": counts["spec_forced_accepted_tokens"],
        "draft_tokens": drafts, "verify_steps": steps,
    }  # fmt: skip
    result["speedup"] = result["spec_tokens_per_s"] / result["plain_tokens_per_s"]
    costs = step_costs(llm, prompt, k)
    result.update(costs)
    result["verify_vs_decode"] = costs["verify_step_s"] / costs["decode_step_s"]
    draft_s = costs.get("draft_step_s", 0.0)
    if "draft_step_s" in costs:
        result["draft_vs_target"] = draft_s / costs["decode_step_s"]
    result["predicted_speedup"] = result["mean_accepted_length"] * costs["decode_step_s"] / (
        costs["verify_step_s"] + k * draft_s)  # fmt: skip
    if structured:  # only some steps verify (those where the grammar forced text): count the plain ones too
        n = len(spec_ids) - 1  # tokens after the first
        plain_steps = n - steps - accepted
        result["tokens_per_step"] = n / (n - accepted)
        result["predicted_speedup"] = n * costs["decode_step_s"] / (
            steps * (costs["verify_step_s"] + k * draft_s) + plain_steps * costs["decode_step_s"])  # fmt: skip
    if batch_prompts:
        result.update(run_batch(llm, batch_prompts, batch_out_len))
    return result


def run_batch(llm: LLM, prompts: list[list[int]], out_len: int) -> dict:
    """Seconds for the batch, all greedy, with speculation allowed and with none (best of two each, alternating)."""
    device = llm.engine.runner.device

    def once(speculative: bool) -> float:
        params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True, speculative=speculative)
        sync(device)
        start = time.perf_counter()
        llm.generate(prompts, params)
        sync(device)
        return time.perf_counter() - start

    times = {True: [], False: []}
    for speculative in (False, True, False, True):
        times[speculative].append(once(speculative))
    on, off = min(times[True]), min(times[False])
    return {"batch": len(prompts), "batch_output_tokens": out_len, "batch_spec_on_s": on, "batch_spec_off_s": off,
            "batch_spec_cost": on / off - 1}  # fmt: skip


def print_speculative(r: dict) -> None:
    print(f"speculative decoding ({r['method']}, k={r['num_speculative_tokens']}), batch 1, greedy, "
          f"{r['prompt_tokens']}-token prompt, {r['output_tokens']} tokens: {r['spec_tokens_per_s']:.2f} tok/s vs "
          f"{r['plain_tokens_per_s']:.2f} with {r['baseline']}: {r['speedup']:.2f}x (predicted from step costs "
          f"{r['predicted_speedup']:.2f}x)")  # fmt: skip
    if len(r["trial_speedups"]) > 1:
        print("speed-up per trial (alternating): " + ", ".join(f"{x:.2f}x" for x in r["trial_speedups"]))
    print(f"acceptance {r['acceptance_rate']:.1%}, mean accepted length {r['mean_accepted_length']:.2f} tokens/step; "
          f"greedy output the same as without for {r['same_greedy_tokens']} of {r['output_tokens']} tokens")
    if r["structured"]:
        print(f"under the JSON schema: {r['verify_steps']} verify steps, {r['draft_tokens']} drafts, of which "
              f"{r['forced_draft_tokens']} forced by the grammar ({r['forced_accepted_tokens']} accepted); "
              f"{r['tokens_per_step']:.2f} tokens per step, verify or plain")  # fmt: skip
    line = (f"step costs: decode {r['decode_step_s'] * 1e3:.2f} ms, verify of {r['num_speculative_tokens'] + 1} "
            f"tokens {r['verify_step_s'] * 1e3:.2f} ms ({r['verify_vs_decode']:.2f}x)")
    if "draft_step_s" in r:
        line += f", draft pass {r['draft_step_s'] * 1e3:.2f} ms ({r['draft_vs_target']:.2f}x the model's)"
    print(line)
    if "batch" in r:
        print(f"batch {r['batch']} x {r['batch_output_tokens']} tokens: {r['batch_spec_on_s']:.2f} s with speculation "
              f"allowed vs {r['batch_spec_off_s']:.2f} s without ({r['batch_spec_cost']:+.1%})")
