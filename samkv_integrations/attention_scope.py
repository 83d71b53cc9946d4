"""One attention function of our own for every layer of a model, only while a block runs.

transformers looks each layer's attention up by ``config._attn_implementation`` in
``ALL_ATTENTION_FUNCTIONS`` at every forward, so a decoding policy can swap in its own
(page retrieval, a pooled question prefill) without touching the model's modules. The swap
is undone on the way out, error or not, so the next forward is the model's own again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["LayerAttention", "swapped_attention"]


#: A layer's attention: ``(layer, query, key, value, attention_mask, scaling) -> output``
#: with ``query`` ``[batch, n_heads, q_len, head_dim]`` post-RoPE, ``key``/``value``
#: ``[batch, n_kv_heads, kv_len, head_dim]`` (the cache, this step's entries included),
#: ``attention_mask`` what transformers passes (None for a key it does not know, a 4-D
#: additive mask given by the caller as it is) and ``output``
#: ``[batch, q_len, n_heads, head_dim]`` in the query's dtype.
LayerAttention = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor
]


@contextlib.contextmanager
def swapped_attention(model: PreTrainedModel, key: str, attend: LayerAttention) -> Iterator[None]:
    """``attend`` as every layer's attention, registered under ``key``, while the block runs."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # transformers' attention-function signature; dropout is 0 at inference.
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        return attend(layer, query, keys, values, attention_mask, scaling), None

    config = model.config
    previous = config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[key] = attention
    try:
        config._attn_implementation = key
        yield
    finally:
        config._attn_implementation = previous
        del ALL_ATTENTION_FUNCTIONS[key]
