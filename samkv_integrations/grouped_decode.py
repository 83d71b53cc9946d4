"""Decode-step attention on a grouped-query cache that does not repeat the KV heads.

The static and batched decode steps (``static_decode``, ``stacked_cache``) pass an explicit
4-D mask, since their caches hold unused or hidden slots. transformers' SDPA attention then
cannot use ``enable_gqa`` on CUDA, and up to 5.17 at least it repeats every KV head
``n_heads / n_kv_heads`` times (``repeat_kv``), writing and reading a copy of the whole cache
per layer and step: for 16 answers of 2.7k slots on the Llama-3.1-8B shape, about 22 GB per
step against the 5.6 GB the cache holds. A decode step has one query per head, so the heads
of one KV group can stand as that group's queries instead: ``[batch, n_kv_heads, group,
head_dim]`` against the unrepeated ``[batch, n_kv_heads, slots, head_dim]`` keys, the mask
``[batch, 1, 1, slots]`` broadcasting over both. Newer transformers do the same
(``pack_gqa``); this scope gives it to every version the package supports.

On CUDA with Triton, that grouped step runs as split-KV attention (``split_kv_attention``):
SDPA's kernels give each KV head one block of threads, too few to read a long cache fast.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import PreTrainedModel

from samkv_integrations import split_kv_attention as split_kv
from samkv_integrations.attention_scope import swapped_attention

__all__ = ["grouped_decode_attention", "grouped_decode_scope", "repeated_heads_attention"]

#: The key the attention is registered under (with the model's id: two engines in one
#: process decode at once, and a scope removes its key on the way out), only while a step runs.
ATTENTION_KEY = "samkv_grouped_decode"


def grouped_decode_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """SDPA of ``[batch, n_heads, q_len, head_dim]`` queries over ``[batch, n_kv_heads, n, head_dim]``.

    With one query per head and fewer KV heads than heads, each group's heads become its
    queries; otherwise the KV heads are repeated, as transformers does. ``attention_mask``
    is additive, ``[batch, 1, q_len, n]`` (or ``None``). Returns ``[batch, q_len, n_heads,
    head_dim]`` (a ``LayerAttention``, ``attention_scope``).
    """
    batch, n_heads, q_len, head_dim = query.shape
    n_kv_heads = key.shape[1]
    if q_len == 1 and n_heads != n_kv_heads:
        grouped = query.reshape(batch, n_kv_heads, n_heads // n_kv_heads, head_dim)
        if split_kv.supports(grouped, key, value) and _kernel_reads(attention_mask, key):
            rows = None if attention_mask is None else attention_mask[:, 0, 0].expand(batch, -1)
            out = split_kv.split_kv_attention(grouped, key, value, rows, scaling)
            return out.reshape(batch, 1, n_heads, head_dim)
        out = scaled_dot_product_attention(
            grouped, key, value, attn_mask=attention_mask, scale=scaling
        )
        return out.reshape(batch, 1, n_heads, head_dim)
    return repeated_heads_attention(query, key, value, attention_mask, scaling)


def repeated_heads_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """SDPA with every KV head repeated per query head, as transformers' SDPA attention runs.

    ``[batch, n_heads, q_len, head_dim]`` queries over ``[batch, n_kv_heads, n, head_dim]``;
    returns ``[batch, q_len, n_heads, head_dim]``.
    """
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _kernel_reads(mask: torch.Tensor | None, key: torch.Tensor) -> bool:
    """Whether the split-KV kernels read ``mask``: none, or additive ``[batch, 1, 1, slots]``."""
    if mask is None:
        return True
    shape_ok = mask.shape[1:] == (1, 1, key.shape[2])
    return mask.is_floating_point() and shape_ok and mask.device == key.device


def grouped_decode_scope(model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
    """``grouped_decode_attention`` as every layer's attention while a decode step runs.

    Only for models on ``sdpa`` (an ``eager`` model keeps its own attention, so its numbers
    do not change).
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return contextlib.nullcontext()
    return swapped_attention(model, f"{ATTENTION_KEY}-{id(model)}", grouped_decode_attention)
