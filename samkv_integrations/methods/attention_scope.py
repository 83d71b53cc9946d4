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

from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["swapped_attention"]


@contextlib.contextmanager
def swapped_attention(
    model: PreTrainedModel, key: str, function: Callable[..., Any]
) -> Iterator[None]:
    """``function`` as every layer's attention, registered under ``key``, while the block runs.

    ``function`` has transformers' attention signature ``(module, query, key, value,
    attention_mask, scaling, dropout=0.0, **kwargs) -> (output [batch, q_len, heads,
    head_dim], weights or None)``; transformers builds no mask for a key it does not know.
    """
    config = model.config
    previous = config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[key] = function
    try:
        config._attn_implementation = key
        yield
    finally:
        config._attn_implementation = previous
        del ALL_ATTENTION_FUNCTIONS[key]
