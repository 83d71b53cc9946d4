"""Score blocks of cached documents against a question, as SamKV ranks them.

Queries and keys are compared before RoPE: ``mean_queries`` reads ``q_proj`` outputs and
``segment_key_means`` un-rotates the cached keys per token before averaging them, since a
mean of post-RoPE keys would mix in each block's rotation. The ranking helpers
(``personalize``, ``adaptive_ratio``, ``fill_budget``) work on the resulting scores.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import cosine_similarity
from transformers import PreTrainedModel

from samkv_integrations.encode import PrefixKV, capture_queries
from samkv_integrations.methods.recompute import assemble_cache
from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import DocumentKV
from samkv_integrations.rope import shift_keys

#: Depths (fractions of the layer count) of the default selection layers.
SELECTION_DEPTHS = (1 / 3, 1 / 2, 2 / 3, 5 / 6)


def selection_layer_indices(n_layers: int, wanted: tuple[int, ...] | None) -> list[int]:
    """Sorted layer indices from ``wanted`` (negative: from the end; ``None``: the default depths).

    Raises:
        ValueError: A wanted layer does not exist.
    """
    if wanted is None:
        return sorted({min(n_layers - 1, round(n_layers * depth)) for depth in SELECTION_DEPTHS})
    if any(not -n_layers <= i < n_layers for i in wanted):
        raise ValueError(f"selection_layers {wanted} out of range for {n_layers} layers")
    return sorted({i % n_layers for i in wanted})


def mean_queries(
    model: PreTrainedModel,
    prefix: PrefixKV,
    context: tuple[torch.Tensor, torch.Tensor],
    token_ids: list[int],
    start: int,
    layers: list[int],
) -> torch.Tensor:
    """Mean queries of ``token_ids`` run from position ``start`` over the prefix and ``context``.

    ``context`` holds keys (at global positions) and values ``[n_layers, n_kv_heads, n,
    head_dim]`` that follow the prefix; ``layers`` are the layers to read.

    Returns:
        ``[len(layers), n_q_heads, head_dim]`` float32, the mean pre-RoPE query (``q_proj``
        output, as stored per document) of the tokens at each of ``layers``.
    """
    positions = torch.arange(start, start + len(token_ids), device=model.device)
    with capture_queries(model) as captured:
        model.get_decoder()(
            input_ids=torch.tensor([token_ids], device=model.device),
            position_ids=positions[None],
            **with_cache(model.get_decoder(), assemble_cache(prefix, [context])),
            use_cache=True,
        )
    n_heads = model.config.get_text_config(decoder=True).num_attention_heads
    means = [q[0].float().mean(0) for i, q in enumerate(captured) if q is not None and i in layers]
    return torch.stack(means).unflatten(-1, (n_heads, -1))


def segment_key_means(
    model: PreTrainedModel,
    documents: list[DocumentKV],
    layers: list[int],
    segment: torch.Tensor,
    n_segments: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean pre-RoPE keys of token segments, over the documents' tokens laid end to end.

    Cached keys are un-rotated per token to position 0 (left scaled by the rotary attention
    factor, the same for every token), so that they compare with pre-RoPE queries.

    Args:
        model: The model (its rotary module un-rotates the keys).
        documents: The documents' caches.
        layers: The layers to read.
        segment: ``[n_context]`` the segment of each token, in ``0 .. n_segments - 1``.
        n_segments: Number of segments.

    Returns:
        Means ``[len(layers), n_kv_heads, n_segments, head_dim]`` (0 for an empty segment)
        and token counts ``[n_segments]``.
    """
    keys = torch.cat([d.keys[layers] for d in documents], dim=2).float()
    local = [torch.arange(d.prefix_len, d.prefix_len + d.n_tokens) for d in documents]
    keys = shift_keys(model, keys, -torch.cat(local).to(keys.device))
    sums = keys.new_zeros(*keys.shape[:2], n_segments, keys.shape[-1])
    counts = torch.bincount(segment, minlength=n_segments)
    return sums.index_add_(2, segment, keys) / counts.clamp(min=1)[:, None], counts


def personalize(generic: torch.Tensor, own: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """``Qi = Qq + 1/(D-1) Σ_{j≠i} |cos(Qj, Qq)| Qj`` per query head, averaged per KV group.

    ``generic`` (Qq) ``[S, Hq, d]``, ``own`` (Qj) ``[D, S, Hq, d]``; -> ``[D, S, H_kv, d]``.
    """
    weighted = cosine_similarity(own, generic[None], dim=-1).abs()[..., None] * own
    personal = generic + (weighted.sum(0) - weighted) / max(len(own) - 1, 1)
    return personal.unflatten(2, (n_kv_heads, -1)).mean(3)


def adaptive_ratio(
    block_scores: torch.Tensor, anchor_score: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``P = (max s_b - s_anc) / (max s_b - min s_b)`` if ``min < s_anc <= max``, else 0.

    ``block_scores [..., n_blocks]`` (``valid`` marks those that exist), ``anchor_score [...]``.
    """
    hi = block_scores.masked_fill(~valid, -math.inf).amax(-1)
    lo = block_scores.masked_fill(~valid, math.inf).amin(-1)
    inside = (lo < anchor_score) & (anchor_score <= hi)
    return torch.where(inside, (hi - anchor_score) / (hi - lo), 0.0)


def fill_budget(
    block_scores: torch.Tensor,
    anchor_score: torch.Tensor,
    valid: torch.Tensor,
    block_tokens: torch.Tensor,
    room: int,
) -> torch.Tensor:
    """The best blocks of all documents whose tokens fit in ``room``, best first.

    Raw scores differ in scale between layers, so each layer's margins over the anchors
    are divided by that layer's score range (over all documents) before averaging.

    Args:
        block_scores: ``[D, S, n_blocks]`` scores per document, selection layer and block.
        anchor_score: ``[D, S]`` each document's anchor score.
        valid: ``[D, n_blocks]`` which blocks exist.
        block_tokens: ``[D, n_blocks]`` tokens per block.
        room: Tokens the blocks may take.

    Returns:
        ``[D, n_blocks]`` the kept blocks.
    """
    top = block_scores.masked_fill(~valid[:, None], -math.inf)
    low = block_scores.masked_fill(~valid[:, None], math.inf).amin(dim=(0, 2))
    spread = (top.amax(dim=(0, 2)) - low).clamp(min=1e-12)
    margin = ((block_scores - anchor_score[..., None]) / spread[:, None]).mean(1)
    order = margin.masked_fill(~valid, -math.inf).flatten().argsort(descending=True)
    fits = (block_tokens.flatten()[order].cumsum(0) <= room) & valid.flatten()[order]
    return torch.zeros_like(fits).scatter(0, order, fits).view_as(valid)
