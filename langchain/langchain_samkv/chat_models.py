"""``ChatSamKV``: a LangChain chat model that answers from precomputed document KV caches."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import (
    ConfigDict,
    Field,
    InstanceOf,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)

from langchain_samkv.conversation import document_refs, parse_messages
from samkv_integrations import KVCacheStore, LoadedModel, SamKVEngine
from samkv_integrations.bridge import aiter_in_thread
from samkv_integrations.lazy_engine import ENGINE_OPTIONS, LazyEngine
from samkv_integrations.methods import DEFAULT_METHOD, BaseMethod, get_method
from samkv_integrations.records import MethodStats

logger = logging.getLogger(__name__)

#: The provider name in ``response_metadata["model_provider"]`` and LangSmith's ``ls_provider``.
PROVIDER = "samkv"

#: A prompt without document blocks at least this long (in tokens) warns once per model that
#: it is answered with a full prefill (see ``FullPrefillWarning``).
FULL_PREFILL_WARNING_TOKENS = 512


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

_GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
# Hugging Face ``generate`` names accepted in ``generate_kwargs`` (``do_sample`` on its own).
_HF_NAMES = {"stop_strings": "stop"}
# Names a field may be given under at construction.
_FIELD_NAMES = {"max_new_tokens": ("max_new_tokens", "max_tokens")}


class FullPrefillWarning(UserWarning):
    """A long prompt without document blocks was answered with a full prefill.

    This is what a stock ``prompt | llm`` chain does when it stuffs retrieved documents into
    the prompt as text: the answer is right, but no cache is used. Pass the documents as
    blocks instead (``create_samkv_rag_chain``, ``document_message`` or
    ``format_docs_as_messages``). Emitted once per ``ChatSamKV``; silence it with
    ``warnings.filterwarnings("ignore", category=FullPrefillWarning)``.
    """


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


def _generation_options(options: dict[str, Any]) -> dict[str, Any]:
    """Generation fields from ``generate_kwargs``, in our names or Hugging Face's."""
    unknown = sorted(set(options) - {*_GENERATION_FIELDS, *_HF_NAMES, "do_sample"})
    if unknown:
        raise ValueError(
            f"generate_kwargs: unsupported {unknown}; accepted: {', '.join(_GENERATION_FIELDS)} "
            "(and Hugging Face's do_sample, stop_strings)"
        )
    out = {_HF_NAMES.get(name, name): value for name, value in options.items()}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    sample = out.pop("do_sample", None)
    if sample is False:
        out["temperature"] = 0.0
    elif sample is True:
        if out.get("temperature", 1.0) == 0:
            raise ValueError("generate_kwargs: do_sample=True contradicts temperature=0 (greedy)")
        out.setdefault("temperature", 1.0)
    return out


def _cache_read(
    stats: MethodStats, reads_cache: bool, cached_before: list[int], n_refs: int
) -> int:
    """Context tokens served from stored caches rather than prefilled.

    ``cached_before`` holds the token counts of the documents whose own cache the store held
    before the call. Exact unless a stored cache turned out unusable (corrupted), which the
    stats count only as a number of recomputed documents.
    """
    if not reads_cache:
        return 0
    if stats.recomputed_documents == 0:
        return stats.context_tokens
    if stats.recomputed_documents >= n_refs:
        return 0
    return min(sum(cached_before), stats.context_tokens)


