"""Stored extras: per-document tensors kept beside K/V because a method reads them at query time.

Methods name the extras they read in ``BaseMethod.stored_extras``; indexing computes those
the registered methods declare from each document's prefill, and
:mod:`samkv_integrations.cache_format` stores and checks them, each under its own version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

#: How many of a document's last tokens the ``query_means`` extra averages over.
QUERY_WINDOW = 8


@dataclass(frozen=True, slots=True)
class DocumentPrefill:
    """One document's indexing prefill, which stored extras are computed from.

    Attributes:
        keys: ``[n_layers, n_kv_heads, n_tokens, head_dim]``, post-RoPE.
        values: ``[n_layers, n_kv_heads, n_tokens, head_dim]``.
        queries: Per layer ``[n, n_q_heads, head_dim]``, the pre-RoPE ``q_proj`` output of
            the document's last ``n`` tokens: at least its last ``QUERY_WINDOW`` (all of
            them if fewer), the only queries an extra reads (indexing keeps no more).
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
    means = [q[-QUERY_WINDOW:].float().mean(0) for q in prefill.queries]
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
