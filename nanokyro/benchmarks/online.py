"""Online: a server under load, measured the way `vllm bench serve` measures one.

Streamed /v1/completions requests with token-id prompts, from closed-loop clients or Poisson arrivals, against a
running server (`--serve-url`) or serve.py started here as users start it (`--serve`). The load comes from
several client processes so that the client is not the bottleneck it measures: each runs an asyncio loop with a
light SSE client (aiohttp, reading the stream line by line) and sends back one plain record per request; this
process merges them into TTFT, TPOT, ITL and E2EL at mean/p50/p90/p99 (ms), request and token throughput and
failed requests per load level, printed as a table and drawn as a plot. With `--serve` the same workload first
runs offline (`nanokyro.LLM` in this process), and online throughput is printed as a fraction of it.
"""
from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing as mp
import multiprocessing.connection
import signal
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanokyro.benchmarks.workload import engine_options, hf_config, make_workload
from nanokyro.cli import engine_flags
from nanokyro.server import free_port

REQUEST_TIMEOUT_S = 600.0  # one request, start to last byte; a longer one counts as failed
STARTUP_TIMEOUT_S = 1800.0  # serve.py loading (and on a GPU compiling) the model
STOP_TIMEOUT_S = 60.0  # serve.py exiting after SIGTERM
SERVE_PY = Path(__file__).resolve().parents[2] / "serve.py"
WARMUP_PROMPT = [1] * 8  # not in the workload (and shorter than a page), so it caches nothing the workload reuses
ERRORS_SHOWN = 3  # error messages kept per load level

# Every time below is time.perf_counter(), which is CLOCK_MONOTONIC on Linux: one clock for every process of the
# host, so the client processes' timestamps and this one's compare directly.


# -- the server under test -----------------------------------------------------------------------------------


def serve_flags(opts: dict) -> list[str]:
    """serve.py's flags for the LLM options bench.py builds (`engine_options`): the same engine, served.

    serve.py takes no seed or tokenizer: the workload is token ids and greedy, so neither changes what is timed."""
    return engine_flags({k: v for k, v in opts.items() if k not in ("seed", "tokenizer")})


