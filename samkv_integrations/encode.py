"""Per-document prefill behind the shared prefix: what indexing computes once per chunk.

What is kept of it, K/V and the stored extras, is laid out in ``cache_format``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.cache_format import EXTRAS, DocumentPrefill, declared_extras
from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import DocumentKV

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefixKV:
    """The shared prefix's KV cache, computed once per model.

    Attributes:
        token_ids: The prefix token ids.
        keys: Per layer ``[1, n_kv_heads, prefix_len, head_dim]``.
        values: Per layer ``[1, n_kv_heads, prefix_len, head_dim]``.
    """

    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        """Number of prefix tokens."""
        return len(self.token_ids)

    def cache(self, model: PreTrainedModel, batch_size: int = 1) -> DynamicCache:
        """A fresh cache holding the prefix; appending to it never touches the stored tensors."""
        return DynamicCache(
            ddp_cache_data=[
                (k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                for k, v in zip(self.keys, self.values, strict=True)
            ],
            config=model.config,
        )


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)``, ``[batch, n_kv_heads, seq, head_dim]``.

    Raises:
        ValueError: If a layer holds no key/value tensors (e.g. linear attention), which
            per-token KV reuse cannot work with.
    """
    tensors = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError(f"cache layer {i} ({type(layer).__name__}) holds no key/value tensors")
        tensors.append((keys, values))
    return tensors


@contextmanager
def capture_queries(model: PreTrainedModel) -> Iterator[list[torch.Tensor | None]]:
    """Record each layer's pre-RoPE query projection during the forward passes inside.

    Yields a list with one slot per layer, holding the last ``q_proj`` output
    ``[batch, seq, n_q_heads * head_dim]``. The hooks are removed on exit, even on error.
    """
    layers = model.get_decoder().layers
    captured: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    try:
        for i, layer in enumerate(layers):

            def hook(_m: torch.nn.Module, _a: object, out: torch.Tensor, i: int = i) -> None:
                captured[i] = out

            handles.append(layer.self_attn.q_proj.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _head_dim(model: PreTrainedModel) -> int:
    config = model.config
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


@torch.inference_mode()
def encode_prefix(model: PreTrainedModel, token_ids: list[int]) -> PrefixKV:
    """Prefill the shared prefix once."""
    ids = torch.tensor([token_ids], device=model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **with_cache(model, cache), use_cache=True)
    layers = layer_tensors(cache)
    return PrefixKV(
        token_ids=list(token_ids),
        keys=[k for k, _ in layers],
        values=[v for _, v in layers],
    )


@torch.inference_mode()
def encode_documents(
    model: PreTrainedModel,
    prefix: PrefixKV,
    documents: Sequence[list[int]],
    fingerprint: str,
    *,
    batch_tokens: int = 8192,
    progress: bool = True,
    extras: Sequence[str] | None = None,
) -> list[DocumentKV]:
    """Prefill each document alone behind the shared prefix, batching similar lengths.

    Documents are right-padded within a batch. Causal attention means a real token never
    sees the padding after it, so no padding mask is needed and each document's KV equals
    what a batch of one would give.

    Args:
        model: The model.
        prefix: The shared prefix cache.
        documents: Framed token ids of each document.
        fingerprint: The model fingerprint to record on each cache.
        batch_tokens: Upper bound on padded tokens per batch.
        progress: Show a tqdm bar.
        extras: Names of the stored extras to compute (``cache_format.EXTRAS``), e.g. those
            the registered methods declare; ``None``: every known extra.

    Returns:
        One ``DocumentKV`` per document, in input order, on the model's device.

    Raises:
        ValueError: An extra's name is unknown.
    """
    names = declared_extras([EXTRAS if extras is None else extras])
    order = sorted(range(len(documents)), key=lambda i: len(documents[i]))
    results: list[DocumentKV | None] = [None] * len(documents)
    n_heads = model.config.num_attention_heads
    head_dim = _head_dim(model)
    bar = tqdm(total=len(documents), desc="Encoding documents", unit="doc", disable=not progress)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(documents[order[end]]) * (end - start + 1) <= batch_tokens:
            end += 1
        batch = order[start:end]
        longest = max(len(documents[i]) for i in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long, device=model.device)
        for row, i in enumerate(batch):
            ids[row, : len(documents[i])] = torch.tensor(documents[i], device=model.device)
        positions = torch.arange(prefix.length, prefix.length + longest, device=model.device)
        cache = prefix.cache(model, batch_size=len(batch))
        capture: AbstractContextManager[list[torch.Tensor | None]] = (
            capture_queries(model) if names else nullcontext([])
        )
        with capture as queries:
            model(
                input_ids=ids,
                position_ids=positions[None, :].expand(len(batch), -1),
                **with_cache(model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
        layers = layer_tensors(cache)
        keys = torch.stack([k[:, :, prefix.length :] for k, _ in layers], dim=1)
        values = torch.stack([v[:, :, prefix.length :] for _, v in layers], dim=1)
        for row, i in enumerate(batch):
            n = len(documents[i])
            prefill = DocumentPrefill(
                keys=keys[row, :, :, :n].contiguous(),
                values=values[row, :, :, :n].contiguous(),
                queries=[q[row, :n].view(n, n_heads, head_dim) for q in queries if q is not None],
            )
            results[i] = DocumentKV(
                token_ids=list(documents[i]),
                keys=prefill.keys,
                values=prefill.values,
                fingerprint=fingerprint,
                prefix_len=prefix.length,
                extras={name: EXTRAS[name].compute(prefill) for name in names},
            )
        bar.update(len(batch))
        start = end
    bar.close()
    return [r for r in results if r is not None]
