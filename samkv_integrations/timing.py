"""Phase timing that does not stall the device: CUDA events on the GPU, the wall clock off it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Stopwatch:
    """Accumulates seconds per named phase.

    On CUDA a phase is timed by two events on the current stream, read only when
    :attr:`seconds` is: the host goes on queueing the next phase's kernels while the device
    still runs this one's, as it would untimed. (Synchronizing at every boundary cost TTFT
    the host time of each phase that the device would otherwise have overlapped.) A phase's
    seconds are then its span on the device's timeline, from the moment the stream reaches
    its start to the moment it finishes its last kernel, so the phases of one stream add up
    to the request's device time and none is billed for another's queued work. Each phase is
    also a ``torch.profiler`` range (``phase:<name>``), so profiles split time the same way.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._seconds: dict[str, float] = {}
        self._cuda = torch.device(device).type == "cuda" if device is not None else False
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block under ``name`` (repeated phases add up)."""
        if self._cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        else:
            began = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase:{name}"):
                yield
        finally:
            if self._cuda:
                end.record()
                self._pending.append((name, start, end))
                self._seconds.setdefault(name, 0.0)  # the phase is known before it is read
            else:
                self._add(name, time.perf_counter() - began)

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase; on CUDA, waits for the device to finish the timed phases."""
        for name, start, end in self._pending:
            end.synchronize()
            self._add(name, start.elapsed_time(end) / 1000)
        self._pending.clear()
        return self._seconds

    def seconds_with(self, more: dict[str, float]) -> dict[str, float]:
        """``seconds`` (waiting as it does) with ``more``'s phases added, after its own."""
        merged = dict(self.seconds)
        for name, seconds in more.items():
            merged[name] = merged.get(name, 0.0) + seconds
        return merged

    def _add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds
