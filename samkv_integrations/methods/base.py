"""The one interface every method implements, and the helpers methods share.

A method has up to three stages, each but the first with a default:

1. ``build``: from the shared prefix, the documents' cached KV (at their local positions)
   and the question, build the context cache the question prefill starts from
   (``question_scope`` may change how that prefill attends: a decoding policy's pool). A
   build whose last work is one causal forward over the context (``full``, ``samkv``'s
   recompute) may run the question in that same forward when ``MethodInput.prefill_question``
   allows it, and return the question's logits (``ContextCache.question_logits``): the
   engine then skips its own question prefill, whose launches cost more than its arithmetic;
2. ``after_question``: once the question is prefilled, change the decode cache (a one-shot
   eviction that reads the question's attention or the first logits); default: no change;
3. ``decoder``: what runs each answer token through the model; default: a plain forward.

The engine calls ``method(inputs, watch)``, prefills the question under
``method.question_scope(inputs, context)`` unless ``build`` did, then calls
``method.run_after_question(state)`` and ``method.decoder(state)`` and never asks which
method it runs: anything that differs between methods is a class attribute or one of these
stages.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.decode import Decoder
from samkv_integrations.encode import PrefixKV
from samkv_integrations.layer_arrival import LayerArrival
from samkv_integrations.records import DocumentKV
from samkv_integrations.rope import shift_keys
from samkv_integrations.timing import Stopwatch

if TYPE_CHECKING:
    from samkv_integrations.methods.pages import KVPool


@dataclass(slots=True)
class MethodInput:
    """What a method builds the context cache from.

    Attributes:
        model: The model.
        prefix: The shared prefix cache (global positions ``0 .. prefix.length - 1``).
        documents: The documents' caches, on the model's device, in prompt order. Keys are
            post-RoPE at local positions ``prefix_len ..``.
        question_ids: Token ids of the question suffix (with the generation prompt).
        arrival: When each layer of the documents' K/V is on the device: a method whose
            ``waits_per_layer`` is set calls ``arrival.wait(l + 1)`` before reading layer
            ``l``; for any other, everything has arrived before ``build``.
        prefill_question: Whether ``build`` may prefill ``question_ids`` (at ``context_end
            ..``) in its own last forward and return their logits in
            ``ContextCache.question_logits``. The engine sets it; a wrapper whose
            ``question_scope`` changes how the question attends clears it for its inner
            method.
    """

    model: PreTrainedModel
    prefix: PrefixKV
    documents: list[DocumentKV]
    question_ids: list[int]
    arrival: LayerArrival = field(default_factory=LayerArrival)
    prefill_question: bool = False

    @property
    def doc_starts(self) -> list[int]:
        """Global position of each document's first token in the assembled layout."""
        starts, position = [], self.prefix.length
        for doc in self.documents:
            starts.append(position)
            position += doc.n_tokens
        return starts

    @property
    def context_end(self) -> int:
        """Global position right after the last document: where the question starts."""
        return self.prefix.length + sum(doc.n_tokens for doc in self.documents)

    def aligned_keys(self, index: int) -> torch.Tensor:
        """Document ``index``'s keys ``[n_layers, n_kv_heads, n, head_dim]`` at global positions."""
        doc = self.documents[index]
        return shift_keys(self.model, doc.keys, self.doc_starts[index] - doc.prefix_len)


@dataclass(slots=True)
class ContextCache:
    """The cache decoding starts from, before the question is prefilled (unless ``build`` did).

    Attributes:
        cache: Prefix plus the kept document tokens, compacted, in global order (then the
            question's entries, if ``question_logits`` is set).
        positions: ``[cache_len]`` global position of each cache entry (gaps allowed).
        next_position: Global position of the first question token.
        kept_indices: Per document, the local indices of its tokens in the cache.
        recomputed_tokens: Document tokens whose KV was recomputed.
        seconds: Seconds per phase the method spent (``select``, ``recompute``, ...).
        details: Method-specific facts for display (e.g. SamKV's anchor indices).
        pool: The dropped document tokens' KV, paged, for a decoder that fetches them back
            (set by a decoding policy such as RetroAttention; None otherwise).
        question_logits: ``[vocab]`` logits for the first answer token if ``build``
            prefilled the question itself (``MethodInput.prefill_question``); the cache then
            also holds the question's entries, after those ``positions`` describes. None
            otherwise.
        question_queries: ``[n_layers, w, n_q_heads * head_dim]`` ``q_proj`` outputs of the
            question's last ``w`` tokens, recorded by a ``build`` that ran the question for
            an after-question stage that scores with them (``eviction``); None otherwise.
    """

    cache: DynamicCache
    positions: torch.Tensor
    next_position: int
    kept_indices: list[torch.Tensor]
    recomputed_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    pool: KVPool | None = None
    question_logits: torch.Tensor | None = None
    question_queries: torch.Tensor | None = None


