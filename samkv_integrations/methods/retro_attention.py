"""RetroAttention's decode step: Quest page retrieval plus retrospective output correction.

Each step, at each layer, the token's query attends to the whole compact cache and to the
``pages`` pool pages whose Quest bound is highest (``pages.KVPool``); the two partial
attentions merge exactly by log-sum-exp. With ``window > 1`` the step also keeps, for each
layer, its query, attention output and normaliser, the pages it saw and the hidden state
entering the layer (the output cache). A later step within the window that fetches pages
an earlier step did not see attends that earlier query to them too and merges the result
into the stored output; the corrected output is then carried through the rest of its layer
(``o_proj``, residual, MLP) and re-projects the earlier token's key and value of the next
layer, overwriting the stale cache entries (Choi et al., arXiv 2508.09001).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.attention_scope import swapped_attention
from samkv_integrations.decode import Decoder
from samkv_integrations.encode import cache_nbytes
from samkv_integrations.methods.pages import KVPool, merge_partials, partial_attention
from samkv_integrations.rope import rotate_half

__all__ = ["DecodeStats", "RetroDecoder"]

logger = logging.getLogger(__name__)

#: The key this decoder's attention is registered under, only while one of its steps runs.
ATTENTION_KEY = "samkv_retro"
#: What a decoder layer must have for the refresh to re-run its tail (Llama, Qwen2, Mistral).
_LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")


@dataclass(slots=True)
class _StepRecord:
    """One decode step's entry in the output cache, per layer (``None`` until reached)."""

    cache_index: int
    query: list[torch.Tensor | None]  # [n_kv_heads, group, head_dim]
    out: list[torch.Tensor | None]  # [n_kv_heads, group, head_dim] float32
    lse: list[torch.Tensor | None]  # [n_kv_heads, group] float32
    seen: list[torch.Tensor | None]  # [n_kv_heads, n_pages] bool
    hidden: list[torch.Tensor | None]  # [1, 1, hidden]: the residual entering the layer
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin at its position

    @classmethod
    def empty(cls, cache_index: int, n_layers: int) -> _StepRecord:
        def empty() -> list[torch.Tensor | None]:
            return [None] * n_layers

        return cls(cache_index, empty(), empty(), empty(), empty(), empty())


@dataclass
class DecodeStats:
    """Per-answer counts of a retrieval decoder, shown in the answer's ``details["decode"]``."""

    steps: int = 0
    pages: int = 0
    bytes_moved: int = 0
    corrections: int = 0
    refreshed: int = 0
    max_pages: int = 0

    def record(self, fetched: int, policy: str, pool: KVPool | None, resident: int) -> dict:
        """Count one step that fetched ``fetched`` pages; the details of the answer so far.

        Args:
            fetched: Pages fetched this step, over every layer and KV head.
            policy: ``retro`` or ``quest``.
            pool: The pool (None: nothing to fetch).
            resident: Bytes of KV the decoder holds on the device besides a device pool.
        """
        self.steps += 1
        self.max_pages = max(self.max_pages, fetched)
        if pool is not None and not pool.on_host:
            resident += pool.nbytes
        return {
            "policy": policy,
            "steps": self.steps,
            "pages_per_step": self.pages / self.steps,
            "max_pages_per_step": self.max_pages,
            "page_size": pool.page_size if pool is not None else 0,
            "bytes_moved": self.bytes_moved,
            "resident_kv_bytes": resident,
            "corrections": self.corrections,
            "refreshed_entries": self.refreshed,
            "pool_tokens": pool.n_tokens if pool is not None else 0,
            "pool_bytes": pool.nbytes if pool is not None else 0,
            "pool_on_host": bool(pool is not None and pool.on_host),
        }


