"""Helpers for the tests that decode answers in threads: start them together, count steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from samkv_integrations.batching import DecodeBatcher
from samkv_integrations.fair_lock import FairLock
from samkv_integrations.stacked_cache import Member


def in_threads(
    calls: list[Callable[[], Any]], lock: FairLock | None = None, waiters: int | None = None
) -> list[Any]:
    """Run ``calls`` in threads at once; results (or raised errors) in call order.

    With ``lock`` (the engine's), the threads are started while the test holds it and
    released once ``waiters`` of them (default: all) wait for it, so their prefills run
    back to back and their first decode steps meet in one batch. The threads are daemons:
    an answer that hangs fails its test (its result stays ``None``), not the whole run.
    """
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    if lock is not None:
        lock.acquire()
    for thread in threads:
        thread.start()
    if lock is not None:
        deadline = time.monotonic() + 10
        while len(lock._queue) < (waiters or len(calls)) and time.monotonic() < deadline:
            time.sleep(0.001)
        lock.release()
    for thread in threads:
        thread.join(timeout=60)
    return results


def count_rows(batcher: DecodeBatcher, sizes: list[int]) -> None:
    """Record each batched step's answers in ``sizes`` (``del batcher._stack.step`` undoes it)."""
    forward = batcher._stack.step

    def step(batch: list[Member], settled: bool = False) -> torch.Tensor:
        sizes.append(len(batch))
        return forward(batch, settled)

    batcher._stack.step = step  # type: ignore[method-assign]
