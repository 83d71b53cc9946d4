"""Per-document prefill behind the shared prefix: what indexing computes once per chunk.

What is kept of it, K/V and the stored extras (``stored_extras``), is laid out in
``cache_format``; indexing streams it to the store a batch at a time (``indexing``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import DocumentKV
from samkv_integrations.stored_extras import (
    EXTRAS,
    QUERY_WINDOW,
    DocumentPrefill,
    declared_extras,
)

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


def layer_tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def cache_nbytes(cache: Cache) -> int:
    """Bytes of every key and value tensor held by ``cache`` (a static one: its capacity)."""
    return sum(t.numel() * t.element_size() for pair in layer_tensors(cache) for t in pair)


class _QueriesCapturedError(Exception):
    """Raised inside a forward to stop it once the last query wanted is recorded."""


@contextmanager
def capture_queries(
    model: PreTrainedModel,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_after: int | None = None,
) -> Iterator[list[torch.Tensor | None]]:
    """Record each layer's pre-RoPE query projection during the forward passes inside.

    Yields a list with one slot per layer, holding the last ``q_proj`` output
    ``[batch, seq, n_q_heads * head_dim]``, or what ``keep`` makes of it (so that a long
    batch need not hold every layer's queries). With ``stop_after``, the forward ends as
    soon as that layer's query is recorded (the deeper layers' work would be thrown away);
    the block inside then leaves quietly. The hooks are removed on exit, even on error.
    """
    layers = model.get_decoder().layers
    captured: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    try:
        for i, layer in enumerate(layers):

            def hook(_m: torch.nn.Module, _a: object, out: torch.Tensor, i: int = i) -> None:
                captured[i] = out if keep is None else keep(out)
                if i == stop_after:
                    raise _QueriesCapturedError

            handles.append(layer.self_attn.q_proj.register_forward_hook(hook))
        yield captured
    except _QueriesCapturedError:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _head_dim(model: PreTrainedModel) -> int:
    config = model.config
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def prefill(
    model: PreTrainedModel, ids: list[int], cache: DynamicCache, start: int
) -> torch.Tensor:
    """Prefill ``ids`` at global positions ``start ..`` into ``cache``; ``[vocab]`` next logits."""
    out = model(
        input_ids=torch.tensor([ids], device=model.device),
        position_ids=(torch.arange(len(ids), device=model.device) + start)[None],
        **with_cache(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[0, -1]


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
    """Prefill each document alone behind the shared prefix; every result at once.

    Holds every document's KV until all are encoded: fine for the few a query re-encodes;
    indexing streams :func:`encode_batches` to storage instead.

    Args:
        model: The model.
        prefix: The shared prefix cache.
        documents: Framed token ids of each document.
        fingerprint: The model fingerprint to record on each cache.
        batch_tokens: Upper bound on padded tokens per batch.
        progress: Show a tqdm bar.
        extras: Names of the stored extras to compute; ``None``: every known extra.

    Returns:
        One ``DocumentKV`` per document, in input order, on the model's device.

    Raises:
        ValueError: An extra's name is unknown.
    """
    results: list[DocumentKV | None] = [None] * len(documents)
    with tqdm(
        total=len(documents), desc="Encoding documents", unit="doc", disable=not progress
    ) as bar:
        for batch in encode_batches(
            model, prefix, documents, fingerprint, batch_tokens=batch_tokens, extras=extras
        ):
            for i, doc in batch:
                results[i] = doc
            bar.update(len(batch))
    return [r for r in results if r is not None]


def encode_batches(
    model: PreTrainedModel,
    prefix: PrefixKV,
    documents: Sequence[list[int]],
    fingerprint: str,
    *,
    batch_tokens: int = 8192,
    extras: Sequence[str] | None = None,
) -> Iterator[EncodedBatch]:
    """Prefill each document alone behind the shared prefix, one batch of similar lengths at a time.

    Documents are right-padded within a batch. Causal attention means a real token never
    sees the padding after it, so no padding mask is needed and each document's KV equals
    what a batch of one would give (up to float rounding, which differs between batch
    shapes). Only the batch in hand is held: a consumer that drops it before asking for the
    next keeps memory flat however many documents there are.

    Args:
        model: The model.
        prefix: The shared prefix cache.
        documents: Framed token ids of each document.
        fingerprint: The model fingerprint to record on each cache.
        batch_tokens: Upper bound on padded tokens per batch.
        extras: Names of the stored extras to compute (``cache_format.EXTRAS``), e.g. those
            the registered methods declare; ``None``: every known extra.

    Yields:
        One :class:`EncodedBatch` per forward pass.

    Raises:
        ValueError: An extra's name is unknown (on the first ``next``).
    """
    names = declared_extras([EXTRAS if extras is None else extras])
    order = sorted(range(len(documents)), key=lambda i: len(documents[i]))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(documents[order[end]]) * (end - start + 1) <= batch_tokens:
            end += 1
        batch = order[start:end]
        with torch.inference_mode():
            yield _encode_batch(model, prefix, documents, batch, fingerprint, names)
        start = end


@dataclass(slots=True)
class EncodedBatch:
    """The documents of one forward pass, their KV still in the batch's cache.

    Iterating gives ``(index into the documents, DocumentKV on the model's device)`` and
    copies each document out of the batch only as it comes, so that the batch never holds
    its documents' KV twice.

    Attributes:
        indices: Each row's index into the documents given to ``encode_batches``.
        documents: Each row's framed token ids.
        layers: Per layer ``(keys, values)``, ``[rows, n_kv_heads, prefix + longest, head_dim]``.
        queries: Per layer ``[rows, QUERY_WINDOW, n_q_heads, head_dim]``: each row's last
            ``QUERY_WINDOW`` queries (fewer real ones, first, for a shorter document).
        prefix_len: The shared prefix length.
        fingerprint: The model fingerprint to record on each cache.
        names: The stored extras to compute.
    """

    indices: list[int]
    documents: list[list[int]]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    queries: list[torch.Tensor]
    prefix_len: int
    fingerprint: str
    names: Sequence[str]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, DocumentKV]]:
        start = self.prefix_len
        for row, (i, doc) in enumerate(zip(self.indices, self.documents, strict=True)):
            n = len(doc)
            with torch.inference_mode():
                prefill = DocumentPrefill(
                    keys=torch.stack([k[row, :, start : start + n] for k, _ in self.layers]),
                    values=torch.stack([v[row, :, start : start + n] for _, v in self.layers]),
                    queries=[q[row, : min(n, QUERY_WINDOW)] for q in self.queries],
                )
                computed = {name: EXTRAS[name].compute(prefill) for name in self.names}
            kv = DocumentKV(
                list(doc), prefill.keys, prefill.values, self.fingerprint, start, computed
            )
            yield i, kv


def _encode_batch(
    model: PreTrainedModel,
    prefix: PrefixKV,
    documents: Sequence[list[int]],
    batch: list[int],
    fingerprint: str,
    names: Sequence[str],
) -> EncodedBatch:
    """One padded forward pass over the documents at ``batch``."""
    rows = [documents[i] for i in batch]
    longest = max(len(doc) for doc in rows)
    ids = torch.zeros((len(rows), longest), dtype=torch.long, device=model.device)
    for row, doc in enumerate(rows):
        ids[row, : len(doc)] = torch.tensor(doc, device=model.device)
    positions = torch.arange(prefix.length, prefix.length + longest, device=model.device)
    cache = prefix.cache(model, batch_size=len(rows))
    # Each row's last QUERY_WINDOW positions (a shorter row's real ones first): the only
    # queries an extra reads, kept instead of every layer's queries for the whole batch.
    lengths = torch.tensor([len(doc) for doc in rows], device=model.device)
    window = torch.arange(QUERY_WINDOW, device=model.device)
    at = ((lengths - QUERY_WINDOW).clamp(min=0)[:, None] + window).clamp(max=lengths[:, None] - 1)
    n_heads, head_dim = model.config.num_attention_heads, _head_dim(model)

    def keep(out: torch.Tensor) -> torch.Tensor:
        picked = out.gather(1, at[:, :, None].expand(-1, -1, out.shape[-1]))
        return picked.view(len(rows), QUERY_WINDOW, n_heads, head_dim)

    capture: AbstractContextManager[list[torch.Tensor | None]] = (
        capture_queries(model, keep) if names else nullcontext([])
    )
    with capture as queries:
        model(
            input_ids=ids,
            position_ids=positions[None, :].expand(len(rows), -1),
            **with_cache(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return EncodedBatch(
        indices=batch,
        documents=rows,
        layers=layer_tensors(cache),
        queries=[q for q in queries if q is not None],
        prefix_len=prefix.length,
        fingerprint=fingerprint,
        names=names,
    )
