"""The stored layout of one document's KV cache: tensor names, metadata, version, key, checksum.

An entry is one safetensors file, a single blob that is written and renamed into place
whole, so that two writers of one key can never leave a mix of their parts; where it is
kept is :mod:`samkv_integrations.store`'s.

- Tensors: ``keys`` and ``values`` ``[n_layers, n_kv_heads, n_tokens, head_dim]`` (keys
  post-RoPE at local positions ``prefix_len ..``), plus one tensor per stored extra under
  the extra's name (see :data:`EXTRAS`).
- Metadata, JSON in the safetensors header's ``__metadata__`` under ``samkv``: ``format``
  (:data:`FORMAT_VERSION`), ``fingerprint`` (the model's), ``token_ids`` (the framed
  document), ``prefix_len`` (the shared prefix it was computed behind), ``extras``
  (``{name: version}`` of the stored extras), ``nbytes`` (tensor bytes), ``tensors_sha256``
  (of the tensors' header entries and the data: everything in the file but the metadata),
  ``checksum`` and ``created`` (informational).

``checksum`` is the sha256 of the canonical JSON of every other field but ``created``, so
it covers everything that changes an answer: token ids, prefix length, fingerprint, format
version, and through ``tensors_sha256`` every tensor with its dtype and shape. The key,
:func:`cache_key`, addresses an entry by fingerprint, format version and token ids; on read
those are hashed back to the key, the checksums are verified and the shapes checked against
each other and the token count. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError
from samkv_integrations.stored_extras import (
    EXTRAS,
    QUERY_WINDOW,
    DocumentPrefill,
    StoredExtra,
    declared_extras,
)

# The stored extras are re-exported: what an entry may hold is part of its format.
__all__ = [
    "EXTRAS",
    "FORMAT_VERSION",
    "KV_TENSORS",
    "META_FIELD",
    "QUERY_WINDOW",
    "DocumentPrefill",
    "StoredExtra",
    "cache_key",
    "check_entry",
    "check_reader",
    "declared_extras",
    "describe",
    "meta_checksum",
    "pack",
    "read_meta",
    "read_tensors",
]

#: Version of the stored layout, part of every key: bump it when what is stored, or how
#: K/V is computed, changes, so that old entries miss instead of misleading. An extra's
#: computation changing bumps that extra's own version instead (``StoredExtra.version``).
#: 1: K/V only. 2: adds SamKV's per-document mean query. 3: named, versioned extras and a
#: checksum over every field that changes an answer (``prefix_len`` included). 4: one file
#: per entry, the metadata in the safetensors header (3 kept it in a ``.json`` beside it).
FORMAT_VERSION = 4

#: The ``__metadata__`` field of the safetensors header that holds the entry's metadata.
META_FIELD = "samkv"

#: The tensors every entry holds, ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
KV_TENSORS = ("keys", "values")

_NOT_CHECKSUMMED = ("checksum", "created")


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


def _require_prefix_len(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"prefix_len must be an int >= 0, got {value!r}")


def check_entry(n_tokens: int, prefix_len: object, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check that an entry's tensors agree with each other and with the token count.

    Args:
        n_tokens: Number of document tokens.
        prefix_len: Length of the shared prefix it was computed behind.
        tensors: ``keys``, ``values`` and the extras, by name.

    Raises:
        ValueError: Naming the first field or tensor that does not fit.
    """
    _require_prefix_len(prefix_len)
    keys, values = tensors.get("keys"), tensors.get("values")
    if keys is None or values is None:
        raise ValueError(f"keys and values are required, got tensors {sorted(tensors)}")
    if keys.dim() != 4 or keys.shape[2] != n_tokens or not keys.is_floating_point():
        raise ValueError(
            f"keys must be float [n_layers, n_kv_heads, {n_tokens} tokens, head_dim], got "
            f"{keys.dtype} {tuple(keys.shape)}"
        )
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(
            f"values must be {keys.dtype} {tuple(keys.shape)} like keys, got "
            f"{values.dtype} {tuple(values.shape)}"
        )
    for name, tensor in tensors.items():
        if name in KV_TENSORS:
            continue
        if name not in EXTRAS:
            raise ValueError(f"extra {name!r} is not among the known extras {list(EXTRAS)}")
        problem = EXTRAS[name].check(tensor, keys.shape)
        if problem:
            raise ValueError(f"extra {name} {EXTRAS[name].shape} {problem}")


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """The ``checksum`` field: sha256 of the canonical JSON of the other fields but ``created``."""
    fields = {k: v for k, v in meta.items() if k not in _NOT_CHECKSUMMED}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def pack(
    fingerprint: str, token_ids: list[int], prefix_len: int, tensors: Mapping[str, torch.Tensor]
) -> tuple[bytes, dict[str, Any]]:
    """Serialize one entry into one safetensors file, its metadata in the header.

    Args:
        fingerprint: The model fingerprint.
        token_ids: The framed document's token ids.
        prefix_len: Length of the shared prefix it was computed behind.
        tensors: Contiguous CPU ``keys``, ``values`` and extras, by name.

    Returns:
        The file's bytes and the metadata it holds.

    Raises:
        ValueError: A field or tensor does not fit (see :func:`check_entry`).
    """
    check_entry(len(token_ids), prefix_len, tensors)
    plain = save_safetensors(dict(tensors))
    header, start = _header(plain, "a new entry")
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "token_ids": token_ids,
        "prefix_len": prefix_len,
        "extras": {n: EXTRAS[n].version for n in sorted(tensors) if n not in KV_TENSORS},
        "nbytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "tensors_sha256": _tensors_digest(header, plain, start),
    }
    meta["checksum"] = meta_checksum(meta)
    meta["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    header["__metadata__"] = {META_FIELD: json.dumps(meta)}
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)  # safetensors keeps the data 8-byte aligned
    return b"".join((struct.pack("<Q", len(raw)), raw, memoryview(plain)[start:])), meta


