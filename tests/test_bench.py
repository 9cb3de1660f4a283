"""bench.py end to end on the CPU: a tiny model and workload, offline, batch-1 latency, prefix cache, structured
output, decode idle time and online against its own server, JSON results; and the GPU-busy arithmetic of the
decode-idle mode."""
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


def test_latency_bench_reports_decode_rate(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--latency", "--input-len", "16", "--output-len", "12")
    assert r["num_prompts"] == 1 and r["output_tokens"] == 12
    assert r["decode_tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0 and r["fraction_of_roofline"] > 0


def test_prefix_cache_bench_serves_the_warm_prefix_from_the_cache(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, "--prefix-cache", "--input-len", "200")
    assert r["prefix_len"] == 200 and r["cached_tokens"] >= 200 - 16
    assert r["cold_ttft_s"] > 0 and r["cached_ttft_s"] > 0 and r["ttft_speedup"] > 0


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


def test_gpu_busy_time_counts_overlapping_kernels_once_and_no_copies():
    from types import SimpleNamespace

    import torch

    from nanokyro.benchmarks.offline import kernel_busy_s

    def event(name, start_us, end_us, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start_us, end=end_us), device_type=device)

    events = [
        event("gemm", 0, 10), event("attn", 5, 12),  # overlap on two streams: 0-12
        event("norm", 12, 15),  # touching: 12-15
        event("tiny", 13, 14),  # inside another: nothing new
        event("Memcpy HtoD (Pageable -> Device)", 20, 30), event("Memset (Device)", 30, 31),  # copies: not kernels
        event("aten::mm", 40, 50, torch.autograd.DeviceType.CPU),  # host op
        event("sample", 35, 36),
    ]  # fmt: skip
    assert kernel_busy_s(events) == pytest.approx((15 + 1) / 1e6)
    assert kernel_busy_s([]) == 0


ONLINE = ("--serve", "--num-prompts", "6", "--input-len", "5-20", "--output-len", "4-8")


def assert_sane_level(level: dict) -> None:
    assert level["completed"] == 6 and level["errors"] == 0 and level["first_error"] is None
    assert level["request_throughput"] > 0 and level["output_tokens_per_s"] > 0
    for metric in ("ttft_s", "tbt_s", "e2e_s"):
        p = level[metric]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (metric, p)
    assert level["ttft_s"]["p50"] < level["e2e_s"]["p50"] and level["e2e_s"]["p99"] <= level["duration_s"]


def test_online_bench_with_closed_loop_clients_completes_every_request(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, *ONLINE, "--concurrency", "3")
    assert r["mode"] == "online" and r["num_prompts"] == 6 and 6 * 4 <= r["output_tokens"] <= 6 * 8
    [level] = r["levels"]
    assert level["concurrency"] == 3
    assert_sane_level(level)
    # every requested token streamed back
    assert level["output_tokens_per_s"] * level["duration_s"] == pytest.approx(r["output_tokens"])


def test_online_bench_with_poisson_arrivals_completes_every_request(tiny_dir, tmp_path):
    r = run_bench(tmp_path, "--model", tiny_dir, *ONLINE, "--request-rate", "20")
    [level] = r["levels"]
    assert level["request_rate"] == 20
    assert_sane_level(level)
    last_arrival = np.cumsum(np.random.default_rng(0).exponential(1 / 20, 6))[-1]  # bench's seeded arrivals
    assert level["duration_s"] > last_arrival


def test_online_bench_plots_latency_against_each_load_level(tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "latency.png"
    r = run_bench(tmp_path, "--model", tiny_dir, *ONLINE, "--request-rate", "10,40", "--plot", str(png))
    assert [lv["request_rate"] for lv in r["levels"]] == [10, 40]
    for level in r["levels"]:
        assert_sane_level(level)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
