"""Cut cached documents into anchors and blocks, and choose the blocks SamKV keeps.

``select_blocks`` is SamKV's selection under either scoring. The paper's compares queries
and keys before RoPE: ``question_queries`` reads ``q_proj`` outputs and
``segment_key_means`` un-rotates the cached keys per token before averaging them, since a
mean of post-RoPE keys would mix in each block's rotation; ``personalize``,
``adaptive_ratio`` and ``fill_budget`` rank by the resulting scores. The attention scoring
lives in ``question_attention``.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedModel

from samkv_integrations.encode import capture_queries
from samkv_integrations.host_values import on_device
from samkv_integrations.methods.aligned import aligned_cache
from samkv_integrations.methods.base import MethodInput
from samkv_integrations.methods.lexical import lexical_block_scores
from samkv_integrations.methods.question_attention import (
    keep_by_mass,
    personal_queries,
    question_block_mass,
)
from samkv_integrations.methods.recompute import RecomputeCache
from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import DocumentKV
from samkv_integrations.rope import shift_keys
from samkv_integrations.tail_attention import tail_attention

logger = logging.getLogger(__name__)

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


def block_layout(
    lengths: list[int], n_init: int, n_local: int, block_size: int, device: torch.device
) -> tuple[list[list[int]], list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors and blocks of documents laid end to end, as SamKV cuts them.

    Returns:
        Per document, its anchors' local indices (every token of a document shorter than
        anchors plus one block) and its number of blocks; per token (``[n_context]`` each),
        its document, its block (clamped to 0 before the first) and whether it is an anchor.
    """
    middle = [n - n_init - n_local for n in lengths]
    n_blocks = [-(-m // block_size) if m >= block_size else 0 for m in middle]
    anchors = [
        [*range(n_init), *range(n - n_local, n)] if b else list(range(n))
        for n, b in zip(lengths, n_blocks, strict=True)
    ]
    n = on_device(lengths, device, torch.long)
    doc = torch.arange(len(n), device=device).repeat_interleave(n, output_size=sum(lengths))
    local = torch.arange(len(doc), device=device) - (n.cumsum(0) - n)[doc]
    anchor = (on_device(n_blocks, device, torch.long)[doc] == 0) | (local < n_init)
    anchor |= local >= n[doc] - n_local
    block = (local - n_init).div(block_size, rounding_mode="floor").clamp(min=0)
    return anchors, n_blocks, doc, block, anchor


def question_queries(
    model: PreTrainedModel,
    context: RecomputeCache,
    token_ids: list[int],
    start: int,
    layers: list[int],
) -> torch.Tensor:
    """Per-token queries of ``token_ids`` run from position ``start`` over ``context``.

    ``context`` holds the prefix and what the question reads of the documents, keys at
    global positions (``aligned_cache``), for at least the layers up to the last of
    ``layers``: the pass stops there.

    Returns:
        ``[len(layers), len(token_ids), n_q_heads, head_dim]`` float32 pre-RoPE queries
        (``q_proj`` outputs, as stored per document) at each of ``layers``.
    """
    positions = torch.arange(start, start + len(token_ids), device=model.device)
    # Every entry of ``context`` precedes the question: causal from the cache's end, no mask.
    with tail_attention(model), capture_queries(model, stop_after=max(layers)) as captured:
        model.get_decoder()(
            input_ids=on_device([token_ids], model.device, torch.long),
            position_ids=positions[None],
            **with_cache(model.get_decoder(), context),
            use_cache=True,
        )
    n_heads = model.config.get_text_config(decoder=True).num_attention_heads
    queries = [q[0].float() for i, q in enumerate(captured) if q is not None and i in layers]
    return torch.stack(queries).unflatten(-1, (n_heads, -1))


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
    return personal_queries(generic, own).unflatten(2, (n_kv_heads, -1)).mean(3)


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


def _share(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``scores`` over the valid blocks, scaled to sum to 1 (all 0 where they sum to 0)."""
    scores = scores.masked_fill(~valid, 0)
    return scores / scores.sum().clamp(min=1e-30)


def select_blocks(
    inputs: MethodInput,
    slot: torch.Tensor,
    n_blocks: list[int],
    anchors: list[list[int]],
    budget: float,
    selection_layers: tuple[int, ...] | None,
    *,
    scoring: str,
    ranking: str,
    personal_weight: float,
    head_pool: str,
    tau: float | None,
    score_positions: str = "global",
    question_context: str = "anchors",
    lexical_weight: float = 0.0,
    min_kept: int = 0,
) -> tuple[torch.Tensor, dict[str, object]]:
    """The blocks SamKV keeps, as ``SamKVMethod`` describes (its options, by name).

    Args:
        inputs: The method's input.
        slot: ``[n_context]`` each token's slot: ``doc * (max_blocks + 1)``, plus 0 for an
            anchor, ``1 + block`` for a block.
        n_blocks: Blocks per document.
        anchors: Per document, the local indices of its anchors.
        budget: Kept fraction of the context tokens under global ranking, anchors counted.
        selection_layers: ``SamKVMethod.selection_layers``.
        scoring: ``"paper"`` or ``"attention"``.
        ranking: ``"per_document"`` or ``"global"``.
        personal_weight: Under attention scoring, the personalized query's weight.
        head_pool: Under attention scoring, ``"mean"`` or ``"max"`` over layers and KV heads.
        tau: Under attention scoring, the share of block mass to keep (``None``: all room).
        score_positions: Under attention scoring, where the documents' keys sit for the
            question to attend to: ``"global"`` (where the prompt lays them out) or
            ``"adjacent"`` (each as if it ended right before the question, so that RoPE's
            decay with distance does not favour the documents nearest the question).
        question_context: What the question runs over to form its queries, besides the
            prefix: ``"anchors"`` (the documents' anchors) or ``"all"`` (every reused
            token, so that its queries at the deeper selection layers have read the
            documents, at the cost of attending over the whole context once).
        lexical_weight: Under attention scoring, the weight of ``lexical_block_scores`` in
            the blocks' score, both normalized over the blocks first.
        min_kept: Under global ranking, the fewest context tokens to keep (anchors counted)
            when ``budget`` gives fewer: a floor for short contexts.

    Returns:
        Kept blocks ``[D, max_blocks]``, and facts for ``details``: ``adaptive_ratio``
        (per document ``P_i``) under the paper's scoring, else ``block_mass_kept`` (a 0-d
        tensor on the device, read with the kept tokens' sizes by ``kept_tokens``).
    """
    model, docs = inputs.model, inputs.documents
    room = max(math.floor(budget * len(slot)), min_kept) - sum(len(a) for a in anchors)
    if room <= 0 and ranking == "global":
        logger.info("samkv: anchors alone fill budget=%s; keeping anchors only", budget)
    n_layers, n_kv_heads = docs[0].keys.shape[:2]
    layers = selection_layer_indices(n_layers, selection_layers)
    local = None  # question_context="all": every reused token
    if question_context == "anchors":
        local = [on_device(a, model.device, torch.long) for a in anchors]
    start = inputs.context_end
    with torch.profiler.record_function("samkv.question_pass"):  # labels for bench --profile
        # Layer 0 alone: the deeper layers are built inside the pass, as it reaches them.
        with torch.profiler.record_function("samkv.aligned_cache"):
            seen = aligned_cache(
                model, inputs.prefix, docs, inputs.doc_starts, local, max(layers) + 1,
                inputs.arrival,
            )  # fmt: skip
        queries = question_queries(model, seen, inputs.question_ids, start, layers)
    inputs.arrival.wait(max(layers) + 1)  # the pass stopped before the last layer's cache
    at_layers = on_device(layers, model.device, torch.long)
    own = torch.stack([d.query_means.index_select(0, at_layers).float() for d in docs])
    width = max(n_blocks) + 1
    sizes = on_device(n_blocks, slot.device, torch.long)
    valid = torch.arange(width - 1, device=slot.device) < sizes[:, None]
    # Counted by index_add_, not bincount, which on CUDA reads the largest slot back to the host.
    block_tokens = slot.new_zeros(len(docs) * width).index_add_(0, slot, torch.ones_like(slot))
    block_tokens = block_tokens.view(len(docs), width)[:, 1:]
    if scoring == "attention":
        personal = personal_queries(queries.mean(1), own) if personal_weight else None
        adjacent = [start - d.n_tokens for d in docs]
        starts = inputs.doc_starts if score_positions == "global" else adjacent
        with torch.profiler.record_function("samkv.block_mass"):
            mass = question_block_mass(
                model, inputs.prefix, docs, starts, layers, queries, start,
                personal, personal_weight, slot, len(docs) * width,
            )  # fmt: skip
        pooled = mass.mean(dim=(0, 1)) if head_pool == "mean" else mass.amax(dim=(0, 1))
        block_mass = pooled.view(len(docs), width)[:, 1:]
        if lexical_weight:
            words = lexical_block_scores(docs, inputs.question_ids, slot, len(docs) * width)
            lexical = words.view(len(docs), width)[:, 1:]
            block_mass = torch.lerp(
                _share(block_mass, valid), _share(lexical, valid), lexical_weight
            )
        kept = keep_by_mass(block_mass, valid, block_tokens, room, tau or 1.0)
        # where, not boolean indexing, which reads the count back; the caller reads the share.
        share = block_mass.where(kept, 0).sum() / block_mass.where(valid, 0).sum().clamp(min=1e-30)
        return kept, {"block_mass_kept": share}
    generic = personalize(queries.mean(1), own, n_kv_heads)
    means, _ = segment_key_means(model, docs, layers, slot, len(docs) * width)
    scores = torch.einsum("dshe,shdbe->dsb", generic, means.unflatten(2, (len(docs), width)))
    anchor_score, block_scores = scores[..., 0], scores[..., 1:]
    ratio = adaptive_ratio(block_scores, anchor_score, valid[:, None]).mean(1)
    facts: dict[str, object] = {"adaptive_ratio": ratio.tolist()}
    if ranking == "per_document":
        top = block_scores.masked_fill(~valid[:, None], -math.inf)
        rank = top.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        return ((rank < (sizes * ratio).floor()[:, None, None]) & valid[:, None]).any(1), facts
    return fill_budget(block_scores, anchor_score, valid, block_tokens, room), facts
