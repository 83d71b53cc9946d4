"""RetroAttention as a decoding policy on top of any cache-building method (``+decode=retro``)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from samkv_integrations.decode import Decoder
from samkv_integrations.methods.base import BaseMethod, ContextCache, DecodeState, MethodInput
from samkv_integrations.methods.option_checks import check_choices, check_ints
from samkv_integrations.methods.pages import KVPool
from samkv_integrations.methods.pooled_question import PooledQuestion
from samkv_integrations.methods.retro_attention import RetroDecoder
from samkv_integrations.rope import rotate, rotation
from samkv_integrations.timing import Stopwatch

__all__ = ["DECODE_POLICIES", "RetroMethod", "dropped_pool"]

#: Decoding policies a spec may name with ``+decode=``.
DECODE_POLICIES = ("retro", "quest")
#: What the question prefill attends to under a decoding policy (``retro_question``).
QUESTION_SCOPES = ("pool", "compact")


def dropped_pool(
    inputs: MethodInput, kept_indices: list[torch.Tensor], page_size: int, on_host: bool
) -> KVPool | None:
    """The documents' tokens missing from ``kept_indices``, at global positions, paged.

    Keys are the stored ones rotated to the tokens' global positions (as
    ``MethodInput.aligned_keys``); values are the stored ones. Built one layer at a time, so
    that no more than one layer's dropped tokens exist as temporaries besides the pool.
    None if nothing was dropped.
    """
    dropped = []  # (document, local indices of its dropped tokens, their rotation)
    positions = []
    for i, (doc, kept) in enumerate(zip(inputs.documents, kept_indices, strict=True)):
        if doc.keys.numel() == 0:
            continue
        missing = torch.ones(doc.n_tokens, dtype=torch.bool, device=doc.keys.device)
        missing[kept.to(doc.keys.device)] = False
        index = missing.nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        start = inputs.doc_starts[i]
        shift = torch.full_like(index, start - doc.prefix_len)
        dropped.append((doc, index, rotation(inputs.model, shift)))
        positions.append(start + index)
    if not dropped:
        return None

    def layer(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [rotate(d.keys[i].index_select(1, index), *turn) for d, index, turn in dropped]
        values = [d.values[i].index_select(1, index) for d, index, _ in dropped]
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    n_layers = int(dropped[0][0].keys.shape[0])
    return KVPool.from_layers(n_layers, layer, torch.cat(positions), page_size, on_host)


@dataclass
class RetroMethod(BaseMethod):
    """Any method's cache, decoded with Quest retrieval and RetroAttention's correction.

    Papers: RetroAttention (Choi, Kang, Jo, Kim, "Retrospective Sparse Attention for
    Efficient Long-Context Generation", https://arxiv.org/abs/2508.09001) on Quest page
    selection (Tang et al., https://arxiv.org/abs/2406.10774).

    ``build`` and ``after_question`` are ``inner``'s; ``build`` also keeps the documents'
    tokens ``inner`` dropped as a paged pool (``ContextCache.pool``, RoPE-aligned to their
    global positions, per-page key min/max computed once). The decoder replaces
    ``inner``'s: per step and layer it attends to the whole compact cache plus the top
    ``retro_pages`` pool pages by Quest's bound, merged by log-sum-exp (exact softmax over
    both); with ``decode=retro`` it corrects the last ``retro_window - 1`` steps' outputs
    with pages they had not seen and refreshes their next-layer K/V
    (``retro_attention.RetroDecoder``). ``decode=quest`` is the retrieval alone; from a
    device pool it decodes on a static cache replayed as a CUDA graph where the engine
    uses graphs (``quest_graph.StaticQuestDecoder``). With
    ``retro_question=pool`` the question prefill attends densely to the compact cache and
    the whole pool (``pooled_question.PooledQuestion``), as Quest's prefill is dense; the
    pool is read, not added to the cache, so decoding still starts from the compact cache.

    Choices the papers leave open, or that this setting decides:

    - The pool is only what the build stage dropped; the compact cache (prefix, kept
      tokens, question, answer) is always attended in full and is not paged. Quest pages
      the whole cache and budgets all of it; here the budget counts pool pages only.
    - Pages are cut over the dropped tokens in global order, ``retro_page_size`` tokens
      each (Quest's 16 by default), across gaps and document boundaries.
    - GQA: one page set per KV head, scored by Quest's bound summed over the head's group
      of query heads (Quest is stated for one query head per KV head).
    - The budget is the same ``retro_pages`` for every layer and KV head, including the
      first layers (Quest runs its first two layers dense; here they fetch like the rest).
    - Window: ``retro_window`` is the paper's ``w`` (the step itself included), default
      2: each step corrects the one before it. A past step is corrected only with pages
      the current step fetched (no extra transfer) that it had not seen at that layer.
    - Refresh: a corrected output at layer ``l`` is carried through ``o_proj``, the
      residual and the MLP of layer ``l``; the result becomes the past token's input to
      layer ``l + 1`` (kept for later corrections there) and re-projects its key and value
      at ``l + 1``, overwriting the cache. Its query and output at ``l + 1`` are not
      recomputed, and nothing deeper than ``l + 1`` changes unless ``l + 1`` is corrected
      in turn; the logits already emitted for the past token stay as they were.
    - Tokens dropped after the question (an ``after_question`` eviction) are not pooled.

    Attributes:
        inner: The method that builds the cache.
        decode: ``retro`` (retrieval and correction) or ``quest`` (retrieval alone).
        retro_pages: Pool pages fetched per layer and KV head at each step (>= 0; 0 is
            plain compact decoding).
        retro_page_size: Tokens per pool page (>= 1).
        retro_window: The paper's ``w`` for ``decode=retro`` (>= 1; 1 is ``quest``);
            ``decode=quest`` ignores it.
        retro_pool: Where the pool lives: ``device`` or ``host`` (pinned memory; each
            fetch copies its pages to the device).
        retro_question: What the question prefill attends to: ``pool`` (the compact
            cache and every pooled token) or ``compact`` (the compact cache alone, as the
            inner method's question prefill does).
    """

    inner: BaseMethod
    decode: str = "retro"
    retro_pages: int = 8
    retro_page_size: int = 16
    retro_window: int = 2
    retro_pool: str = "device"
    retro_question: str = "pool"

    def __post_init__(self) -> None:
        if not isinstance(self.inner, BaseMethod):
            raise TypeError(f"inner must be a BaseMethod, got {type(self.inner).__name__}")
        check_choices(self, {"decode": DECODE_POLICIES})
        check_ints(self, {"retro_pages": 0, "retro_page_size": 1, "retro_window": 1})
        if self.retro_pool not in ("device", "host"):
            raise ValueError(f"retro_pool must be 'device' or 'host', got {self.retro_pool!r}")
        check_choices(self, {"retro_question": QUESTION_SCOPES})

    @property  # type: ignore[misc]
    def name(self) -> str:  # type: ignore[override]
        """The inner method's name with the policy, e.g. ``samkv+decode=retro``."""
        return f"{self.inner.name}+decode={self.decode}"

    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """``inner``'s cache, with the dropped tokens pooled in ``pool``.

        Args:
            inputs: Prefix, documents (``[n_layers, n_kv_heads, n, head_dim]`` at local
                positions) and question ids.
            watch: Times ``inner``'s phases and ``pool`` (paging and key bounds).

        Returns:
            ``inner``'s context cache with ``pool`` set (None if nothing was dropped).
        """
        if self.retro_question == "pool":  # the question must run under question_scope
            inputs = dataclasses.replace(inputs, prefill_question=False)
        context = self.inner.build(inputs, watch)
        with watch.phase("pool"):
            context.pool = dropped_pool(
                inputs, context.kept_indices, self.retro_page_size, self.retro_pool == "host"
            )
        return context

    def question_scope(
        self, inputs: MethodInput, context: ContextCache
    ) -> contextlib.AbstractContextManager[None]:
        """With ``retro_question=pool`` and a pool, the question also reads every pooled token."""
        if self.retro_question == "compact" or context.pool is None:
            return self.inner.question_scope(inputs, context)
        return PooledQuestion(inputs.model, context.pool, context.details).installed()

    def after_question(self, state: DecodeState, watch: Stopwatch) -> DecodeState:
        """``inner``'s after-question stage."""
        return self.inner.after_question(state, watch)

    def decoder(self, state: DecodeState) -> Decoder:
        """A fresh ``RetroDecoder`` over ``state.pool``; its stats go to ``state.details``."""
        return RetroDecoder(
            state.model,
            state.pool,
            self.retro_pages,
            self.retro_window if self.decode == "retro" else 1,
            state.details,
        )