class ServeProcess:
    """`python serve.py` in a subprocess on a free loopback port, its log going to this process's stderr."""

    def __init__(self, model: str | None, flags: list[str]):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # A queue limit no run reaches: the benchmark measures queueing, not admission control (429s).
        cmd = [sys.executable, str(SERVE_PY), *(["--model", model] if model else []), *flags, "--port", str(port),
               "--max-queue", "1000000"]  # fmt: skip
        self.proc = subprocess.Popen(cmd)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Until GET /health answers 200; raises if serve.py exits first or takes longer than timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with code {self.proc.returncode} before it was ready "
                                   "(its log is above)")  # fmt: skip
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):  # not listening yet, or 503 while the model loads
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve.py was not healthy within {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit code (killed, and negative, if it does not exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"serve.py did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM: killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def served_model(url: str, api_key: str) -> str:
    """The model name the server answers to (the first of GET /v1/models)."""
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["data"][0]["id"]


# -- one client process --------------------------------------------------------------------------------------


async def timed(receive, max_tokens: int) -> dict:
    """One streamed completion as a record: its send and end times, time to first token, the gap before each later
    token, and its output tokens; `error` instead of the timings when it fails. `receive()` sends the request and
    returns the arrival time of each token and the usage chunk's token count."""
    start = time.perf_counter()
    try:
        arrivals, tokens = await receive()
        end = time.perf_counter()
        if tokens != max_tokens or not arrivals:
            raise RuntimeError(f"{tokens} of {max_tokens} tokens in the usage chunk, {len(arrivals)} events")
    except Exception as e:  # noqa: BLE001 -- a failed request is a measurement, not a crash
        return {"start": start, "end": time.perf_counter(), "error": f"{type(e).__name__}: {e}"}
    return {"start": start, "end": end, "ttft": arrivals[0] - start, "e2e": end - start, "tokens": tokens,
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}  # fmt: skip


async def stream_request(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion from the server at `url`, over raw SSE, as a `timed` record.

    The SSE body is read line by line, however the bytes were split into network reads: each `data:` event with
    choices is one token arrival (the server sends one per token; several that arrive together get gaps of ~0),
    and the token count is the usage chunk's."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip

    async def receive() -> tuple[list[float], int]:
        arrivals, tokens = [], 0
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue  # the blank line that ends each event
                data = line[5:].strip()
                if data == b"[DONE]":
                    return arrivals, tokens
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error'].get('message', event['error'])}")
                if event.get("choices"):
                    arrivals.append(time.perf_counter())
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        raise RuntimeError("the stream ended without [DONE]")

    return await timed(receive, max_tokens)


async def stream_request_sdk(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """The same record through the openai SDK (`--openai-sdk`): the client most users have, with its own
    connection pool; heavier than raw SSE, so it measures the server less and the client more."""

    async def receive() -> tuple[list[float], int]:
        arrivals, tokens = [], 0
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
        async for chunk in stream:
            if chunk.choices:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return arrivals, tokens

    return await timed(receive, max_tokens)


def _session(url: str, api_key: str, sdk: bool):
    """What one client process sends its requests through: an aiohttp session, or an openai SDK client."""
    if sdk:
        import openai

        return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # no pool limit: one connection per open stream
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}, connector=connector, timeout=timeout)


def take(next_index, n: int) -> int | None:
    """The next prompt no client has taken (shared by every process), or None when all are taken."""
    with next_index.get_lock():
        i = next_index.value
        if i >= n:
            return None
        next_index.value = i + 1
        return i


async def run_level(conn, url: str, api_key: str, prompts, out_lens, plan: dict, next_index,
                    done) -> tuple[list[dict], float]:  # fmt: skip
    """This process's share of one load level: `plan["concurrency"]` closed-loop clients taking prompts from the
    shared counter, or `plan["arrivals"]` [(prompt index, seconds after the start)]. Warms up, says "ready",
    waits for the common start time, then returns a record per request it sent and the CPU seconds it spent
    sending them."""
    request = stream_request_sdk if plan["sdk"] else stream_request
    async with _session(url, api_key, plan["sdk"]) as session:
        warm = await request(session, url, plan["model"], WARMUP_PROMPT, 4)
        if "error" in warm:
            raise RuntimeError(f"the warm-up request failed: {warm['error']}")
        conn.send(("ready", None))
        t0 = conn.recv()  # blocks the loop a moment, with nothing in flight
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        cpu0, records = time.process_time(), []

        async def one(i: int) -> None:
            record = await request(session, url, plan["model"], prompts[i], out_lens[i])
            records.append({"index": i, **record})
            with done.get_lock():
                done.value += 1

        if "concurrency" in plan:

            async def client() -> None:
                while (i := take(next_index, len(prompts))) is not None:  # the next prompt when the last one ends
                    await one(i)

            await asyncio.gather(*(client() for _ in range(plan["concurrency"])))
        else:
            tasks = []
            for i, at in plan["arrivals"]:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        return records, time.process_time() - cpu0


def client_main(conn, url: str, api_key: str, prompts, out_lens, next_index, done) -> None:
    """A client process: runs its share of each load level the parent sends and answers with its records; None
    ends it."""
    try:
        while (plan := conn.recv()) is not None:
            result = asyncio.run(run_level(conn, url, api_key, prompts, out_lens, plan, next_index, done))
            conn.send(("records", result))
    except Exception:  # noqa: BLE001 -- the parent raises it with the traceback
        conn.send(("error", traceback.format_exc()))


# -- the parent: the client processes, their records merged --------------------------------------------------


class ClientPool:
    """`procs` client processes, spawned once and reused for every load level of the run."""

    def __init__(self, procs: int, url: str, api_key: str, prompts, out_lens):
        ctx = mp.get_context("spawn")  # no fork of this process's threads and CUDA state
        self.num_prompts = len(prompts)
        self.next_index, self.done = ctx.Value("q", 0), ctx.Value("q", 0)
        self.conns, self.procs = [], []
        for k in range(procs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_main, name=f"bench-client-{k}", daemon=True,
                               args=(theirs, url, api_key, prompts, out_lens, self.next_index, self.done))  # fmt: skip
            proc.start()
            theirs.close()  # so that recv() raises EOFError, not hangs, if the process dies
            self.conns.append(ours)
            self.procs.append(proc)

    def run(self, model: str, *, concurrency: int | None = None, request_rate: float | None = None,
            seed: int = 0, sdk: bool = False) -> tuple[list[dict], float, float]:  # fmt: skip
        """Every prompt once, from `concurrency` closed-loop clients split over the processes, or at Poisson
        arrivals of `request_rate`/s dealt round-robin. Returns the records by prompt index, the seconds from the
        common start to the last answer, and the busiest client process's CPU seconds: near the duration, the
        client was the bottleneck."""
        n, p = self.num_prompts, len(self.conns)
        if concurrency is not None:
            shares = [concurrency // p + (k < concurrency % p) for k in range(p)]
            plans = [{"model": model, "sdk": sdk, "concurrency": c} for c in shares if c > 0]
        else:
            arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / request_rate, n)).tolist()
            plans = [{"model": model, "sdk": sdk, "arrivals": [(i, arrivals[i]) for i in range(k, n, p)]}
                     for k in range(min(p, n))]  # fmt: skip
        self.next_index.value = self.done.value = 0
        conns = self.conns[: len(plans)]  # a level with fewer clients than processes leaves the rest idle
        for conn, plan in zip(conns, plans):
            conn.send(plan)
        for conn in conns:
            self._receive(conn, "ready")
        t0 = time.perf_counter() + 0.01
        for conn in conns:
            conn.send(t0)
        records, cpu, pending = [], [], set(conns)
        with tqdm(total=n, desc="requests", unit="req") as bar:
            while pending:
                for conn in mp.connection.wait(pending, timeout=0.5):
                    got, cpu_s = self._receive(conn, "records")
                    records += got
                    cpu.append(cpu_s)
                    pending.discard(conn)
                bar.update(self.done.value - bar.n)
        return sorted(records, key=lambda r: r["index"]), max(r["end"] for r in records) - t0, max(cpu)

    def _receive(self, conn, kind: str):
        try:
            got, value = conn.recv()
        except EOFError:
            raise RuntimeError("a benchmark client process died") from None
        if got == "error":
            raise RuntimeError(f"a benchmark client process failed:\n{value}")
        assert got == kind, (got, kind)
        return value

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def summarize(records: list[dict], duration: float, prompts) -> dict:
    """One load level in vLLM's terms: completed and failed requests (and the first few errors), request,
    output and total token throughput, and TTFT, TPOT ((e2e - ttft) / (tokens - 1) per request), ITL (every gap
    between token arrivals) and E2EL, each at mean/p50/p90/p99 in ms."""
    ok = [r for r in records if "error" not in r]
    errors = [r["error"] for r in records if "error" in r]

    def ms(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "p50": None, "p90": None, "p99": None}
        p50, p90, p99 = (np.percentile(values, [50, 90, 99]) * 1e3).tolist()
        return {"mean": float(np.mean(values)) * 1e3, "p50": p50, "p90": p90, "p99": p99}

    input_tokens = sum(len(prompts[r["index"]]) for r in ok)
    output_tokens = sum(r["tokens"] for r in ok)
    return {
        "completed": len(ok), "failed": len(errors), "errors": errors[:ERRORS_SHOWN], "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": ms([r["ttft"] for r in ok]),
        "tpot_ms": ms([(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
        "itl_ms": ms([g for r in ok for g in r["itl"]]),
        "e2el_ms": ms([r["e2e"] for r in ok]),
    }  # fmt: skip


# -- reporting -----------------------------------------------------------------------------------------------

METRICS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2EL", "e2el_ms"))


def load_name(level: dict) -> str:
    return f"concurrency {level['concurrency']:g}" if "concurrency" in level else f"{level['request_rate']:g} req/s"


def print_levels(levels: list[dict]) -> None:
    """Per load level: a line of counts and throughput, the fraction of offline throughput when there is one,
    then the latency table."""
    for lv in levels:
        print(f"{load_name(lv)}: {lv['completed']} completed, {lv['failed']} failed in {lv['duration_s']:.2f} s; "
              f"{lv['request_throughput']:.2f} req/s, output {lv['output_throughput']:.1f} tok/s, "
              f"total {lv['total_token_throughput']:.1f} tok/s; busiest client process {lv['busiest_client_cpu']:.0%} "
              "of a core")  # fmt: skip
        if "fraction_of_offline" in lv:
            print(f"  online output throughput is {lv['fraction_of_offline']:.1%} of offline "
                  f"({lv['output_throughput']:.1f} vs {lv['offline_output_throughput']:.1f} tok/s)")  # fmt: skip
        print(f"  {'ms':<6}" + "".join(f"{k:>10}" for k in ("mean", "p50", "p90", "p99")))
        for name, key in METRICS:
            cells = ("-" if lv[key][k] is None else f"{lv[key][k]:.2f}" for k in ("mean", "p50", "p90", "p99"))
            print(f"  {name:<6}" + "".join(f"{c:>10}" for c in cells))
        for e in lv["errors"]:
            print(f"  error: {e[:300]}")


def plot_levels(levels: list[dict], path: str) -> None:
    """p50 and p99 of each latency metric against the load level, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "concurrency" if "concurrency" in levels[0] else "request_rate"
    x = [lv[key] for lv in levels]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5))
    for ax, (name, metric) in zip(axes, METRICS):
        for p in ("p50", "p99"):
            ax.plot(x, [lv[metric][p] for lv in levels], marker="o", label=p)
        ax.set(title=name, xlabel="concurrent clients" if key == "concurrency" else "requests/s", ylabel="ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run -------------------------------------------------------------------------------------------------


def run_offline_reference(args, prompts, out_lens) -> dict:
    """The workload's offline throughput: all of it at once through nanokyro.LLM in this process, which then lets
    go of the model and KV cache so that the server can have the memory."""
    from nanokyro import LLM
    from nanokyro.benchmarks.offline import run_offline

    llm = LLM(args.model, **engine_options(args))
    elapsed = run_offline(llm, prompts, out_lens)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()  # compiled code can keep the model alive
        gc.collect()
        torch.cuda.empty_cache()
        if (left := torch.cuda.memory_allocated()) > 1 << 30:
            print(f"the offline engine left {left / (1 << 30):.1f} GiB allocated: serve.py gets that much less",
                  file=sys.stderr)  # fmt: skip
    print(f"offline: {len(prompts)} requests, {sum(out_lens)} output tokens in {elapsed:.2f} s: "
          f"{sum(out_lens) / elapsed:.1f} output tok/s")  # fmt: skip
    return {"offline_elapsed_s": elapsed, "offline_output_throughput": sum(out_lens) / elapsed}


def run_online(args, input_len, output_len) -> dict:
    """The workload at each load level the command line names, against --serve-url or serve.py (--serve)."""
    vocab = hf_config(args.model)["vocab_size"]
    prompts, out_lens = make_workload(args.num_prompts, input_len, output_len, vocab, args.seed)
    offline = run_offline_reference(args, prompts, out_lens) if args.serve else {}
    server = ServeProcess(args.model, serve_flags(engine_options(args))) if args.serve else None
    url = server.url if server else args.serve_url.rstrip("/").removesuffix("/v1")
    loads = args.concurrency or args.request_rate
    procs = min(args.client_procs, int(max(loads)) if args.concurrency else len(prompts))
    pool = None
    try:
        pool = ClientPool(procs, url, args.api_key, prompts, out_lens)  # starts while the server loads
        if server:
            server.wait_ready()
        model = served_model(url, args.api_key)
        levels = []
        for load in loads:
            kw = {"concurrency": int(load)} if args.concurrency else {"request_rate": load}
            records, duration, client_cpu_s = pool.run(model, **kw, seed=args.seed, sdk=args.openai_sdk)
            level = {**kw, **summarize(records, duration, prompts), "busiest_client_cpu": client_cpu_s / duration}
            if offline:
                level.update(offline_output_throughput=offline["offline_output_throughput"],
                             fraction_of_offline=level["output_throughput"] / offline["offline_output_throughput"])
            levels.append(level)
    finally:
        if pool:
            pool.close()
        exit_code = server.stop() if server else None
    return {"mode": "online", "url": url, "model": model, "client_procs": procs, "openai_sdk": args.openai_sdk, "num_prompts": len(prompts),
            "input_tokens": sum(map(len, prompts)), "output_tokens": sum(out_lens), **offline,
            "levels": levels, **({"server_exit_code": exit_code} if server else {})}  # fmt: skip
