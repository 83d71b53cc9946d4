"""The KV cache store: per-document caches on fsspec storage, verified on read, a memory tier.

An entry is one file, written whole and renamed into place (:mod:`store_files`); what it
holds, how the key is derived and how it is verified is :mod:`cache_format`'s. Nothing is
ever unpickled. Besides ``put``/``get``, the store lists, verifies and garbage-collects
its entries (``entries``, ``verify``, ``gc``; the ``samkv cache`` commands).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from samkv_integrations.cache_format import (
    FORMAT_VERSION,
    cache_key,
    check_entry,
    check_reader,
    describe,
    pack,
    read_meta,
    read_tensors,
)
from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError
from samkv_integrations.memory_tier import MemoryTier
from samkv_integrations.records import DocumentKV
from samkv_integrations.store_files import TEMP_MAX_AGE_S, StoreEntry, StoreFiles

__all__ = ["FORMAT_VERSION", "GcReport", "KVCacheStore", "StoreEntry", "StoreStats", "cache_key"]

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(slots=True)
class StoreStats:
    """Counters of one :class:`KVCacheStore` since it was opened.

    Attributes:
        hits: Successful ``get`` calls (memory hits included).
        misses: ``get`` calls that raised :class:`CacheMissError`.
        bytes_read: Entry file bytes read from storage.
        bytes_written: Entry file bytes written to storage.
        memory_hits: ``get`` calls served from the in-memory tier.
        entries_in_memory: Entries held in the in-memory tier now.
        memory_bytes_used: Tensor bytes held in the in-memory tier now.
    """

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    memory_hits: int = 0
    entries_in_memory: int = 0
    memory_bytes_used: int = 0


@dataclass(slots=True)
class GcReport:
    """What :meth:`KVCacheStore.gc` did.

    Attributes:
        deleted: Keys of the entries deleted.
        freed_bytes: Their file bytes.
        kept_entries: Entries left.
        kept_bytes: Their file bytes.
        temps_removed: Temp files, left behind by crashed writers, removed.
    """

    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_entries: int = 0
    kept_bytes: int = 0
    temps_removed: int = 0


class KVCacheStore:
    """Store of :class:`DocumentKV` records keyed by model, format version and token ids.

    Args:
        url: A local directory (created if missing) or any fsspec URL (``memory://x``,
            ``s3://bucket/prefix``, ``file:///path``). Temp files older than an hour, left
            there by writers that crashed, are removed on opening.
        memory_bytes: Cap, in tensor bytes, of an in-memory LRU tier; 0 disables it. A
            negative value, or a directory that cannot be created, raises ValueError.
        storage_options: Passed to fsspec for URLs (credentials, endpoints).
        pin_memory: Pin the tensors returned by :meth:`get` when CUDA is available.

    Examples:
        >>> import torch
        >>> from samkv_integrations.records import DocumentKV
        >>> store = KVCacheStore("memory://doctest-store", memory_bytes=1 << 20)
        >>> kv = torch.zeros(2, 2, 3, 4)  # [layers, kv heads, tokens, head_dim]
        >>> extras = {"query_means": torch.zeros(2, 4, 4)}  # [layers, q heads, head_dim]
        >>> doc = DocumentKV([1, 2, 3], kv, kv, "my-model", prefix_len=5, extras=extras)
        >>> key = store.put(doc)
        >>> store.get(key, fingerprint="my-model").token_ids
        [1, 2, 3]
        >>> store.stats().hits
        1
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        memory_bytes: int = 0,
        storage_options: dict[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self._files = StoreFiles(url, storage_options or {})
        self._url = self._files.url
        self._files.clean_temps(TEMP_MAX_AGE_S)
        self._memory = MemoryTier(memory_bytes, pin_memory)
        self._lock = threading.Lock()
        self._stats = StoreStats()

    @property
    def url(self) -> str:
        """The store location: an absolute directory path, or a full fsspec URL."""
        return self._url

    def put(self, doc: DocumentKV) -> str:
        """Store a document cache; a valid stored entry holding its extras is kept as is.

        Args:
            doc: The cache. Tensors may live on any device; they are saved from CPU.

        Returns:
            The entry's key, ``cache_key(doc.fingerprint, doc.token_ids)``.

        Raises:
            ValueError: If a tensor's shape does not fit the others and the token count,
                an extra is unknown, or ``prefix_len`` is negative; the message names it.
            OSError: If storage cannot be written.
        """
        key = cache_key(doc.fingerprint, doc.token_ids)
        given = {"keys": doc.keys, "values": doc.values, **doc.extras}
        if torch.cuda.is_available() and any(t.is_pinned() for t in given.values()):
            torch.cuda.synchronize()  # a non-blocking device-to-host copy may be in flight
        # Private copies: safetensors refuses tensors that share storage (keys and values
        # sliced from one buffer), and the memory tier must not alias the caller's tensors.
        kept = doc.map_tensors(lambda t: t.detach().to("cpu", copy=True).contiguous())
        kept.token_ids = [int(i) for i in doc.token_ids]
        tensors = {"keys": kept.keys, "values": kept.values, **kept.extras}
        check_entry(kept.n_tokens, kept.prefix_len, tensors)
        stored = self._stored(key, kept.prefix_len, needs=kept.extras)
        if stored is not None:
            logger.debug("put %s: already stored in %s", key, self._url)
            kept = stored
        else:
            data, _ = pack(kept.fingerprint, kept.token_ids, kept.prefix_len, tensors)
            self._files.write(key, data)
            with self._lock:
                self._stats.bytes_written += len(data)
            logger.debug("put %s: wrote %d bytes to %s", key, len(data), self._url)
        self._memory.put(key, kept)
        return key

    def get(
        self,
        key: str,
        *,
        fingerprint: str | None = None,
        token_ids: Sequence[int] | None = None,
        prefix_len: int | None = None,
        extras: Collection[str] = (),
        device: torch.device | str | None = None,
        shared: bool = False,
    ) -> DocumentKV:
        """Load a document cache, checking it before returning it.

        Args:
            key: The entry's key.
            fingerprint: If given, the fingerprint of the model that will use the cache.
            token_ids: If given, the token ids the caller expects the cache to hold.
            prefix_len: If given, the caller's shared prefix length.
            extras: Names of the stored extras the caller needs.
            device: If given, the tensors are returned on it, as fresh copies (from pinned
                host memory, asynchronously, when the memory tier holds the entry pinned).
            shared: Without ``device``, hand out the memory tier's own tensors rather than
                copies, for a caller that copies them elsewhere at once and never writes them.

        Returns:
            The cache, on CPU (pinned if ``pin_memory`` was set and CUDA is available).

        Raises:
            CacheMissError: No entry is stored under ``key``, or it lacks a needed extra.
            CacheCorruptedError: The entry cannot be read, fails a checksum or shape check,
                or has another ``prefix_len`` than the caller's.
            CacheMismatchError: The entry was written by another model or format version,
                or holds other token ids than ``token_ids``.
        """
        self._check_key(key)
        expect: dict[str, Any] = {
            "fingerprint": fingerprint,
            "token_ids": token_ids,
            "prefix_len": prefix_len,
            "extras": extras,
        }
        cached = self._memory.get(key)
        try:
            if cached is not None:
                fields = describe(
                    cached.fingerprint, cached.token_ids, cached.prefix_len, cached.extras
                )
                check_reader(self._where(key), fields, **expect)
                with self._lock:
                    self._stats.hits += 1
                    self._stats.memory_hits += 1
                self._files.touch(key)
                return self._memory.output(cached, copy=not shared, device=device)
            doc = self._from_storage(key, **expect)
        except CacheMissError:
            with self._lock:
                self._stats.misses += 1
            raise
        with self._lock:
            self._stats.hits += 1
        self._files.touch(key)
        self._memory.put(key, doc)
        if shared:  # the tier's own entry if it kept one (pinned on entry): no second copy
            doc = self._memory.get(key) or doc
        copy = 0 < doc.nbytes <= self._memory.capacity_bytes and not shared
        return self._memory.output(doc, copy=copy, device=device)

    def verify(
        self,
        key: str,
        *,
        fingerprint: str | None = None,
        prefix_len: int | None = None,
        extras: Collection[str] = (),
    ) -> None:
        """Check the entry under ``key`` on storage, as ``get`` would, without keeping it.

        The memory tier is neither read nor filled, and the last use is not stamped.

        Raises:
            CacheMissError, CacheCorruptedError, CacheMismatchError: As ``get`` does.
        """
        self._check_key(key)
        self._from_storage(key, fingerprint=fingerprint, prefix_len=prefix_len, extras=extras)

    def contains(self, key: str) -> bool:
        """Whether an entry is committed under ``key`` (or held in memory); it is not verified."""
        self._check_key(key)
        return key in self._memory or self._files.exists(key)

    def mark_used(self, key: str) -> bool:
        """``contains``, stamping a found entry's last use for ``gc`` as a ``get`` would.

        For a caller that holds the entry's tensors elsewhere (``DeviceTier``) and reads
        them instead of calling ``get``.
        """
        found = self.contains(key)
        if found:
            self._files.touch(key)
        return found

    def delete(self, key: str) -> bool:
        """Remove an entry from storage and memory.

        Returns:
            True if anything was deleted.
        """
        self._check_key(key)
        in_memory = self._memory.pop(key)
        return self._files.remove(key) or in_memory

    def entries(self) -> list[StoreEntry]:
        """Every entry on storage, by key, with its size, creation and last use (not read)."""
        return sorted(self._files.scan()[0], key=lambda entry: entry.key)

    def gc(
        self,
        keep: Collection[str] | None = None,
        max_bytes: int | None = None,
        *,
        temp_max_age_s: float = TEMP_MAX_AGE_S,
    ) -> GcReport:
        """Delete entries not in ``keep``, then the least recently used down to ``max_bytes``.

        Temp files older than ``temp_max_age_s`` (left by crashed writers) go too. An entry
        written while this runs may be deleted if ``keep`` does not name it.

        Args:
            keep: Keys to keep; ``None``: keep every entry (only ``max_bytes`` evicts).
            max_bytes: Cap on the entries' total file bytes; ``None``: no cap.
            temp_max_age_s: Age, in seconds, past which a temp file is removed.

        Raises:
            ValueError: ``max_bytes`` or ``temp_max_age_s`` is negative.
        """
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        if temp_max_age_s < 0:
            raise ValueError(f"temp_max_age_s must be >= 0, got {temp_max_age_s}")
        found, temps = self._files.scan()
        kept = set(keep) if keep is not None else None
        doomed = [e for e in found if kept is not None and e.key not in kept]
        left = sorted((e for e in found if e not in doomed), key=lambda e: (e.last_used, e.key))
        total = sum(e.nbytes for e in left)
        for entry in left:  # least recently used first
            if max_bytes is None or total <= max_bytes:
                break
            doomed.append(entry)
            total -= entry.nbytes
        report = GcReport(temps_removed=self._files.clean_temps(temp_max_age_s, temps))
        for entry in doomed:
            if self.delete(entry.key):
                report.deleted.append(entry.key)
                report.freed_bytes += entry.nbytes
        report.kept_entries = len(found) - len(report.deleted)
        report.kept_bytes = sum(e.nbytes for e in found) - report.freed_bytes
        logger.info(
            "gc of %s: deleted %d entries (%d bytes), kept %d (%d bytes), removed %d temp files",
            self._url,
            len(report.deleted),
            report.freed_bytes,
            report.kept_entries,
            report.kept_bytes,
            report.temps_removed,
        )
        return report

    def stats(self) -> StoreStats:
        """A snapshot of the store's counters."""
        entries, used = self._memory.usage()
        with self._lock:
            return dataclasses.replace(
                self._stats, entries_in_memory=entries, memory_bytes_used=used
            )

    def _check_key(self, key: str) -> None:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"key must be a 64-character sha256 hex digest, got {key!r}")

    def _where(self, key: str) -> str:
        return f"KV cache {key} in {self._url}"

    def _from_storage(self, key: str, **expect: Any) -> DocumentKV:
        """Read the entry under ``key``, verify it, check it fits ``expect`` and load it.

        Raises:
            CacheMissError: It is absent (not counted as a miss here), or lacks an extra.
            CacheCorruptedError: It cannot be read, or fails a check.
            CacheMismatchError: See :func:`check_reader`.
        """
        where = self._where(key)
        try:
            blob = self._files.read(key)
        except FileNotFoundError as e:
            raise CacheMissError(f"no KV cache {key} in the store {self._url}") from e
        except OSError as e:
            raise CacheCorruptedError(f"{where}: cannot read its file ({e})") from e
        with self._lock:
            self._stats.bytes_read += len(blob)
        meta = read_meta(blob, key, where)
        check_reader(where, meta, **expect)
        t = read_tensors(blob, meta, where)
        extras = {name: t[name] for name in t if name not in ("keys", "values")}
        fp, prefix_len = meta["fingerprint"], meta["prefix_len"]
        return DocumentKV(meta["token_ids"], t["keys"], t["values"], fp, prefix_len, extras)

    def _stored(self, key: str, prefix_len: int, needs: Collection[str]) -> DocumentKV | None:
        """The entry under ``key``, if it reads back whole, fits and holds ``needs``."""
        try:
            return self._from_storage(key, prefix_len=prefix_len, extras=needs)
        except CacheMissError as e:
            logger.debug("put %s: %s", key, e)  # absent, or lacking an extra
        except (CacheCorruptedError, CacheMismatchError) as e:
            logger.warning("%s; rewriting it", e)
        return None
