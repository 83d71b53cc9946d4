"""The question prefill of a decoding policy: dense attention over the compact cache and the pool.

Quest (Tang et al., arXiv 2406.10774) runs the prefill densely and makes only the decode
steps sparse. In our setting the context was built before the question by a method that
dropped most document tokens (the ``KVPool``); ``PooledQuestion`` lets the question's
tokens attend to the compact cache *and* every pooled token, so that the first answer
token and the question's own KV come from the whole context, while the cache decoding
keeps stays compact (the pool is not added to it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from samkv_integrations.attention_scope import swapped_attention
from samkv_integrations.methods.pages import KVPool, merge_partials, partial_attention

__all__ = ["PooledQuestion"]

#: The key this prefill's attention is registered under, only while the prefill runs.
ATTENTION_KEY = "samkv_pooled_question"


class PooledQuestion:
    """Runs a question prefill whose attention also reads every pooled token.

    Args:
        model: The model whose attention is swapped for the prefill.
        pool: The dropped tokens' pages (all at positions before the question).
        details: Where the prefill's stats go (``question_pool``: tokens read, bytes moved
            from host memory).
    """

    def __init__(self, model: PreTrainedModel, pool: KVPool, details: dict[str, object]) -> None:
        self.model = model
        self.pool = pool
        self.details = details
        self.bytes_moved = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """This attention for every layer while the block runs, then the model's own again."""
        try:
            with swapped_attention(self.model, ATTENTION_KEY, self._attend):
                yield
        finally:
            self.details["question_pool"] = {
                "tokens": self.pool.n_tokens,
                "bytes_moved": self.bytes_moved,
            }

    def _attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Causal attention over the compact cache, plus every pooled token, merged exactly.

        A ``LayerAttention`` (``attention_scope``) for a batch of one: ``key`` is the compact
        cache, its last ``q_len`` entries the question's own; ``attention_mask`` is None
        (the causal mask is built here).
        """
        batch, n_heads, q_len, head_dim = query.shape
        if batch != 1:
            raise ValueError(f"PooledQuestion prefills one sequence, got batch {batch}")
        n_kv_heads, cache_len = key.shape[1], key.shape[2]
        group = n_heads // n_kv_heads
        # Rows are (query head within the group, question token), per KV head.
        q = query[0].reshape(n_kv_heads, group * q_len, head_dim)
        entry = torch.arange(cache_len, device=query.device)
        last_seen = torch.arange(q_len, device=query.device) + (cache_len - q_len)
        causal = (entry[None, :] <= last_seen[:, None]).repeat(group, 1)  # [group * q_len, n]
        out, lse = partial_attention(q, key[0], value[0], scaling, causal[None])
        pool = self.pool
        pool_keys, pool_values = pool.keys[layer], pool.values[layer]
        if pool.on_host:
            pool_keys = pool_keys.to(query.device, non_blocking=True)
            pool_values = pool_values.to(query.device, non_blocking=True)
            self.bytes_moved += 2 * pool_keys.numel() * pool_keys.element_size()
        n_slots = pool.n_pages * pool.page_size
        pool_out, pool_lse = partial_attention(
            q,
            pool_keys.reshape(n_kv_heads, n_slots, head_dim),
            pool_values.reshape(n_kv_heads, n_slots, head_dim),
            scaling,
            pool.valid.reshape(1, 1, n_slots),
        )
        out, _ = merge_partials(out, lse, pool_out, pool_lse)
        out = out.reshape(n_heads, q_len, head_dim).transpose(0, 1)
        return out[None].to(query.dtype)