def _header(blob: bytes, where: str) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the offset its data starts at."""
    try:
        if len(blob) < 8:
            raise ValueError(f"{len(blob)} bytes is too short for a header")
        (size,) = struct.unpack_from("<Q", blob)
        if size > len(blob) - 8:
            raise ValueError(f"a header of {size} bytes in a file of {len(blob)}")
        header = json.loads(blob[8 : 8 + size])
        if not isinstance(header, dict):
            raise TypeError(f"a JSON object is required, got {type(header).__name__}")
    except (ValueError, TypeError) as e:
        raise CacheCorruptedError(f"{where}: unparsable safetensors header ({e})") from e
    return header, 8 + size


def _tensors_digest(header: Mapping[str, Any], blob: bytes, start: int) -> str:
    """sha256 of the tensors' header entries (canonical JSON) and the data after the header."""
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode())
    digest.update(memoryview(blob)[start:])
    return digest.hexdigest()


def read_meta(blob: bytes, key: str, where: str) -> dict[str, Any]:
    """Parse and verify the metadata of an entry's file.

    Args:
        blob: The entry's file.
        key: The key it was stored under.
        where: Names the entry in error messages.

    Raises:
        CacheCorruptedError: Unparsable, a field missing or out of range, not hashing
            back to ``key``, or failing its checksum; the message names the field.
        CacheMismatchError: Written in another format version (one before 4 left no
            metadata in the header).
    """
    stored = _header(blob, where)[0].get("__metadata__")
    raw = stored.get(META_FIELD) if isinstance(stored, dict) else None
    if not isinstance(raw, str):
        raise CacheMismatchError(
            f"{where} has no {META_FIELD} metadata in its header: store format 3 or older "
            f"(metadata in a .json beside it), this version reads {FORMAT_VERSION}"
        )
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON object is required, got {type(meta).__name__}")
        fmt, fp, ids = meta.get("format"), meta.get("fingerprint"), meta.get("token_ids")
        if type(fmt) is not int or not isinstance(fp, str):
            raise TypeError("format must be an int and fingerprint a string")
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise TypeError("token_ids must be a list of ints")
        rehashed = cache_key(fp, ids, fmt)
    except (ValueError, TypeError) as e:
        raise CacheCorruptedError(f"{where}: unreadable metadata JSON ({e})") from e
    if rehashed != key:
        raise CacheCorruptedError(f"{where}: its metadata does not hash back to the key")
    if fmt != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{where} has store format {fmt}, this version reads {FORMAT_VERSION}"
        )
    try:
        _require_prefix_len(meta.get("prefix_len"))
        for field in ("tensors_sha256", "checksum"):
            if not isinstance(meta.get(field), str):
                raise ValueError(f"{field} must be a string, got {meta.get(field)!r}")
        extras = meta.get("extras")
        if not isinstance(extras, dict) or not all(type(v) is int for v in extras.values()):
            raise ValueError(f"extras must map names to int versions, got {extras!r}")
    except ValueError as e:
        raise CacheCorruptedError(f"{where}: bad metadata field: {e}") from e
    if meta_checksum(meta) != meta["checksum"]:
        covered = ", ".join(k for k in meta if k not in _NOT_CHECKSUMMED)
        raise CacheCorruptedError(f"{where}: metadata checksum mismatch (covers {covered})")
    return meta


