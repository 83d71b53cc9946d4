"""One-shot eviction after the question: score cache entries by the question's attention.

SAGE-KV (``sagekv.py``) keeps, per layer and KV head, the context entries that the last
question tokens attend to most. The engine prefills the question, so its queries are not
at hand once ``after_question`` runs; ``window_attention`` recomputes them by running the
last ``w`` question tokens through every layer again, behind the decode cache as it is
(``FrozenCache``: attention reads the cache, nothing is written to it). Cost: one forward
of ``w`` tokens over the ``L``-entry cache, as much as decoding ``w`` tokens, plus the
score matmul of the same size; memory ``n_q_heads · w · L`` floats for one layer at a time.

Queries are formed as the model's attention forms them: ``q_proj`` of the layer's
normalised input, the per-head ``q_norm`` where the model has one (Qwen3), RoPE at the
tokens' global positions; scores use the module's ``scaling`` and the cached (post-RoPE)
keys, so they are the model's own attention probabilities, in float32.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from samkv_integrations.encode import layer_tensors
from samkv_integrations.methods.base import cache_from_layers
from samkv_integrations.methods.recompute import check_model, embed, position_mask
from samkv_integrations.models.compat import with_cache
from samkv_integrations.rope import rotary_module, rotate_half


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
    normed: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of ``n`` queries over a layer's keys, summed per KV group.

    Args:
        attention: The layer's attention module (``q_proj``, optional ``q_norm``).
        normed: ``[1, n, hidden]`` the layer's normalised input for the query tokens.
        position_embeddings: RoPE ``(cos, sin)``, each ``[1, n, head_dim]``.
        keys: ``[n_kv_heads, L, head_dim]`` the cached keys (post-RoPE).
        allowed: ``[n, L]`` which entries each query may attend to.

    Returns:
        ``[n_kv_heads, L]`` float32: the softmax summed over the query heads of each KV
        group and over the ``n`` queries.
    """
    n, head_dim = normed.shape[1], keys.shape[-1]
    q_proj = cast(torch.nn.Module, attention.q_proj)
    query = q_proj(normed).view(1, n, -1, head_dim)
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
        normed = layer.input_layernorm(hidden)
        scores.append(pooled_attention(layer.self_attn, normed, position_embeddings, keys, allowed))
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
