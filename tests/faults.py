"""Engine cores with a fault built in, for the server's fault tests: each is a `core_entry` ("faults:NAME") that the
server runs in its core process. The fault is patched into the real EngineCore there, then the real loop runs."""
from __future__ import annotations

import time

from nanokyro import core, core_process

POISON = 13  # a prompt that starts with this token id makes its request raise inside the core


def request_raises(*args) -> None:
    """Handling a poisoned request's tokens raises; every other request is unaffected."""
    stop_reason = core.EngineCore._stop_reason

    def poisoned(self, seq, *rest):
        if seq.prompt_ids[0] == POISON:
            raise RuntimeError("a bug that only this request hits")
        return stop_reason(self, seq, *rest)

    core.EngineCore._stop_reason = poisoned
    core_process.run_core(*args)


def step_fails_once(*args) -> None:
    """The first step raises; the ones after it run."""
    step = core.EngineCore.step

    def fails_once(self):
        core.EngineCore.step = step
        raise RuntimeError("a bug in this step")

    core.EngineCore.step = fails_once
    core_process.run_core(*args)


def steps_fail(*args) -> None:
    """Every step raises: after a few in a row the core reports itself unhealthy."""

    def fails(self):
        raise RuntimeError("the device is gone")

    core.EngineCore.step = fails
    core_process.run_core(*args)


def device_lost_after_a_few_steps(*args) -> None:
    """Steps run until the fifth, which fails as a lost GPU's does: a device error makes the core unhealthy at once,
    while its process lives on."""
    step, steps = core.EngineCore.step, [0]

    def fails_later(self):
        steps[0] += 1
        if steps[0] >= 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step(self)

    core.EngineCore.step = fails_later
    core_process.run_core(*args)


def slow_steps(*args) -> None:
    """Every step takes at least 10 ms, as on a slow device: a long request outlasts a short deadline on any
    machine (the tiny test model decodes 900 tokens in about a second on a free CPU)."""
    step = core.EngineCore.step

    def slow(self):
        time.sleep(0.01)
        return step(self)

    core.EngineCore.step = slow
    core_process.run_core(*args)
