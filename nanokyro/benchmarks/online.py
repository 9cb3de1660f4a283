"""Online: a server under load. Streamed /v1/completions requests with token-id prompts from closed-loop
clients or Poisson arrivals, against a running server or this engine served in-process; latency percentiles
and throughput per load level, as a table and a plot.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
from tqdm import tqdm

from nanokyro.benchmarks.workload import engine_options, hf_config, make_workload

REQUEST_TIMEOUT_S = 600.0  # one request, start to last byte; a longer one counts as an error


class ServedEngine:
    """This engine behind the HTTP server, in a thread of this process."""

    def __init__(self, args):
        from nanokyro.config import EngineConfig
        from nanokyro.server import MAX_QUEUE, BackgroundServer, create_app

        # Queue every request rather than answer 429: the benchmark measures queueing, not admission control.
        cfg = EngineConfig(model=args.model, **engine_options(args))
        self.http = BackgroundServer(create_app(cfg, max_queue=max(MAX_QUEUE, args.num_prompts)))
        self.vocab_size = self.http.app.state.server.client.limits.vocab_size
        self.url = self.http.url

    def stop(self) -> None:
        self.http.stop()


async def stream_request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: its time to first token, the gaps between later chunks (the server sends one per
    token, text or not), its total time and output tokens (from the usage chunk); `error` is set instead of
    raising."""
    start = time.perf_counter()
    chunk_times, tokens = [], 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
        async for chunk in stream:
            if chunk.choices:
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
    """The workload at each load level the command line names, against --serve-url or this engine (--serve)."""
    served = ServedEngine(args) if args.serve else None
    try:
        url = served.url if served else args.serve_url.rstrip("/").removesuffix("/v1")
        vocab = served.vocab_size if served else hf_config(args.model)["vocab_size"]
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
    return {"mode": "online", "url": url, "model": model, "num_prompts": len(prompts),
            "input_tokens": sum(map(len, prompts)), "output_tokens": sum(out_lens), "levels": levels}  # fmt: skip
