"""Stopwatch: phases add up, and on CUDA timing a phase does not wait for the device."""

from __future__ import annotations

import time

import pytest
import torch

from samkv_integrations.timing import Stopwatch


def test_repeated_phases_add_up_and_a_failing_phase_is_still_timed() -> None:
    watch = Stopwatch("cpu")
    with watch.phase("load"):
        time.sleep(0.01)
    with watch.phase("load"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), watch.phase("select"):
        raise RuntimeError("boom")
    assert list(watch.seconds) == ["load", "select"]
    assert watch.seconds["load"] >= 0.02
    assert watch.seconds["select"] >= 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a CUDA device")
def test_cuda_phase_is_read_from_events_without_stalling_the_host() -> None:
    torch.ones(1, device="cuda").sum().item()  # the context exists before anything is timed
    watch = Stopwatch("cuda")
    began = time.perf_counter()
    with watch.phase("busy"):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device time on a ~2 GHz clock
    queued = time.perf_counter() - began
    with watch.phase("after"):
        pass
    assert list(watch.seconds) == ["busy", "after"]  # known before they are read
    busy = watch.seconds["busy"]
    # Leaving the phase only queued its end event: the host was back long before the device.
    assert queued < busy / 2
    assert watch.seconds["after"] < busy
