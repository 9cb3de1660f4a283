"""bench.py end to end on the CPU: a tiny model and workload, offline, batch-1 latency, prefix cache, structured
output, decode idle time, JSON results; online against serve.py in a subprocess, with the offline reference, and
against a running server; the SSE client and the online metrics' arithmetic. (The GPU-busy arithmetic of the
decode-idle mode is the step profiler's: test_profiling.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model("qwen3", str(tmp_path_factory.mktemp("bench_qwen3")))


def run_bench(tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "bench.py", *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_offline_bench_reports_throughput_and_roofline(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--num-prompts", "6", "--input-len", "5-40", "--output-len", "3-9")
    assert r["num_prompts"] == 6 and r["device"] == "cpu"
    assert 6 * 3 <= r["output_tokens"] <= 6 * 9 and 6 * 5 <= r["input_tokens"] <= 6 * 40
    for key in ("elapsed_s", "output_tokens_per_s", "total_tokens_per_s", "bandwidth_bytes_per_s",
                "matmul_flops_per_s", "weight_bytes", "kv_bytes_per_token", "fraction_of_roofline"):  # fmt: skip
        assert r[key] > 0, key
    assert r["total_tokens_per_s"] > r["output_tokens_per_s"]
    floor = r["roofline"]
    assert floor["floor_s"] == max(floor["memory_s"], floor["compute_s"]) > 0
    assert floor["bytes"] > r["weight_bytes"] and floor["flops"] > 0
    assert r["fraction_of_roofline"] == pytest.approx(floor["floor_s"] / r["elapsed_s"])


def test_latency_bench_reports_decode_rate(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--latency", "--input-len", "16", "--output-len", "12")
    assert r["num_prompts"] == 1 and r["output_tokens"] == 12
    assert r["decode_tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0
    assert r["fraction_of_roofline"] == pytest.approx(r["decode_tokens_per_s"] / r["roofline_tokens_per_s"])


def test_prefix_cache_bench_serves_the_warm_prefix_from_the_cache(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--prefix-cache", "--input-len", "200")
    assert r["prefix_len"] == 200 and r["cached_tokens"] >= 200 - 16
    assert r["cold_ttft_s"] > 0 and r["cached_ttft_s"] > 0
    assert r["ttft_speedup"] == pytest.approx(r["cold_ttft_s"] / r["cached_ttft_s"])


def test_structured_bench_keeps_the_constrained_batch_decoding(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--structured-fraction", "0.5", "--num-prompts", "4",
                  "--input-len", "8", "--output-len", "8")  # fmt: skip
    assert r["batch"] == 4 and r["constrained"] == 2
    assert r["plain_step_s"] > 0 and r["constrained_step_s"] > 0
    assert r["running_at_end"] == 4  # nobody finished early: both runs timed the full batch


def test_decode_idle_bench_times_the_whole_batch_decoding(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--decode-idle", "--num-prompts", "5", "--input-len", "4-30")
    assert r["batch"] == 5 and r["running_at_end"] == 5 and r["steps"] == 20
    assert r["step_wall_ms"] > 0
    assert r["step_gpu_busy_ms"] is None and r["gpu_idle_fraction"] is None  # on a CPU: no kernels to profile


ONLINE = ("--num-prompts", "6", "--input-len", "5-20", "--output-len", "4-8", "--client-procs", "2")


def run_online_bench(tmp_path, *args) -> tuple[dict, str]:
    """bench.py in the online mode: its JSON result and what it printed."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "bench.py", *args, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def assert_sane_level(level: dict, output_tokens: int) -> None:
    assert level["completed"] == 6 and level["failed"] == 0 and level["errors"] == []
    assert level["total_output_tokens"] == output_tokens  # every requested token, counted from the usage chunks
    assert level["request_throughput"] > 0
    assert level["output_throughput"] * level["duration_s"] == pytest.approx(output_tokens)
    assert level["total_token_throughput"] > level["output_throughput"]
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        p = level[metric]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (metric, p)
        assert p["mean"] > 0
    assert level["ttft_ms"]["p50"] < level["e2el_ms"]["p50"] <= level["duration_s"] * 1e3
    assert 0 < level["busiest_client_cpu"] < 2  # CPU seconds of one client process per second of the run


def test_online_bench_through_serve_py_compares_with_offline(tiny_dir, tmp_path):
    """The smoke test of the online benchmark: serve.py in a subprocess, two client processes reused for two
    closed-loop levels (one with fewer clients than processes), the offline reference, the table and the plot."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "latency.png"
    r, printed = run_online_bench(tmp_path, "--model", tiny_dir, "--serve", *ONLINE, "--concurrency", "1,3",
                                  "--plot", str(png))  # fmt: skip
    assert r["mode"] == "online" and r["num_prompts"] == 6 and 6 * 4 <= r["output_tokens"] <= 6 * 8
    assert r["client_procs"] == 2 and r["server_exit_code"] == 0
    assert r["offline_output_throughput"] > 0
    assert [lv["concurrency"] for lv in r["levels"]] == [1, 3]
    for level in r["levels"]:
        assert_sane_level(level, r["output_tokens"])
        ratio = level["output_throughput"] / r["offline_output_throughput"]
        assert level["fraction_of_offline"] == pytest.approx(ratio) and ratio > 0
        assert f"online output throughput is {level['fraction_of_offline']:.1%} of offline" in printed
    for name in ("TTFT", "TPOT", "ITL", "E2EL"):
        assert printed.count(f"  {name} ") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_bench_with_poisson_arrivals_loads_a_running_server(tiny_dir, tmp_path):
    """Also through the openai SDK's client instead of raw SSE: the same counts."""
    from nanokyro.benchmarks.online import ServeProcess

    server = ServeProcess(tiny_dir, [])
    try:
        server.wait_ready(timeout_s=60)
        r, printed = run_online_bench(tmp_path, "--model", tiny_dir, "--serve-url", server.url, *ONLINE,
                                      "--request-rate", "20", "--openai-sdk")  # fmt: skip
    finally:
        assert server.stop() == 0
    assert r["openai_sdk"] and "offline_output_throughput" not in r and "of offline" not in printed
    [level] = r["levels"]
    assert level["request_rate"] == 20
    assert_sane_level(level, r["output_tokens"])
    last_arrival = np.cumsum(np.random.default_rng(0).exponential(1 / 20, 6))[-1]  # bench's seeded arrivals
    assert level["duration_s"] > last_arrival


