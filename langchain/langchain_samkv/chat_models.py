"""``ChatSamKV``: a LangChain chat model that answers from precomputed document KV caches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, Field, InstanceOf, PrivateAttr, field_serializer, field_validator

from samkv_integrations import KVCacheStore, LoadedModel, SamKVEngine
from samkv_integrations.bridge import aiter_in_thread
from samkv_integrations.lazy_engine import LazyEngine
from samkv_integrations.methods import DEFAULT_METHOD, BaseMethod, get_method
from samkv_integrations.records import CacheRef, ref_from_metadata

logger = logging.getLogger(__name__)

#: The content block type that carries a retrieved document (LangChain v1 standard block).
DOCUMENT_BLOCK_TYPE = "text-plain"

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}
# Keyword arguments a call may override (``invoke(..., method="full")``, ``.bind(...)``).
_CALL_OPTIONS = frozenset(
    {
        "method",
        "max_new_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "on_foreign_cache",
    }
)


@dataclass(slots=True)
class _Request:
    """A parsed chat request: either chat turns, or a question over documents."""

    turns: list[dict[str, str]]
    question: str | None
    documents: list[dict[str, Any]]


@dataclass(slots=True)
class _CallOptions:
    """One call's settings, after per-call overrides.

    ``generation`` holds the engine's generation keywords (``max_new_tokens``,
    ``temperature``, ``top_p``, ``seed``, ``stop``); the engine validates them.
    """

    method: BaseMethod
    on_foreign_cache: Literal["error", "recompute"]
    generation: dict[str, Any]


def _options_of(method: BaseMethod) -> dict[str, Any]:
    """A method's hyperparameters (its dataclass fields), as plain data."""
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}


def _text_of(message: BaseMessage) -> str:
    """The message's text, rejecting content this text-only model cannot read."""
    if isinstance(message.content, list):
        for block in message.content:
            kind = block.get("type") if isinstance(block, dict) else "text"
            if kind not in ("text", DOCUMENT_BLOCK_TYPE):
                raise ValueError(
                    f"ChatSamKV reads text only: a {message.type} message holds a {kind!r} "
                    "content block (images, audio and files are not supported)"
                )
    return message.text


def _parse(messages: Sequence[BaseMessage]) -> _Request:
    """Split messages into chat turns, or a question over document blocks."""
    if not messages:
        raise ValueError("messages: ChatSamKV needs at least one message")
    turns: list[dict[str, str]] = []
    documents: list[dict[str, Any]] = []
    for message in messages:
        if message.type in ("tool", "function") or getattr(message, "tool_calls", None):
            raise NotImplementedError(
                "ChatSamKV does not support tool calling yet: tool calls and tool messages "
                "cannot be sent to it"
            )
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
        if role is None:
            raise ValueError(f"messages: unsupported message type {message.type!r}")
        text = _text_of(message)
        if isinstance(message.content, list):
            documents += [
                b
                for b in message.content
                if isinstance(b, dict) and b.get("type") == DOCUMENT_BLOCK_TYPE
            ]
        turns.append({"role": role, "content": text})
    if not documents:
        return _Request(turns, None, [])
    if len(messages) != 1 or messages[0].type != "human":
        raise ValueError(
            "messages: document blocks are answered behind the engine's shared cached prompt, "
            "so they must come in a single human message (with the question as its text); "
            f"got {len(messages)} messages ({', '.join(m.type for m in messages)})"
        )
    question = turns[0]["content"].strip()
    if not question:
        raise ValueError("messages: the message with document blocks has no question text")
    return _Request(turns, question, documents)


def _document_ref(engine: SamKVEngine, block: dict[str, Any], index: int) -> CacheRef:
    """The cache ref a document block points to; computed from its text when it carries none."""
    text = block.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"document block {index}: a {DOCUMENT_BLOCK_TYPE!r} block needs its 'text'"
        )
    ref = ref_from_metadata(block.get("extras") or {}, text)
    if ref is not None:
        return ref
    # No cache key: address the cache this engine would write, so the engine loads it
    # if it exists and otherwise encodes the text and reports it as recomputed.
    return engine.cache_ref(text, label=index)


