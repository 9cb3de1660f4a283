"""Greedy agreement of a parallel layout with one GPU, teacher-forced: every token of the reference's greedy
continuations against this layout's greedy choice after the same prefix, so one early difference does not count
every token after it. The reference run writes its tokens, the layout's run reads them:

    python -m nanokyro.benchmarks.layout_agreement --model llama-3.1-8b --load-format dummy --write ref.json
    python -m nanokyro.benchmarks.layout_agreement --model llama-3.1-8b --load-format dummy --read ref.json \
        --tensor-parallel-size 2

Reading with the layout that wrote gives the floor: how often batching alone flips a greedy choice.
"""
from __future__ import annotations

import argparse
import json

from nanokyro import LLM, SamplingParams
from nanokyro.benchmarks.workload import make_workload
from nanokyro.cli import add_engine_args, engine_kwargs


def agreement(llm: LLM, prompts: list[list[int]], ref: list[list[int]]) -> dict:
    """Each reference position is checked once: run from the furthest agreed prefix to the first difference,
    count it, continue from the reference's token there."""
    pos = [0] * len(prompts)
    flips, rounds, active = 0, 0, list(range(len(prompts)))
    while active:
        rounds += 1
        params = [SamplingParams(max_tokens=len(ref[i]) - pos[i], temperature=0, ignore_eos=True) for i in active]
        outs = llm.generate([prompts[i] + ref[i][: pos[i]] for i in active], params)
        left = []
        for i, out in zip(active, outs):
            j = next((j for j, (a, b) in enumerate(zip(out.token_ids, ref[i][pos[i]:])) if a != b), None)
            if j is not None:
                flips, pos[i] = flips + 1, pos[i] + j + 1
                if pos[i] < len(ref[i]):
                    left.append(i)
        active = left
    total = sum(len(r) for r in ref)
    return {"tokens": total, "flips": flips, "agreement": 1 - flips / total, "rounds": rounds}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", help="run greedily and write the tokens here (the reference)")
    ap.add_argument("--read", help="the reference's tokens, to check this layout against")
    add_engine_args(ap)
    args = ap.parse_args(argv)
    llm = LLM(args.model, **engine_kwargs(args))
    prompts, _ = make_workload(args.num_prompts, (32, 512), (1, 1), llm.engine.vocab_size, args.seed)
    result = {}
    if args.write:
        params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        with open(args.write, "w") as f:
            json.dump([o.token_ids for o in llm.generate(prompts, params)], f)
    if args.read:
        with open(args.read) as f:
            result = agreement(llm, prompts, json.load(f))
        print(f"teacher-forced greedy agreement: {result['agreement']:.2%} ({result['flips']} of {result['tokens']} "
              f"tokens differ; {result['rounds']} rounds)")  # fmt: skip
    llm.close()
    return result


if __name__ == "__main__":
    main()
