"""CacheBlend: recompute the tokens whose KV deviates most, keep every reused KV."""

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
from samkv_integrations.methods.option_checks import check_fractions
from samkv_integrations.methods.recompute import (
    assemble_cache,
    embed,
    fresh_values,
    recompute,
    split_by_document,
)
from samkv_integrations.timing import Stopwatch


@dataclass
class CacheBlendMethod(BaseMethod):
    """Selective KV recompute by value deviation at a check layer (Yao et al., EuroSys 2025).

    Paper: https://arxiv.org/abs/2405.16444 (reference code ``YaoJiayi/CacheBlend``).

    Every document's reused KV is kept (re-aligned to its global offset). Layers
    ``0 .. check_layer - 1`` are run fresh for all context tokens, which is what gives
    fresh hidden states at the check layer; their fresh KV replaces the reused KV in those
    layers, since it is computed anyway. At the check layer the fresh values of all context
    tokens are compared with the reused ones, ``sum((V_new - V_old) ** 2)`` per token, and
    the ``recompute_ratio`` most-deviating tokens are recomputed from the check layer to the
    last, overwriting their KV; every other token keeps its reused KV from the check layer
    on. Selected tokens attend causally in global positions over all earlier tokens,
    reused or updated. The question is prefilled afterwards on the final cache, which
    equals recomputing it alongside (context tokens never attend to it).

    ``recomputed_tokens`` counts the selected tokens; the full pass over the first
    ``check_layer`` layers is this method's fixed overhead on top (1/n_layers of a full
    prefill with the default ``check_layer=1``). All KV is kept: kept fraction 1.0.

    Attributes:
        recompute_ratio: Fraction of context tokens recomputed past the check layer, in (0, 1].
        check_layer: The layer whose value deviation picks the tokens (>= 0).
    """

    name = "cacheblend"

    recompute_ratio: float = 0.15
    check_layer: int = 1

    def __post_init__(self) -> None:
        check_fractions(self, {"recompute_ratio": False})
        if isinstance(self.check_layer, bool) or not isinstance(self.check_layer, int):
            raise ValueError(f"check_layer must be an int, got {self.check_layer!r}")
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")

    @torch.inference_mode()
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Blend re-aligned ``[n_layers, n_kv_heads, n, head_dim]`` caches with selective recompute.

        The cache keeps every entry (``[1, n_kv_heads, prefix_len + n_context, head_dim]`` per
        layer); ``details["recomputed_indices"]`` lists each document's selected local indices.
        """
        model = inputs.model
        n_layers = len(model.get_decoder().layers)
        if self.check_layer >= n_layers:
            raise ValueError(f"check_layer {self.check_layer} >= the model's {n_layers} layers")
        prefix_len = inputs.prefix.length
        lengths = [doc.n_tokens for doc in inputs.documents]
        n_context = sum(lengths)
        with watch.phase("assemble"):
            segments = [
                (inputs.aligned_keys(i), doc.values) for i, doc in enumerate(inputs.documents)
            ]
            cache = assemble_cache(inputs.prefix, segments)
            positions = full_positions(inputs)
        selected = torch.empty(0, dtype=torch.long, device=model.device)
        if n_context:
            with watch.phase("select"):
                ids = [token for doc in inputs.documents for token in doc.token_ids]
                context = torch.arange(prefix_len, inputs.context_end, device=model.device)
                hidden = recompute(
                    model,
                    cache,
                    positions,
                    embed(model, torch.tensor(ids, device=model.device)),
                    context,
                    stop_layer=self.check_layer,
                )
                old = cache.recompute_layers[self.check_layer].values[0, :, prefix_len:]
                new = fresh_values(model, self.check_layer, hidden)
                deviation = (new.float() - old.float()).square().sum(dim=(0, 2))
                n_selected = max(1, round(self.recompute_ratio * n_context))
                selected = deviation.topk(n_selected).indices.sort().values
            with watch.phase("recompute"):
                recompute(
                    model,
                    cache,
                    positions,
                    hidden[:, selected],
                    context[selected],
                    start_layer=self.check_layer,
                )
        return ContextCache(
            cache=cache,
            positions=positions,
            next_position=inputs.context_end,
            kept_indices=all_kept(inputs),
            recomputed_tokens=int(selected.numel()),
            details={
                "recomputed_indices": [t.tolist() for t in split_by_document(selected, lengths)]
            },
        )
