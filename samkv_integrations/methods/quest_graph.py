"""Quest retrieval on a static cache, so that a decode step can be replayed as a CUDA graph.

``retro_attention.RetroDecoder`` runs each step eagerly on the growing ``DynamicCache``: page
scoring, top-k, the gather and two partial attentions per layer are dozens of small kernels
launched from Python, which made ``+decode=quest`` decode about 4x slower than the plain
CUDA-graph step on the 8B shape (README). Quest alone (no retrospective correction) has
fixed shapes once the cache is preallocated: the pool, the page budget and the static
buffers do not change between steps, and nothing is read back to the host mid-step. So the
step of ``static_decode.StaticDecoder`` is reused with Quest's attention swapped in, and
captured and replayed like the plain one.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.attention_scope import swapped_attention
from samkv_integrations.encode import cache_nbytes
from samkv_integrations.methods.pages import KVPool, merge_partials, partial_attention
from samkv_integrations.methods.retro_attention import DecodeStats
from samkv_integrations.static_decode import StaticDecoder

__all__ = ["StaticQuestDecoder"]

#: The key this decoder's attention is registered under, only while one of its steps runs.
ATTENTION_KEY = "samkv_quest_static"


class StaticQuestDecoder(StaticDecoder):
    """Quest page retrieval from a device pool, on a static cache (a CUDA graph where on).

    Each step and layer, the query attends to the static cache's visible slots and to the
    ``pages`` pool pages with the highest Quest bound per KV head, merged by log-sum-exp:
    the same attention as ``RetroDecoder`` with ``window == 1``, on preallocated buffers.

    Args:
        pool: The dropped tokens' pages, on the model's device.
        pages: Pages fetched per layer and KV head at each step (1 .. ``pool.n_pages``).
        details: Where the per-answer stats go (the state's ``details``).
        max_new_tokens: Steps this decoder may run (the static cache's extra slots).
        graphs: Capture the step in a CUDA graph on the first call and replay it after.
    """

    def __init__(
        self,
        pool: KVPool,
        pages: int,
        details: dict[str, object],
        max_new_tokens: int,
        *,
        graphs: bool = False,
    ) -> None:
        if pool.on_host:
            raise ValueError("a pool in host memory cannot be read inside a CUDA graph")
        if not 1 <= pages <= pool.n_pages:
            raise ValueError(f"pages must be in 1 .. {pool.n_pages}, got {pages}")
        super().__init__(max_new_tokens, graphs=graphs)
        self.pool, self.pages, self.details = pool, pages, details
        self.stats = DecodeStats()

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """Feed one token at global ``position``; ``[vocab]`` logits for the next one."""
        logits = super().step(model, cache, token, position)
        n_layers, n_kv_heads = self.pool.key_min.shape[:2]
        fetched = self.pages * n_layers * n_kv_heads
        self.stats.pages += fetched
        resident = cache_nbytes(self._cache) if self._cache is not None else 0
        self.details["decode"] = self.stats.record(fetched, "quest", self.pool, resident)
        return logits

    def _attention(self, model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
        """The static step runs with Quest's attention: what is captured, or run eagerly."""
        return swapped_attention(model, ATTENTION_KEY, self._attend)

    def _attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of the step's one query over the visible slots plus the top pool pages.

        A ``LayerAttention`` (``attention_scope``): ``key`` is the static buffers
        ``[1, n_kv_heads, capacity, head_dim]``; ``attention_mask`` is the static step's
        ``[1, 1, 1, capacity]`` additive mask, 0 where a slot is visible.
        """
        if attention_mask is None or query.shape[0] != 1 or query.shape[2] != 1:
            raise ValueError("StaticQuestDecoder decodes one token at a time on its own mask")
        n_heads, head_dim = query.shape[1], query.shape[3]
        n_kv_heads = key.shape[1]
        q = query[0, :, 0].reshape(n_kv_heads, n_heads // n_kv_heads, head_dim)
        visible = attention_mask[0, 0] == 0  # [1, capacity]
        out, lse = partial_attention(q, key[0], value[0], scaling, visible[None])
        chosen = self.pool.scores(layer, q).topk(self.pages, dim=-1).indices
        page_keys, page_values, valid = self.pool.fetch(layer, chosen)
        page_out, page_lse = partial_attention(q, page_keys, page_values, scaling, valid[:, None])
        out, _ = merge_partials(out, lse, page_out, page_lse)
        return out.reshape(1, 1, n_heads, head_dim).to(query.dtype)
