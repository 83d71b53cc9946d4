"""A paged pool of dropped KV with Quest key bounds, and partial attention merged by log-sum-exp.

Quest (Tang et al., ICML 2024, arXiv 2406.10774) splits the KV cache into pages and keeps,
per page, the channel-wise minimum and maximum of its keys. For a query ``q`` the page's
score ``sum_i max(q_i * kmin_i, q_i * kmax_i)`` bounds from above every ``q . k`` inside
it, so the top pages by that bound are the ones worth loading. Here the pages hold the
tokens a cache-building method dropped (``KVPool``), at their global positions; decoding
attends to the compact cache and to a few fetched pages, and the two partial attentions
are combined exactly by their softmax normalisers (``merge_partials``), as FlashAttention
combines blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVPool", "merge_partials", "partial_attention"]


def partial_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each KV head's queries over a subset of entries, with its normaliser.

    Args:
        query: ``[n_kv_heads, rows, head_dim]``: each KV head's queries (its GQA group of
            query heads, for one token or several).
        keys: ``[n_kv_heads, n, head_dim]`` post-RoPE keys.
        values: ``[n_kv_heads, n, head_dim]``.
        scaling: The score scale (``head_dim ** -0.5`` for Llama and Qwen2).
        mask: Broadcastable to ``[n_kv_heads, rows, n]``, True where the entry takes part
            (e.g. ``[n_kv_heads, 1, n]`` for one set per head); None: all do.

    Returns:
        ``(out, lse)``: ``[n_kv_heads, rows, head_dim]`` attention output normalised over
        the subset and ``[n_kv_heads, rows]`` log-sum-exp of its scores, both float32.
        A head with no entry gets a zero output and ``lse = -inf`` (it weighs nothing in
        ``merge_partials``).
    """
    scores = torch.matmul(query, keys.transpose(-1, -2)).float() * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) is NaN where a head has no entry: those weights are zero.
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(weights, values.float()), lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint entry sets into the attention over both.

    ``softmax`` over ``A ∪ B`` is ``exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``
    with ``lse = logaddexp(lse_a, lse_b)``: exact, whatever the order of the merges.

    Args:
        out_a: ``[..., head_dim]`` output normalised over set A.
        lse_a: ``[...]`` log-sum-exp of set A's scores.
        out_b: ``[..., head_dim]`` output normalised over set B.
        lse_b: ``[...]`` log-sum-exp of set B's scores.

    Returns:
        ``(out, lse)`` over the union, float32.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


