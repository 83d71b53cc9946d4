"""A reentrant lock that waiting threads get in the order they asked for it.

The engine's model lock is held by every prefill and, with batched decoding, by the decode
worker for each step. ``threading.RLock`` lets the thread that releases it take it straight
back before a waiter wakes, so a worker stepping in a loop could keep a prefill waiting
indefinitely; this lock queues its waiters instead.
"""

from __future__ import annotations

import collections
import threading
import time

__all__ = ["FairLock"]


class FairLock:
    """A reentrant lock handed to waiting threads in the order they asked for it (FIFO)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[object] = collections.deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (again, if this thread holds it); ``False`` if ``timeout`` ran out."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = object()
            self._queue.append(ticket)
            deadline = None if timeout < 0 else time.monotonic() + timeout
            while self._owner is not None or self._queue[0] is not ticket:
                left = None if deadline is None else deadline - time.monotonic()
                if not blocking or (left is not None and left <= 0):
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next in line may now be first
                    return False
                self._cond.wait(left)
            self._queue.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        """Release one level; the next thread in line gets it when none is left."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def waiting(self) -> int:
        """Threads waiting for the lock now."""
        with self._cond:
            return len(self._queue)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
