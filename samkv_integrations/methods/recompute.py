"""Recompute a subset of tokens over an assembled cache, layer by layer.

CacheBlend and EPIC do the same thing: given a cache that holds every context token
(reused KV, re-aligned to global positions), run some tokens through some decoder layers
again, so that their KV regains attention to everything before them, and write the fresh
KV over the stale one. This module is that one path; SamKV's compact recompute
(``recompute_behind_prefix``) lives beside it.

The model's own decoder layers do the work (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``,
...), called with the rotary embeddings of the selected tokens' global positions, a 4D mask
in which a token attends to every cache entry at a position not after its own, and a
``RecomputeCache``: a ``DynamicCache`` whose layers, while a ``scatter`` is active, write
the new K/V into the selected entries (optionally blended with the old) instead of
appending them, and return the whole cache to attend over. Outside ``scatter`` it appends
like any ``DynamicCache`` (under ``blend_appended``, blending the new entries with reused
KV), so the question prefill and decoding run on it as is.

The reused KV those paths start from, re-aligned to global positions, comes from
``aligned``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from samkv_integrations.encode import PrefixKV
from samkv_integrations.host_values import on_device
from samkv_integrations.models.compat import with_cache
from samkv_integrations.rope import rotary_module

#: Attention implementations that take an arbitrary 4D mask.
_MASKED_ATTENTION = ("sdpa", "eager")


class RecomputeLayer(DynamicLayer):
    """A ``DynamicLayer`` that can overwrite or blend chosen entries instead of appending.

    Attributes:
        index: ``[n_sel]`` cache entries that the next updates write to, or ``None`` to append.
        reused: While appending, K/V ``[1, n_kv_heads, n, head_dim]`` to blend the ``n``
            appended entries before the last ``trailing`` with, or ``None``.
        trailing: Appended entries after the blended ones (a question run in the same
            forward), left as computed.
        theta: Weight of the new K/V: ``entry = (1 - theta) * old + theta * new``; one
            weight while scattering, ``[n, 1]`` (one per blended entry) while appending.
    """

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(
        self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
    ) -> None:
        """Hold ``keys``/``values`` ``[1, n_kv_heads, n, head_dim]``; none: until ``hold``."""
        super().__init__()
        if keys is not None and values is not None:
            self.hold(keys, values)
        self.index: torch.Tensor | None = None
        self.reused: tuple[torch.Tensor, torch.Tensor] | None = None
        self.trailing = 0
        self.theta: float | torch.Tensor = 1.0

    def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take ``keys``/``values`` as the layer's entries, as they are (no copy)."""
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[1, n_kv_heads, n_sel, head_dim]`` states at ``index``, or append them."""
        if self.index is None:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            if self.reused is not None:
                old_k, old_v = self.reused
                end = keys.shape[-2] - self.trailing
                start = end - old_k.shape[-2]
                keys[:, :, start:end] = torch.lerp(old_k, keys[:, :, start:end], self.theta)
                values[:, :, start:end] = torch.lerp(old_v, values[:, :, start:end], self.theta)
            return keys, values
        if self.theta == 1.0:
            self.keys[:, :, self.index] = key_states
            self.values[:, :, self.index] = value_states
        else:
            old_k = self.keys[:, :, self.index]
            old_v = self.values[:, :, self.index]
            self.keys[:, :, self.index] = torch.lerp(old_k, key_states, self.theta)
            self.values[:, :, self.index] = torch.lerp(old_v, value_states, self.theta)
        return self.keys, self.values


class RecomputeCache(DynamicCache):
    """A ``DynamicCache`` over given per-layer tensors whose layers can scatter updates.

    Args:
        keys: Per layer ``[1, n_kv_heads, n, head_dim]`` (post-RoPE, global positions).
        values: Per layer ``[1, n_kv_heads, n, head_dim]``.

    Attributes:
        recompute_layers: The cache's layers (the same objects as ``layers``).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        # DynamicCache.__init__ only picks layer classes from the config; the layers here
        # are given, so the base Cache is initialised with them directly.
        self.recompute_layers = [RecomputeLayer(k, v) for k, v in zip(keys, values, strict=True)]
        Cache.__init__(self, layers=list(self.recompute_layers))

    @classmethod
    def of_layers(cls, layers: list[RecomputeLayer]) -> RecomputeCache:
        """A cache over given layers (some may be ``DeferredLayer``)."""
        cache = cls.__new__(cls)
        cache.recompute_layers = layers
        Cache.__init__(cache, layers=list(layers))
        return cache

    @contextmanager
    def scatter(self, index: torch.Tensor, theta: float = 1.0) -> Iterator[None]:
        """While active, every layer's update writes to the entries ``index`` (blend ``theta``)."""
        try:
            for layer in self.recompute_layers:
                layer.index, layer.theta = index, theta
            yield
        finally:
            for layer in self.recompute_layers:
                layer.index, layer.theta = None, 1.0

    @contextmanager
    def blend_appended(
        self, reused: tuple[torch.Tensor, torch.Tensor], theta: torch.Tensor, trailing: int = 0
    ) -> Iterator[None]:
        """While active, appended states end with ``n`` entries blended with ``reused``.

        ``reused`` holds keys and values ``[n_layers, n_kv_heads, n, head_dim]``; ``theta``
        the ``[n]`` weights of the new entries; ``trailing`` entries appended after those
        ``n`` (a question in the same forward) are left as computed.
        """
        try:
            for layer, k, v in zip(self.recompute_layers, *reused, strict=True):
                layer.reused, layer.theta = (k[None], v[None]), theta[:, None].to(k.dtype)
                layer.trailing = trailing
            yield
        finally:
            for layer in self.recompute_layers:
                layer.reused, layer.theta, layer.trailing = None, 1.0, 0


