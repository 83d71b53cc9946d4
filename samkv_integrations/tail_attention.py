"""Attention of tokens appended to a cache, causal from its end, with no mask built.

A forward that appends ``q`` tokens to a cache of ``n`` entries, all at earlier positions,
lets its ``i``-th token attend to the first ``n + i + 1`` entries: causal attention aligned
to the lower right. transformers materializes that as a ``[q, n + q]`` mask, and SDPA then
takes its memory-efficient kernel with every KV head repeated. SamKV's question pass is
such a forward (the question over the prefix and every reused token, up to the deepest
selection layer): on the Llama-3.1-8B shape at 8×2048, 101 tokens over 16.5k keys, that
kernel took 760 µs a layer, where FlashAttention took 120 µs (docs/performance.md, "Tried,
not kept: FlashAttention for SamKV's question pass", and "The question pass on
FlashAttention").
FlashAttention's own causal flag is lower-right aligned and reads grouped KV heads as they
are; ``tail_attention`` calls it directly for every layer while the block runs. (Going
through ``torch.nn.attention.bias.causal_lower_right`` reaches the same kernel, but its
Python dispatch cost more host time than the kernel saved.)

Elsewhere (CPU, float32, a GPU older than Ampere, a head size FlashAttention does not take,
a 4-D mask the caller passed in) the same lower-right mask is built and SDPA runs with the
KV heads repeated, as transformers' own SDPA attention does.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers import PreTrainedModel

from samkv_integrations.attention_scope import swapped_attention
from samkv_integrations.grouped_decode import repeated_heads_attention

__all__ = ["tail_attention", "tail_causal_attention"]

#: The key the attention is registered under (with the model's id, as ``grouped_decode``
#: does), only while the block runs. An unknown key also makes transformers skip building
#: its mask.
ATTENTION_KEY = "samkv_tail_attention"


@functools.cache
def _flash_device(index: int) -> bool:
    """Whether CUDA device ``index`` runs PyTorch's FlashAttention (an NVIDIA Ampere or newer)."""
    # torch 2.4 cannot say whether it was built with FlashAttention (2.5 added the check):
    # there SDPA with a mask runs instead.
    built_with = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    built = torch.version.hip is None and built_with is not None and built_with()
    return built and torch.cuda.get_device_capability(index) >= (8, 0)


def _flash_runs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether FlashAttention takes these inputs: its devices, half precision, its head sizes.

    ``flash_sdp_enabled`` is the user's switch (``torch.nn.attention.sdpa_kernel``), honoured
    as SDPA would.
    """
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.dtype == key.dtype == value.dtype
        and head_dim == key.shape[-1] == value.shape[-1]
        and head_dim % 8 == 0
        and head_dim <= 256
        and query.shape[1] % key.shape[1] == 0
        and torch.backends.cuda.flash_sdp_enabled()
        and _flash_device(query.get_device())
    )


def tail_causal_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``[batch, n_heads, q, head_dim]`` queries, the cache's last ``q`` entries.

    Keys and values are ``[batch, n_kv_heads, n, head_dim]``; query ``i`` attends to keys
    ``0 .. n - q + i``. A 4-D ``attention_mask`` given by the caller is used as it is
    instead. Returns ``[batch, q, n_heads, head_dim]`` (a ``LayerAttention``,
    ``attention_scope``).

    Raises:
        ValueError: More queries than keys (the queries' own entries are not in the cache).
    """
    q_len, n_keys = query.shape[2], key.shape[2]
    if q_len > n_keys:
        raise ValueError(f"layer {layer}: {q_len} queries over {n_keys} keys; tail attention "
                         "needs the queries' own entries in the cache")  # fmt: skip
    if attention_mask is None and _flash_runs(query, key, value):
        # is_causal=True is lower-right aligned in FlashAttention when q_len < n_keys.
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scaling
        )[0]
        return out.transpose(1, 2)
    if attention_mask is None:
        ones = torch.ones(q_len, n_keys, dtype=torch.bool, device=query.device)
        attention_mask = ones.tril(n_keys - q_len)
    return repeated_heads_attention(query, key, value, attention_mask, scaling)


def tail_attention(model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
    """``tail_causal_attention`` as every layer's attention while the block runs.

    Only for models on ``sdpa`` whose every layer attends to the whole cache: an ``eager``
    model keeps its own attention, and a model with a sliding window (Mistral v0.1, Phi-3,
    Gemma 3) keeps transformers' mask, which hides what lies outside the window.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return contextlib.nullcontext()
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in layer_types
    ):
        return contextlib.nullcontext()
    return swapped_attention(model, f"{ATTENTION_KEY}-{id(model)}", tail_causal_attention)
