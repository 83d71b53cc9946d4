"""The one interface every method implements, and the helpers methods share.

A method gets the shared prefix, the documents' cached KV (at their local positions) and
the question, and builds the context cache that the question prefill and decoding start
from. The engine calls ``method(inputs)`` and never asks which method it runs: anything
that differs between methods is a class attribute here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.encode import PrefixKV
from samkv_integrations.records import DocumentKV
from samkv_integrations.rope import shift_keys
from samkv_integrations.timing import Stopwatch


@dataclass(slots=True)
class MethodInput:
    """What a method builds the context cache from.

    Attributes:
        model: The model.
        prefix: The shared prefix cache (global positions ``0 .. prefix.length - 1``).
        documents: The documents' caches, on the model's device, in prompt order. Keys are
            post-RoPE at local positions ``prefix_len ..``.
        question_ids: Token ids of the question suffix (with the generation prompt).
    """

    model: PreTrainedModel
    prefix: PrefixKV
    documents: list[DocumentKV]
    question_ids: list[int]

    @property
    def doc_starts(self) -> list[int]:
        """Global position of each document's first token in the assembled layout."""
        starts, position = [], self.prefix.length
        for doc in self.documents:
            starts.append(position)
            position += doc.n_tokens
        return starts

    @property
    def context_end(self) -> int:
        """Global position right after the last document: where the question starts."""
        return self.prefix.length + sum(doc.n_tokens for doc in self.documents)

    def aligned_keys(self, index: int) -> torch.Tensor:
        """Document ``index``'s keys ``[n_layers, n_kv_heads, n, head_dim]`` at global positions."""
        doc = self.documents[index]
        return shift_keys(self.model, doc.keys, self.doc_starts[index] - doc.prefix_len)


@dataclass(slots=True)
class ContextCache:
    """The cache decoding starts from, before the question is prefilled.

    Attributes:
        cache: Prefix plus the kept document tokens, compacted, in global order.
        positions: ``[cache_len]`` global position of each cache entry (gaps allowed).
        next_position: Global position of the first question token.
        kept_indices: Per document, the local indices of its tokens in the cache.
        recomputed_tokens: Document tokens whose KV was recomputed.
        seconds: Seconds per phase the method spent (``select``, ``recompute``, ...).
        details: Method-specific facts for display (e.g. SamKV's anchor indices).
    """

    cache: DynamicCache
    positions: torch.Tensor
    next_position: int
    kept_indices: list[torch.Tensor]
    recomputed_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


def cache_from_layers(
    model: PreTrainedModel, keys: list[torch.Tensor], values: list[torch.Tensor]
) -> DynamicCache:
    """Build a ``DynamicCache`` from per-layer ``[n_kv_heads, n, head_dim]`` tensors."""
    return DynamicCache(
        ddp_cache_data=[(k[None], v[None]) for k, v in zip(keys, values, strict=True)],
        config=model.config,
    )


def concat_segments(
    model: PreTrainedModel, prefix: PrefixKV, segments: list[tuple[torch.Tensor, torch.Tensor]]
) -> DynamicCache:
    """Prefix cache followed by document segments, each ``[n_layers, n_kv_heads, n, head_dim]``."""
    n_layers = len(prefix.keys)
    keys = [
        torch.cat([prefix.keys[i][0], *(k[i] for k, _ in segments)], dim=-2)
        for i in range(n_layers)
    ]
    values = [
        torch.cat([prefix.values[i][0], *(v[i] for _, v in segments)], dim=-2)
        for i in range(n_layers)
    ]
    return cache_from_layers(model, keys, values)


@dataclass
class BaseMethod(ABC):
    """A way of building the decode cache from independently cached documents.

    Subclasses are dataclasses whose fields are the method's hyperparameters, validated
    in ``__post_init__`` with a ``ValueError`` naming the field.
    """

    #: The name the engine, CLI and adapters know the method by.
    name: ClassVar[str]
    #: Whether the method reads the documents' stored KV at all (``full`` re-prompts text).
    reads_cache: ClassVar[bool] = True

    def __call__(self, inputs: MethodInput) -> ContextCache:
        """Build the context cache, timing the method's own phases."""
        watch = Stopwatch(inputs.model.device)
        result = self.build(inputs, watch)
        result.seconds = {**watch.seconds, **result.seconds}
        return result

    @abstractmethod
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Build the context cache.

        Args:
            inputs: Prefix, documents (``keys``/``values`` ``[n_layers, n_kv_heads, n, head_dim]``
                at local positions) and question ids.
            watch: Time phases with ``with watch.phase("select"): ...``.

        Returns:
            The compacted cache at global positions and what was kept and recomputed.
        """


def all_kept(inputs: MethodInput) -> list[torch.Tensor]:
    """Every document token, as per-document local indices."""
    device = inputs.model.device
    return [torch.arange(doc.n_tokens, device=device) for doc in inputs.documents]


def full_positions(inputs: MethodInput) -> torch.Tensor:
    """Global positions of a cache holding the prefix and every document token."""
    return torch.arange(inputs.context_end, device=inputs.model.device)
