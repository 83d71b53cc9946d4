"""SamKVLLM: a LlamaIndex LLM over a SamKVEngine, with a cache-aware answer call.

Used as a plain LLM by a stock response synthesizer (``index.as_query_engine(llm=llm)``,
``Settings.llm = llm``), it receives the retrieved text already formatted into a prompt and
answers it like any LLM: the prompt templates and response modes are honoured, and the
stored KV caches are not used. It says so once, with a :class:`SamKVCachesSkippedWarning`
(and a log line) naming the wiring that does use them: :class:`SamKVQueryEngine` or
``response_synthesizer=SamKVSynthesizer(llm)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import (
    Field,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import default_completion_to_prompt, generic_messages_to_prompt
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import TokenAsyncGen, TokenGen
from pydantic import InstanceOf

from samkv_integrations.bridge import aiter_in_thread, iter_in_thread
from samkv_integrations.engine import AnswerStream, SamKVEngine
from samkv_integrations.lazy_engine import ENGINE_OPTIONS, LazyEngine
from samkv_integrations.methods import DEFAULT_METHOD, BaseMethod, get_method
from samkv_integrations.records import CacheRef

logger = logging.getLogger(__name__)

OnForeignCache = Literal["error", "recompute"]
Prompt = str | Sequence[ChatMessage]

_GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
# Hugging Face ``generate`` names accepted for ours (``do_sample`` is handled on its own).
_HF_NAMES = {"stop_strings": "stop"}


class SamKVCachesSkippedWarning(UserWarning):
    """A stock response synthesizer re-prompted retrieved text: stored KV caches were not used.

    Emitted once per :class:`SamKVLLM`. Silence it with
    ``warnings.filterwarnings("ignore", category=SamKVCachesSkippedWarning)``.
    """


_SKIPPED = (
    "SamKVLLM was called by a stock LlamaIndex response synthesizer: the retrieved text is "
    "re-prompted in full and the nodes' stored KV caches are not used. To answer from the "
    "caches, use SamKVQueryEngine.from_index(index, llm) or index.as_query_engine(llm=llm, "
    "response_synthesizer=SamKVSynthesizer(llm))."
)


def generation_options(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Our generation options from ours or Hugging Face ``generate`` names.

    ``do_sample=False`` is greedy decoding (temperature 0); ``do_sample=True`` samples at
    the given temperature, 1.0 if none is given; ``stop_strings`` is ``stop``.

    Raises:
        ValueError: An option we do not support; the message names ``what`` and the option.
    """
    unknown = sorted(set(options) - {*_GENERATION_FIELDS, *_HF_NAMES, "do_sample"})
    if unknown:
        raise ValueError(
            f"unsupported {what} {unknown}; accepted: {', '.join(_GENERATION_FIELDS)} "
            "(and Hugging Face's do_sample, stop_strings)"
        )
    out = {_HF_NAMES.get(name, name): value for name, value in options.items()}
    sample = out.pop("do_sample", None)
    if sample is False:
        out["temperature"] = 0.0
    elif sample is True:
        if out.get("temperature", 1.0) == 0:
            raise ValueError(f"{what}: do_sample=True contradicts temperature=0 (greedy)")
        out.setdefault("temperature", 1.0)
    return out


def resolve_method(method: str | BaseMethod | Mapping[str, Any]) -> BaseMethod:
    """A method from a spec (``"samkv+budget=0.2"``), an instance, or :func:`method_payload`'s data.

    Raises:
        ValueError: An unknown method or option, or a bad value; the message names it.
    """
    if isinstance(method, Mapping):
        return get_method(str(method.get("name", "")), **dict(method.get("options") or {}))
    return get_method(method)


def method_payload(method: BaseMethod) -> dict[str, Any]:
    """A method as plain data: its name and hyperparameters (:func:`resolve_method` reads it)."""
    options = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    return {"name": method.name, "options": options}