@dataclass(slots=True)
class DecodeState:
    """The decode cache once the question is prefilled: what ``after_question`` gets and returns.

    Attributes:
        model: The model.
        cache: Prefix, kept document tokens and question, ``[1, n_kv_heads, cache_len,
            head_dim]`` per layer, in global order; decoding extends it in place.
        positions: ``[cache_len]`` global position of each cache entry (gaps allowed).
        next_position: Global position of the first answer token.
        kept_indices: Per document, the local indices of its tokens in the cache.
        doc_starts: Global position of each document's first token (kept or not).
        question_ids: Token ids of the question, at the positions before ``next_position``.
        first_logits: ``[vocab]`` logits for the first answer token.
        recomputed_tokens: Document tokens whose KV was recomputed.
        seconds: Seconds per phase so far (``load``, the method's, then ``question``).
        details: Method-specific facts for display (e.g. SamKV's anchor indices).
        pool: The dropped document tokens' KV, paged (``ContextCache.pool``), or None.
        question_queries: The question's last tokens' queries as ``build`` recorded them
            (``ContextCache.question_queries``), or None.
    """

    model: PreTrainedModel
    cache: DynamicCache
    positions: torch.Tensor
    next_position: int
    kept_indices: list[torch.Tensor]
    doc_starts: list[int]
    question_ids: list[int]
    first_logits: torch.Tensor
    recomputed_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    pool: KVPool | None = None
    question_queries: torch.Tensor | None = None

    @classmethod
    def after_prefill(
        cls,
        inputs: MethodInput,
        context: ContextCache,
        first_logits: torch.Tensor,
        seconds: dict[str, float],
    ) -> DecodeState:
        """The state of ``context`` once ``inputs.question_ids`` are prefilled into its cache."""
        n_question = len(inputs.question_ids)
        question = torch.arange(n_question, device=context.positions.device)
        return cls(
            model=inputs.model,
            cache=context.cache,
            positions=torch.cat([context.positions, question + context.next_position]),
            next_position=context.next_position + n_question,
            kept_indices=context.kept_indices,
            doc_starts=inputs.doc_starts,
            question_ids=inputs.question_ids,
            first_logits=first_logits,
            recomputed_tokens=context.recomputed_tokens,
            seconds={**context.seconds, **seconds},
            details=context.details,
            pool=context.pool,
            question_queries=context.question_queries,
        )

    @property
    def context_end(self) -> int:
        """Global position right after the last document: where the question starts."""
        return self.next_position - len(self.question_ids)


def cache_from_layers(
    model: PreTrainedModel, keys: list[torch.Tensor], values: list[torch.Tensor]
) -> DynamicCache:
    """Build a ``DynamicCache`` from per-layer ``[n_kv_heads, n, head_dim]`` tensors."""
    return DynamicCache(
        ddp_cache_data=[(k[None], v[None]) for k, v in zip(keys, values, strict=True)],
        config=model.config,
    )


def concat_segments(
    model: PreTrainedModel, prefix: PrefixKV, segments: list[tuple[torch.Tensor, torch.Tensor]]
) -> DynamicCache:
    """Prefix cache followed by document segments, each ``[n_layers, n_kv_heads, n, head_dim]``."""
    n_layers = len(prefix.keys)
    keys = [
        torch.cat([prefix.keys[i][0], *(k[i] for k, _ in segments)], dim=-2)
        for i in range(n_layers)
    ]
    values = [
        torch.cat([prefix.values[i][0], *(v[i] for _, v in segments)], dim=-2)
        for i in range(n_layers)
    ]
    return cache_from_layers(model, keys, values)


