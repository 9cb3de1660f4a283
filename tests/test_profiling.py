"""The per-rank step profiler (profile_dir, profile_steps): every rank writes a chrome trace of the model's ops
and its step means over its window, also when the window is still open at the stop; the flag's A:B; and the
kernel-busy arithmetic (NCCL's kernels apart) and the table of kernels a step."""
from __future__ import annotations

import argparse
import json
import multiprocessing
from types import SimpleNamespace

import pytest
import torch

from nanokyro import LLM, SamplingParams
from nanokyro.cli import add_engine_args
from nanokyro.config import EngineConfig
from nanokyro.profiling import is_nccl, kernel_busy_s, kernel_table


def report(path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


def assert_profiled(tmp_path, rank: int, steps: str) -> None:
    """rank{rank}.txt reports `steps` ("N (A to B-1)") with positive means, and its trace the model's layers
    and spans named after those steps."""
    r = report(tmp_path / f"rank{rank}.txt")
    assert r["rank"] == str(rank) and r["steps"] == steps
    assert float(r["wall ms a step"]) > 0 and float(r["host ms a step"]) > 0
    assert float(r["host ms a step"]) <= float(r["wall ms a step"])
    assert "kernel busy ms a step, any" not in r  # no kernels on a CPU
    names = {e.get("name") for e in json.loads((tmp_path / f"rank{rank}.json").read_text())["traceEvents"]}
    first, last = map(int, steps.split("(")[1].rstrip(")").split(" to "))
    assert {f"step {i}" for i in range(first, last + 1)} <= names and f"step {last + 1}" not in names
    assert "aten::scaled_dot_product_attention" in names and any("linear" in n for n in names)  # the layers


@pytest.mark.parametrize("window", [(1, 4), (2, 10**6)], ids=["closed-by-its-last-step", "open-at-the-stop"])
def test_every_pipeline_rank_writes_its_trace_and_step_means(llama_dir, tmp_path, window):
    """PP=2: rank 0 (engine steps) and rank 1 (plans run) each profile their own steps; a window still open when
    the engine closes is written then, by rank 0 at its close and by the worker at the stop."""
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, pipeline_parallel_size=2,
              profile_dir=str(tmp_path), profile_steps=window)  # fmt: skip
    try:
        outs = llm.generate([[5, 6, 7], [9, 10, 11, 12]], SamplingParams(max_tokens=8, temperature=0))
        assert all(len(o.token_ids) == 8 for o in outs)
        engine_steps = llm.engine.profiler.steps
    finally:
        llm.close()
    assert not multiprocessing.active_children()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.txt", "rank1.json", "rank1.txt"]
    if window == (1, 4):
        assert_profiled(tmp_path, 0, "3 (1 to 3)")
        assert_profiled(tmp_path, 1, "3 (1 to 3)")
    else:
        assert_profiled(tmp_path, 0, f"{engine_steps - 2} (2 to {engine_steps - 1})")
        plans = int(report(tmp_path / "rank1.txt")["steps"].split()[0]) + 2
        assert plans >= 8  # at least one a token, each sequence's first aside: all of them, up to the stop
        assert_profiled(tmp_path, 1, f"{plans - 2} (2 to {plans - 1})")


def test_one_process_profiles_only_rank_0_and_stops_after_its_window(llama_dir, tmp_path):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, profile_dir=str(tmp_path), profile_steps=(1, 4))
    engine = llm.engine
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
        if engine.profiler.steps < 4:
            assert not (tmp_path / "rank0.txt").exists()
    assert engine.profiler.steps == 4 and not engine.profiler.on  # counting stopped with the window
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.txt"]
    assert_profiled(tmp_path, 0, "3 (1 to 3)")
    llm.close()


def test_profile_steps_take_a_to_b_from_0_with_a_before_b(capsys):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args([]).profile_steps == EngineConfig().profile_steps == (20, 40)
    assert p.parse_args(["--profile-steps", "0:1"]).profile_steps == (0, 1)
    for bad in ["5:3", "4:4", "-1:3", "3", "a:b"]:
        with pytest.raises(SystemExit):
            p.parse_args([f"--profile-steps={bad}"])  # (= lets argparse take "-1:3" as a value)
        assert f"argument --profile-steps: expected A:B with 0 <= A < B, got '{bad}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="profile_steps must be A:B with 0 <= A < B, got 5:3"):
        LLM("unused", profile_steps=(5, 3))  # refused before any model is looked for


def test_kernel_busy_time_counts_overlapping_kernels_once_no_copies_and_nccl_apart():
    def event(name, start_us, end_us, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start_us, end=end_us), device_type=device)

    events = [
        event("gemm", 0, 10), event("attn", 5, 12),  # overlap on two streams: 0-12
        event("norm", 12, 15),  # touching: 12-15
        event("tiny", 13, 14),  # inside another: nothing new
        event("Memcpy HtoD (Pageable -> Device)", 20, 30), event("Memset (Device)", 30, 31),  # copies: not kernels
        event("aten::mm", 40, 50, torch.autograd.DeviceType.CPU),  # host op
        event("sample", 35, 36),
        event("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 11, 18),  # waiting for another rank
    ]  # fmt: skip
    assert kernel_busy_s(events, lambda n: not is_nccl(n)) == pytest.approx((15 + 1) / 1e6)
    assert kernel_busy_s(events, is_nccl) == pytest.approx(7 / 1e6)
    assert kernel_busy_s(events) == pytest.approx((18 + 1) / 1e6)
    assert kernel_busy_s([]) == 0


def test_the_kernel_table_splits_a_kernel_by_grid_and_counts_the_gaps_in_which_none_ran():
    """Two steps of a chrome trace (as torch.profiler exports it: "X" events, microseconds): a GEMV at two grids is
    two rows, largest first, by time a step; a kernel on another stream overlapping one leaves no gap; copies and
    host ops are not kernels."""
    def kernel(name, ts, dur, grid, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"grid": grid, "stream": 7}}

    step = [kernel("gemv", 0, 30, [7168, 1, 1]), kernel("norm", 31, 2, [1, 1, 1]),  # a gap of 1 before it
            kernel("gemv", 35, 10, [1024, 1, 1]), kernel("attn", 40, 8, [33, 1, 8]),  # 2 before; overlapping
            kernel("Memcpy HtoD (Pageable -> Device)", 50, 5, [], cat="gpu_memcpy"),
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 60}]  # fmt: skip
    second = [dict(e, ts=e["ts"] + 100) for e in step]  # the next step starts 52 us after this one's last kernel
    lines = kernel_table(step + second, steps=2)
    assert lines[0] == "kernels a step: 4.0 launches over 74.0 us, none running for 29.0 us of it"
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[4], r[3]) for r in rows] == [("gemv", "7168x1x1"), ("gemv", "1024x1x1"), ("attn", "33x1x8"),
                                           ("norm", "1x1x1")]  # fmt: skip
    assert rows[0][:3] == ["30.0", "1.00", "30.00"] and rows[3][:3] == ["2.0", "1.00", "2.00"]
    assert kernel_table(step[-2:], steps=1) == []  # no kernels: no table
