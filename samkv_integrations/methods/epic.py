"""EPIC (LegoLink): recompute the first k tokens of every document, keep every reused KV."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samkv_integrations.methods.base import (
    BaseMethod,
    ContextCache,
    MethodInput,
    all_kept,
    full_positions,
)
from samkv_integrations.methods.option_checks import check_ints
from samkv_integrations.methods.recompute import assemble_cache, embed, recompute
from samkv_integrations.timing import Stopwatch


@dataclass
class EpicMethod(BaseMethod):
    """Position-independent caching with static sparse recompute (Hu et al., 2024).

    Paper: https://arxiv.org/abs/2410.15332 (the "LegoLink" recompute scheme).

    Every document's reused KV is kept (re-aligned to its global offset). The first ``k``
    tokens of every document, which were computed as the start of a sequence and act as
    spurious attention sinks, are recomputed at every layer: each attends causally in
    global positions over the prefix, every earlier document (reused KV, with those
    documents' own first tokens already updated at that layer) and its own document's
    earlier tokens, and its KV is overwritten. The question is prefilled afterwards on the
    final cache. Cost grows as ``k × n_documents``, not with the context length.

    Attributes:
        k: Tokens recomputed at the start of each document (a document shorter than ``k``
            is recomputed whole).
    """

    name = "epic"

    k: int = 16

    def __post_init__(self) -> None:
        check_ints(self, {"k": 1})

    @torch.inference_mode()
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Recompute the first ``k`` tokens of each ``[n_layers, n_kv_heads, n, head_dim]`` cache.

        The cache keeps every entry (``[1, n_kv_heads, prefix_len + n_context, head_dim]`` per
        layer); ``details["recomputed_indices"]`` lists each document's recomputed local indices.
        """
        model = inputs.model
        with watch.phase("assemble"):
            segments = [
                (inputs.aligned_keys(i), doc.values) for i, doc in enumerate(inputs.documents)
            ]
            cache = assemble_cache(inputs.prefix, segments)
            positions = full_positions(inputs)
        heads = [min(self.k, doc.n_tokens) for doc in inputs.documents]
        with watch.phase("select"):
            index = torch.tensor(
                [
                    start + i
                    for start, n in zip(inputs.doc_starts, heads, strict=True)
                    for i in range(n)
                ],
                dtype=torch.long,
                device=model.device,
            )
            ids = torch.tensor(
                [
                    t
                    for doc, n in zip(inputs.documents, heads, strict=True)
                    for t in doc.token_ids[:n]
                ],
                dtype=torch.long,
                device=model.device,
            )
        with watch.phase("recompute"):
            recompute(model, cache, positions, embed(model, ids), index)
        return ContextCache(
            cache=cache,
            positions=positions,
            next_position=inputs.context_end,
            kept_indices=all_kept(inputs),
            recomputed_tokens=sum(heads),
            details={"recomputed_indices": [list(range(n)) for n in heads]},
        )