@dataclass(slots=True)
class KVPool:
    """Dropped tokens' KV in pages of ``page_size``, with per-page key bounds.

    Pages are cut over the dropped tokens in global order (a page may span a gap or a
    document boundary); the last page is padded, and ``valid`` masks the padding out.

    Attributes:
        keys: ``[n_layers, n_kv_heads, n_pages, page_size, head_dim]`` post-RoPE keys at
            global positions, on the model's device or in (pinned) host memory.
        values: Same shape as ``keys``, same place.
        valid: ``[n_pages, page_size]`` True for real tokens, on the model's device.
        key_min: ``[n_layers, n_kv_heads, n_pages, head_dim]`` channel-wise minimum of the
            page's keys, on the model's device (computed once).
        key_max: Same shape, the maximum.
        positions: ``[n_tokens]`` global positions of the pooled tokens, in pool order.
        on_host: Whether the pages live in host memory (each fetch copies them to the
            device of the bounds).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    key_min: torch.Tensor
    key_max: torch.Tensor
    positions: torch.Tensor
    on_host: bool = False

    @classmethod
    def from_layers(
        cls,
        n_layers: int,
        layer: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        page_size: int,
        on_host: bool,
    ) -> KVPool:
        """Page the tokens and compute their bounds, one layer at a time.

        Args:
            n_layers: Layers of the model.
            layer: Layer ``i``'s ``(keys, values)``, each ``[n_kv_heads, n_tokens, head_dim]``
                at global positions, on the model's device; called once per layer, so
                that only one layer's tokens are temporaries at a time.
            positions: ``[n_tokens]`` their global positions (ascending).
            page_size: Tokens per page.
            on_host: Keep the pages in host memory (pinned where CUDA is available) rather
                than on the device; they are copied there layer by layer.
        """
        n_tokens = int(positions.numel())
        n_pages = -(-n_tokens // page_size)
        pad = n_pages * page_size - n_tokens
        device = positions.device
        valid = (torch.arange(n_pages * page_size, device=device) < n_tokens).view(n_pages, -1)
        inside = valid[None, :, :, None]
        first = layer(0)
        n_kv_heads, _, head_dim = first[0].shape
        paged = (n_kv_heads, n_pages, page_size, head_dim)
        # Host pages are pinned where there is a GPU, so each fetch copies asynchronously.
        pinned = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        place: dict[str, Any] = pinned if on_host else {"device": device}
        keys = torch.empty((n_layers, *paged), dtype=first[0].dtype, **place)
        values = torch.empty((n_layers, *paged), dtype=first[1].dtype, **place)
        bounds = (n_layers, n_kv_heads, n_pages, head_dim)
        key_min = torch.empty(bounds, dtype=first[0].dtype, device=device)
        key_max = torch.empty(bounds, dtype=first[0].dtype, device=device)
        for i in range(n_layers):
            layer_keys, layer_values = first if i == 0 else layer(i)
            page_keys = torch.nn.functional.pad(layer_keys, (0, 0, 0, pad)).view(paged)
            page_values = torch.nn.functional.pad(layer_values, (0, 0, 0, pad)).view(paged)
            key_min[i] = page_keys.masked_fill(~inside, float("inf")).amin(dim=2)
            key_max[i] = page_keys.masked_fill(~inside, float("-inf")).amax(dim=2)
            keys[i].copy_(page_keys)
            values[i].copy_(page_values)
        return cls(keys, values, valid, key_min, key_max, positions, on_host)

    @property
    def n_pages(self) -> int:
        """Number of pages."""
        return int(self.valid.shape[0])

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return int(self.valid.shape[1])

    @property
    def n_tokens(self) -> int:
        """Pooled tokens (padding excluded)."""
        return int(self.positions.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the paged keys and values (padding included)."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def page_bytes(self) -> int:
        """Bytes of one page's keys and values at one layer and KV head."""
        return 2 * self.page_size * int(self.keys.shape[-1]) * self.keys.element_size()

    def scores(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """Quest's upper bound of each page for a query, summed over each KV head's group.

        Args:
            layer: Layer index.
            query: ``[n_kv_heads, group, head_dim]``.

        Returns:
            ``[n_kv_heads, n_pages]`` float32 scores.
        """
        q = query.float()[:, :, None, :]  # [n_kv_heads, group, 1, head_dim]
        low = self.key_min[layer].float()[:, None]  # [n_kv_heads, 1, n_pages, head_dim]
        high = self.key_max[layer].float()[:, None]
        return torch.maximum(q * low, q * high).sum(dim=-1).sum(dim=1)

    def fetch(
        self, layer: int, pages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pages' keys and values at one layer, on the device of the bounds.

        Args:
            layer: Layer index.
            pages: ``[n_kv_heads, k]`` page indices, one set per KV head.

        Returns:
            ``(keys, values, valid)``: ``[n_kv_heads, k * page_size, head_dim]`` twice and
            ``[n_kv_heads, k * page_size]``.
        """
        n_kv_heads, k = pages.shape
        heads = torch.arange(n_kv_heads, device=pages.device)[:, None]
        if self.on_host:
            host_pages, host_heads = pages.cpu(), heads.cpu()
            keys = self.keys[layer][host_heads, host_pages].to(pages.device, non_blocking=True)
            values = self.values[layer][host_heads, host_pages].to(pages.device, non_blocking=True)
        else:
            keys = self.keys[layer][heads, pages]
            values = self.values[layer][heads, pages]
        head_dim = keys.shape[-1]
        valid = self.valid[pages].reshape(n_kv_heads, k * self.page_size)
        return (
            keys.reshape(n_kv_heads, k * self.page_size, head_dim),
            values.reshape(n_kv_heads, k * self.page_size, head_dim),
            valid,
        )