class SamKVLLM(CustomLLM):
    """A self-hosted Hugging Face causal LM that can answer from stored document KV caches.

    As a plain LlamaIndex LLM (``Settings.llm``, chat engines, agents) it renders the
    prompt with the model's chat template and generates. The cache-aware call
    :meth:`stream_answer` is what :class:`SamKVSynthesizer` uses: it answers a question
    from the documents behind cache references with a method (default ``samkv``). Under a
    stock response synthesizer it re-prompts the retrieved text (see the module docstring).

    The constructor is cheap: the model loads on first use (or pass an existing engine);
    the options are checked here, each error naming its option.

    Args:
        model: A registry name, local directory, ``.gguf`` file or hub id; ``None`` is the
            embedded SmolLM2-135M-Instruct.
        store: KV cache store directory or fsspec URL; ``None`` is ``$SAMKV_HOME/kvcache``.
        device: Torch device (``"cuda:1"``); defaults to CUDA when available.
        dtype: ``bfloat16``, ``float16`` or ``float32``; defaults to bfloat16 on CUDA and
            float32 on CPU. Caches are bound to the dtype that wrote them: a node cached in
            another dtype raises ``CacheMismatchError`` naming the ``dtype`` that serves it
            (or pass ``on_foreign_cache="recompute"`` to re-encode it in this one).
        model_kwargs: Extra ``from_pretrained`` arguments (``revision``,
            ``trust_remote_code``, ``quantization_config``, ...); ``dtype``, ``device_map``
            and ``attn_implementation`` are set by the loader.
        generate_kwargs: Generation defaults by name, ours or Hugging Face's
            (``{"do_sample": False, "max_new_tokens": 64}``); folded into the fields below,
            which they may not contradict.
        memory_bytes: Cap, in tensor bytes, of the store's in-memory LRU tier (0: none).
        storage_options: fsspec options for a store URL (credentials, endpoints).
        pin_memory: Pin the memory tier's tensors for fast copies to the GPU.
        method: The method cache-aware answers use: a spec, ``name[+option=value...]``
            (``"samkv+budget=0.2"``), or a ``BaseMethod``. It is resolved here, so a bad
            name or option fails at construction.
        on_foreign_cache: What a cache written by another model means: ``"error"`` or
            ``"recompute"`` (re-encode it from the node's text).
        max_new_tokens, temperature, top_p, seed, stop: Generation defaults; each call may
            override them by keyword (``do_sample`` and ``stop_strings`` are understood).
        engine: An already built :class:`SamKVEngine` (instead of ``model``/``store``/...).

    Examples:
        >>> from llama_index.llms.samkv import SamKVLLM
        >>> llm = SamKVLLM(max_new_tokens=32, generate_kwargs={"do_sample": False})
        >>> llm.temperature
        0.0
        >>> llm.complete("What is the capital of France?").text  # doctest: +SKIP
        'The capital of France is Paris.'
    """

    model: str | None = Field(default=None, description="Registry name, path or hub id.")
    store: str | None = Field(default=None, description="KV cache store directory or URL.")
    device: str | None = Field(default=None, description="Torch device.")
    dtype: str | None = Field(default=None, description="Model dtype.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra from_pretrained arguments."
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Generation defaults by name (HF names accepted)."
    )
    memory_bytes: int = Field(default=0, ge=0, description="In-memory cache tier, in bytes.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a store URL.", exclude=True
    )
    pin_memory: bool = Field(default=False, description="Pin the memory tier (CUDA).")
    method: InstanceOf[BaseMethod] = Field(
        default_factory=lambda: get_method(DEFAULT_METHOD),
        description="Method for cache-aware answers (a spec such as 'samkv+budget=0.2').",
    )
    on_foreign_cache: OnForeignCache = Field(default="error", description="Foreign cache policy.")
    max_new_tokens: int = Field(default=256, gt=0, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed.")
    stop: list[str] = Field(default_factory=list, description="Strings that end the answer.")

    _engine: LazyEngine = PrivateAttr()
    _skipped_warned: bool = PrivateAttr(default=False)

    def __init__(self, *, engine: SamKVEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is None:
            self._engine = LazyEngine.from_settings(self)
            return
        given = [name for name in ENGINE_OPTIONS if name in kwargs]
        if given:
            raise ValueError(f"engine: pass either an engine or {', '.join(given)}, not both")
        self._engine = LazyEngine.of(engine)

    @model_validator(mode="before")
    @classmethod
    def _fold_generate_kwargs(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("generate_kwargs"):
            return data
        folded = dict(data)
        for name, value in generation_options(data["generate_kwargs"], "generate_kwargs").items():
            if name in data and data[name] != value:
                raise ValueError(
                    f"generate_kwargs: {name}={value!r} contradicts {name}={data[name]!r}"
                )
            folded[name] = value
        return folded

    @field_validator("method", mode="before")
    @classmethod
    def _resolve_method(cls, value: str | BaseMethod | Mapping[str, Any]) -> BaseMethod:
        return resolve_method(value)

    @field_serializer("method")
    def _serialize_method(self, method: BaseMethod) -> dict[str, Any]:
        return method_payload(method)

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this class under."""
        return "SamKVLLM"

    @property
    def engine(self) -> SamKVEngine:
        """The engine, loading the model and opening the store on first access."""
        return self._engine.get()

    @property
    def metadata(self) -> LLMMetadata:
        """Context window and name of the loaded model (loads it)."""
        loaded = self.engine.model
        return LLMMetadata(
            context_window=loaded.max_context,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=loaded.name,
        )

    def stream_answer(
        self,
        question: str,
        refs: Sequence[CacheRef],
        *,
        method: str | BaseMethod | None = None,
        on_foreign_cache: OnForeignCache | None = None,
        **generation: Any,
    ) -> AnswerStream:
        """Answer ``question`` from the documents behind ``refs``, as a stream of deltas.

        Args:
            question: The question.
            refs: The documents' cache references, in prompt order.
            method: Overrides :attr:`method` (a spec or an instance).
            on_foreign_cache: Overrides :attr:`on_foreign_cache`.
            **generation: Overrides of the generation defaults.

        Returns:
            The engine's stream: iterate it for text deltas; ``stats`` is set once the
            first delta (or the end of an empty answer) has been produced. It takes the
            engine's lock one step at a time, so any thread may advance it, one at a time.
        """
        return self.engine.stream(
            question,
            refs,
            self.method if method is None else resolve_method(method),
            on_foreign_cache=on_foreign_cache or self.on_foreign_cache,
            **self._generation(generation),
        )

    def _generation(self, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides = generation_options(overrides, "keyword arguments")
        defaults = {name: getattr(self, name) for name in _GENERATION_FIELDS}
        return {**defaults, **overrides, "stop": tuple(overrides.get("stop", self.stop))}

    def _prompt_ids(self, prompt: Prompt, formatted: bool) -> list[int]:
        """Token ids of a completion prompt (a string) or a chat (a message list)."""
        # The validators fill both formatters with LlamaIndex's generic ones when not given.
        to_prompt, chat_to_prompt = self.completion_to_prompt, self.messages_to_prompt
        if isinstance(prompt, str):
            if formatted:
                return self._encode(prompt)
            if to_prompt is not None and to_prompt is not default_completion_to_prompt:
                return self._encode(to_prompt(prompt))
            system = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt)]
            prompt = [*(system if self.system_prompt else []), ChatMessage(content=prompt)]
        if chat_to_prompt is not None and chat_to_prompt is not generic_messages_to_prompt:
            return self._encode(chat_to_prompt(prompt))
        # The model's own chat template (plain role-prefixed text for a model without one).
        return self.engine.chat_ids(
            [{"role": m.role.value, "content": m.content or ""} for m in prompt]
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.engine.model.tokenizer(text)["input_ids"])

    def _stream(
        self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]
    ) -> tuple[AnswerStream, int]:
        """The one path from a prompt to text deltas, for every sync, async and stream call.

        Returns:
            The stream and the number of prompt tokens.
        """
        ids = self._prompt_ids(prompt, formatted)
        return self.engine.stream_prompt(ids, **self._generation(overrides)), len(ids)

    def _text(
        self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]
    ) -> CompletionResponse:
        stream, n_prompt = self._stream(prompt, formatted, overrides)
        text = "".join(stream)
        return CompletionResponse(text=text, raw={"usage": usage(n_prompt, stream)})

    def _completions(
        self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]
    ) -> CompletionResponseGen:
        stream, n_prompt = self._stream(prompt, formatted, overrides)  # validates first
        return _accumulate(iter_in_thread(lambda: iter(stream)), lambda: usage(n_prompt, stream))

    async def _acompletions(
        self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]
    ) -> CompletionResponseAsyncGen:
        opened: list[tuple[AnswerStream, int]] = []

        def start() -> Iterator[str]:
            opened.append(self._stream(prompt, formatted, overrides))
            return iter(opened[0][0])

        def counts() -> dict[str, int]:
            stream, n_prompt = opened[0]
            return usage(n_prompt, stream)

        text, raw = "", None
        async for delta in aiter_in_thread(start):
            text += delta
            raw = {"usage": counts()}
            yield CompletionResponse(text=text, delta=delta, raw=raw)
        if raw is not None:  # the final counts, for the end event's token counters
            raw["usage"] = counts()

    def _note_stock_synthesis(self, prompt_args: Mapping[str, Any]) -> None:
        """Warn once that a stock synthesizer re-prompts retrieved text (``context_str``)."""
        # Every stock response synthesizer (compact, refine, tree_summarize, simple_summarize,
        # accumulate) formats the retrieved text into its template as context_str.
        if "context_str" not in prompt_args or self._skipped_warned:
            return
        self._skipped_warned = True
        logger.warning(_SKIPPED)
        warnings.warn(_SKIPPED, SamKVCachesSkippedWarning, stacklevel=3)

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        """LlamaIndex's ``predict`` (see :class:`SamKVCachesSkippedWarning`)."""
        self._note_stock_synthesis(prompt_args)
        return super().predict(prompt, **prompt_args)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        """LlamaIndex's ``stream`` (see :class:`SamKVCachesSkippedWarning`)."""
        self._note_stock_synthesis(prompt_args)
        return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        """LlamaIndex's ``apredict`` (see :class:`SamKVCachesSkippedWarning`)."""
        self._note_stock_synthesis(prompt_args)
        return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        """LlamaIndex's ``astream`` (see :class:`SamKVCachesSkippedWarning`)."""
        self._note_stock_synthesis(prompt_args)
        return await super().astream(prompt, **prompt_args)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt`` (rendered as one user turn unless ``formatted``).

        ``raw["usage"]`` holds the prompt and completion token counts (as OpenAI reports
        them), which LlamaIndex's ``TokenCountingHandler`` reads.
        """
        return self._text(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream the completion of ``prompt``; the deltas join to :meth:`complete`'s text."""
        return self._completions(prompt, formatted, kwargs)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """:meth:`complete` in a worker thread."""
        return await asyncio.to_thread(self._text, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """:meth:`stream_complete`, generated in a worker thread."""
        return self._acompletions(prompt, formatted, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer the last turn of ``messages`` (rendered with the model's chat template)."""
        return completion_response_to_chat_response(self._text(messages, False, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream :meth:`chat`'s answer."""
        return stream_completion_response_to_chat_response(
            self._completions(messages, False, kwargs)
        )

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` in a worker thread."""
        response = await asyncio.to_thread(self._text, messages, False, kwargs)
        return completion_response_to_chat_response(response)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """:meth:`stream_chat`, generated in a worker thread."""
        return astream_completion_response_to_chat_response(
            self._acompletions(messages, False, kwargs)
        )


def usage(prompt_tokens: int, stream: AnswerStream) -> dict[str, int]:
    """Token counts as OpenAI reports them: what ``TokenCountingHandler`` reads from ``raw``."""
    completion_tokens = len(stream.answer.token_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _accumulate(
    deltas: Iterator[str], counts: Callable[[], dict[str, int]]
) -> CompletionResponseGen:
    text, raw = "", None
    for delta in deltas:
        text += delta
        raw = {"usage": counts()}
        yield CompletionResponse(text=text, delta=delta, raw=raw)
    if raw is not None:  # the final counts, for the end event's token counters
        raw["usage"] = counts()