@dataclass
class BaseMethod(ABC):
    """A way of building the decode cache from independently cached documents.

    Subclasses are dataclasses whose fields are the method's hyperparameters, validated
    in ``__post_init__`` with a ``ValueError`` naming the field.
    """

    #: The name the engine, CLI and adapters know the method by.
    name: ClassVar[str]
    #: Whether the method reads the documents' stored KV at all (``full`` re-prompts text).
    reads_cache: ClassVar[bool] = True
    #: Per-document tensors the method reads beside K/V, named in ``cache_format.EXTRAS``:
    #: indexing computes those any registered method declares; a cache lacking one is re-encoded.
    stored_extras: ClassVar[tuple[str, ...]] = ()
    #: Whether ``build`` waits for each layer of the documents' K/V (``MethodInput.arrival``)
    #: before reading it, so that it can start while the later layers are still loading.
    waits_per_layer: ClassVar[bool] = False

    def __call__(self, inputs: MethodInput, watch: Stopwatch | None = None) -> ContextCache:
        """Build the context cache, timing the method's own phases.

        The engine passes the request's ``watch`` and reads it once the question is
        prefilled: reading waits for the device, which would stall the host between the
        method's phases and the question's. Without one, the seconds are in ``seconds``.
        """
        if not self.waits_per_layer:
            inputs.arrival.wait()
        if watch is not None:
            return self.build(inputs, watch)
        watch = Stopwatch(inputs.model.device)
        result = self.build(inputs, watch)
        result.seconds = {**watch.seconds, **result.seconds}
        return result

    @abstractmethod
    def build(self, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        """Build the context cache.

        Args:
            inputs: Prefix, documents (``keys``/``values`` ``[n_layers, n_kv_heads, n, head_dim]``
                at local positions) and question ids.
            watch: Time phases with ``with watch.phase("select"): ...``.

        Returns:
            The compacted cache at global positions and what was kept and recomputed.
        """

    def question_scope(
        self, inputs: MethodInput, context: ContextCache
    ) -> contextlib.AbstractContextManager[None]:
        """What the question prefill runs under; by default nothing (plain attention).

        A decoding policy that pools the dropped tokens (``ContextCache.pool``) returns a
        scope whose attention also reads the pool, as Quest's dense prefill would.
        """
        return contextlib.nullcontext()

    def run_after_question(self, state: DecodeState) -> DecodeState:
        """Run ``after_question``, adding the seconds of its phases to the state's."""
        watch = Stopwatch(state.model.device)
        result = self.after_question(state, watch)
        for phase, seconds in watch.seconds.items():
            result.seconds[phase] = result.seconds.get(phase, 0.0) + seconds
        return result

    def after_question(self, state: DecodeState, watch: Stopwatch) -> DecodeState:
        """Change the decode cache once the question is prefilled; by default, keep it.

        A one-shot eviction (SAGE-KV, arXiv 2503.08879) drops entries here, using the
        question's attention or ``state.first_logits``, and returns the state with the
        reduced cache and the matching ``positions`` and ``kept_indices``, so that the
        reported kept fraction stays the cache's.

        Args:
            state: The cache (``[1, n_kv_heads, cache_len, head_dim]`` per layer) with the
                question prefilled, its ``[cache_len]`` positions and the first logits.
            watch: Time phases with ``with watch.phase("evict"): ...``.

        Returns:
            The state decoding starts from (``state`` itself, or an altered copy).
        """
        return state

    def decoder(self, state: DecodeState) -> Decoder:
        """What runs each answer token through the model; by default, a plain forward.

        Called once per answer with the state decoding starts from, so the decoder may keep
        per-answer state (decode-time retrieval or correction, e.g. RetroAttention,
        arXiv 2508.09001).
        """
        return Decoder()


def all_kept(inputs: MethodInput) -> list[torch.Tensor]:
    """Every document token, as per-document local indices."""
    device = inputs.model.device
    return [torch.arange(doc.n_tokens, device=device) for doc in inputs.documents]


def full_positions(inputs: MethodInput) -> torch.Tensor:
    """Global positions of a cache holding the prefix and every document token."""
    return torch.arange(inputs.context_end, device=inputs.model.device)
