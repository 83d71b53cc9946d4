"""A thread-safe LRU capped in bytes: how the store's memory tier and the device tier keep caches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class ByteLRU(Generic[Value]):
    """Values by key, the least recently used dropped once their bytes pass a cap.

    Thread-safe. A value larger than the whole cap is not kept, and nothing is dropped for it.

    Args:
        capacity_bytes: Cap on the kept values' bytes.
        size: A value's bytes.
    """

    def __init__(self, capacity_bytes: int, size: Callable[[Value], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self._size = size
        self._lru: OrderedDict[str, Value] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    def get(self, key: str) -> Value | None:
        """The value kept under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._lru.get(key)
            if value is not None:
                self._lru.move_to_end(key)
            return value

    def put(self, key: str, value: Value) -> None:
        """Keep ``value`` under ``key`` (replacing what was there), unless it exceeds the cap."""
        if self._size(value) > self.capacity_bytes:
            return
        with self._lock:
            old = self._lru.pop(key, None)
            self._used += self._size(value) - (self._size(old) if old is not None else 0)
            self._lru[key] = value
            while self._used > self.capacity_bytes:
                self._used -= self._size(self._lru.popitem(last=False)[1])

    def pop(self, key: str) -> bool:
        """Forget the value under ``key``; False if none was kept."""
        with self._lock:
            value = self._lru.pop(key, None)
            if value is not None:
                self._used -= self._size(value)
            return value is not None

    def usage(self) -> tuple[int, int]:
        """How many values are kept, and their bytes."""
        with self._lock:
            return len(self._lru), self._used
