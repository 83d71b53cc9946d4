"""Wall-clock phase timing that waits for the device, so GPU phases are not under-counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Stopwatch:
    """Accumulates seconds per named phase.

    On CUDA each phase boundary synchronizes the device: without it, asynchronous kernels
    would be billed to whichever later phase happens to wait for them. Each phase is also a
    ``torch.profiler`` range (``phase:<name>``), so profiles split time the same way.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._cuda = torch.device(device).type == "cuda" if device is not None else False

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block under ``name`` (repeated phases add up)."""
        self._sync()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase:{name}"):
                yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
