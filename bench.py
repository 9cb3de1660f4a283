"""Offline throughput and batch-1 latency benchmark, measured against this machine's roofline and a peer.

`python bench.py` runs the offline recipe nano-vllm and mini-sglang publish: 256 requests of random token ids,
input and output lengths uniform in [100, 1024], seed 0, ignore_eos. It prints output and total tokens/s, the
time floor of this workload on this machine (weights read once per step, the KV bytes each decode step reads,
the FLOPs; bandwidth and matmul rate measured at start-up), the fraction of it achieved, and with `--peer hf`
the ratio to HF transformers' continuous batching on the same workload in the same process. `--latency` runs
one request and compares its decode tokens/s with the weight-read roofline. `--prefix-cache` compares the
time to first token of a cold and a cached long prefix; `--structured-fraction` the decode step time with part
of the batch under a JSON schema against none.

`--serve-url URL` (a running OpenAI-compatible server) or `--serve` (this engine, served in-process on a free
local port) runs the same workload online: streamed /v1/completions requests with token-id prompts, from
`--concurrency N` closed-loop clients or at `--request-rate R` Poisson arrivals per second. It reports p50/p90/p99
time to first token, time between streamed chunks and end-to-end latency, request and output-token throughput,
and the count of failed requests. Given comma lists (`--request-rate 1,2,4`), it runs each load level in turn,
and `--plot PNG` draws latency against load (needs matplotlib: the `bench` extra).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from nanokyro import LLM, SamplingParams
from nanokyro.loader import DUMMY_ARCHITECTURES


def parse_range(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '100-1024' -> (100, 1024)."""
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad length range {text!r}")
    return lo, hi


def make_workload(num_prompts: int, input_len, output_len, vocab_size: int, seed: int):
    """Random prompts (token ids) and output lengths, uniform over the inclusive ranges."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1] + 1, num_prompts)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, num_prompts)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in in_lens]
    return prompts, [int(n) for n in out_lens]


# -- the machine's two ceilings ------------------------------------------------------------------------------


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_machine(device: torch.device, dtype: torch.dtype) -> dict:
    """Memory bandwidth (a large copy, bytes read + written) and matmul rate (square product, random data)."""
    cuda = device.type == "cuda"
    n_copy = (1 << 30) if cuda else (64 << 20)  # bytes per buffer
    src = torch.randn(n_copy // dtype.itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), device, 20 if cuda else 5)
    n = 8192 if cuda else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    mm_s = _time(lambda: a @ b, device, 20 if cuda else 3)
    del src, dst, a, b
    return {"bandwidth_bytes_per_s": 2 * n_copy / copy_s, "matmul_flops_per_s": 2 * n**3 / mm_s}


# -- what the workload must move and compute -----------------------------------------------------------------


def model_costs(llm: LLM) -> dict:
    """Bytes of weights one step reads, KV bytes per token, and matmul parameters per token and per logit row."""
    model = llm.engine.runner.model
    cfg = model.cfg
    itemsize = next(model.parameters()).dtype.itemsize
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed_tokens.weight.numel()
    lm_head = embed  # tied or not, the vocab projection has the embedding's shape
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    # An untied embedding table is only gathered from (one row per token); every other weight is read.
    read = total - (0 if cfg.tie_word_embeddings else embed)
    per_token_matmul = total - embed - norms - (0 if cfg.tie_word_embeddings else lm_head)
    return {
        "weight_bytes": read * itemsize,
        "kv_bytes_per_token": cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize,
        "matmul_params": per_token_matmul,
        "lm_head_params": lm_head,
        "attn_flops_per_pair": 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim,  # QK^T + PV per (query, key)
    }


def roofline(costs: dict, in_lens: list[int], out_lens: list[int], max_num_seqs: int, machine: dict) -> dict:
    """A lower bound on the workload's time: max(bytes / bandwidth, FLOPs / matmul rate), summed over the run.

    Steps: at least the longest output, and enough to emit every token at max_num_seqs per step; each reads the
    weights once. Decode step j of a request (j = 1 .. out-1) reads its in + j cached tokens. FLOPs: the linear
    layers over every computed token, the vocab projection over every sampled one, causal prefill attention
    and decode attention over the cached context.
    """
    ins, outs = np.asarray(in_lens, dtype=np.float64), np.asarray(out_lens, dtype=np.float64)
    steps = max(outs.max(), math.ceil(outs.sum() / max_num_seqs))
    kv_read_tokens = ((outs - 1) * ins + (outs - 1) * outs / 2).sum()
    kv_written_tokens = (ins + outs - 1).sum()
    bytes_ = steps * costs["weight_bytes"] + (kv_read_tokens + kv_written_tokens) * costs["kv_bytes_per_token"]
    computed = (ins + outs - 1).sum()
    flops = (
        2 * costs["matmul_params"] * computed
        + 2 * costs["lm_head_params"] * outs.sum()
        + costs["attn_flops_per_pair"] * ((ins * (ins + 1) / 2).sum() + kv_read_tokens)
    )
    memory_s, compute_s = bytes_ / machine["bandwidth_bytes_per_s"], flops / machine["matmul_flops_per_s"]
    return {"bytes": float(bytes_), "flops": float(flops), "memory_s": memory_s, "compute_s": compute_s,
            "floor_s": max(memory_s, compute_s)}  # fmt: skip


# -- runs ----------------------------------------------------------------------------------------------------


def engine_options(args) -> dict:
    opts = dict(seed=args.seed, enforce_eager=args.enforce_eager, tokenizer=args.tokenizer)
    if args.model in DUMMY_ARCHITECTURES:
        opts["load_format"] = "dummy"
    for name in ("dtype", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    return opts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_offline(llm: LLM, prompts, out_lens) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in out_lens]
    device = llm.engine.runner.device
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2)  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    sync(device)
    elapsed = time.perf_counter() - start
    got = [len(o.token_ids) for o in outs]
    assert got == out_lens, "every request must produce exactly its output length"
    return elapsed


def run_latency(llm: LLM, prompt: list[int], out_len: int) -> float:
    """Seconds per decode step of one request (its prefill step excluded)."""
    engine = llm.engine
    llm.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    engine.add_request(prompt, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    engine.step()  # prefill and first token
    sync(engine.runner.device)
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    sync(engine.runner.device)
    return (time.perf_counter() - start) / steps


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
    from nanokyro.grammar import StructuredOutput

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


def hf_config(model: str | None) -> dict:
    """The HF config.json of a model nanokyro can load: a dummy architecture, an HF dir, or a GGUF file."""
    if model in DUMMY_ARCHITECTURES:
        return dict(DUMMY_ARCHITECTURES[model])
    from nanokyro.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        from nanokyro.gguf import read_gguf

        return dict(read_gguf(path).hf_config)
    with open(f"{path}/config.json") as f:
        return json.load(f)


def run_hf_peer(model: str | None, dtype: torch.dtype, device: torch.device, prompts, out_lens) -> float:
    """HF transformers' continuous batching (the manager `generate_batch` wraps, so each request keeps its own
    max_new_tokens) on a random-weight model of the same architecture; timed after its warm-up."""
    import transformers

    cfg = hf_config(model)
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    gen = transformers.GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=-1,
                                        pad_token_id=0)  # fmt: skip
    with hf.continuous_batching_context_manager(generation_config=gen, block=True, timeout=10) as manager:
        sync(device)
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        bar = tqdm(total=len(prompts), desc="hf generate", unit="seq")
        while bar.n < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                assert len(result.generated_tokens) == out_lens[int(result.request_id[1:])]
                bar.update(1)
            elif result is None and not manager.is_running():
                raise RuntimeError("HF continuous batching stopped early")
        bar.close()
        sync(device)
        elapsed = time.perf_counter() - start
    del hf, manager
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed


# -- online: a server under load -----------------------------------------------------------------------------

REQUEST_TIMEOUT_S = 600.0  # one request, start to last byte; a longer one counts as an error


def parse_levels(text: str) -> list[float]:
    """'4' -> [4.0]; '1,2,4' -> [1.0, 2.0, 4.0]: the load levels to run in turn."""
    levels = [float(x) for x in text.split(",")]
    if not levels or min(levels) <= 0:
        raise argparse.ArgumentTypeError(f"bad load levels {text!r}")
    return levels


class ServedEngine:
    """This engine behind the HTTP server, in a thread of this process."""

    def __init__(self, args):
        from nanokyro.config import EngineConfig
        from nanokyro.engine import AsyncEngine
        from nanokyro.server import MAX_QUEUE, BackgroundServer, create_app

        self.engine = AsyncEngine(EngineConfig(model=args.model, **engine_options(args)))
        # Queue every request rather than answer 429: the benchmark measures queueing, not admission control.
        self.http = BackgroundServer(create_app(self.engine, max_queue=max(MAX_QUEUE, args.num_prompts)))
        self.url = self.http.url

    def stop(self) -> None:
        self.http.stop()


async def stream_request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: its time to first token, the gaps between later chunks, its total time and
    output tokens (from the usage chunk). Chunks carry text, so a token whose bytes end mid-character arrives with
    the next one; `error` is set instead of raising."""
    start = time.perf_counter()
    chunk_times, tokens = [], 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].text or not chunk_times):
                chunk_times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
    except Exception as e:  # noqa: BLE001 -- a failed request is a measurement, not a crash
        return {"error": f"{type(e).__name__}: {e}"}
    if not chunk_times or tokens != max_tokens:
        return {"error": f"{tokens} of {max_tokens} tokens streamed"}
    return {"ttft": chunk_times[0] - start, "tbt": np.diff(chunk_times).tolist(), "e2e": end - start,
            "tokens": tokens}  # fmt: skip