class ChatSamKV(BaseChatModel):
    """Chat model on a self-hosted Hugging Face causal LM that answers from cached document KV.

    Retrieved documents reach it as ``text-plain`` content blocks in human messages (their
    ``extras`` hold the ``samkv_*`` cache keys written by ``SamKVCacheBuilder`` or
    ``SamKVVectorStore``); ``document_message``, ``format_docs_as_messages`` and
    ``create_samkv_rag_chain`` build them. Such a request is answered by ``method`` over the
    documents' stored caches, with the last human message's text as the question:

    * Documents may come in any human message of the conversation, in order. Earlier turns
      (system, human and AI text) are not cached: they follow the question as a short
      transcript and are prefilled with it, so a follow-up question can refer to them. The
      prompt prefix stays the engine's own system prompt, behind which the caches were
      computed.
    * Each document is answered from the cache of its current text: a tag that no longer
      matches the text warns (``StaleCacheKeyWarning``); a missing or corrupted cache is
      re-encoded from the text, stored, and counted in
      ``response_metadata["recomputed_documents"]``; another model's cache raises
      ``CacheMismatchError`` unless ``on_foreign_cache="recompute"``.
    * ``usage_metadata["input_token_details"]["cache_read"]`` counts the document tokens
      served from caches, ``cache_creation`` those encoded and stored during the call.

    Messages without document blocks, such as a stock ``prompt | llm`` chain that pastes
    retrieved text into the prompt, are answered with a full prefill of the chat rendered
    by the tokenizer's chat template; a long one warns once (``FullPrefillWarning``). The
    weights load on first use. Tool calling and structured output are not supported.

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
    dtype: str | None = None
    """Model dtype for a model loaded by name: ``"bfloat16"``, ``"float16"`` or ``"float32"``
    (default: bfloat16 on CUDA, float32 on CPU); a ``torch.dtype`` is accepted too."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra ``from_pretrained`` arguments for a model loaded by name (``revision``,
    ``trust_remote_code``, ``quantization_config``, ...), as ``HuggingFacePipeline``'s;
    ``dtype``, ``device_map`` and ``attn_implementation`` are set by the loader."""
    memory_bytes: int = Field(default=0, ge=0)
    """Cap, in tensor bytes, of an in-memory LRU tier over the KV cache store (0: none)."""
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    """fsspec options for a store URL (credentials, endpoints); never serialized."""
    pin_memory: bool = False
    """Pin the memory tier's tensors, for fast copies to a CUDA device."""
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
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Generation defaults by name, ours or Hugging Face ``generate``'s, as ``pipeline_kwargs``
    of ``HuggingFacePipeline`` (``{"do_sample": False, "max_new_tokens": 64}``): folded into
    the fields above, which they may not contradict. ``do_sample=False`` is greedy
    (temperature 0), ``do_sample=True`` samples at the given temperature (1.0 if none),
    ``stop_strings`` is ``stop``; other keys raise ``ValueError``."""
    on_foreign_cache: Literal["error", "recompute"] = "error"
    """A cache written by another model: raise ``CacheMismatchError``, or re-encode the text."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (token callbacks fire as text is generated)."""

    model_config = ConfigDict(populate_by_name=True)

    _engine: LazyEngine = PrivateAttr()
    _warned_full_prefill: bool = PrivateAttr(default=False)

    def model_post_init(self, context: Any, /) -> None:
        """Prepare the engine, to be built on first use."""
        super().model_post_init(context)
        self._engine = LazyEngine.from_settings(self)

    @model_validator(mode="before")
    @classmethod
    def _fold_generate_kwargs(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("generate_kwargs"):
            return data
        folded = dict(data)
        for name, value in _generation_options(data["generate_kwargs"]).items():
            given = [n for n in _FIELD_NAMES.get(name, (name,)) if n in data]
            if given and data[given[0]] != value:
                raise ValueError(
                    f"generate_kwargs: {name}={value!r} contradicts {given[0]}={data[given[0]]!r}"
                )
            folded[name] = value
        return folded

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        # A torch.dtype is kept by name ("torch.float16" -> "float16"), so the field serializes.
        return str(value).removeprefix("torch.") if value is not None else None

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
        given = sorted(set(kwargs) & set(ENGINE_OPTIONS))
        if given:
            raise ValueError(f"from_engine: the engine is built; {', '.join(given)} cannot apply")
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
            "dtype": self.dtype,
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
            ls_provider=PROVIDER,
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

    def _warn_full_prefill(self, prompt_tokens: int) -> None:
        if prompt_tokens < FULL_PREFILL_WARNING_TOKENS or self._warned_full_prefill:
            return
        self._warned_full_prefill = True
        warnings.warn(
            f"ChatSamKV answered a {prompt_tokens}-token prompt without document blocks with a "
            "full prefill: no cache was used. To answer retrieved documents from their caches, "
            "pass them as blocks (create_samkv_rag_chain, document_message, or "
            "format_docs_as_messages in a prompt placeholder) instead of pasting their text "
            "into the prompt. Warned once per model.",
            FullPrefillWarning,
            stacklevel=2,
        )

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[ChatGenerationChunk]:
        """The one generation path: text deltas, then a last chunk with usage and stats."""
        options = self._options(stop, kwargs)
        generation = options.generation
        request = parse_messages(messages)
        engine = self.engine
        if request.question is not None:
            refs = document_refs(engine, request.documents, options.on_foreign_cache)
            # Which documents the store held before the call, for usage's cache_read (the
            # stats count re-encoded documents, not which ones); a method that reads no
            # cache needs no look.
            own, reads = engine.fingerprint, options.method.reads_cache
            cached_before = [
                r.n_tokens for r in refs if reads and r.model == own and engine.has_cache(r)
            ]
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
            self._warn_full_prefill(prompt_tokens)
        for delta in stream:
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=delta, response_metadata={"model_provider": PROVIDER}
                )
            )
        answer = stream.answer
        stats = answer.stats
        cache_read = 0
        if request.question is not None:
            cache_read = _cache_read(
                stats, options.method.reads_cache, cached_before, len(request.documents)
            )
        # What was encoded and stored during the call: documents whose cache was missing.
        cache_creation = stats.context_tokens - cache_read if stats.recomputed_documents else 0
        input_tokens = prompt_tokens + stats.context_tokens
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
                    input_token_details=InputTokenDetails(
                        cache_read=cache_read, cache_creation=cache_creation
                    ),
                ),
                response_metadata={
                    "model_provider": PROVIDER,
                    "model_name": engine.model.name,
                    "finish_reason": finished,
                    **stats.as_dict(),
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
