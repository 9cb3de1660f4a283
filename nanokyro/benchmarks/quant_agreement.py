"""Greedy agreement of a quantised model with the unquantised one on the same prompts (the default model by
default, on whatever device is there): `python -m nanokyro.benchmarks.quant_agreement [--model M] [--quantization fp8]`."""
from __future__ import annotations

import argparse

from nanokyro import LLM, SamplingParams

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, there was a", "The three primary colors are",
    "Water boils at a temperature of", "import numpy as np\n", "The largest planet in our solar system is",
    "To make a cup of tea, first", "In 1492, Christopher Columbus", "The quick brown fox",
    "Machine learning is a field of", "My favourite food is", "The speed of light is", "List three fruits:",
    "Translate to French: Hello, how are you?", "The sum of 2 and 3 is",
]  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default="fp8", choices=["fp8", "awq"])
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    base, quant = ([o.token_ids for o in LLM(args.model, quantization=q).generate(PROMPTS, params)]
                   for q in (None, args.quantization))  # fmt: skip
    base, quant = list(base), list(quant)
    total = sum(len(a) for a in base)
    same = sum(x == y for a, b in zip(base, quant) for x, y in zip(a, b))
    prefix = 0
    for a, b in zip(base, quant):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n
    first = sum(a[0] == b[0] for a, b in zip(base, quant))
    print(f"{args.quantization}: first tokens {first}/{len(PROMPTS)}; identical at the same position {same}/{total} "
          f"({same / total:.1%}); common greedy prefix {prefix}/{total} ({prefix / total:.1%})")
    return dict(first=first, same=same, prefix=prefix, total=total)


if __name__ == "__main__":
    main()
