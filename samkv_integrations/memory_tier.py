"""The in-memory tier of a KV cache store: loaded caches kept in an LRU, capped in tensor bytes."""

from __future__ import annotations

import torch

from samkv_integrations.byte_lru import ByteLRU
from samkv_integrations.records import DocumentKV


class MemoryTier(ByteLRU[DocumentKV]):
    """Loaded document caches by key, the least recently used dropped past a byte cap.

    Thread-safe. The cached tensors are never handed out: :meth:`output` copies them.

    Args:
        capacity_bytes: Cap, in tensor bytes; 0 keeps nothing.
        pin_memory: Pin the kept tensors, and those handed out, when CUDA is available.
    """

    def __init__(self, capacity_bytes: int, pin_memory: bool) -> None:
        super().__init__(capacity_bytes, size=lambda doc: doc.nbytes)
        self.pin_memory = pin_memory

    def put(self, key: str, doc: DocumentKV) -> None:
        """Keep ``doc`` (it must not be changed afterwards), unless it exceeds the cap alone."""
        if self.capacity_bytes == 0 or doc.nbytes > self.capacity_bytes:
            return
        if self.pin_memory and torch.cuda.is_available() and not doc.keys.is_pinned():
            # Pinned once on entry: every later hit copies to the GPU at full PCIe speed.
            doc = doc.map_tensors(torch.Tensor.pin_memory)
        super().put(key, doc)

    def output(
        self, doc: DocumentKV, *, copy: bool, device: torch.device | str | None = None
    ) -> DocumentKV:
        """Tensors for a caller: on ``device``, pinned, or copies when ``copy`` (kept ones)."""
        if device is not None and torch.device(device).type != "cpu":
            return doc.map_tensors(lambda t: t.to(device, non_blocking=t.is_pinned()))
        if self.pin_memory and torch.cuda.is_available():
            return doc.map_tensors(torch.Tensor.pin_memory)
        return doc.map_tensors(torch.Tensor.clone if copy else lambda t: t)
