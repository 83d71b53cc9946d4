"""Content-addressed, model-fingerprinted store of per-document KV caches.

An entry is two files under ``<root>/<key[:2]>/``: ``<key>.safetensors`` holds the tensors
(``keys``, ``values``, ``query_means``) and ``<key>.json`` the metadata, including the
sha256 of the exact tensor bytes. The JSON is written last, so its presence commits the
entry. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError
from samkv_integrations.records import FORMAT_VERSION, DocumentKV

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_TENSORS = ("keys", "values", "query_means")
_META_TYPES = dict(format=int, fingerprint=str, token_ids=list, prefix_len=int, tensors_sha256=str)


def cache_key(
    fingerprint: str, token_ids: Sequence[int], format_version: int = FORMAT_VERSION
) -> str:
    """The sha256 hex key over the length-prefixed fingerprint, format and int64 token ids.

    Raises:
        ValueError: If a token id or the format version is not a 64-bit integer.
    """
    fp = fingerprint.encode("utf-8")
    try:
        head = struct.pack("<q", len(fp)) + fp + struct.pack("<qq", format_version, len(token_ids))
        ids = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as e:
        raise ValueError(f"token_ids and format_version must be int64 values: {e}") from e
    return hashlib.sha256(b"samkv-kv\0" + head + ids).hexdigest()


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
        >>> doc = DocumentKV([1, 2, 3], kv, kv, torch.zeros(2, 4, 4), "my-model", prefix_len=5)
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
        """Store a document cache; an existing valid entry under its key is kept as is.

        Args:
            doc: The cache. Tensors may live on any device; they are saved from CPU.

        Returns:
            The entry's key, ``cache_key(doc.fingerprint, doc.token_ids)``.

        Raises:
            ValueError: If the tensor shapes do not match the record's contract.
        """
        key = cache_key(doc.fingerprint, doc.token_ids)
        shape = tuple(doc.keys.shape)
        if len(shape) != 4 or shape[2] != doc.n_tokens or tuple(doc.values.shape) != shape:
            raise ValueError(
                f"keys and values must be [layers, heads, {doc.n_tokens} tokens, head_dim], got "
                f"keys {shape} and values {tuple(doc.values.shape)}"
            )
        if torch.cuda.is_available() and any(getattr(doc, n).is_pinned() for n in _TENSORS):
            torch.cuda.synchronize()  # a non-blocking device-to-host copy may be in flight
        # Private copies: safetensors refuses tensors that share storage (keys and values
        # sliced from one buffer), and the memory tier must not alias the caller's tensors.
        t = {n: getattr(doc, n).detach().to("cpu", copy=True).contiguous() for n in _TENSORS}
        ids = [int(i) for i in doc.token_ids]
        kept = DocumentKV(
            ids, t["keys"], t["values"], t["query_means"], doc.fingerprint, doc.prefix_len
        )
        if self._valid_on_storage(key):
            logger.debug("put %s: already stored in %s", key, self._url)
        else:
            data = save_safetensors(t)
            meta = {
                "format": FORMAT_VERSION,
                "fingerprint": doc.fingerprint,
                "token_ids": kept.token_ids,
                "prefix_len": kept.prefix_len,
                "tensors_sha256": hashlib.sha256(data).hexdigest(),
                "nbytes": kept.nbytes,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
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
        device: torch.device | str | None = None,
    ) -> DocumentKV:
        """Load a document cache, checking it before returning it.

        Args:
            key: The entry's key.
            fingerprint: If given, the fingerprint of the model that will use the cache.
            token_ids: If given, the token ids the caller expects the cache to hold.
            device: If given, the tensors are returned on it, as fresh copies (from pinned
                host memory, asynchronously, when the memory tier holds the entry pinned).

        Returns:
            The cache, on CPU (pinned if ``pin_memory`` was set and CUDA is available).

        Raises:
            CacheMissError: No entry is stored under ``key``.
            CacheCorruptedError: The entry fails its checksum or cannot be parsed.
            CacheMismatchError: The entry was written by another model or format version,
                or holds other token ids than ``token_ids``.
        """
        self._check_key(key)
        with self._lock:
            cached = self._lru.get(key)
            if cached is not None:
                self._lru.move_to_end(key)
        if cached is not None:
            stored = {"fingerprint": cached.fingerprint, "token_ids": cached.token_ids}
            self._check_request(key, {"format": FORMAT_VERSION, **stored}, fingerprint, token_ids)
            with self._lock:
                self._stats.hits += 1
                self._stats.memory_hits += 1
            return self._output(cached, copy=True, device=device)
        try:
            meta = self._parse_meta(key, self._read(key, "json"))
            self._check_request(key, meta, fingerprint, token_ids)
            doc = self._parse_tensors(key, meta)
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
        return bool(self._fs.exists(self._path(key, "json")))

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

    def _read(self, key: str, suffix: str) -> bytes:
        """Read one file of an entry; CacheMissError (not counted) if it is absent."""
        try:
            if not self._local:
                return bytes(self._fs.cat_file(self._path(key, suffix)))
            with open(self._path(key, suffix), "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise CacheMissError(f"no KV cache {key} ({suffix}) in the store {self._url}") from e

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
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def _valid_on_storage(self, key: str) -> bool:
        """Whether a committed entry under ``key`` reads back whole; uncommit it if not."""
        try:
            self._parse_tensors(key, self._parse_meta(key, self._read(key, "json")))
            return True
        except CacheMissError:
            pass
        except CacheCorruptedError as e:
            logger.warning("%s; rewriting it", e)
        self._rm(self._path(key, "json"))
        return False

    def _parse_meta(self, key: str, raw: bytes) -> dict[str, Any]:
        where = f"KV cache {key} in {self._url}"
        try:
            meta = json.loads(raw)
            bad = [f for f, t in _META_TYPES.items() if not isinstance(meta.get(f), t)]
            if bad or not all(type(t) is int for t in meta["token_ids"]):
                raise TypeError(f"bad or missing fields {bad or ['token_ids']}")
            rehashed = cache_key(meta["fingerprint"], meta["token_ids"], meta["format"])
        except (ValueError, TypeError, AttributeError) as e:
            raise CacheCorruptedError(f"{where}: unreadable metadata JSON ({e})") from e
        if rehashed != key:
            raise CacheCorruptedError(f"{where}: its metadata does not hash back to the key")
        return meta

    @staticmethod
    def _check_request(
        key: str, stored: dict[str, Any], fingerprint: str | None, ids: Sequence[int] | None
    ) -> None:
        """Raise CacheMismatchError unless ``stored`` is usable as the caller asks."""
        if stored["format"] != FORMAT_VERSION:
            msg = f"has store format {stored['format']}, this version reads {FORMAT_VERSION}"
        elif fingerprint is not None and fingerprint != stored["fingerprint"]:
            fp = stored["fingerprint"]
            msg = f"was written by model {fp!r}, this engine runs model {fingerprint!r}"
        elif ids is not None and [int(t) for t in ids] != list(stored["token_ids"]):
            msg = f"holds other token ids ({len(stored['token_ids'])}) than asked ({len(ids)})"
        else:
            return
        raise CacheMismatchError(f"KV cache {key} {msg}")

    def _parse_tensors(self, key: str, meta: dict[str, Any]) -> DocumentKV:
        """Read an entry's tensors, check them against its metadata and load them."""
        data = self._read(key, "safetensors")
        with self._lock:
            self._stats.bytes_read += len(data)
        where = f"KV cache {key} in {self._url}"
        if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
            raise CacheCorruptedError(f"{where}: tensors checksum mismatch")
        try:
            t = load_safetensors(data)
            k, v, q = t["keys"], t["values"], t["query_means"]
        except Exception as e:  # safetensors raises its own error types
            raise CacheCorruptedError(f"{where}: unparsable safetensors ({e})") from e
        if k.dim() != 4 or k.shape[2] != len(meta["token_ids"]):
            raise CacheCorruptedError(f"{where}: keys shape does not match token_ids")
        return DocumentKV(meta["token_ids"], k, v, q, meta["fingerprint"], meta["prefix_len"])

    def _remember(self, key: str, doc: DocumentKV) -> None:
        if self._memory_bytes == 0 or doc.nbytes > self._memory_bytes:
            return
        if self._pin and torch.cuda.is_available() and not doc.keys.is_pinned():
            # Pinned once on entry: every later hit copies to the GPU at full PCIe speed.
            k, v, q = (t.pin_memory() for t in (doc.keys, doc.values, doc.query_means))
            doc = DocumentKV(doc.token_ids, k, v, q, doc.fingerprint, doc.prefix_len)
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
        tensors = (doc.keys, doc.values, doc.query_means)
        if device is not None and torch.device(device).type != "cpu":
            k, v, q = (t.to(device, non_blocking=t.is_pinned()) for t in tensors)
        else:
            pin = self._pin and torch.cuda.is_available()
            k, v, q = (t.pin_memory() if pin else t.clone() if copy else t for t in tensors)
        return DocumentKV(list(doc.token_ids), k, v, q, doc.fingerprint, doc.prefix_len)
