"""One-shot eviction after the question: score cache entries by the question's attention.

SAGE-KV (``sagekv.py``), and SamKV with ``resident``, keep per layer and KV head the context
entries that the last question tokens attend to most. Where the question ran in ``build``'s
forward, ``build`` records those tokens' queries on the way (``record_window``: the
``q_proj`` outputs of the last ``w`` rows, ``[n_layers, w, n_q_heads · head_dim]``), and
scoring costs one score matmul per layer. Otherwise ``window_attention`` recomputes them by
running the last ``w`` question tokens through every layer again, behind the decode cache as
it is (``FrozenCache``: attention reads the cache, nothing is written to it): one forward of
``w`` tokens over the ``L``-entry cache, as much as decoding ``w`` tokens, plus the same
matmul. Memory: ``n_q_heads · w · L`` floats for one layer at a time.

Queries are formed as the model's attention forms them: ``q_proj`` of the layer's
normalised input, the per-head ``q_norm`` where the model has one (Qwen3), RoPE at the
tokens' global positions; scores use the module's ``scaling`` and the cached (post-RoPE)
keys, so they are the model's own attention probabilities, in float32. Before the top-k, a
``kernel`` wider than 1 averages each entry's score with its neighbours in cache order
(``clustered``, SnapKV's pooling).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from samkv_integrations.encode import capture_queries, layer_tensors
from samkv_integrations.methods.base import DecodeState, cache_from_layers
from samkv_integrations.methods.recompute import (
    check_model,
    embed,
    position_mask,
    split_by_document,
)
from samkv_integrations.models.compat import with_cache
from samkv_integrations.rope import rotary_module, rotate_half
from samkv_integrations.timing import Stopwatch

logger = logging.getLogger(__name__)

#: Question tokens whose attention scores the cache by default: SnapKV's observation window.
OBSERVATION_WINDOW = 16


class FrozenLayer(DynamicLayer):
    """A cache layer that attention reads as is: ``update`` returns the stored K/V, unchanged.

    Valid when the tokens being run already have their KV in the cache (their own entries
    are among those returned, masked by position).
    """

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ignore ``[1, n_kv_heads, n, head_dim]`` states; return the stored ones."""
        return self.keys, self.values


class FrozenCache(Cache):
    """A read-only view of a cache's per-layer ``[1, n_kv_heads, L, head_dim]`` tensors."""

    def __init__(self, cache: DynamicCache) -> None:
        self.frozen_layers = [FrozenLayer(k, v) for k, v in layer_tensors(cache)]
        super().__init__(layers=list(self.frozen_layers))


