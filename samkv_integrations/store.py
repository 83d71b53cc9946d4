"""Where and how per-document KV caches are kept: fsspec storage, a memory tier, atomic writes.

An entry is two files under ``<root>/<key[:2]>/``: ``<key>.safetensors`` holds the tensors
and ``<key>.json`` the metadata. What they hold, how the key is derived and how an entry is
verified is :mod:`samkv_integrations.cache_format`'s. The JSON is written last, so its
presence commits the entry. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

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
from samkv_integrations.records import DocumentKV

__all__ = ["FORMAT_VERSION", "KVCacheStore", "StoreStats", "cache_key"]

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(slots=True)
class StoreStats:
    """Counters of one :class:`KVCacheStore` since it was opened.

    Attributes:
        hits: Successful ``get`` calls (memory hits included).
        misses: ``get`` calls that raised :class:`CacheMissError`.
        bytes_read: Tensor file bytes read.
        bytes_written: Tensor file bytes written.
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


class KVCacheStore:
    """Store of :class:`DocumentKV` records keyed by model, format version and token ids.

    Args:
        url: A local directory (created if missing) or any fsspec URL (``memory://x``,
            ``s3://bucket/prefix``, ``file:///path``).
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
        text = os.fspath(url)
        if "://" in text:
            self._fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
        else:
            self._fs, root = LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
        self._local = isinstance(self._fs, LocalFileSystem)
        self._root: str = root.rstrip("/") or root
        self._url = self._root if self._local else self._fs.unstrip_protocol(self._root)
        try:
            self._fs.makedirs(self._root, exist_ok=True)
            if self._local and not os.access(self._root, os.W_OK | os.X_OK):
                raise PermissionError("the directory is not writable")
        except OSError as e:
            raise ValueError(f"cannot create the KV cache store at {self._url}: {e}") from e
        self._memory_bytes = memory_bytes
        self._pin = pin_memory
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, DocumentKV] = OrderedDict()
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
            data, meta = pack(kept.fingerprint, kept.token_ids, kept.prefix_len, tensors)
            self._fs.makedirs(f"{self._root}/{key[:2]}", exist_ok=True)
            self._write_atomic(self._path(key, "safetensors"), data)
            self._write_atomic(self._path(key, "json"), json.dumps(meta).encode("utf-8"))
            with self._lock:
                self._stats.bytes_written += len(data)
            logger.debug("put %s: wrote %d tensor bytes to %s", key, len(data), self._url)
        self._remember(key, kept)
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
        with self._lock:
            cached = self._lru.get(key)
            if cached is not None:
                self._lru.move_to_end(key)

        def check(stored: dict[str, Any]) -> None:
            check_reader(
                self._where(key),
                stored,
                fingerprint=fingerprint,
                token_ids=token_ids,
                prefix_len=prefix_len,
                extras=extras,
            )

        try:
            if cached is not None:
                check(
                    describe(cached.fingerprint, cached.token_ids, cached.prefix_len, cached.extras)
                )
                with self._lock:
                    self._stats.hits += 1
                    self._stats.memory_hits += 1
                return self._output(cached, copy=True, device=device)
            meta = read_meta(self._read(key, "json"), key, self._where(key))
            check(meta)
            doc = self._load(key, meta)
        except CacheMissError:
            with self._lock:
                self._stats.misses += 1
            raise
        with self._lock:
            self._stats.hits += 1
        self._remember(key, doc)
        return self._output(doc, copy=0 < doc.nbytes <= self._memory_bytes, device=device)

    def contains(self, key: str) -> bool:
        """Whether an entry is committed under ``key`` (or held in memory)."""
        self._check_key(key)
        with self._lock:
            if key in self._lru:
                return True
        return bool(self._fs.isfile(self._path(key, "json")))

    def delete(self, key: str) -> bool:
        """Remove an entry from storage and memory.

        Returns:
            True if anything was deleted.
        """
        self._check_key(key)
        with self._lock:
            doc = self._lru.pop(key, None)
            if doc is not None:
                self._stats.memory_bytes_used -= doc.nbytes
                self._stats.entries_in_memory -= 1
        removed = [self._rm(self._path(key, s)) for s in ("json", "safetensors")]  # JSON first
        return doc is not None or any(removed)

    def stats(self) -> StoreStats:
        """A snapshot of the store's counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def _check_key(self, key: str) -> None:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"key must be a 64-character sha256 hex digest, got {key!r}")

    def _path(self, key: str, suffix: str) -> str:
        return f"{self._root}/{key[:2]}/{key}.{suffix}"

    def _where(self, key: str) -> str:
        return f"KV cache {key} in {self._url}"

    def _read(self, key: str, suffix: str) -> bytes:
        """Read one file of an entry.

        Raises:
            CacheMissError: It is absent (not counted as a miss here).
            CacheCorruptedError: It cannot be read (a permission error, a directory).
        """
        try:
            if not self._local:
                return bytes(self._fs.cat_file(self._path(key, suffix)))
            with open(self._path(key, suffix), "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise CacheMissError(f"no KV cache {key} ({suffix}) in the store {self._url}") from e
        except OSError as e:
            raise CacheCorruptedError(f"{self._where(key)}: cannot read its {suffix} ({e})") from e

    def _write_atomic(self, path: str, data: bytes) -> None:
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            if self._local:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self._fs.pipe_file(tmp, data)
                self._fs.mv(tmp, path)
        except BaseException:
            self._rm(tmp)
            raise

    def _rm(self, path: str) -> bool:
        """Remove one file; False if absent or if it cannot be removed (logged)."""
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            logger.warning("cannot remove %s from the KV cache store: %s", path, e)
            return False
        return True

    def _stored(self, key: str, prefix_len: int, needs: Collection[str]) -> DocumentKV | None:
        """The committed entry under ``key``, if it reads back whole, fits and holds ``needs``.

        Otherwise the entry, about to be rewritten, is uncommitted.
        """
        try:
            meta = read_meta(self._read(key, "json"), key, self._where(key))
            check_reader(self._where(key), meta, prefix_len=prefix_len, extras=needs)
            return self._load(key, meta)
        except CacheMissError as e:
            logger.debug("put %s: %s", key, e)  # absent, or lacking an extra
        except (CacheCorruptedError, CacheMismatchError) as e:
            logger.warning("%s; rewriting it", e)
        self._rm(self._path(key, "json"))
        return None

    def _load(self, key: str, meta: dict[str, Any]) -> DocumentKV:
        """Read an entry's tensors, verify them against its metadata and load them."""
        data = self._read(key, "safetensors")
        with self._lock:
            self._stats.bytes_read += len(data)
        t = read_tensors(data, meta, self._where(key))
        extras = {name: t[name] for name in t if name not in ("keys", "values")}
        fp, prefix_len = meta["fingerprint"], meta["prefix_len"]
        return DocumentKV(meta["token_ids"], t["keys"], t["values"], fp, prefix_len, extras)

    def _remember(self, key: str, doc: DocumentKV) -> None:
        if self._memory_bytes == 0 or doc.nbytes > self._memory_bytes:
            return
        if self._pin and torch.cuda.is_available() and not doc.keys.is_pinned():
            # Pinned once on entry: every later hit copies to the GPU at full PCIe speed.
            doc = doc.map_tensors(torch.Tensor.pin_memory)
        with self._lock:
            old = self._lru.pop(key, None)
            used = self._stats.memory_bytes_used + doc.nbytes - (old.nbytes if old else 0)
            self._lru[key] = doc
            while used > self._memory_bytes:
                used -= self._lru.popitem(last=False)[1].nbytes
            self._stats.memory_bytes_used, self._stats.entries_in_memory = used, len(self._lru)

    def _output(
        self, doc: DocumentKV, *, copy: bool, device: torch.device | str | None = None
    ) -> DocumentKV:
        """Tensors for the caller: copies when the memory tier holds the originals."""
        if device is not None and torch.device(device).type != "cpu":
            return doc.map_tensors(lambda t: t.to(device, non_blocking=t.is_pinned()))
        if self._pin and torch.cuda.is_available():
            return doc.map_tensors(torch.Tensor.pin_memory)
        return doc.map_tensors(torch.Tensor.clone if copy else lambda t: t)
