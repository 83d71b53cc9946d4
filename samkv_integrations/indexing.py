"""Indexing: encode documents' caches behind the shared prefix and store them, a batch at a time.

Each batch is written to the store as soon as it is encoded, then freed: memory stays flat
however many documents are indexed, and a crash loses at most the batch in flight. What the
store already holds is verified as a read would verify it (checksums, model, prefix,
extras); a broken entry is encoded again and replaces it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from samkv_integrations.encode import PrefixKV, encode_batches
from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError
from samkv_integrations.methods import METHODS
from samkv_integrations.models import LoadedModel
from samkv_integrations.records import CacheRef
from samkv_integrations.store import KVCacheStore, cache_key
from samkv_integrations.stored_extras import declared_extras

logger = logging.getLogger(__name__)

#: Stored entries verified at once (reading and hashing release the GIL).
VERIFY_THREADS = 4

#: Size from which glibc serves an allocation by mmap (see ``_bound_heap_growth``).
MMAP_THRESHOLD = 4 << 20


@functools.cache
def _bound_heap_growth() -> None:
    """Make glibc return large freed blocks to the OS, once per process (Linux, glibc only).

    Encoding a batch on the CPU interleaves the cache's long-lived per-layer tensors with
    short-lived activations of the same size. glibc raises its mmap threshold as large
    blocks are freed, so those come from the heap, whose freed holes it cannot give back:
    resident memory then grew by the better part of a gigabyte over a run (measured on
    SmolLM2-135M, 8192-token batches). A fixed threshold keeps blocks of 4 MiB and more
    out of the heap, and memory flat from batch to batch.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ok = ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError) as e:
        logger.debug("cannot set glibc's mmap threshold: %s", e)
        return
    logger.debug("glibc mmap threshold set to %d bytes: %s", MMAP_THRESHOLD, bool(ok))


@dataclass(slots=True)
class Indexer:
    """Encodes and stores the caches of one engine's documents.

    Attributes:
        model: The engine's model.
        store: Where the caches go.
        fingerprint: The engine's fingerprint (model and prompt prefix).
        prefix_len: Length of the shared prompt prefix, which stored entries must match.
        prefix: Gives the shared prefix cache (computed on first use: indexing documents
            that are all stored already needs none).
        batch_tokens: Upper bound on padded tokens per encoding batch.
        lock: Held while each batch is encoded (the engine's model lock), not while it is
            written, so that answers interleave with a long indexing run.
    """

    model: LoadedModel
    store: KVCacheStore
    fingerprint: str
    prefix_len: int
    prefix: Callable[[], PrefixKV]
    batch_tokens: int = 8192
    lock: AbstractContextManager[Any] = field(default_factory=nullcontext)

    def index(
        self, ids: Sequence[list[int]], texts: Sequence[str | None], *, progress: bool = True
    ) -> list[CacheRef]:
        """Store the cache of each document (framed token ids) that is missing or broken.

        Args:
            ids: Each document's framed token ids.
            texts: Each document's text, for its ref, or None.
            progress: Show a tqdm bar over the documents.

        Returns:
            One ref per document, in input order.

        Raises:
            ValueError: A document is empty or leaves no room in the model's context after
                the prompt prefix; the message names its position.
        """
        limit = self.model.max_context - self.prefix_len
        for i, doc in enumerate(ids):
            if not doc or len(doc) >= limit:
                raise ValueError(f"document {i}: {len(doc)} token ids; need 1 to {limit - 1}")
        keys = [cache_key(self.fingerprint, doc) for doc in ids]
        first: dict[str, int] = {}  # a document given twice is encoded once
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        extras = declared_extras(m.stored_extras for m in METHODS.values())
        todo = [first[key] for key in self._unusable(list(first), extras)]
        with tqdm(
            total=len(ids),
            initial=len(ids) - len(todo),
            desc="Indexing documents",
            unit="doc",
            disable=not progress,
        ) as bar:
            if todo:
                if self.model.device.type == "cpu":
                    _bound_heap_growth()
                with self.lock:
                    prefix = self.prefix()
                batches = encode_batches(
                    self.model.model,
                    prefix,
                    [ids[i] for i in todo],
                    self.fingerprint,
                    batch_tokens=self.batch_tokens,
                    extras=extras,
                )
                while True:
                    with self.lock:
                        batch = next(batches, None)
                    if batch is None:
                        break
                    for _, kv in batch:
                        self.store.put(kv.to("cpu"))
                    bar.update(len(batch))
                    del batch  # the next batch is encoded with this one's memory free
        logger.info("indexed %d documents (%d already stored)", len(ids), len(ids) - len(todo))
        return [
            CacheRef(key=key, n_tokens=len(doc), model=self.fingerprint, text=text)
            for key, doc, text in zip(keys, ids, texts, strict=True)
        ]

    def _unusable(self, keys: list[str], extras: Sequence[str]) -> list[str]:
        """The keys among ``keys`` whose stored entry is missing or fails verification."""

        def usable(key: str) -> bool:
            try:
                self.store.verify(
                    key, fingerprint=self.fingerprint, prefix_len=self.prefix_len, extras=extras
                )
            except CacheMissError:
                return False  # absent, or lacking an extra
            except (CacheCorruptedError, CacheMismatchError) as e:
                logger.warning("%s; deleting it, to encode it again", e)
                self.store.delete(key)
                return False
            return True

        if not keys:
            return []
        with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(keys))) as pool:
            return [key for key, ok in zip(keys, pool.map(usable, keys), strict=True) if not ok]
