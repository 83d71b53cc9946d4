"""The documents' reused KV re-aligned to global positions, for a method to read or assemble.

Each document's cache holds keys rotated at its local positions behind the prefix; in the
assembled prompt the document starts elsewhere, so its keys are rotated by the difference
(``token_shifts``). ``gather_aligned`` takes chosen tokens' KV so re-aligned, for a method
to blend or score; ``aligned_cache`` assembles them behind the prefix as a cache whose
deeper layers are built only when a forward reaches them, for a pass that reads them once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from samkv_integrations.encode import PrefixKV
from samkv_integrations.host_values import on_device
from samkv_integrations.layer_arrival import LayerArrival
from samkv_integrations.methods.recompute import RecomputeCache, RecomputeLayer
from samkv_integrations.records import DocumentKV
from samkv_integrations.rope import rotate, rotation, shift_keys


class DeferredLayer(RecomputeLayer):
    """A ``RecomputeLayer`` whose K/V are built by ``build()`` when first needed.

    A forward needs a layer's entries only when it reaches that layer (``update``), so the
    building of the deeper layers can wait for what they read, such as K/V still loading.
    """

    def __init__(self, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self._build: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = build

    def materialize(self) -> None:
        """Build the entries now, if they are not yet."""
        if self._build is not None:
            self.hold(*self._build())
            self._build = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the entries, then update as a ``RecomputeLayer``."""
        self.materialize()
        return super().update(key_states, value_states, *args, **kwargs)


def token_shifts(
    model: PreTrainedModel, documents: list[DocumentKV], doc_starts: list[int], counts: list[int]
) -> torch.Tensor:
    """``[sum counts]`` shifts from cached to global positions (``counts`` tokens per document)."""
    shifts = [start - d.prefix_len for start, d in zip(doc_starts, documents, strict=True)]
    return on_device(shifts, model.device, torch.long).repeat_interleave(
        on_device(counts, model.device, torch.long), output_size=sum(counts)
    )


def gather_aligned(
    model: PreTrainedModel,
    documents: list[DocumentKV],
    doc_starts: list[int],
    local: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reused KV of chosen tokens, keys moved to their global positions.

    Args:
        model: The model (its rotary module re-aligns the keys).
        documents: The documents' caches.
        doc_starts: Global position of each document's first token.
        local: Per document, ``[k_i]`` local indices of the chosen tokens.

    Returns:
        Keys and values ``[n_layers, n_kv_heads, sum k_i, head_dim]``, in document order.
    """
    delta = token_shifts(model, documents, doc_starts, [len(i) for i in local])
    keys = torch.cat([doc.keys[:, :, i] for doc, i in zip(documents, local, strict=True)], dim=2)
    values = torch.cat(
        [doc.values[:, :, i] for doc, i in zip(documents, local, strict=True)], dim=2
    )
    return shift_keys(model, keys, delta), values


def aligned_cache(
    model: PreTrainedModel,
    prefix: PrefixKV,
    documents: list[DocumentKV],
    doc_starts: list[int],
    local: list[torch.Tensor] | None,
    n_layers: int,
    arrival: LayerArrival | None = None,
) -> RecomputeCache:
    """The prefix, then chosen tokens' reused KV at global positions, for the first ``n_layers``.

    The entries of ``assemble_cache(prefix, [gather_aligned(...)])``, each layer built when
    a forward first reaches it (``DeferredLayer``; the first at once, since the attention
    mask is sized by it): each entry is copied once, the float32 scratch of the rotation is
    one layer's rather than the whole context's (gigabytes on an 8B model's 16k-token
    context), a pass that stops early builds no deeper layer, and with ``arrival`` a layer
    waits only for its own documents' K/V to reach the device.

    Args:
        model: The model (its rotary module re-aligns the keys).
        prefix: The shared prefix.
        documents: The documents' caches.
        doc_starts: Global position of each document's first token.
        local: Per document, ``[k_i]`` local indices of the chosen tokens; ``None``: all.
        n_layers: Layers to build (a pass that stops early needs no more).
        arrival: When each layer of the documents' K/V is on the device; ``None``: now.
    """
    counts = [d.n_tokens for d in documents] if local is None else [len(i) for i in local]
    cos, sin = rotation(model, token_shifts(model, documents, doc_starts, counts))
    chosen: list[torch.Tensor | slice] = (
        [slice(None)] * len(documents) if local is None else [*local]
    )
    picks = list(zip(documents, chosen, strict=True))

    def build(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if arrival is not None:
            arrival.wait(layer + 1)
        k = torch.cat([prefix.keys[layer][:1]] + [d.keys[layer][None, :, i] for d, i in picks], -2)
        k[:, :, prefix.length :] = rotate(k[:, :, prefix.length :], cos, sin)
        v = torch.cat(
            [prefix.values[layer][:1]] + [d.values[layer][None, :, i] for d, i in picks], -2
        )
        return k, v

    first = RecomputeLayer(*build(0))
    later = [DeferredLayer(functools.partial(build, layer)) for layer in range(1, n_layers)]
    return RecomputeCache.of_layers([first, *later])
