"""SamKVLLM: a LlamaIndex LLM over a SamKVEngine, with a cache-aware answer call."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
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
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import default_completion_to_prompt, generic_messages_to_prompt
from pydantic import InstanceOf

from samkv_integrations.bridge import aiter_in_thread, iter_in_thread
from samkv_integrations.engine import AnswerStream, SamKVEngine
from samkv_integrations.lazy_engine import LazyEngine
from samkv_integrations.methods import DEFAULT_METHOD, BaseMethod, get_method
from samkv_integrations.records import CacheRef

OnForeignCache = Literal["error", "recompute"]
Prompt = str | Sequence[ChatMessage]

_GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


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
    from the documents behind cache references with a method (default ``samkv``).

    The constructor is cheap: the model loads on first use (or pass an existing engine).

    Args:
        model: A registry name, local directory, ``.gguf`` file or hub id; ``None`` is the
            embedded SmolLM2-135M-Instruct.
        store: KV cache store directory or fsspec URL; ``None`` is ``$SAMKV_HOME/kvcache``.
        device: Torch device; defaults to CUDA when available.
        dtype: ``bfloat16``, ``float16`` or ``float32``; defaults by device.
        method: The method cache-aware answers use: a spec, ``name[+option=value...]``
            (``"samkv+budget=0.2"``), or a ``BaseMethod``. It is resolved here, so a bad
            name or option fails at construction.
        on_foreign_cache: What a cache written by another model means: ``"error"`` or
            ``"recompute"`` (re-encode it from the node's text).
        max_new_tokens, temperature, top_p, seed, stop: Generation defaults; each call may
            override them by keyword.
        engine: An already built :class:`SamKVEngine` (instead of ``model``/``store``/...).

    Examples:
        >>> from llama_index.llms.samkv import SamKVLLM
        >>> llm = SamKVLLM(max_new_tokens=32)
        >>> llm.complete("What is the capital of France?").text  # doctest: +SKIP
        'The capital of France is Paris.'
    """

    model: str | None = Field(default=None, description="Registry name, path or hub id.")
    store: str | None = Field(default=None, description="KV cache store directory or URL.")
    device: str | None = Field(default=None, description="Torch device.")
    dtype: str | None = Field(default=None, description="Model dtype.")
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

    def __init__(self, *, engine: SamKVEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is None:
            self._engine = LazyEngine(self.model, self.store, self.device, self.dtype)
            return
        given = [name for name in ("model", "store", "device", "dtype") if name in kwargs]
        if given:
            raise ValueError(f"engine: pass either an engine or {', '.join(given)}, not both")
        self._engine = LazyEngine.of(engine)

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
        unknown = sorted(set(overrides) - set(_GENERATION_FIELDS))
        if unknown:
            raise ValueError(
                f"unsupported keyword arguments {unknown}; accepted: {', '.join(_GENERATION_FIELDS)}"
            )
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

    def _stream(self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]) -> AnswerStream:
        """The one path from a prompt to text deltas, for every sync, async and stream call."""
        ids = self._prompt_ids(prompt, formatted)
        return self.engine.stream_prompt(ids, **self._generation(overrides))

    def _text(self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]) -> str:
        return "".join(self._stream(prompt, formatted, overrides))

    def _completions(
        self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]
    ) -> CompletionResponseGen:
        stream = self._stream(prompt, formatted, overrides)  # validates before returning
        return _accumulate(iter_in_thread(lambda: iter(stream)))

    async def _acompletions(
        self, prompt: Prompt, formatted: bool, overrides: dict[str, Any]
    ) -> CompletionResponseAsyncGen:
        text = ""
        deltas = aiter_in_thread(lambda: iter(self._stream(prompt, formatted, overrides)))
        async for delta in deltas:
            text += delta
            yield CompletionResponse(text=text, delta=delta)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt`` (rendered as one user turn unless ``formatted``)."""
        return CompletionResponse(text=self._text(prompt, formatted, kwargs))

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
        text = await asyncio.to_thread(self._text, prompt, formatted, kwargs)
        return CompletionResponse(text=text)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """:meth:`stream_complete`, generated in a worker thread."""
        return self._acompletions(prompt, formatted, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer the last turn of ``messages`` (rendered with the model's chat template)."""
        text = self._text(messages, False, kwargs)
        return completion_response_to_chat_response(CompletionResponse(text=text))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream :meth:`chat`'s answer."""
        return stream_completion_response_to_chat_response(
            self._completions(messages, False, kwargs)
        )

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` in a worker thread."""
        text = await asyncio.to_thread(self._text, messages, False, kwargs)
        return completion_response_to_chat_response(CompletionResponse(text=text))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """:meth:`stream_chat`, generated in a worker thread."""
        return astream_completion_response_to_chat_response(
            self._acompletions(messages, False, kwargs)
        )


def _accumulate(deltas: Iterator[str]) -> CompletionResponseGen:
    text = ""
    for delta in deltas:
        text += delta
        yield CompletionResponse(text=text, delta=delta)