async def run_load(url: str, api_key: str, prompts, out_lens, *, concurrency: int | None = None,
                   request_rate: float | None = None, seed: int = 0) -> tuple[list[dict], float, str]:  # fmt: skip
    """Every prompt once, from `concurrency` closed-loop clients or at Poisson arrivals of `request_rate`/s.
    Returns each request's measurements, the seconds from the first send to the last answer, the model's name."""
    import httpx
    import openai

    conns = len(prompts) if concurrency is None else concurrency  # httpx's default pool would queue beyond 100
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns))
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S,
                                  http_client=http) as client:  # fmt: skip
        model = (await client.models.list()).data[0].id
        await asyncio.gather(*(stream_request(client, model, p, 4) for p in prompts[:2]))  # warm-up
        results: list[dict | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="requests", unit="req")

        async def one(i: int) -> None:
            results[i] = await stream_request(client, model, prompts[i], out_lens[i])
            bar.update(1)

        start = time.perf_counter()
        if concurrency is not None:
            queue = iter(range(len(prompts)))

            async def worker() -> None:
                for i in queue:  # a shared iterator: each client takes the next prompt when its last one ends
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / request_rate, len(prompts)))
            tasks = []
            for i, at in enumerate(arrivals):
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return results, duration, model


def summarize(results: list[dict], duration: float) -> dict:
    """Percentiles (seconds) of TTFT, time between chunks and end-to-end latency; throughput; errors."""
    ok = [r for r in results if "error" not in r]

    def pct(values: list[float]) -> dict:
        if not values:
            return {"p50": None, "p90": None, "p99": None, "mean": None}
        p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
        return {"p50": p50, "p90": p90, "p99": p99, "mean": float(np.mean(values))}

    errors = [r["error"] for r in results if "error" in r]
    return {
        "completed": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / duration,
        "ttft_s": pct([r["ttft"] for r in ok]), "tbt_s": pct([g for r in ok for g in r["tbt"]]),
        "e2e_s": pct([r["e2e"] for r in ok]),
    }  # fmt: skip


def print_levels(levels: list[dict]) -> None:
    print(f"{'load':>10} {'done':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9}  "
          f"{'TTFT p50/p90/p99 ms':>21}  {'TBT p50/p90/p99 ms':>20}  {'e2e p50/p90/p99 s':>19}")  # fmt: skip

    def trio(p: dict, scale: float, fmt: str) -> str:
        return "/".join("-" if p[k] is None else format(p[k] * scale, fmt) for k in ("p50", "p90", "p99"))

    for lv in levels:
        load = f"c={lv['concurrency']:g}" if "concurrency" in lv else f"{lv['request_rate']:g} r/s"
        print(f"{load:>10} {lv['completed']:>5} {lv['errors']:>4} {lv['request_throughput']:>7.2f} "
              f"{lv['output_tokens_per_s']:>9.1f}  {trio(lv['ttft_s'], 1e3, '.1f'):>21}  "
              f"{trio(lv['tbt_s'], 1e3, '.1f'):>20}  {trio(lv['e2e_s'], 1, '.2f'):>19}")  # fmt: skip
        if lv["first_error"]:
            print(f"{'':>10} first error: {lv['first_error'][:200]}")


