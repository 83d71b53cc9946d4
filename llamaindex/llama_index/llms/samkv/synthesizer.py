"""SamKVSynthesizer: answer from the retrieved nodes' stored KV caches, not from their text.

LlamaIndex's built-in synthesizers turn the retrieved nodes into one prompt string before
the LLM sees them, which throws the cache references away. This synthesizer takes the
``NodeWithScore`` list itself, maps each node to its cache reference and lets the engine's
method (default ``samkv``) build the decode cache from the stored caches. The answer is
reported as an LLM completion (instrumentation events, ``CBEventType.LLM`` with token
counts): see :mod:`llama_index.llms.samkv.events`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.indices.prompt_helper import ChatPromptHelper, PromptHelper
from llama_index.core.instrumentation.events.synthesis import (
    SynthesizeEndEvent,
    SynthesizeStartEvent,
)
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.response_synthesizers.base import BaseSynthesizer, QueryTextType
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from llama_index.llms.samkv.base import OnForeignCache, SamKVLLM, resolve_method
from llama_index.llms.samkv.cache_builder import node_ref, node_text
from llama_index.llms.samkv.events import CacheCompletion
from samkv_integrations.engine import AnswerStream
from samkv_integrations.methods import BaseMethod
from samkv_integrations.records import CacheRef, MethodStats

dispatcher = instrument.get_dispatcher(__name__)

#: Key of the method's stats in ``Response.metadata`` (the other keys are node ids).
STATS_KEY = "samkv"

Source = BaseNode | str


class SamKVSynthesizer(BaseSynthesizer):
    """Answers a query from the retrieved nodes' stored KV caches.

    Each node maps to its cache reference (``samkv_cache_key`` and friends, written by
    :class:`SamKVCacheBuilder`). A node without a cache, or whose cache was evicted or is
    corrupted, is encoded from its text on the spot and stored; a cache written by another
    model raises ``CacheMismatchError`` unless ``on_foreign_cache="recompute"``.

    ``Response.metadata`` maps each source node id to its metadata (as LlamaIndex's
    synthesizers do) and ``"samkv"`` to the method's stats: ``method``, ``model``,
    ``ttft_s``, ``kept_fraction``, ``kept_tokens_by_node``, ``recomputed_documents``,
    ``context_tokens``, ``prompt_tokens`` (what the prompt would prefill under ``full``),
    ``completion_tokens`` (once the answer is complete), ``seconds`` per phase and more. A
    streaming response returns after the first token, with the stats already in place.

    Each answer is reported as an LLM completion: ``LLMCompletionStartEvent`` /
    ``LLMCompletionEndEvent`` on the instrumentation dispatcher, and ``CBEventType.LLM`` on
    the callback managers of this synthesizer and of the LLM, with the token counts in
    ``raw["usage"]``, so ``TokenCountingHandler`` counts them.

    Args:
        llm: The :class:`SamKVLLM` that answers.
        method: Overrides the LLM's method: a spec, ``name[+option=value...]``
            (``"samkv+budget=0.2"``, ``"full"``, ...), or a ``BaseMethod``; resolved here.
        on_foreign_cache: ``"error"`` or ``"recompute"``; defaults to the LLM's setting.
        streaming: Return ``StreamingResponse`` / ``AsyncStreamingResponse``.
        callback_manager: LlamaIndex callback manager.

    Examples:
        >>> from llama_index.llms.samkv import SamKVLLM, SamKVSynthesizer
        >>> llm = SamKVLLM()
        >>> engine = index.as_query_engine(
        ...     llm=llm, response_synthesizer=SamKVSynthesizer(llm)
        ... )  # doctest: +SKIP
        >>> response = engine.query("Who wrote the report?")  # doctest: +SKIP
        >>> response.metadata["samkv"]["recomputed_documents"]  # doctest: +SKIP
        0
    """

    def __init__(
        self,
        llm: SamKVLLM,
        *,
        method: str | BaseMethod | None = None,
        on_foreign_cache: OnForeignCache | None = None,
        streaming: bool = False,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if not isinstance(llm, SamKVLLM):
            raise ValueError(f"llm: SamKVSynthesizer needs a SamKVLLM, got {type(llm).__name__}")
        resolved = None if method is None else resolve_method(method)
        if on_foreign_cache not in (None, "error", "recompute"):
            raise ValueError(
                f"on_foreign_cache: must be 'error' or 'recompute', got {on_foreign_cache!r}"
            )
        # Nothing is ever packed into a prompt window here; explicit helpers keep the base
        # class from loading the model just to read its context size.
        super().__init__(
            llm=llm,
            callback_manager=callback_manager,
            prompt_helper=PromptHelper(),
            chat_prompt_helper=ChatPromptHelper(),
            streaming=streaming,
        )
        self._samkv = llm
        self._method = resolved
        self._on_foreign_cache = on_foreign_cache

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _update_prompts(self, prompts_dict: PromptDictType) -> None:
        if prompts_dict:
            raise ValueError(
                f"prompts: SamKVSynthesizer has no templates ({', '.join(prompts_dict)}); "
                "the engine frames the documents and the question"
            )

    @dispatcher.span
    def synthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        """Answer ``query`` from the caches of ``nodes``.

        Args:
            query: The query string or bundle.
            nodes: The retrieved nodes, in prompt order.
            additional_source_nodes: Reported as sources, not read.
            **response_kwargs: Generation overrides (``max_new_tokens``, ``stop``, ...).

        Returns:
            ``Response``, or ``StreamingResponse`` when streaming.
        """
        dispatcher.event(SynthesizeStartEvent(query=query))
        bundle = QueryBundle(query_str=query) if isinstance(query, str) else query
        sources = [*nodes, *(additional_source_nodes or [])]
        with self._callback_manager.event(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: bundle.query_str}
        ) as event:
            used = _with_text(nodes)
            response: RESPONSE_TYPE
            if not used:
                response = (
                    StreamingResponse(self._empty_response_generator())
                    if self._streaming
                    else Response(self._empty_response)
                )
            else:
                call = self._call(bundle.query_str, used, response_kwargs)
                answer = call.stream() if self._streaming else call.text()
                metadata = self._response_metadata(bundle.query_str, sources, used, call)
                response = (
                    Response(answer, sources, metadata)
                    if isinstance(answer, str)
                    else StreamingResponse(answer, sources, metadata)
                )
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    @dispatcher.span
    async def asynthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        """:meth:`synthesize` with the engine work in a worker thread.

        Returns:
            ``Response``, or ``AsyncStreamingResponse`` when streaming.
        """
        dispatcher.event(SynthesizeStartEvent(query=query))
        bundle = QueryBundle(query_str=query) if isinstance(query, str) else query
        sources = [*nodes, *(additional_source_nodes or [])]
        with self._callback_manager.event(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: bundle.query_str}
        ) as event:
            used = _with_text(nodes)
            response: RESPONSE_TYPE
            if not used:
                response = (
                    AsyncStreamingResponse(self._empty_response_agenerator())
                    if self._streaming
                    else Response(self._empty_response)
                )
            else:
                call = self._call(bundle.query_str, used, response_kwargs)
                answer = await (call.astream() if self._streaming else call.atext())
                metadata = self._response_metadata(bundle.query_str, sources, used, call)
                response = (
                    Response(answer, sources, metadata)
                    if isinstance(answer, str)
                    else AsyncStreamingResponse(answer, sources, metadata)
                )
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    def get_response(
        self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any
    ) -> str | Generator[str, None, None]:
        """Answer from plain text chunks (each encoded, or read from the store if cached)."""
        call = self._call(query_str, list(text_chunks), response_kwargs)
        return call.stream() if self._streaming else call.text()

    async def aget_response(
        self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any
    ) -> str | AsyncGenerator[str, None]:
        """:meth:`get_response` with the engine work in a worker thread."""
        call = self._call(query_str, list(text_chunks), response_kwargs)
        return await (call.astream() if self._streaming else call.atext())

    def _call(
        self, query_str: str, sources: Sequence[Source], kwargs: dict[str, Any]
    ) -> CacheCompletion:
        """One answer from the sources' caches, reported as an LLM completion."""
        method = self._method or self._samkv.method
        return CacheCompletion(
            lambda: self._open(query_str, sources, kwargs),
            prompt_tokens=lambda stats: self._prompt_tokens(query_str, stats),
            callback_manager=self._llm_callbacks(),
            model_dict=self._samkv.to_payload(),
            prompt=query_str,
            details={"samkv_method": method.name, "documents": len(sources), **kwargs},
        )

    def _llm_callbacks(self) -> CallbackManager:
        """This synthesizer's and the LLM's callback handlers, each once.

        A stock synthesizer hands its callback manager to its LLM, so the LLM events of a
        stock query reach both; so do these, without changing the LLM.
        """
        handlers = [*self._callback_manager.handlers, *self._samkv.callback_manager.handlers]
        return CallbackManager(list({id(h): h for h in handlers}.values()))

    def _open(
        self, query_str: str, sources: Sequence[Source], kwargs: dict[str, Any]
    ) -> AnswerStream:
        """Map sources to cache refs and start the engine's answer."""
        engine = self._samkv.engine
        policy = self._on_foreign_cache or self._samkv.on_foreign_cache
        if not (self._method or self._samkv.method).reads_cache:
            policy = "recompute"  # a method that reads no stored KV meets no foreign cache
        refs: list[CacheRef] = [
            engine.cache_ref(s, label=i) if isinstance(s, str) else node_ref(engine, s, policy)
            for i, s in enumerate(sources)
        ]
        return self._samkv.stream_answer(
            query_str,
            refs,
            method=self._method,
            on_foreign_cache=self._on_foreign_cache,
            **kwargs,
        )

    def _prompt_tokens(self, query_str: str, stats: MethodStats) -> int:
        """What the prompt would prefill under ``full``: prefix, documents as loaded, question."""
        # A re-encoded foreign cache counts in this model's tokens.
        return self._samkv.engine.prompt_tokens(query_str) + stats.context_tokens

    def _response_metadata(
        self,
        query_str: str,
        sources: list[NodeWithScore],
        used: list[BaseNode],
        call: CacheCompletion,
    ) -> dict[str, Any]:
        metadata = self._get_metadata_for_response([n.node for n in sources]) or {}
        stats = call.stats
        report = stats.as_dict()
        report["model"] = self._samkv.engine.model.name
        report["prompt_tokens"] = self._prompt_tokens(query_str, stats)
        report["kept_tokens_by_node"] = {
            node.node_id: kept for node, kept in zip(used, stats.kept_tokens, strict=True)
        }
        call.on_end(lambda usage: report.update(completion_tokens=usage["completion_tokens"]))
        metadata[STATS_KEY] = report
        return metadata


def _with_text(nodes: Sequence[NodeWithScore]) -> list[BaseNode]:
    """The nodes that have text to answer from (image-only nodes have none)."""
    return [n.node for n in nodes if node_text(n.node).strip()]
