"""SAGE-KV: full prefill, then one top-k eviction per KV head guided by the question's attention."""

from __future__ import annotations

from dataclasses import dataclass

from samkv_integrations.methods.base import BaseMethod, ContextCache, DecodeState, MethodInput
from samkv_integrations.methods.eviction import (
    OBSERVATION_WINDOW,
    evict_after_question,
    record_window,
)
from samkv_integrations.methods.full import FullMethod
from samkv_integrations.methods.option_checks import check_fractions, check_ints, check_odd
from samkv_integrations.timing import Stopwatch


@dataclass
class SageKVMethod(BaseMethod):
    """Self-attention guided eviction after a full prefill (Wang et al., 2025).

    Paper: https://arxiv.org/abs/2503.08879 ("LLMs Know What to Drop").

    ``build`` is ``full``'s: the prefix, every document token and (where the engine allows
    it) the question are prefilled from their text in one forward. ``after_question`` then
    makes the one selection: the last ``window`` question tokens' queries score every cache
    entry at every layer (softmax over the whole cache, as the model attends), summed over
    the query heads of each KV group and over the window, giving ``[n_layers, n_kv_heads,
    n_context]``; each KV head of each layer keeps its own top ``k = floor(budget ·
    n_context)`` document tokens (``n_context``: the document tokens of the layout),
    gathered per head, so every layer's cache stays ``[1, n_kv_heads, prefix + k + question,
    head_dim]``. Decoding then runs on the reduced cache. The window's queries are recorded
    in ``build``'s forward where the question runs in it (the engine's path, unless a
    decoding policy prefills the question itself); otherwise recomputing them costs one
    forward of ``window`` tokens over the cache (``eviction.window_attention``).

    Choices the paper leaves open, or that this layout decides:

    - Window: the paper scores with the last input token's query (``window=1``); the
      default pools the last 16 (SnapKV's observation window), capped at the question's
      length so that no document token votes for itself. To be measured against 1.
    - Pooling: probabilities summed over the group's query heads and the window (the
      ranking equals the mean's).
    - Sinks and recent window: the shared prefix (BOS and instructions, first in the
      layout) and the whole question are always kept and not counted against the budget,
      as in every method here; ``n_sink`` leading layout tokens are kept as sinks, which
      touches document tokens (counted in ``k``) only when it exceeds the prefix. New
      answer tokens are appended; the recent window does not slide (answers are short).
    - Budget: the same ``k`` for every layer and head (rectangular caches; per-head or
      per-layer budgets as in Ada-KV or PyramidKV would need ragged layers).
    - Clustering: the paper ranks tokens by their own scores (``kernel=1``); the default
      first averages each score with its two neighbours each side (``kernel=5``, SnapKV's
      pooling, ``eviction.clustered``), so that a kept token keeps the rest of its word or
      name. Qwen2.5-Coder-1.5B on the GPU at 15%, contains against ``kernel=1`` in the same
      run: NQ 30 documents +3.3 points [+0.0, +6.7] (n=300), HotpotQA long +5.4
      [+1.9, +8.8] (n=261 of 300: the run hit its timeout); README, "SnapKV's
      clustering". Not measured on 0.5B or the short set.
    - Ties: the earlier token wins (stable sort).

    Positions: heads keep different tokens, so no single ``[cache_len]`` vector can name
    every entry. ``positions`` and ``kept_indices`` name the representative set of ``k``
    tokens, the top ``k`` by the score summed over all layers and heads: the count and so
    the kept fraction (``k / n_context``, exact for every head) are true, the identity of
    each head's tokens is not. ``details`` says how far that set stands for the heads'
    own: ``kept_per_head`` (``k``), ``union_fraction`` (document tokens that some head of
    some layer kept, over ``n_context``) and ``head_agreement`` (the mean share of a head's
    ``k`` tokens that are in the representative set). With ``per_head=False`` every head
    keeps the representative set and ``positions`` is exact.

    Attributes:
        budget: Kept fraction of the document tokens per KV head, in (0, 1].
        window: Question tokens whose queries score the cache (>= 1).
        n_sink: Leading layout tokens always kept (>= 0).
        per_head: Each KV head keeps its own tokens (SAGE-KV) or all keep one shared set.
        kernel: Odd width of the neighbourhood each score is averaged over (1: none).
    """

    name = "sagekv"
    reads_cache = False  # the documents are prefilled from their text, as ``full`` does

    budget: float = 0.15
    window: int = OBSERVATION_WINDOW
    n_sink: int = 4
    per_head: bool = True
    kernel: int = 5

    def __post_init__(self) -> None:
        check_fractions(self, {"budget": False})
        check_ints(self, {"window": 1, "n_sink": 0})
        check_odd(self, ("kernel",))
        if not isinstance(self.per_head, bool):
            raise ValueError(f"per_head must be true or false, got {self.per_head!r}")

    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Prefill the prefix and documents (``[1, n_context]`` ids) from scratch, as ``full``.

        Where the question runs in that forward, its last ``window`` tokens' queries are
        recorded for the selection (``ContextCache.question_queries``).
        """
        question = inputs.question_ids if inputs.prefill_question else []
        with record_window(inputs.model, self.window, question) as recorded:
            context = FullMethod().build(inputs, watch)
        context.question_queries = recorded.queries
        return context

    def after_question(self, state: DecodeState, watch: Stopwatch) -> DecodeState:
        """Keep ``k`` document entries per KV head of each ``[1, n_kv_heads, L, head_dim]`` layer.

        ``details`` gains ``kept_per_head``, ``union_fraction`` and ``head_agreement``.
        """
        return evict_after_question(
            state, watch, self.budget, window=self.window, n_sink=self.n_sink,
            per_head=self.per_head, kernel=self.kernel,
        )  # fmt: skip