class RetroDecoder(Decoder):
    """Decode step over the compact cache plus retrieved pool pages, with retro correction.

    One instance serves one answer: the output cache is per answer. ``window == 1`` is
    Quest-style retrieval alone (nothing is kept, nothing corrected).

    Args:
        model: The model (Llama or Qwen2 family: its decoder layers must have
            ``self_attn``, ``input_layernorm``, ``post_attention_layernorm`` and ``mlp``).
        pool: The dropped tokens' pages, or None (nothing to fetch: plain attention).
        pages: Pages fetched per layer and KV head at each step.
        window: Steps whose outputs a step may correct, itself included (the paper's ``w``).
        details: Where the per-answer stats go, updated after every step (the state's
            ``details``, which the engine's answer record holds).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pool: KVPool | None,
        pages: int,
        window: int,
        details: dict[str, object],
    ) -> None:
        self.layers: nn.ModuleList = model.get_decoder().layers
        if window > 1:
            missing = [p for p in _LAYER_PARTS if not hasattr(self.layers[0], p)]
            if missing:
                raise ValueError(
                    f"retro_window: {type(self.layers[0]).__name__} lacks {missing}; the "
                    "retrospective refresh needs a Llama-style decoder layer (use retro_window=1)"
                )
        self.pool = pool if pool is not None and pool.n_pages else None
        self.pages = min(pages, self.pool.n_pages) if self.pool is not None else 0
        self.window = window
        self.details = details
        self.past: deque[_StepRecord] = deque(maxlen=max(window - 1, 0))
        self.stats = DecodeStats()
        self._cache: DynamicCache | None = None
        self._current: _StepRecord | None = None

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """Feed one token through the model with this decoder's attention; next logits."""
        if self.pages == 0:
            # Nothing to fetch: the plain step is exactly compact decoding, at its speed.
            logits = super().step(model, cache, token, position)
            self._count(0, cache)
            return logits
        n_layers = len(self.layers)
        self._cache = cache
        self._current = _StepRecord.empty(cache.get_seq_length(), n_layers)
        fetched_before = self.stats.pages
        with self._installed(model):
            logits = super().step(model, cache, token, position)
        if self.window > 1:
            self.past.append(self._current)
        self._current = None
        self._count(self.stats.pages - fetched_before, cache)
        return logits

    def _count(self, fetched: int, cache: DynamicCache) -> None:
        policy = "retro" if self.window > 1 else "quest"
        self.details["decode"] = self.stats.record(fetched, policy, self.pool, cache_nbytes(cache))

    def graph_twin(self, max_new_tokens: int) -> Decoder | None:
        """Quest retrieval from a device pool on a static cache, replayed as a CUDA graph.

        None for the retrospective correction (its refresh rewrites past entries from the
        host's records), a pool in host memory (each fetch is a host-driven copy) or no pool.
        """
        if self.window > 1 or self.pool is None or self.pool.on_host or self.pages == 0:
            return None
        from samkv_integrations.methods.quest_graph import StaticQuestDecoder

        return StaticQuestDecoder(self.pool, self.pages, self.details, max_new_tokens, graphs=True)

    @contextlib.contextmanager
    def _installed(self, model: PreTrainedModel) -> Iterator[None]:
        """This decoder's attention (and hidden-state capture) for one step, then restored."""
        hooks = []
        with swapped_attention(model, ATTENTION_KEY, self._attend):
            try:
                if self.window > 1:
                    hooks = [
                        layer.register_forward_pre_hook(self._capture(i), with_kwargs=True)
                        for i, layer in enumerate(self.layers)
                    ]
                yield
            finally:
                for hook in hooks:
                    hook.remove()

    def _capture(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            record = self._current
            if record is None:
                return
            record.hidden[index] = args[0] if args else kwargs["hidden_states"]
            if record.rotary is None:
                record.rotary = kwargs.get("position_embeddings")

        return hook

    def _attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of the step's one query over the compact cache plus fetched pages.

        A ``LayerAttention`` (``attention_scope``): ``key`` is the compact cache with this
        token; ``attention_mask`` is ignored (one query at the end of the cache sees every
        entry).
        """
        if query.shape[0] != 1 or query.shape[2] != 1:
            raise ValueError(f"RetroDecoder decodes one token at a time, got {tuple(query.shape)}")
        pool, record = self.pool, self._current
        if pool is None or record is None:
            raise RuntimeError("RetroDecoder attention ran outside its own step")
        n_heads, head_dim = query.shape[1], query.shape[3]
        n_kv_heads = key.shape[1]
        q = query[0, :, 0].reshape(n_kv_heads, n_heads // n_kv_heads, head_dim)
        out, lse = partial_attention(q, key[0], value[0], scaling)
        chosen = pool.scores(layer, q).topk(self.pages, dim=-1).indices  # [n_kv_heads, k]
        page_keys, page_values, valid = pool.fetch(layer, chosen)
        page_out, page_lse = partial_attention(q, page_keys, page_values, scaling, valid[:, None])
        out, lse = merge_partials(out, lse, page_out, page_lse)
        self.stats.pages += chosen.numel()
        if pool.on_host:
            self.stats.bytes_moved += chosen.numel() * pool.page_bytes()
        if self.window > 1:
            seen = torch.zeros(n_kv_heads, pool.n_pages, dtype=torch.bool, device=q.device)
            seen.scatter_(1, chosen, True)
            for past in self.past:
                self._correct(past, layer, seen, chosen, page_keys, page_values, valid, scaling)
            record.query[layer], record.out[layer], record.lse[layer] = q, out, lse
            record.seen[layer] = seen
        return out.reshape(1, 1, n_heads, head_dim).to(query.dtype)

    def _correct(
        self,
        past: _StepRecord,
        layer: int,
        seen: torch.Tensor,
        chosen: torch.Tensor,
        page_keys: torch.Tensor,
        page_values: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
    ) -> None:
        """Merge the pages ``past`` did not see into its output at ``layer``; refresh ``layer + 1``."""
        past_seen, past_query = past.seen[layer], past.query[layer]
        past_out, past_lse = past.out[layer], past.lse[layer]
        if past_seen is None or past_query is None or past_out is None or past_lse is None:
            return
        new_pages = seen & ~past_seen
        if not bool(new_pages.any()):
            return
        # Only the pages this step already fetched are read: no extra transfer.
        unseen = new_pages.gather(1, chosen).repeat_interleave(self.pool_page_size, dim=1)
        extra_out, extra_lse = partial_attention(
            past_query, page_keys, page_values, scaling, (unseen & valid)[:, None]
        )
        past.out[layer], past.lse[layer] = merge_partials(past_out, past_lse, extra_out, extra_lse)
        past.seen[layer] = past_seen | seen
        self.stats.corrections += 1
        self._refresh(past, layer)

    @property
    def pool_page_size(self) -> int:
        """Tokens per pool page."""
        return self.pool.page_size if self.pool is not None else 0

    def _refresh(self, past: _StepRecord, layer: int) -> None:
        """Carry ``past``'s corrected output through its layer; rewrite its next-layer K/V.

        The corrected hidden state becomes ``past``'s input to ``layer + 1`` in the output
        cache, so that a later correction there builds on it. The query ``past`` used at
        ``layer + 1`` (and its output there) are not recomputed: only the key and value
        later tokens read are refreshed, as the paper's KV update does.
        """
        hidden, out, cache = past.hidden[layer], past.out[layer], self._cache
        if hidden is None or out is None or cache is None or layer + 1 >= len(self.layers):
            return
        if past.rotary is None:
            return
        block: Any = self.layers[layer]
        following: Any = self.layers[layer + 1]
        attention = following.self_attn
        flat = out.reshape(1, 1, -1).to(hidden.dtype)
        hidden = hidden + block.self_attn.o_proj(flat)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        past.hidden[layer + 1] = hidden
        normed = following.input_layernorm(hidden)
        head_dim = out.shape[-1]
        keys = attention.k_proj(normed).view(1, 1, -1, head_dim)
        k_norm = getattr(attention, "k_norm", None)  # Qwen3-style per-head key norm
        if k_norm is not None:
            keys = k_norm(keys)
        keys = keys.transpose(1, 2)
        values = attention.v_proj(normed).view(1, 1, -1, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in past.rotary)
        keys = keys * cos + rotate_half(keys) * sin
        target: Any = cache.layers[layer + 1]
        target.keys[0, :, past.cache_index] = keys[0, :, 0].to(target.keys.dtype)
        target.values[0, :, past.cache_index] = values[0, :, 0].to(target.values.dtype)
        self.stats.refreshed += 1
