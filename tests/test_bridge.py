"""The one thread/async bridge: order, errors, early exits and context, from any consumer."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from samkv_integrations.bridge import aiter_in_thread, iter_in_thread

REQUEST = contextvars.ContextVar("REQUEST", default="none")


class Recorder:
    """A counting iterator that records which threads ran it and whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.threads: set[str] = set()
        self.contexts: set[str] = set()
        self.closed_in: str | None = None
        self.closed = threading.Event()

    def make(self) -> Iterator[int]:
        return self._run()

    def _run(self) -> Iterator[int]:
        try:
            for i in range(self.n):
                self.threads.add(threading.current_thread().name)
                self.contexts.add(REQUEST.get())
                if i == self.fail_at:
                    raise KeyError(f"item {i}")
                yield i
        finally:
            self.closed_in = threading.current_thread().name
            self.closed.set()


def test_items_come_in_order_from_one_worker_in_the_callers_context() -> None:
    recorder = Recorder(50)
    REQUEST.set("request-1")
    assert list(iter_in_thread(recorder.make)) == list(range(50))
    assert recorder.threads == {"samkv-stream"} and recorder.contexts == {"request-1"}
    assert recorder.closed_in == "samkv-stream"


def test_errors_reach_the_consumer() -> None:
    recorder = Recorder(5, fail_at=3)
    got: list[int] = []
    with pytest.raises(KeyError, match="item 3"):
        for item in iter_in_thread(recorder.make):
            got.append(item)
    assert got == [0, 1, 2]

    def broken() -> Iterator[int]:
        raise ValueError("cannot start")

    with pytest.raises(ValueError, match="cannot start"):
        next(iter_in_thread(broken))


def test_an_early_stop_closes_the_iterator_in_the_worker() -> None:
    recorder = Recorder(10**9)
    items = iter_in_thread(recorder.make)
    assert next(items) == 0
    items.close()
    assert recorder.closed.wait(timeout=10)
    assert recorder.closed_in == "samkv-stream"


def test_the_consumer_may_hop_threads() -> None:
    recorder = Recorder(20)
    items = iter_in_thread(recorder.make)
    got: list[int | None] = []
    while not got or got[-1] is not None:
        reader = threading.Thread(target=lambda: got.append(next(items, None)))
        reader.start()
        reader.join()
    assert got[:-1] == list(range(20))
    assert recorder.threads == {"samkv-stream"}


async def test_async_items_errors_and_context() -> None:
    REQUEST.set("request-2")
    recorder = Recorder(30)
    assert [i async for i in aiter_in_thread(recorder.make)] == list(range(30))
    assert recorder.threads == {"samkv-stream"} and recorder.contexts == {"request-2"}
    with pytest.raises(KeyError, match="item 2"):
        async for _ in aiter_in_thread(Recorder(5, fail_at=2).make):
            pass


async def test_async_early_exit_waits_until_the_worker_closed_the_iterator() -> None:
    recorder = Recorder(10**9)
    items = aiter_in_thread(recorder.make)
    assert await anext(items) == 0
    await items.aclose()
    assert recorder.closed.is_set()  # closed before aclose returned
    assert recorder.closed_in == "samkv-stream"


async def test_the_event_loop_stays_free_while_the_iterator_blocks() -> None:
    loop_ran = threading.Event()

    def blocking() -> Iterator[str]:
        # Waits for a coroutine on the loop: a bridge running this on the loop would hang.
        yield "waited" if loop_ran.wait(timeout=30) else "timed out"

    async def mark() -> None:
        loop_ran.set()

    consumer = asyncio.ensure_future(_collect(aiter_in_thread(blocking)))
    await asyncio.sleep(0)
    await mark()
    assert await consumer == ["waited"]


async def _collect(items: AsyncIterator[str]) -> list[str]:
    return [item async for item in items]
