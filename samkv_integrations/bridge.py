"""Run an engine stream in a worker thread of its own, consumed from any thread or event loop.

The engine's generators hold the engine's re-entrant lock while they run, and a
re-entrant lock must be released by the thread that took it. Consumers often advance a
stream from changing threads (Starlette's ``iterate_in_threadpool``, thread pools), so one
engine stream is always iterated, start to finish (or to ``close``), by one worker thread,
which hands the items over through a queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar, cast

T = TypeVar("T")

_ITEM, _ERROR, _DONE = "item", "error", "done"

Send = Callable[[str, object], None]


def _pump(make_iterator: Callable[[], Iterator[T]], send: Send, stop: threading.Event) -> None:
    """Iterate ``make_iterator()`` in the calling thread, sending each item, error or the end."""
    try:
        iterator = make_iterator()
    except Exception as e:
        send(_ERROR, e)
        return
    try:
        for item in iterator:
            if stop.is_set():
                break
            send(_ITEM, item)
    except Exception as e:
        send(_ERROR, e)
        return
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    send(_DONE, None)


def iter_in_thread(make_iterator: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Iterate ``make_iterator()`` in a worker thread; this generator may be advanced anywhere.

    Args:
        make_iterator: Called in the worker thread (with the caller's context variables,
            so instrumentation spans follow the work).

    Yields:
        The iterator's items, in order. An exception raised in the worker is re-raised here.
        When the consumer stops early, the worker stops after its current item and closes
        the iterator in its own thread.
    """
    channel: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
    stop = threading.Event()
    context = contextvars.copy_context()
    worker = threading.Thread(
        target=context.run,
        args=(_pump, make_iterator, lambda kind, value: channel.put((kind, value)), stop),
        name="samkv-stream",
        daemon=True,
    )
    worker.start()
    try:
        while True:
            kind, value = channel.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise cast(Exception, value)
            yield cast(T, value)
    finally:
        stop.set()


async def aiter_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Iterate ``make_iterator()`` in a worker thread, yielding its items on the event loop.

    Args:
        make_iterator: Called in the worker thread; everything it does (tokenizing,
            prefill, decoding) stays off the event loop.

    Yields:
        As :func:`iter_in_thread`; on early exit, waits for the worker to stop.
    """
    loop = asyncio.get_running_loop()
    channel: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    stop = threading.Event()

    def send(kind: str, value: object) -> None:
        loop.call_soon_threadsafe(channel.put_nowait, (kind, value))

    # to_thread copies the context, so instrumentation spans follow the work.
    worker = asyncio.ensure_future(asyncio.to_thread(_pump, make_iterator, send, stop))
    try:
        while True:
            kind, value = await channel.get()
            if kind == _DONE:
                break
            if kind == _ERROR:
                raise cast(Exception, value)
            yield cast(T, value)
    finally:
        stop.set()
        await worker