def test_serve_process_that_exits_before_it_is_ready_fails_clearly():
    from nanokyro.benchmarks.online import ServeProcess

    server = ServeProcess(None, ["--dtype", "float64"])  # serve.py rejects the flag and exits 2
    with pytest.raises(RuntimeError, match="serve.py exited with code 2 before it was ready"):
        server.wait_ready(timeout_s=60)
    assert server.stop() == 2


def test_sse_client_counts_each_event_of_a_read_that_carries_several():
    """Two token events in one network write are two arrivals ~0 ms apart; the count is the usage chunk's; an
    error event or a short stream is a failed request, not a crash."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from nanokyro.benchmarks.online import stream_request

    token = b'data: {"choices": [{"index": 0, "text": "a"}], "usage": null}\n\n'
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["max_tokens"] == 99:
            await resp.write(token + b'data: {"error": {"message": "boom"}}\n\n')
            return resp
        await resp.write(token)
        await asyncio.sleep(0.05)
        await resp.write(token + token + usage + b"data: [DONE]\n\n")
        return resp

    async def main() -> list[dict]:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as session:
                return [await stream_request(session, url, "m", [1, 2, 3], n) for n in (3, 4, 99)]
        finally:
            await runner.cleanup()

    ok, short, failed = asyncio.run(main())
    assert ok["tokens"] == 3 and len(ok["itl"]) == 2
    assert ok["itl"][0] >= 0.04 and ok["itl"][1] < 0.01  # the sleep, then two events from one write
    assert 0 < ok["ttft"] < ok["ttft"] + sum(ok["itl"]) <= ok["e2e"]
    assert short["error"] == "RuntimeError: 3 of 4 tokens in the usage chunk, 3 events"
    assert failed["error"] == "RuntimeError: error event: boom"


def test_summary_uses_vllm_definitions_of_tpot_and_itl():
    from nanokyro.benchmarks.online import summarize

    records = [
        {"index": 0, "start": 0.0, "end": 1.0, "ttft": 0.1, "e2e": 1.0, "tokens": 4, "itl": [0.2, 0.3, 0.4]},
        {"index": 1, "start": 0.0, "end": 0.5, "ttft": 0.2, "e2e": 0.5, "tokens": 2, "itl": [0.3]},
        {"index": 2, "start": 0.0, "end": 0.1, "error": "HTTP 500: no"},
    ]  # fmt: skip
    s = summarize(records, 2.0, prompts=[[1] * 10, [1] * 20, [1] * 30])
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 500: no"]
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 6  # the failed request counts neither
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 18.0
    assert s["tpot_ms"]["mean"] == pytest.approx((300 + 300) / 2)  # (e2e - ttft) / (tokens - 1) per request
    assert s["itl_ms"]["mean"] == pytest.approx(300) and s["itl_ms"]["p50"] == pytest.approx(300)  # every gap
    assert s["ttft_ms"]["p50"] == pytest.approx(150) and s["e2el_ms"]["mean"] == pytest.approx(750)


def test_serve_flags_give_serve_py_the_engine_options_of_the_offline_run(monkeypatch):
    """bench.py --serve starts serve.py with the engine of the offline run: the same EngineConfig, seed and
    tokenizer aside (serve.py takes neither); bench.py and serve.py share the engine's flags (cli.py)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import bench
    import serve
    from nanokyro.benchmarks.online import serve_flags
    from nanokyro.benchmarks.workload import engine_options
    from nanokyro.config import EngineConfig

    args = bench.parse_args(["--model", "qwen3-0.6b", "--seed", "3", "--enforce-eager", "--no-overlap-schedule",
                             "--tokenizer", "/t", "--dtype", "bfloat16", "--max-num-seqs", "64",
                             "--max-num-batched-tokens", "2048", "--quantization", "fp8", "--tensor-parallel-size", "2",
                             "--speculative-method", "ngram", "--num-speculative-tokens", "6", "--kv-cache-memory",
                             "512M", "--num-loras", "3", "--lora-rank", "8", "--profile-dir", "/p", "--profile-steps",
                             "3:7"])  # fmt: skip
    opts = engine_options(args)
    served = serve.engine_config(serve.parse_args(["--model", args.model, *serve_flags(opts)]))
    del opts["seed"], opts["tokenizer"]
    assert served == EngineConfig(model=args.model, **opts)
    assert (served.load_format, served.tensor_parallel_size, served.max_loras, served.max_lora_rank) == ("dummy", 2, 3, 8)
    assert served.kv_cache_memory == 512 << 20 and not served.overlap_schedule and served.enforce_eager
    assert (served.profile_dir, served.profile_steps) == ("/p", (3, 7))
    # Nothing asked for: serve.py's own defaults.
    defaults = bench.parse_args(["--model", "/some/dir"])
    assert serve.parse_args(["--model", "/some/dir", *serve_flags(engine_options(defaults))]) == serve.parse_args(
        ["--model", "/some/dir"])  # fmt: skip