class ChatSamKV(BaseChatModel):
    """Chat model on a self-hosted Hugging Face causal LM that answers from cached document KV.

    Plain messages are answered with a full prefill of the chat rendered by the tokenizer's
    chat template. A human message that carries retrieved documents as ``text-plain``
    content blocks (their ``extras`` hold the ``samkv_*`` cache keys written by
    ``SamKVCacheBuilder``) is answered by ``method`` over the documents' stored caches, with
    the message's text as the question; a missing or corrupted cache is re-encoded from the
    block's text and counted in ``response_metadata["recomputed_documents"]``. The weights
    load on first use. Tool calling and structured output are not supported.

    Examples:
        >>> from langchain_core.documents import Document
        >>> from langchain_samkv import ChatSamKV, SamKVCacheBuilder, document_message
        >>> llm = ChatSamKV(max_tokens=24)  # the embedded SmolLM2-135M-Instruct
        >>> docs = SamKVCacheBuilder(llm).transform_documents(
        ...     [Document("Mount Fuji is 3,776 metres high.")]
        ... )
        >>> reply = llm.invoke([document_message("How high is Mount Fuji?", docs)])
        >>> reply.content
        'The document states that Mount Fuji is 3,776 metres high, which is 1,00'
        >>> reply.response_metadata["recomputed_documents"]
        0
    """

    model: str | InstanceOf[LoadedModel] | None = None
    """Model: registry name, local path or hub id (``None``: the embedded default), or a loaded model."""
    store: str | Path | InstanceOf[KVCacheStore] | None = None
    """KV cache store: directory or fsspec URL (``None``: ``$SAMKV_HOME/kvcache``), or a store."""
    device: str | None = None
    """Torch device for a model loaded by name (default: CUDA when available)."""
    method: InstanceOf[BaseMethod] = Field(default_factory=lambda: get_method(DEFAULT_METHOD))
    """How to answer from document caches: a spec, ``name[+option=value...]`` such as
    ``"samkv+budget=0.2"``, or a ``BaseMethod``; resolved at construction."""
    max_new_tokens: int = Field(default=256, ge=1, alias="max_tokens")
    """Upper bound on generated tokens (``max_tokens`` is accepted as well)."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 decodes greedily; above 0 samples."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass when sampling."""
    seed: int | None = None
    """Seed for reproducible sampling."""
    stop: list[str] | None = None
    """Default stop strings: the answer ends before the first one."""
    on_foreign_cache: Literal["error", "recompute"] = "error"
    """A cache written by another model: raise ``CacheMismatchError``, or re-encode the text."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (token callbacks fire as text is generated)."""

    model_config = ConfigDict(populate_by_name=True)

    _engine: LazyEngine = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        """Prepare the engine, to be built on first use."""
        super().model_post_init(context)
        self._engine = LazyEngine(self.model, self.store, self.device)

    @field_validator("method", mode="before")
    @classmethod
    def _resolve_method(cls, value: str | BaseMethod) -> BaseMethod:
        return get_method(value)

    @field_serializer("method")
    def _serialize_method(self, method: BaseMethod) -> dict[str, Any]:
        return {"name": method.name, "options": _options_of(method)}

    @classmethod
    def from_engine(cls, engine: SamKVEngine, **kwargs: Any) -> ChatSamKV:
        """A chat model on an existing engine (shares its model, store and lock)."""
        chat = cls(model=engine.model.name, store=engine.store.url, **kwargs)
        chat._engine = LazyEngine.of(engine)
        return chat

    @property
    def engine(self) -> SamKVEngine:
        """The engine, loading the model on first use (thread-safe)."""
        return self._engine.get()

    @property
    def _model_label(self) -> str:
        if isinstance(self.model, LoadedModel):
            return self.model.name
        return self.model or "smollm2-135m-instruct"

    @property
    def _llm_type(self) -> str:
        return "samkv-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self._model_label,
            "method": self.method.name,
            "method_options": _options_of(self.method),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "on_foreign_cache": self.on_foreign_cache,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="samkv",
            ls_model_name=kwargs["model"]
            if isinstance(kwargs.get("model"), str)
            else self._model_label,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get(
                "max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)
            ),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[Any, Any]:
        """Not supported yet: raises ``NotImplementedError``."""
        raise NotImplementedError(
            "ChatSamKV does not support tool calling yet; answer over documents with "
            "create_samkv_rag_chain or pass document blocks in a human message"
        )

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Runnable[Any, Any]:
        """Not supported yet: raises ``NotImplementedError``."""
        raise NotImplementedError(
            "ChatSamKV does not support structured output yet (it has no tool calling or "
            "constrained decoding); parse its text output instead"
        )

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _CallOptions:
        """This call's settings: the fields, overridden by the call's keyword arguments."""
        unknown = sorted(set(kwargs) - _CALL_OPTIONS)
        if unknown:
            raise ValueError(
                f"ChatSamKV got unsupported call arguments {unknown}; "
                f"accepted: {sorted(_CALL_OPTIONS)}"
            )
        max_new_tokens = kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens))
        return _CallOptions(
            method=get_method(kwargs["method"]) if "method" in kwargs else self.method,
            on_foreign_cache=kwargs.get("on_foreign_cache", self.on_foreign_cache),
            generation={
                "max_new_tokens": max_new_tokens,
                "temperature": kwargs.get("temperature", self.temperature),
                "top_p": kwargs.get("top_p", self.top_p),
                "seed": kwargs.get("seed", self.seed),
                "stop": tuple(stop if stop is not None else self.stop or ()),
            },
        )

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[ChatGenerationChunk]:
        """The one generation path: text deltas, then a last chunk with usage and stats."""
        options = self._options(stop, kwargs)
        generation = options.generation
        request = _parse(messages)
        engine = self.engine
        if request.question is not None:
            refs = [_document_ref(engine, block, i) for i, block in enumerate(request.documents)]
            logger.debug("answering over %d documents with %s", len(refs), options.method.name)
            stream = engine.stream(
                request.question,
                refs,
                options.method,
                on_foreign_cache=options.on_foreign_cache,
                **generation,
            )
            # The documents are counted as loaded (a re-encoded foreign cache in this
            # model's tokens): the answer's context_tokens, added below.
            prompt_tokens = engine.prompt_tokens(request.question)
        else:
            # Plain chat: a full prefill of the turns under the model's chat template.
            prompt_ids = engine.chat_ids(request.turns)
            stream = engine.stream_prompt(prompt_ids, **generation)
            prompt_tokens = len(prompt_ids)
        for delta in stream:
            yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        answer = stream.answer
        input_tokens = prompt_tokens + answer.stats.context_tokens
        output_tokens = len(answer.token_ids)
        finished = "length" if output_tokens >= generation["max_new_tokens"] else "stop"
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                chunk_position="last",
                usage_metadata=UsageMetadata(
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    total_tokens=input_tokens + output_tokens,
                ),
                response_metadata={
                    "model_name": engine.model.name,
                    "finish_reason": finished,
                    **answer.stats.as_dict(),
                },
            ),
            generation_info={"finish_reason": finished},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager is not None and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Model loading, prefill and decoding all block: they run in a thread of their own.
        async for chunk in aiter_in_thread(lambda: self._chunks(messages, stop, kwargs)):
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, None, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, None, **kwargs))