def read_tensors(blob: bytes, meta: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Verify and load an entry's tensors; extras unknown to, or stale for, this version drop.

    Args:
        blob: The entry's file.
        meta: Its verified metadata (:func:`read_meta`).
        where: Names the entry in error messages.

    Returns:
        ``keys``, ``values`` and the current extras, by name, on CPU.

    Raises:
        CacheCorruptedError: The tensors fail their checksum, cannot be parsed, are other
            tensors than the metadata lists, or a shape does not fit; the message names it.
    """
    header, start = _header(blob, where)
    if _tensors_digest(header, blob, start) != meta["tensors_sha256"]:
        raise CacheCorruptedError(f"{where}: tensors checksum mismatch (tensors_sha256)")
    try:
        tensors = load_safetensors(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CacheCorruptedError(f"{where}: unparsable safetensors ({e})") from e
    listed = {*KV_TENSORS, *meta["extras"]}
    if set(tensors) != listed:
        raise CacheCorruptedError(
            f"{where}: holds tensors {sorted(tensors)}, its metadata lists {sorted(listed)}"
        )
    for name, version in meta["extras"].items():
        if name not in EXTRAS or EXTRAS[name].version != version:
            del tensors[name]  # written by another version of this package: absent here
    try:
        check_entry(len(meta["token_ids"]), meta["prefix_len"], tensors)
    except ValueError as e:
        raise CacheCorruptedError(f"{where}: {e}") from e
    return tensors


def describe(
    fingerprint: str, token_ids: list[int], prefix_len: int, extras: Collection[str]
) -> dict[str, Any]:
    """The metadata fields :func:`check_reader` reads, for a cache already loaded."""
    current = {name: EXTRAS[name].version for name in extras if name in EXTRAS}
    return {
        "fingerprint": fingerprint,
        "token_ids": token_ids,
        "prefix_len": prefix_len,
        "extras": current,
    }


def check_reader(
    where: str,
    stored: Mapping[str, Any],
    *,
    fingerprint: str | None = None,
    token_ids: Sequence[int] | None = None,
    prefix_len: int | None = None,
    extras: Collection[str] = (),
) -> None:
    """Raise unless an entry is usable by a reader with these expectations.

    Args:
        where: Names the entry in error messages.
        stored: The entry's verified metadata (:func:`read_meta`, or :func:`describe`).
        fingerprint: The reader's model fingerprint; None: not checked.
        token_ids: The token ids the reader expects; None: not checked.
        prefix_len: The reader's shared prefix length; None: not checked.
        extras: Names of the stored extras the reader needs.

    Raises:
        CacheMismatchError: Another model's entry, or one of other token ids.
        CacheCorruptedError: Another ``prefix_len``: the fingerprint binds the prefix, so
            such an entry is inconsistent (its keys sit at other positions).
        CacheMissError: A needed extra is absent or of another version: like a missing
            cache, it is to be encoded again.
    """
    if fingerprint is not None and fingerprint != stored["fingerprint"]:
        raise CacheMismatchError(
            f"{where} was written by model {stored['fingerprint']!r}, this engine runs model "
            f"{fingerprint!r}"
        )
    ids = stored["token_ids"]
    if token_ids is not None and [int(t) for t in token_ids] != list(ids):
        raise CacheMismatchError(
            f"{where} holds other token ids ({len(ids)}) than asked ({len(token_ids)})"
        )
    if prefix_len is not None and stored["prefix_len"] != prefix_len:
        raise CacheCorruptedError(
            f"{where} has prefix_len {stored['prefix_len']}, the reader's prompt prefix is "
            f"{prefix_len} tokens"
        )
    have = stored["extras"]
    missing = [n for n in extras if n not in EXTRAS or have.get(n) != EXTRAS[n].version]
    if missing:
        raise CacheMissError(f"{where} lacks the stored extras {missing} (holds {sorted(have)})")
