"""Run a blocking stream in a worker thread of its own, consumed from any thread or event loop.

This is the one bridge the adapters and the demo server use between the engine's blocking
iterators and their consumers. The engine itself does not need it for thread safety: it
takes its lock for each decode step and never holds it across a ``yield``
(``model_lock.LockedDecoder``), so an ``AnswerStream`` may be advanced from a different
thread each time. One worker thread still iterates each stream, start to finish (or to an
early stop), because:

* Everything the stream does blocks: tokenizing, loading caches, the method, prefill and
  every decode step, and an adapter's first call may load the weights. An async consumer
  must keep all of it off the event loop, and one dedicated thread (rather than a
  thread-pool hop per item, or the loop's default executor held for a whole answer)
  keeps the items in order.
* The iterator runs in one copy of the caller's context, so what lives in context
  variables (LlamaIndex's instrumentation spans, LangChain's callbacks and tracing)
  follows the work, whichever thread the consumer reads from.
* The consumer never advances or closes the generator itself: a consumer that hops
  threads (Starlette's ``iterate_in_threadpool``) or leaves early cannot race the worker,
  and the worker closes the iterator in its own thread, after its current item.

The worker runs ahead of the consumer by whatever the queue holds.
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
    # BaseException too: whatever ends the worker must reach the consumer, or it waits forever.
    try:
        iterator = make_iterator()
    except BaseException as e:
        send(_ERROR, e)
        return
    try:
        for item in iterator:
            if stop.is_set():
                break
            send(_ITEM, item)
    except BaseException as e:
        send(_ERROR, e)
        return
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    send(_DONE, None)


def _start(make_iterator: Callable[[], Iterator[T]], send: Send, stop: threading.Event) -> None:
    """Start the worker thread, in a copy of the caller's context variables."""
    context = contextvars.copy_context()
    threading.Thread(
        target=context.run,
        args=(_pump, make_iterator, send, stop),
        name="samkv-stream",
        daemon=True,
    ).start()


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
    _start(make_iterator, lambda kind, value: channel.put((kind, value)), stop)
    try:
        while True:
            kind, value = channel.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise cast(BaseException, value)
            yield cast(T, value)
    finally:
        stop.set()


async def aiter_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Iterate ``make_iterator()`` in a worker thread, yielding its items on the event loop.

    Args:
        make_iterator: Called in the worker thread (with the caller's context variables);
            everything it does stays off the event loop.

    Yields:
        As :func:`iter_in_thread`. On an early exit (``break``, ``aclose``, cancellation)
        it waits, without blocking the loop, until the worker has closed the iterator. If
        the loop closes first, the worker stops after its current item.
    """
    loop = asyncio.get_running_loop()
    channel: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    stop = threading.Event()

    def send(kind: str, value: object) -> None:
        try:
            loop.call_soon_threadsafe(channel.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    _start(make_iterator, send, stop)
    finished = False
    try:
        while True:
            kind, value = await channel.get()
            if kind != _ITEM:
                finished = True
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise cast(BaseException, value)
            yield cast(T, value)
    finally:
        stop.set()
        while not finished:
            kind, _ = await channel.get()
            finished = kind != _ITEM
