"""The stored layout of one document's KV cache: tensor names, metadata, version, key, checksum.

An entry is two blobs; :mod:`samkv_integrations.store` decides where and how they are kept.

- Tensors, safetensors: ``keys`` and ``values`` ``[n_layers, n_kv_heads, n_tokens, head_dim]``
  (keys post-RoPE at local positions ``prefix_len ..``), plus one tensor per stored extra
  under the extra's name (see :data:`EXTRAS`).
- Metadata, JSON: ``format`` (:data:`FORMAT_VERSION`), ``fingerprint`` (the model's),
  ``token_ids`` (the framed document), ``prefix_len`` (the shared prefix it was computed
  behind), ``extras`` (``{name: version}`` of the stored extras), ``nbytes`` (tensor bytes),
  ``tensors_sha256`` (of the tensors blob), ``checksum`` and ``created`` (informational).

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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError

#: Version of the stored layout, part of every key: bump it when what is stored, or how
#: K/V is computed, changes, so that old entries miss instead of misleading. An extra's
#: computation changing bumps that extra's own version instead (:class:`StoredExtra`).
#: 1: K/V only. 2: adds SamKV's per-document mean query. 3: named, versioned extras and a
#: checksum over every field that changes an answer (``prefix_len`` included).
FORMAT_VERSION = 3

#: The tensors every entry holds, ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
KV_TENSORS = ("keys", "values")

#: How many of a document's last tokens the ``query_means`` extra averages over.
QUERY_WINDOW = 8

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


@dataclass(frozen=True, slots=True)
class DocumentPrefill:
    """One document's indexing prefill, which stored extras are computed from.

    Attributes:
        keys: ``[n_layers, n_kv_heads, n_tokens, head_dim]``, post-RoPE.
        values: ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
        queries: Per layer ``[n_tokens, n_q_heads, head_dim]``, the pre-RoPE ``q_proj`` output.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: Sequence[torch.Tensor]


@dataclass(frozen=True, slots=True)
class StoredExtra:
    """A per-document tensor stored beside K/V because a method reads it at query time.

    Methods name the extras they read in ``BaseMethod.stored_extras``; indexing computes
    those the registered methods declare, and a cache lacking one counts as missing.

    Attributes:
        version: Bumped when ``compute`` changes; a stored tensor of another version is
            dropped on read, so the cache counts as lacking it.
        shape: The tensor's shape, in words.
        compute: Computes it from the document's prefill.
        check: What is wrong with a stored tensor, given the shape of ``keys``; None if
            nothing.
    """

    version: int
    shape: str
    compute: Callable[[DocumentPrefill], torch.Tensor]
    check: Callable[[torch.Tensor, torch.Size], str | None]


def _query_means(prefill: DocumentPrefill) -> torch.Tensor:
    n = prefill.keys.shape[2]
    window = slice(max(0, n - QUERY_WINDOW), n)
    means = [q[window].float().mean(0) for q in prefill.queries]
    return torch.stack(means).to(prefill.keys.dtype)


def _check_query_means(tensor: torch.Tensor, keys: torch.Size) -> str | None:
    n_layers, n_kv_heads, _, head_dim = keys
    shape = tuple(tensor.shape)
    fits = len(shape) == 3 and shape[0] == n_layers and shape[2] == head_dim
    if fits and shape[1] and shape[1] % n_kv_heads == 0 and tensor.is_floating_point():
        return None
    return (
        f"must be float [{n_layers} layers, n_q_heads (a multiple of {n_kv_heads}), "
        f"{head_dim} head_dim], got {tensor.dtype} {shape}"
    )


#: Every extra a method may declare, by name (the tensor's name in the stored entry).
EXTRAS: dict[str, StoredExtra] = {
    # SamKV's Qj: the mean pre-RoPE query of the document's last QUERY_WINDOW tokens.
    "query_means": StoredExtra(
        version=1,
        shape="[n_layers, n_q_heads, head_dim]",
        compute=_query_means,
        check=_check_query_means,
    ),
}


def declared_extras(declarations: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """The sorted union of declared extra names (e.g. each method's ``stored_extras``).

    Raises:
        ValueError: A declared name is not in :data:`EXTRAS`.
    """
    names = sorted({name for declared in declarations for name in declared})
    unknown = [name for name in names if name not in EXTRAS]
    if unknown:
        raise ValueError(f"stored_extras {unknown} are not among the known extras {list(EXTRAS)}")
    return tuple(names)


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
    """Serialize one entry.

    Args:
        fingerprint: The model fingerprint.
        token_ids: The framed document's token ids.
        prefix_len: Length of the shared prefix it was computed behind.
        tensors: Contiguous CPU ``keys``, ``values`` and extras, by name.

    Returns:
        The tensors blob and the metadata (JSON-ready).

    Raises:
        ValueError: A field or tensor does not fit (see :func:`check_entry`).
    """
    check_entry(len(token_ids), prefix_len, tensors)
    data = save_safetensors(dict(tensors))
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "token_ids": token_ids,
        "prefix_len": prefix_len,
        "extras": {n: EXTRAS[n].version for n in sorted(tensors) if n not in KV_TENSORS},
        "nbytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    meta["checksum"] = meta_checksum(meta)
    meta["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    return data, meta


def read_meta(raw: bytes, key: str, where: str) -> dict[str, Any]:
    """Parse and verify an entry's metadata.

    Args:
        raw: The metadata blob.
        key: The key it was stored under.
        where: Names the entry in error messages.

    Raises:
        CacheCorruptedError: Unparsable, a field missing or out of range, not hashing
            back to ``key``, or failing its checksum; the message names the field.
        CacheMismatchError: Written in another format version.
    """
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


def read_tensors(data: bytes, meta: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Verify and load an entry's tensors; extras unknown to, or stale for, this version drop.

    Args:
        data: The tensors blob.
        meta: Its verified metadata (:func:`read_meta`).
        where: Names the entry in error messages.

    Returns:
        ``keys``, ``values`` and the current extras, by name, on CPU.

    Raises:
        CacheCorruptedError: The blob fails its checksum, cannot be parsed, holds other
            tensors than the metadata lists, or a shape does not fit; the message names it.
    """
    if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise CacheCorruptedError(f"{where}: tensors checksum mismatch (tensors_sha256)")
    try:
        tensors = load_safetensors(data)
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