def pooled_attention(
    attention: torch.nn.Module,
    projected: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of ``n`` queries over a layer's keys, summed per KV group.

    Args:
        attention: The layer's attention module (optional ``q_norm``, ``scaling``).
        projected: ``[1, n, n_q_heads * head_dim]`` the query tokens' ``q_proj`` output.
        position_embeddings: RoPE ``(cos, sin)``, each ``[1, n, head_dim]``.
        keys: ``[n_kv_heads, L, head_dim]`` the cached keys (post-RoPE).
        allowed: ``[n, L]`` which entries each query may attend to.

    Returns:
        ``[n_kv_heads, L]`` float32: the softmax summed over the query heads of each KV
        group and over the ``n`` queries.
    """
    n, head_dim = projected.shape[1], keys.shape[-1]
    query = projected.view(1, n, -1, head_dim)
    q_norm = getattr(attention, "q_norm", None)
    if q_norm is not None:
        query = q_norm(query)
    query = query[0].transpose(0, 1).float()  # [n_q_heads, n, head_dim]
    cos, sin = (t[0].float() for t in position_embeddings)
    query = query * cos + rotate_half(query) * sin
    grouped = query.unflatten(0, (keys.shape[0], -1))  # [n_kv_heads, group, n, head_dim]
    scaling = float(getattr(attention, "scaling", head_dim**-0.5))
    logits = torch.einsum("hgnd,hld->hgnl", grouped, keys.float()) * scaling
    probs = logits.masked_fill(~allowed, -torch.inf).softmax(dim=-1)
    return probs.sum(dim=(1, 2))


@torch.inference_mode()
def window_attention(
    model: PreTrainedModel, cache: DynamicCache, positions: torch.Tensor, token_ids: list[int]
) -> torch.Tensor:
    """What the cache's last ``w`` tokens attend to, at every layer, pooled per KV head.

    Args:
        model: The model (``sdpa`` or ``eager`` attention, full-attention layers).
        cache: ``[1, n_kv_heads, L, head_dim]`` per layer, ending with the ``w`` tokens.
        positions: ``[L]`` global position of each entry.
        token_ids: The ``w`` token ids of the cache's last entries.

    Returns:
        ``[n_layers, n_kv_heads, L]`` float32 attention, summed over each KV group's query
        heads and the ``w`` queries (a query sees the entries at positions not after its own).
    """
    check_model(model)
    layers = model.get_decoder().layers
    query_positions = positions[-len(token_ids) :]
    ids = torch.tensor(token_ids, device=positions.device)
    hidden = embed(model, ids)
    position_embeddings = rotary_module(model)(hidden, position_ids=query_positions[None])
    allowed = positions[None, :] <= query_positions[:, None]
    mask = position_mask(model, positions, query_positions)
    frozen = FrozenCache(cache)
    scores = []
    for i, layer in enumerate(layers):
        keys = frozen.frozen_layers[i].keys[0]
        projected = cast(torch.nn.Module, layer.self_attn.q_proj)(layer.input_layernorm(hidden))
        scores.append(
            pooled_attention(layer.self_attn, projected, position_embeddings, keys, allowed)
        )
        if i + 1 < len(layers):  # the last layer's output feeds nothing we read
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=query_positions[None],
                **with_cache(layer, frozen),
                use_cache=True,
                position_embeddings=position_embeddings,
            )
    return torch.stack(scores)


def window_rows(window: int, question_ids: Sequence[int]) -> int:
    """Question tokens whose queries score the cache: the last ``window``, at most all of them."""
    return min(window, len(question_ids))


@dataclass
class WindowRecord:
    """What ``record_window`` kept: one slot per layer, filled by the forward inside it."""

    slots: list[torch.Tensor | None]

    @property
    def queries(self) -> torch.Tensor | None:
        """``[n_layers, w, n_q_heads * head_dim]`` once the forward ran; None: none recorded."""
        return torch.stack(cast(list[torch.Tensor], self.slots)) if self.slots else None


@contextmanager
def record_window(
    model: PreTrainedModel, window: int, question_ids: Sequence[int]
) -> Iterator[WindowRecord]:
    """Record the question's last rows of each layer's ``q_proj`` output in the forward inside.

    ``question_ids`` are the tokens the forward runs last (none: nothing is recorded); the
    last ``window_rows(window, question_ids)`` rows are kept, as copies, so that the
    forward's whole query projections are not kept alive.
    """
    rows = window_rows(window, question_ids)
    if not rows:
        yield WindowRecord([])
        return
    with capture_queries(model, keep=lambda out: out[0, -rows:].clone()) as captured:
        yield WindowRecord(captured)


@torch.inference_mode()
def recorded_window_attention(
    model: PreTrainedModel, cache: DynamicCache, positions: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """``window_attention`` from the window's recorded queries, with no forward.

    Args:
        model: The model whose forward recorded ``queries`` (``record_window``).
        cache: ``[1, n_kv_heads, L, head_dim]`` per layer, ending with the ``w`` tokens.
        positions: ``[L]`` global position of each entry.
        queries: ``[n_layers, w, n_q_heads * head_dim]`` the ``w`` tokens' ``q_proj`` outputs.

    Returns:
        ``[n_layers, n_kv_heads, L]`` float32, as ``window_attention`` returns.
    """
    query_positions = positions[-queries.shape[1] :]
    position_embeddings = rotary_module(model)(queries, position_ids=query_positions[None])
    allowed = positions[None, :] <= query_positions[:, None]
    layers = model.get_decoder().layers
    scores = [
        pooled_attention(layer.self_attn, projected[None], position_embeddings, keys[0], allowed)
        for layer, projected, (keys, _) in zip(layers, queries, layer_tensors(cache), strict=True)
    ]
    return torch.stack(scores)


def clustered(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's clustering: each entry's score averaged with its ``kernel // 2`` neighbours each side.

    Paper: SnapKV (Li et al., https://arxiv.org/abs/2404.14469) pools the observation
    window's scores over neighbouring positions before the top-k, so that a kept token
    brings the tokens around it (a name's other pieces) rather than standing alone. Unlike
    SnapKV's reference code, which pools over the whole prompt and pads its ends with
    zeros, this pools the document span alone (the caller's slice) and averages an edge
    entry over the neighbours that exist. Neighbours are in cache order: where the cache
    is already compacted (SamKV's kept blocks), they reach across the gaps.

    Args:
        scores: ``[n_layers, n_kv_heads, n]`` float32 scores of ``n`` entries in cache order.
        kernel: Odd window width; 1 returns ``scores`` as they are.

    Returns:
        ``[n_layers, n_kv_heads, n]`` smoothed scores.
    """
    if kernel == 1 or scores.shape[-1] == 0:
        return scores
    return torch.nn.functional.avg_pool1d(
        scores, kernel, stride=1, padding=kernel // 2, count_include_pad=False
    )


def top_per_head(scores: torch.Tensor, k: int, forced: torch.Tensor) -> torch.Tensor:
    """The ``k`` best entries of each row, in increasing order; ``forced`` entries first.

    Ties go to the earlier entry (a stable sort), so the selection is deterministic.

    Args:
        scores: ``[..., n]`` scores.
        k: Entries to keep per row, at least ``forced.sum()``.
        forced: ``[n]`` entries kept whatever their score.

    Returns:
        ``[..., k]`` long indices, sorted.
    """
    ranked = scores.masked_fill(forced, torch.inf)
    order = ranked.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return order.sort(dim=-1).values


def evict(
    model: PreTrainedModel, cache: DynamicCache, start: int, end: int, index: torch.Tensor
) -> DynamicCache:
    """Keep entries ``start .. end - 1`` of each layer and KV head only where ``index`` says.

    Args:
        model: The model (its config types the new cache's layers).
        cache: ``[1, n_kv_heads, L, head_dim]`` per layer.
        start: First entry of the span to reduce; entries before it stay.
        end: Entry after the span; entries from it on stay.
        index: ``[n_layers, n_kv_heads, k]`` offsets into the span, sorted per head.

    Returns:
        A cache of ``[1, n_kv_heads, L - (end - start) + k, head_dim]`` per layer, in which
        head ``h`` of layer ``l`` holds span entries ``index[l, h]``.
    """
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for (layer_keys, layer_values), kept in zip(layer_tensors(cache), index, strict=True):
        for tensors, source in ((keys, layer_keys[0]), (values, layer_values[0])):
            take = kept[:, :, None].expand(-1, -1, source.shape[-1])
            span = source[:, start:end].gather(1, take)
            tensors.append(torch.cat([source[:, :start], span, source[:, end:]], dim=1))
    return cache_from_layers(model, keys, values)


@torch.inference_mode()
def evict_after_question(
    state: DecodeState,
    watch: Stopwatch,
    budget: float,
    *,
    window: int,
    n_sink: int,
    per_head: bool,
    min_kept: int = 0,
    kernel: int = 1,
) -> DecodeState:
    """Keep ``k = max(floor(budget · n_context), min_kept)`` document entries per KV head.

    SAGE-KV's one-shot selection (``sagekv.py`` names the choices): the last ``window``
    question tokens' attention scores the document entries of the
    ``[1, n_kv_heads, L, head_dim]`` layers, and each KV head keeps its own top ``k``
    (``per_head``) or all keep the top ``k`` of the score summed over layers and heads;
    ``kernel > 1`` first averages each score with its neighbours in cache order
    (``clustered``, SnapKV's pooling).
    ``n_context`` counts the layout's document tokens, kept or not, so ``budget`` is a
    share of the context whatever an earlier stage kept. Works on any state whose cache is
    in global order (the document entries, kept or not, lie between the prefix and the
    question); the prefix, ``n_sink`` leading layout tokens and the question stay. The
    queries are ``state.question_queries`` where ``build`` recorded ``window`` of them
    (``record_window``), else recomputed (``window_attention``). Where ``k`` covers every
    document entry the cache holds, nothing is scored or copied.

    Returns:
        The state with the reduced cache; ``positions`` and ``kept_indices`` name the
        representative set of ``k`` tokens (the top ``k`` of the summed score), and
        ``details`` gains ``kept_per_head``, ``union_fraction`` and ``head_agreement``.
    """
    if not state.doc_starts:
        return dataclasses.replace(state, question_queries=None)
    check_model(state.model)
    start, end = state.doc_starts[0], state.context_end
    positions = state.positions
    first = int(torch.searchsorted(positions, start))
    last = int(torch.searchsorted(positions, end))
    context = positions[first:last]
    n_context = end - start
    forced = context < n_sink
    wanted = max(math.floor(budget * n_context), min_kept)
    k = max(min(len(context), wanted), int(forced.sum()))
    if k == 0:
        logger.info("eviction: a share of %s keeps no document token", budget)
    if k == len(context):  # every head keeps every entry: the cache stays as it is
        union = k / n_context if n_context else 0.0
        facts = {"kept_per_head": k, "union_fraction": union, "head_agreement": 1.0}
        details = {**state.details, **facts}
        return dataclasses.replace(state, details=details, question_queries=None)
    window = window_rows(window, state.question_ids)
    with watch.phase("select"):
        recorded = state.question_queries
        if recorded is not None and recorded.shape[1] == window:
            scores = recorded_window_attention(state.model, state.cache, positions, recorded)
        else:
            tail = state.question_ids[-window:]
            scores = window_attention(state.model, state.cache, positions, tail)
        scores = clustered(scores[..., first:last], kernel)
        shared = top_per_head(scores.sum(dim=(0, 1)), k, forced)
        index = (
            top_per_head(scores, k, forced) if per_head else shared.expand(*scores.shape[:2], -1)
        )
    with watch.phase("evict"):
        cache = evict(state.model, state.cache, first, last, index)
    kept = context[shared]
    bounds = [*state.doc_starts, end]
    lengths = [later - earlier for earlier, later in itertools.pairwise(bounds)]
    details = {**state.details, **_agreement(index, shared, len(context), n_context)}
    return dataclasses.replace(
        state,
        cache=cache,
        positions=torch.cat([positions[:first], kept, positions[last:]]),
        kept_indices=split_by_document(kept - start, lengths),
        details=details,
        question_queries=None,  # scored: decoding needs them no more
    )


def _agreement(
    index: torch.Tensor, shared: torch.Tensor, n_entries: int, n_context: int
) -> dict[str, object]:
    """How well ``[k]`` ``shared`` stands for ``[n_layers, n_kv_heads, k]`` ``index``."""
    k = int(shared.numel())
    union = torch.zeros(n_entries, dtype=torch.bool, device=index.device)
    union[index.flatten()] = True
    in_shared = torch.zeros_like(union)
    in_shared[shared] = True
    agreement = float(in_shared[index].float().mean()) if k else 1.0
    return {
        "kept_per_head": k,
        "union_fraction": int(union.sum()) / n_context if n_context else 0.0,
        "head_agreement": agreement,
    }
