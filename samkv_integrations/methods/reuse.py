"""Naive reuse: concatenate the documents' cached KV and recompute nothing. The floor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samkv_integrations.methods.base import (
    BaseMethod,
    ContextCache,
    MethodInput,
    all_kept,
    concat_segments,
    full_positions,
)
from samkv_integrations.timing import Stopwatch


@dataclass
class ReuseMethod(BaseMethod):
    """Re-align each document's cached keys to its global offset and concatenate.

    No document attends to any other, so multi-hop questions lose the cross-document
    attention they need; this is the floor the other methods must beat. For a single
    document it equals full recompute.
    """

    name = "reuse"

    @torch.inference_mode()
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Concatenate re-aligned ``[n_layers, n_kv_heads, n, head_dim]`` caches behind the prefix."""
        with watch.phase("assemble"):
            segments = [
                (inputs.aligned_keys(i), doc.values) for i, doc in enumerate(inputs.documents)
            ]
            cache = concat_segments(inputs.model, inputs.prefix, segments)
        return ContextCache(
            cache=cache,
            positions=full_positions(inputs),
            next_position=inputs.context_end,
            kept_indices=all_kept(inputs),
            recomputed_tokens=0,
        )
