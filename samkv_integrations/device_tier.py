"""Documents' KV kept on the model's device between requests: a byte-capped LRU above the store.

Every answer copies its documents' K/V from host memory to the GPU (``layer_arrival``): 2 GiB
for 8 documents of 2,048 tokens on the Llama-3.1-8B shape, over 40 ms of PCIe, and SamKV's
question pass waits for each layer it reads. In RAG the same chunks come back across
questions, so RAGCache (Jin et al., 2024, https://arxiv.org/abs/2404.12457) keeps the KV of
often-retrieved documents in GPU memory above a host tier. This tier
keeps the device copies a request loaded, by store key, and hands them to later requests
instead of copying again. It costs GPU memory, which is why it is off unless the engine gets
``device_cache_bytes``.

The copies are read, never written: every method builds its caches from them by copying
(``aligned_cache``, ``gather_aligned``, ``assemble_cache``), as it must already on the CPU,
where the store's memory tier hands out its own tensors (``KVCacheStore.get(shared=True)``).
Off CUDA nothing is copied to begin with, and the tier only keeps the loaded tensors alive.

Each hit still asks the store whether the entry exists, and stamps its last use there
(``KVCacheStore.mark_used``): a document deleted from the store is not answered from here,
and ``gc`` does not take the documents the tier serves most for unused ones. On a remote
store that is one request per document per answer. One stream is assumed: the entries are
allocated on the stream that loaded them and read on the default stream of any thread, as
the engine runs every forward.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from samkv_integrations.byte_lru import ByteLRU
from samkv_integrations.records import DocumentKV


@dataclass(slots=True)
class _Entry:
    doc: DocumentKV
    # Recorded on the copy stream after the document's last layer; None: already complete.
    ready: torch.cuda.Event | None


class DeviceTier:
    """Documents' KV on the device, by store key; the least recently used dropped past the cap.

    Thread-safe. A document larger than the whole cap is not kept.

    Args:
        capacity_bytes: Cap, in tensor bytes (``DocumentKV.nbytes``); 0 keeps nothing.

    Raises:
        ValueError: ``capacity_bytes`` is not an int, or is negative.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise ValueError(f"device_cache_bytes must be an int >= 0, got {capacity_bytes!r}")
        if capacity_bytes < 0:
            raise ValueError(f"device_cache_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.hits = 0
        self.misses = 0
        self._entries: ByteLRU[_Entry] = ByteLRU(capacity_bytes, size=lambda e: e.doc.nbytes)
        self._count_lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> DocumentKV | None:
        """The document kept under ``key`` (now the most recently used), or None.

        On CUDA the current stream first waits until the copy that brought it has finished.
        """
        entry = self._entries.get(key)
        with self._count_lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        if entry is None:
            return None
        if entry.ready is not None:
            torch.cuda.current_stream(entry.doc.keys.device).wait_event(entry.ready)
        return entry.doc

    def put(self, key: str, doc: DocumentKV, ready: torch.cuda.Event | None = None) -> None:
        """Keep ``doc``, which must not be written afterwards, complete once ``ready`` is."""
        self._entries.put(key, _Entry(doc, ready))

    def discard(self, key: str) -> None:
        """Forget the document under ``key``, if one is kept."""
        self._entries.pop(key)

    def usage(self) -> tuple[int, int]:
        """How many documents are kept, and their tensor bytes."""
        return self._entries.usage()
