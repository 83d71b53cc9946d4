"""The in-memory tier of a KV cache store: loaded caches kept in an LRU, capped in tensor bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from samkv_integrations.records import DocumentKV


class MemoryTier:
    """Loaded document caches by key, the least recently used dropped past a byte cap.

    Thread-safe. The cached tensors are never handed out: :meth:`output` copies them.

    Args:
        capacity_bytes: Cap, in tensor bytes; 0 keeps nothing.
        pin_memory: Pin the kept tensors, and those handed out, when CUDA is available.
    """

    def __init__(self, capacity_bytes: int, pin_memory: bool) -> None:
        self.capacity_bytes = capacity_bytes
        self.pin_memory = pin_memory
        self._lru: OrderedDict[str, DocumentKV] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    def get(self, key: str) -> DocumentKV | None:
        """The cache kept under ``key`` (now the most recently used), or None."""
        with self._lock:
            doc = self._lru.get(key)
            if doc is not None:
                self._lru.move_to_end(key)
            return doc

    def put(self, key: str, doc: DocumentKV) -> None:
        """Keep ``doc`` (it must not be changed afterwards), unless it exceeds the cap alone."""
        if self.capacity_bytes == 0 or doc.nbytes > self.capacity_bytes:
            return
        if self.pin_memory and torch.cuda.is_available() and not doc.keys.is_pinned():
            # Pinned once on entry: every later hit copies to the GPU at full PCIe speed.
            doc = doc.map_tensors(torch.Tensor.pin_memory)
        with self._lock:
            old = self._lru.pop(key, None)
            self._used += doc.nbytes - (old.nbytes if old else 0)
            self._lru[key] = doc
            while self._used > self.capacity_bytes:
                self._used -= self._lru.popitem(last=False)[1].nbytes

    def pop(self, key: str) -> bool:
        """Forget the cache under ``key``; False if none was kept."""
        with self._lock:
            doc = self._lru.pop(key, None)
            if doc is not None:
                self._used -= doc.nbytes
            return doc is not None

    def usage(self) -> tuple[int, int]:
        """How many caches are kept, and their tensor bytes."""
        with self._lock:
            return len(self._lru), self._used

    def output(
        self, doc: DocumentKV, *, copy: bool, device: torch.device | str | None = None
    ) -> DocumentKV:
        """Tensors for a caller: on ``device``, pinned, or copies when ``copy`` (kept ones)."""
        if device is not None and torch.device(device).type != "cpu":
            return doc.map_tensors(lambda t: t.to(device, non_blocking=t.is_pinned()))
        if self.pin_memory and torch.cuda.is_available():
            return doc.map_tensors(torch.Tensor.pin_memory)
        return doc.map_tensors(torch.Tensor.clone if copy else lambda t: t)