def plot_levels(levels: list[dict], path: str) -> None:
    """p50 and p99 of TTFT and end-to-end latency against the load level, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "concurrency" if "concurrency" in levels[0] else "request_rate"
    x = [lv[key] for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "e2e_s", "end-to-end latency")):
        for p in ("p50", "p99"):
            ax.plot(x, [lv[metric][p] for lv in levels], marker="o", label=p)
        ax.set(title=title, xlabel="concurrent clients" if key == "concurrency" else "requests/s", ylabel="s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_online(args, input_len, output_len) -> dict:
    served = ServedEngine(args) if args.serve else None
    try:
        url = served.url if served else args.serve_url.rstrip("/").removesuffix("/v1")
        vocab = served.engine.engine.vocab_size if served else hf_config(args.model)["vocab_size"]
        prompts, out_lens = make_workload(args.num_prompts, input_len, output_len, vocab, args.seed)
        shape = "concurrency" if args.concurrency else "request_rate"
        levels = []
        for level in args.concurrency or args.request_rate:
            kw = {"concurrency": int(level)} if shape == "concurrency" else {"request_rate": level, "seed": args.seed}
            results, duration, model = asyncio.run(run_load(url, args.api_key, prompts, out_lens, **kw))
            levels.append({shape: kw[shape], **summarize(results, duration)})
    finally:
        if served:
            served.stop()
    print(f"{model} at {url}: {len(prompts)} requests, {sum(map(len, prompts))} input + {sum(out_lens)} output tokens")
    print_levels(levels)
    if args.plot:
        plot_levels(levels, args.plot)
    return {"mode": "online", "url": url, "model": model, "num_prompts": len(prompts),
            "input_tokens": sum(map(len, prompts)), "output_tokens": sum(out_lens), "levels": levels}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF dir, .gguf, or a dummy architecture name "
                    f"({', '.join(DUMMY_ARCHITECTURES)}); default: the engine's default model")  # fmt: skip
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=parse_range, default=None, help="N or LO-HI (default 100-1024; latency 128)")
    ap.add_argument("--output-len", type=parse_range, default=None, help="N or LO-HI (default 100-1024; latency 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no torch.compile")
    ap.add_argument("--peer", choices=["hf"], default=None, help="also run HF transformers on the same workload")
    ap.add_argument("--latency", action="store_true", help="batch-1 decode tokens/s vs the weight-read roofline")
    ap.add_argument("--prefix-cache", action="store_true",
                    help="time to first token with a cold vs a cached prefix of --input-len tokens (default 4000)")
    ap.add_argument("--structured-fraction", type=float, default=None,
                    help="decode step time with this fraction of --num-prompts requests JSON-schema constrained")
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer directory (e.g. for dummy weights)")
    online = ap.add_mutually_exclusive_group()
    online.add_argument("--serve-url", default=None, help="online: load this running server (e.g. http://host:3000)")
    online.add_argument("--serve", action="store_true", help="online: serve this engine in-process and load it")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=parse_levels, default=None,
                      help="online: N closed-loop clients (N or N1,N2,..)")
    load.add_argument("--request-rate", type=parse_levels, default=None,
                      help="online: Poisson arrivals, requests/s (R or R1,R2,..)")  # fmt: skip
    ap.add_argument("--api-key", default="none", help="online: the server's API key, if it wants one")
    ap.add_argument("--plot", default=None, help="online: draw latency against the load levels to this PNG")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if (args.serve or args.serve_url) and not (args.concurrency or args.request_rate):
        ap.error("the online mode needs --concurrency or --request-rate")
    if (args.concurrency or args.request_rate or args.plot) and not (args.serve or args.serve_url):
        ap.error("--concurrency, --request-rate and --plot need --serve or --serve-url")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install 'nanokyro[bench]'")
    input_len = args.input_len or ((128, 128) if args.latency else (100, 1024))
    output_len = args.output_len or ((256, 256) if args.latency else (100, 1024))
    num_prompts = 1 if args.latency else args.num_prompts
    if args.serve or args.serve_url:
        return save(run_online(args, input_len, output_len), args.json)

    peer_s = None
    if args.peer == "hf" and not args.latency:  # first, so that the engine's KV cache can take the memory it leaves
        from nanokyro.config import EngineConfig

        ecfg = EngineConfig(model=args.model, **engine_options(args))
        vocab = hf_config(args.model)["vocab_size"]
        prompts, out_lens = make_workload(num_prompts, input_len, output_len, vocab, args.seed)
        peer_s = run_hf_peer(args.model, ecfg.torch_dtype(), ecfg.torch_device(), prompts, out_lens)

    llm = LLM(args.model, **engine_options(args))
    engine = llm.engine
    device, dtype = engine.runner.device, engine.runner.dtype
    prompts, out_lens = make_workload(num_prompts, input_len, output_len, engine.vocab_size, args.seed)
    in_lens = [len(p) for p in prompts]
    machine = measure_machine(device, dtype)
    costs = model_costs(llm)
    result = {
        "model": engine.model_name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "num_prompts": num_prompts, "input_tokens": sum(in_lens),
        "output_tokens": sum(out_lens), "enforce_eager": engine.cfg.enforce_eager, **machine, **costs,
    }  # fmt: skip
    if args.prefix_cache:
        result.update(run_prefix_cache(llm, args.input_len[0] if args.input_len else 4000, args.seed))
        print(f"time to first token, {result['prefix_len']}-token prefix: cold {result['cold_ttft_s'] * 1e3:.1f} ms, "
              f"cached ({result['cached_tokens']} tokens) {result['cached_ttft_s'] * 1e3:.1f} ms: "
              f"{result['ttft_speedup']:.1f}x faster")  # fmt: skip
    elif args.structured_fraction is not None:
        result.update(run_structured(llm, prompts, args.structured_fraction, steps=64))
        print(f"decode step, batch {result['batch']} with {result['constrained']} JSON-schema constrained: "
              f"{result['constrained_step_s'] * 1e3:.2f} ms vs {result['plain_step_s'] * 1e3:.2f} ms unconstrained "
              f"(+{result['overhead']:.1%}; {result['running_at_end']} still running at the end)")  # fmt: skip
    elif args.latency:
        step_s = run_latency(llm, prompts[0], out_lens[0])
        floor_s = (costs["weight_bytes"] + (in_lens[0] + out_lens[0] / 2) * costs["kv_bytes_per_token"]) / machine[
            "bandwidth_bytes_per_s"]  # fmt: skip
        result.update(decode_tokens_per_s=1 / step_s, roofline_tokens_per_s=1 / floor_s, fraction_of_roofline=floor_s / step_s)
        print(f"batch-1 decode: {1 / step_s:.1f} tok/s ({step_s * 1e3:.2f} ms/step); weight-read roofline "
              f"{1 / floor_s:.1f} tok/s; {floor_s / step_s:.1%} of roofline")  # fmt: skip
    else:
        elapsed = run_offline(llm, prompts, out_lens)
        floor = roofline(costs, in_lens, out_lens, engine.cfg.max_num_seqs, machine)
        result.update(elapsed_s=elapsed, output_tokens_per_s=sum(out_lens) / elapsed,
                      total_tokens_per_s=(sum(in_lens) + sum(out_lens)) / elapsed, roofline=floor,
                      fraction_of_roofline=floor["floor_s"] / elapsed)  # fmt: skip
        print(f"{num_prompts} requests, {sum(in_lens)} input + {sum(out_lens)} output tokens in {elapsed:.2f} s: "
              f"{result['output_tokens_per_s']:.0f} output tok/s, {result['total_tokens_per_s']:.0f} total tok/s")
        print(f"roofline: {floor['floor_s']:.2f} s (memory {floor['memory_s']:.2f} s for {floor['bytes'] / 1e9:.1f} GB "
              f"at {machine['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; compute {floor['compute_s']:.2f} s for "
              f"{floor['flops'] / 1e12:.1f} TFLOP at {machine['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s); "
              f"{result['fraction_of_roofline']:.1%} of roofline")  # fmt: skip
        if peer_s is not None:
            result.update(peer="hf", peer_elapsed_s=peer_s, peer_output_tokens_per_s=sum(out_lens) / peer_s,
                          speedup_vs_peer=peer_s / elapsed)  # fmt: skip
            print(f"HF transformers continuous batching: {peer_s:.2f} s, {sum(out_lens) / peer_s:.0f} output tok/s; "
                  f"nanokyro is {peer_s / elapsed:.1f}x faster")  # fmt: skip
    return save(result, args.json)


def save(result: dict, path: str | None) -> dict:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