def assemble_cache(
    prefix: PrefixKV, segments: list[tuple[torch.Tensor, torch.Tensor]]
) -> RecomputeCache:
    """The prefix followed by segments ``[n_layers, n_kv_heads, n, head_dim]``, copied once."""
    keys, values = [], []
    for layer, (prefix_k, prefix_v) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
        keys.append(torch.cat([prefix_k[:1], *(k[layer][None] for k, _ in segments)], dim=-2))
        values.append(torch.cat([prefix_v[:1], *(v[layer][None] for _, v in segments)], dim=-2))
    return RecomputeCache(keys, values)


def check_model(model: PreTrainedModel) -> None:
    """Raise ``ValueError`` unless the model can be recomputed layer by layer under a 4D mask."""
    config = model.config.get_text_config(decoder=True)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in _MASKED_ATTENTION:
        raise ValueError(
            f"attn_implementation {implementation!r}: recomputing a token subset needs a 4D "
            f"attention mask; load the model with one of {', '.join(_MASKED_ATTENTION)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"layer_types: {sorted(set(layer_types))}; recomputation supports full attention only"
        )


def embed(model: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[1, n, hidden]`` of ``[n]`` token ids."""
    return model.get_input_embeddings()(token_ids[None])


def position_mask(
    model: PreTrainedModel, cache_positions: torch.Tensor, query_positions: torch.Tensor
) -> torch.Tensor:
    """The mask ``[1, 1, n_query, n_cache]``: a query sees entries at positions not after its own.

    Boolean for SDPA; additive (0 or the dtype's minimum) for eager attention, which adds it.
    """
    allowed = cache_positions[None, :] <= query_positions[:, None]
    if model.config._attn_implementation == "sdpa":
        return allowed[None, None]
    blocked = torch.finfo(model.dtype).min
    return torch.where(allowed, 0.0, blocked).to(model.dtype)[None, None]


def recompute(
    model: PreTrainedModel,
    cache: RecomputeCache,
    cache_positions: torch.Tensor,
    hidden: torch.Tensor,
    index: torch.Tensor,
    start_layer: int = 0,
    stop_layer: int | None = None,
    theta: float = 1.0,
) -> torch.Tensor:
    """Run the tokens at cache entries ``index`` through layers ``start_layer .. stop_layer - 1``.

    At each layer the selected tokens' fresh K/V replace (or, with ``theta < 1``, are
    blended into) their entries before attention, so later tokens of the selection attend
    to the updated KV of earlier ones, and every other entry is attended to as cached.

    Args:
        model: The model whose cache this is.
        cache: Every entry's KV at global positions; updated in place.
        cache_positions: ``[n_cache]`` global position of each cache entry.
        hidden: ``[1, n_sel, hidden]`` input hidden states of the selected tokens at
            ``start_layer`` (the embeddings when ``start_layer`` is 0).
        index: ``[n_sel]`` cache entries of the selected tokens, increasing.
        start_layer: First layer to run.
        stop_layer: Layer to stop before (default: all remaining layers).
        theta: Weight of the fresh KV (1.0 overwrites).

    Returns:
        ``[1, n_sel, hidden]`` hidden states after layer ``stop_layer - 1`` (before the final
        norm), i.e. the input of layer ``stop_layer``.
    """
    check_model(model)
    layers = model.get_decoder().layers
    stop = len(layers) if stop_layer is None else stop_layer
    if not 0 <= start_layer <= stop <= len(layers):
        raise ValueError(f"start_layer/stop_layer: {start_layer}..{stop} outside 0..{len(layers)}")
    if start_layer == stop or index.numel() == 0:
        return hidden
    positions = cache_positions[index]
    mask = position_mask(model, cache_positions, positions)
    position_embeddings = rotary_module(model)(hidden, position_ids=positions[None])
    with cache.scatter(index, theta):
        for layer in layers[start_layer:stop]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions[None],
                **with_cache(layer, cache),
                use_cache=True,
                position_embeddings=position_embeddings,
            )
    return hidden


def fresh_values(model: PreTrainedModel, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
    """Values ``[n_kv_heads, n, head_dim]`` that layer ``layer_idx`` makes of ``[1, n, hidden]``."""
    layer = model.get_decoder().layers[layer_idx]
    attention = layer.self_attn
    values = attention.v_proj(layer.input_layernorm(hidden))
    return values.view(hidden.shape[1], -1, attention.head_dim).transpose(0, 1)


def split_by_document(context_indices: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Split increasing indices into the concatenated documents into per-document local indices.

    Args:
        context_indices: ``[k]`` increasing indices into the documents' tokens laid end to end.
        lengths: Each document's number of tokens.

    Returns:
        One ``[k_i]`` tensor of local indices per document.
    """
    ends = torch.tensor(lengths, device=context_indices.device).cumsum(0)
    document = torch.bucketize(context_indices, ends, right=True)
    counts = torch.bincount(document, minlength=len(lengths)).tolist()
    local = context_indices - (ends - torch.tensor(lengths, device=ends.device))[document]
    return list(local.split(counts))


def recompute_behind_prefix(
    model: PreTrainedModel,
    prefix: PrefixKV,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    reused: tuple[torch.Tensor, torch.Tensor] | None = None,
    theta: torch.Tensor | None = None,
    question_ids: Sequence[int] = (),
    question_start: int = 0,
) -> tuple[DynamicCache, torch.Tensor | None]:
    """A cache of the prefix and ``[n]`` tokens at increasing global ``positions``, computed afresh.

    Every token attends to the prefix and to the tokens before it here, not to anything
    left out: this is how a compacted subset of documents regains cross-document attention.

    Args:
        model: The model.
        prefix: The shared prefix cache.
        token_ids: ``[n]`` token ids, in global order.
        positions: ``[n]`` their global positions (gaps allowed).
        reused: The tokens' reused keys and values ``[n_layers, n_kv_heads, n, head_dim]``
            (keys at ``positions``) to blend with, weighted by ``theta``.
        theta: ``[n]`` weight of each token's fresh KV: each layer stores ``(1 - theta) ·
            reused + theta · fresh`` before attention, so later tokens attend to the blend
            (1 stores the fresh KV). The hidden states carry on from the fresh computation.
        question_ids: ``m`` ids to prefill in the same forward, at global positions
            ``question_start ..``, attending to everything before them as a later prefill
            over this cache would (none: no logits).
        question_start: Global position of the first question token, after ``positions``.

    Returns:
        The cache ``[1, n_kv_heads, prefix_len + n (+ m), head_dim]`` per layer, and the
        ``[vocab]`` logits after the question (``None`` without one).
    """
    m = len(question_ids)
    if not token_ids.numel() and not m:
        return prefix.cache(model), None
    if (reused is None) != (theta is None):
        raise ValueError("reused and theta: blending needs both the reused KV and its weights")
    # One causal prefill of prefix and tokens from an empty cache: index-causal equals
    # position-causal here, and with no past SDPA runs its flash kernel under is_causal
    # (behind a cached prefix it needs an explicit mask and a slower kernel); redoing the
    # short prefix costs less. An empty cache, not None, keeps the gapped position ids
    # from being read as packed sequences.
    cache = RecomputeCache(
        [k[:1, :, :0] for k in prefix.keys], [v[:1, :, :0] for v in prefix.values]
    )
    device = positions.device
    ids = [on_device(prefix.token_ids, device, torch.long), token_ids.long()]
    position_ids = [torch.arange(prefix.length, device=device), positions]
    if m:  # not checked against positions: that would sync
        ids.append(on_device(list(question_ids), device, torch.long))
        position_ids.append(torch.arange(question_start, question_start + m, device=device))
    blending = (
        cache.blend_appended(reused, theta, trailing=m)
        if reused is not None and theta is not None
        else nullcontext()
    )
    # The question's logits need the head; without a question, the decoder alone does.
    runner = model if m else model.get_decoder()
    extra = {"logits_to_keep": 1} if m else {}
    with blending:
        out = runner(
            input_ids=torch.cat(ids)[None],
            position_ids=torch.cat(position_ids)[None],
            **with_cache(runner, cache),
            use_cache=True,
            **extra,
        )
    return cache, out.logits[0, -1] if m else None
