"""Per-rank step profiles (EngineConfig.profile_dir, profile_steps): torch.profiler over a window of the steps a
rank runs, and what its trace says about them.

Every rank counts the steps it runs from its start and profiles steps A up to but not including B: on rank 0 a
call of the engine's step (core.py; in a pipeline: sample the oldest step in flight, launch the next), on the
other ranks one plan received and run (ModelRunner.serve). Each writes DIR/rank{r}.json, a chrome trace (Perfetto,
chrome://tracing), and DIR/rank{r}.txt with means a step over the window: wall time (the device synchronised at
both ends), host time (inside the step function: a worker whose host is the slower side shows host close to wall;
rank 0's includes waiting for sampled tokens) and, on CUDA, time in which some kernel ran, NCCL's kernels apart
from the others (they wait for the other ranks while they run). On CUDA, DIR/rank{r}.kernels.txt also breaks the
kernels down (`kernel_table`). A window still open when the rank stops is written then. Before the window a step
costs a few microseconds; after it, or without a profile_dir, one attribute check.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from nanokyro.config import EngineConfig

log = logging.getLogger("nanokyro.profiling")

_OFF = contextlib.nullcontext()


class StepProfiler:
    """One rank's step counter and profile window; the step loop runs each step inside `step()`."""

    def __init__(self, cfg: EngineConfig, rank: int):
        first, end = cfg.profile_steps
        if not 0 <= first < end:
            raise ValueError(f"profile_steps must be A:B with 0 <= A < B, got {first}:{end}")
        self.dir, self.first, self.end, self.rank = cfg.profile_dir, first, end, rank
        self.cuda = cfg.torch_device().type == "cuda"
        self.on = self.dir is not None  # until the window is written
        self.steps = 0  # steps this rank has run
        self._profiler = None  # while the window is open
        self._start = 0.0  # perf_counter when it opened
        self._host_s = 0.0  # inside its steps
        if self.on:
            # A process's first profiler session starts the tracer (1.2 s on a CPU): a throwaway one here, before any
            # step, so that the window's start holds up no other rank whose window is open (in a pipeline they wait
            # for each other).
            warm_up = self._new_profiler()
            warm_up.start()
            warm_up.stop()

    def step(self):
        """A context around one step."""
        return self._step() if self.on else _OFF

    @contextlib.contextmanager
    def _step(self):
        if self.steps == self.first:
            self._open()
        start = time.perf_counter()
        try:
            # a span per step in the trace, named by its number on this rank, to line the ranks' traces up
            with record_function(f"step {self.steps}") if self._profiler else _OFF:
                yield
        finally:
            if self._profiler is not None:
                self._host_s += time.perf_counter() - start
            self.steps += 1
            if self.steps == self.end:
                self.close()

    def _new_profiler(self) -> profile:
        return profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])])

    def _open(self) -> None:
        self._profiler = self._new_profiler()
        self._profiler.start()  # before the clock starts
        self._sync()
        self._start = time.perf_counter()

    def close(self) -> None:
        """End the window, if open, and write its files (at its last step, or when the rank stops before it);
        nothing is profiled after. Idempotent."""
        if not self.on:
            return
        self.on = False
        if self._profiler is None:
            log.warning("rank %d ran %d steps, fewer than profile_steps' first (%d): nothing profiled",
                        self.rank, self.steps, self.first)  # fmt: skip
            return
        self._sync()
        wall_s = time.perf_counter() - self._start
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        steps = self.steps - self.first
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"rank{self.rank}")
        profiler.export_chrome_trace(path + ".json")

        def ms(seconds: float) -> str:  # over the window -> a step
            return f"{seconds / steps * 1e3:.3f}"

        lines = [f"rank: {self.rank}", f"steps: {steps} ({self.first} to {self.steps - 1})",
                 f"wall ms a step: {ms(wall_s)}", f"host ms a step: {ms(self._host_s)}"]  # fmt: skip
        if self.cuda:
            events = profiler.events()
            lines += [f"kernel busy ms a step, not NCCL: {ms(kernel_busy_s(events, lambda n: not is_nccl(n)))}",
                      f"kernel busy ms a step, NCCL: {ms(kernel_busy_s(events, is_nccl))}",
                      f"kernel busy ms a step, any: {ms(kernel_busy_s(events))}"]  # fmt: skip
        with open(path + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        if self.cuda:  # the kernels' launch grids are in the exported trace only, not in the profiler's events
            with open(path + ".json") as f:
                table = kernel_table(json.load(f)["traceEvents"], steps)
            with open(path + ".kernels.txt", "w") as f:
                f.write("\n".join(table) + "\n")
        log.info("rank %d: steps %d to %d profiled into %s.json and .txt", self.rank, self.first, self.steps - 1, path)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@contextlib.contextmanager
def unrecorded():
    """Post async collectives here (parallel.py): the profiler does not record them. A collective's record ends
    when its work completes, which may be after a window has closed (a pipeline's logits receive is posted in one
    step and waited for in the next; a plan is taken when its rank gets to it), and then writes into the profiler's
    freed buffers: on gloo, torch 2.13 corrupts the heap and the process aborts later (the PP=2 profiling tests
    did). Their host calls only post them; on CUDA their kernels are still traced. With no profiler running
    (every step outside a window) nothing records them, and nothing is switched."""
    if not torch.autograd._profiler_enabled():
        yield
        return
    torch.autograd._enable_record_function(False)
    try:
        yield
    finally:
        torch.autograd._enable_record_function(True)


def is_nccl(kernel: str) -> bool:
    return "nccl" in kernel.lower()


def kernel_table(trace_events: list[dict], steps: int, top: int = 25) -> list[str]:
    """A window's kernels a step, from its chrome trace's events: their span and the gaps in which no kernel ran,
    then the `top` kernels by time, each by name and launch grid (one kernel at two grids is two pieces of work:
    the one-row GEMV of each projection), with its launches a step and mean duration."""
    kernels = sorted((e for e in trace_events if e.get("cat") == "kernel"), key=lambda e: e["ts"])  # us
    if not kernels:
        return []
    by_kernel = collections.defaultdict(list)
    for e in kernels:
        by_kernel[(e["name"], tuple(e.get("args", {}).get("grid", ())))].append(e["dur"])
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    span = max(end for _, end in spans) - spans[0][0]
    gaps = span - covered(spans)
    lines = [f"kernels a step: {len(kernels) / steps:.1f} launches over {span / steps:.1f} us, none running for "
             f"{gaps / steps:.1f} us of it", "us a step | launches a step | mean us | grid | kernel"]  # fmt: skip
    for (name, grid), durs in sorted(by_kernel.items(), key=lambda item: -sum(item[1]))[:top]:
        lines.append(f"{sum(durs) / steps:.1f} | {len(durs) / steps:.2f} | {sum(durs) / len(durs):.2f} | "
                     f"{'x'.join(map(str, grid))} | {name}")  # fmt: skip
    return lines


def kernel_busy_s(events, select=lambda kernel: True) -> float:
    """Seconds in which at least one CUDA kernel that `select` takes (by name) ran: the union of their intervals,
    so that kernels overlapping on several streams count once. Memory copies and sets are not kernels."""
    spans = [
        (e.time_range.start, e.time_range.end)  # microseconds
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        and select(e.name)
    ]  # fmt: skip
    return covered(spans) / 1e6


def covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: overlapping ones count once."""
    total, covered_to = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total
