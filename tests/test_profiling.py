"""The per-rank step profiler (profile_dir, profile_steps): the flag's A:B, and the kernel-busy arithmetic (NCCL's
kernels apart)."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from nanokyro.cli import add_engine_args
from nanokyro.config import EngineConfig
from nanokyro.profiling import StepProfiler, is_nccl, kernel_busy_s


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
        StepProfiler(EngineConfig(profile_steps=(5, 3)), rank=0)


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
