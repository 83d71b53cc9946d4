"""Score blocks of cached documents by the question's softmax attention, and keep by mass.

SamKV's paper scoring (``block_scores``) compares one mean query with one mean key per
block, before RoPE. ``SamKVMethod(scoring="attention")`` scores blocks instead by what the
question's tokens attend to, as the model would attend; ``benchmarks/ACCURACY.md`` found
that this ranking halves SamKV's median first-token KL at 14% kept (Qwen2.5-Coder-0.5B).
At each of the ``S`` selection layers:

- Queries ``[m, n_q_heads, head_dim]``: the ``m`` question tokens (generation prompt
  included) run over the prefix and every reused token (``question_context="all"``, the
  default) or only the anchors (``block_scores.question_queries``), ``q_norm`` where the
  model has one, RoPE at their global positions.
- Keys ``[n_kv_heads, prefix + N, head_dim]``: the prefix's and every document token's
  reused keys, re-rotated to global positions, or (``score_positions="adjacent"``, the
  default) each document's as if it ended right before the question.
- Softmax per query head and token over that whole context, scaled as the layer scales;
  the question's own keys are left out, so each token's probabilities over the context sum
  to 1 (the model would also attend to the question itself).
- Probabilities averaged over the query heads of each KV group and over the ``m`` tokens,
  summed per block: ``[S, n_kv_heads, n_blocks]``.
- Personalization (``personal_weight`` ``λ``): SamKV's ``Qi`` (``personal_queries``, per
  query head) placed at the last question token's position, attends over the same context;
  its mass on document ``i``'s own tokens enters as ``(1 - λ) · question's + λ · Qi's``.

``block_scores.select_blocks`` pools layers and KV heads (``"mean"``: the share of the
question's attention; ``"max"``: a block one head needs survives, as head-level selection
such as Ada-KV keeps it) and ``keep_by_mass`` keeps the heaviest blocks of all documents
under the budget, or only the fewest that hold ``tau`` of the blocks' mass.

Cost (``S`` layers, ``L = prefix + N``): ``2 · S · n_q_heads · m · L · head_dim`` FLOPs of
logits (``λ > 0`` adds ``D`` one-token queries per layer), the selection layers' keys
re-rotated once (``S · n_kv_heads · N · head_dim``), and scratch of one layer's keys and
logits in float32, computed a chunk of query tokens at a time; reading every reused token
first adds a question pass over the whole context, up to the deepest selection layer (27 ms
of TTFT on the 8B shape at 8×2048, docs/performance.md). Measured on the GPU and not the
default: ``λ = 0.3``; not measured there: ``head_pool="max"``, ``tau``, per-token
personalization.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from samkv_integrations.encode import PrefixKV
from samkv_integrations.host_values import on_device
from samkv_integrations.methods.aligned import token_shifts
from samkv_integrations.records import DocumentKV
from samkv_integrations.rope import rotary_module, rotate, rotate_half, rotation

#: Logit elements (query heads x queries x keys) computed at once; bounds the scratch memory
#: to a few hundred MB in float32 on long contexts with long questions.
_CHUNK_ELEMENTS = 1 << 26


def rotate_queries(
    model: PreTrainedModel, layer: int, queries: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """``[..., n, n_q_heads, head_dim]`` pre-RoPE queries, as the layer's attention forms them.

    The per-head ``q_norm`` where the model has one (Qwen3), then the rotary embedding at
    ``positions [n]``, whose cos/sin carry the module's attention scaling as the model's do.
    Returns ``[..., n_q_heads, n, head_dim]`` float32.
    """
    attention = model.get_decoder().layers[layer].self_attn
    q_norm = getattr(attention, "q_norm", None)
    if q_norm is not None:
        queries = q_norm(queries.to(model.dtype)).float()
    cos, sin = rotary_module(model)(queries, position_ids=positions[None])
    queries = queries.transpose(-3, -2)
    return queries * cos[0].float() + rotate_half(queries) * sin[0].float()


def _scaling(model: PreTrainedModel, layer: int, head_dim: int) -> float:
    attention = model.get_decoder().layers[layer].self_attn
    return float(getattr(attention, "scaling", head_dim**-0.5))


def _attention_mass(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of ``[..., n_q_heads, n, d]`` queries over ``[n_kv_heads, L, d]`` keys.

    Returns ``[..., n_kv_heads, L]``: the probabilities averaged over the query heads of each
    KV group and over the ``n`` queries (each row sums to 1), computed a chunk of queries at
    a time.
    """
    n_kv, length = keys.shape[0], keys.shape[1]
    grouped = queries.unflatten(-3, (n_kv, -1))  # [..., n_kv, group, n, d]
    group, n = grouped.shape[-3], grouped.shape[-2]
    per_query = queries.numel() // (n * queries.shape[-1]) * length  # logits of one query token
    step = max(1, _CHUNK_ELEMENTS // per_query)
    total = grouped.new_zeros(*grouped.shape[:-3], length)
    for first in range(0, n, step):
        chunk = grouped[..., first : first + step, :]
        logits = torch.einsum("...hgnd,hld->...hgnl", chunk, keys) * scaling
        total += logits.softmax(dim=-1).sum(dim=(-3, -2))
    return total / (group * n)


def question_block_mass(
    model: PreTrainedModel,
    prefix: PrefixKV,
    documents: list[DocumentKV],
    doc_starts: list[int],
    layers: list[int],
    queries: torch.Tensor,
    start: int,
    personal: torch.Tensor | None,
    personal_weight: float,
    slot: torch.Tensor,
    n_slots: int,
) -> torch.Tensor:
    """Attention mass per token segment, per selection layer and KV head.

    Args:
        model: The model (rotary module, attention scaling, optional ``q_norm``).
        prefix: The shared prefix (its keys are part of the softmax's denominator).
        documents: The documents' caches, keys post-RoPE at local positions.
        doc_starts: Global position of each document's first token.
        layers: The selection layers.
        queries: ``[S, m, n_q_heads, head_dim]`` the question tokens' pre-RoPE queries, at
            global positions ``start ..``.
        start: Global position of the first question token.
        personal: ``[D, S, n_q_heads, head_dim]`` each document's personalized pre-RoPE
            query (SamKV's ``Qi``), placed at the last question token's position; ``None``:
            none.
        personal_weight: Weight ``λ`` of the personalized attention:
            ``mass = (1 - λ) · question's + λ · Qi's`` (``Qi`` counts only over its own
            document ``i``).
        slot: ``[N]`` the segment of each document token (documents laid end to end).
        n_slots: Number of segments.

    Returns:
        ``[S, n_kv_heads, n_slots]`` float32: per layer and KV head, the attention mass on
        each segment, averaged over the group's query heads and the question tokens.
    """
    device = queries.device
    n_question = queries.shape[1]
    positions = torch.arange(start, start + n_question, device=device)
    counts = [d.n_tokens for d in documents]
    doc = torch.arange(len(documents), device=device).repeat_interleave(
        on_device(counts, device, torch.long), output_size=sum(counts)
    )
    token = torch.arange(len(doc), device=device)
    # One rotation per layer for all documents (a shift per token), not one per document.
    cos, sin = rotation(model, token_shifts(model, documents, doc_starts, counts))
    masses = []
    for s, layer in enumerate(layers):
        reused = rotate(
            torch.cat([d.keys[layer] for d in documents], dim=1), cos, sin, dtype=torch.float32
        )
        keys = torch.cat([prefix.keys[layer][0].float(), reused], dim=1)
        # [n_kv_heads, prefix + N, head_dim] at global positions
        scaling = _scaling(model, layer, keys.shape[-1])
        rotated = rotate_queries(model, layer, queries[s], positions)
        mass = _attention_mass(rotated, keys, scaling)[:, prefix.length :]
        if personal is not None and personal_weight > 0:
            last = positions[-1:]
            own = rotate_queries(model, layer, personal[:, s, None], last)  # [D, n_q_heads, 1, d]
            per_doc = _attention_mass(own, keys, scaling)[..., prefix.length :]
            mass = torch.lerp(mass, per_doc[doc, :, token].T, personal_weight)
        masses.append(mass.new_zeros(mass.shape[0], n_slots).index_add_(1, slot, mass))
    return torch.stack(masses)


def personal_queries(generic: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``Qi = Qq + 1/(D-1) Σ_{j≠i} |cos(Qj, Qq)| Qj`` per query head (SamKV's Eq. for ``Qi``).

    ``generic`` (Qq) ``[S, Hq, d]``, ``own`` (Qj) ``[D, S, Hq, d]``; -> ``[D, S, Hq, d]``.
    """
    cos = torch.nn.functional.cosine_similarity(own, generic[None], dim=-1).abs()[..., None]
    weighted = cos * own
    return generic + (weighted.sum(0) - weighted) / max(len(own) - 1, 1)


def keep_by_mass(
    mass: torch.Tensor, valid: torch.Tensor, block_tokens: torch.Tensor, room: int, tau: float
) -> torch.Tensor:
    """The heaviest blocks of all documents, until they hold ``tau`` of the mass or fill ``room``.

    Args:
        mass: ``[D, n_blocks]`` each block's attention mass.
        valid: ``[D, n_blocks]`` which blocks exist.
        block_tokens: ``[D, n_blocks]`` tokens per block.
        room: Tokens the blocks may take.
        tau: Share of the blocks' total mass to hold, in (0, 1]; 1 keeps to ``room``.

    Returns:
        ``[D, n_blocks]`` the kept blocks. Ties go to the earlier block (a stable sort).
    """
    ranked = mass.masked_fill(~valid, -math.inf).flatten()
    order = ranked.argsort(descending=True, stable=True)
    fits = (block_tokens.flatten()[order].cumsum(0) <= room) & valid.flatten()[order]
    if tau < 1:
        sorted_mass = mass.flatten()[order].masked_fill(~valid.flatten()[order], 0)
        before = sorted_mass.cumsum(0) - sorted_mass  # mass held by the blocks ranked above
        fits &= before < tau * sorted_mass.sum()
    return torch.zeros_like(fits).scatter(0, order, fits).view_as(valid)
