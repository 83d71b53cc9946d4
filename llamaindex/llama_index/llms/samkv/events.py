"""An answer from caches, reported to LlamaIndex as the LLM completion it is.

Stock synthesizers call the LLM, whose decorators emit ``LLMCompletionStartEvent`` /
``LLMCompletionEndEvent`` on the instrumentation dispatcher and a ``CBEventType.LLM`` event
on the callback manager. :class:`SamKVSynthesizer` calls the engine instead, so it emits
the same events itself, through :class:`CacheCompletion`, with the token counts in
``raw["usage"]`` (where ``TokenCountingHandler`` reads them): the prompt tokens are those
``full`` would prefill (shared prefix, documents, question), as the response's
``metadata["samkv"]["prompt_tokens"]`` reports them, and the completion tokens are the
tokens generated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.exception import ExceptionEvent
from llama_index.core.instrumentation.events.llm import (
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.instrumentation.span import active_span_id

from samkv_integrations.bridge import aiter_in_thread, iter_in_thread
from samkv_integrations.engine import AnswerStream
from samkv_integrations.records import MethodStats

dispatcher = instrument.get_dispatcher(__name__)

Usage = dict[str, int]


class CacheCompletion:
    """One answer from caches: runs it and reports it as an LLM completion.

    Args:
        open_stream: Starts the engine's answer (called in the thread that runs it).
        prompt_tokens: The prompt's token count, given the method's stats.
        callback_manager: Where the ``CBEventType.LLM`` event goes.
        model_dict: The LLM's ``to_payload()``.
        prompt: What the events show as the prompt (the question).
        details: The events' ``additional_kwargs`` (method, number of documents).
    """

    def __init__(
        self,
        open_stream: Callable[[], AnswerStream],
        *,
        prompt_tokens: Callable[[MethodStats], int],
        callback_manager: CallbackManager,
        model_dict: dict[str, Any],
        prompt: str,
        details: dict[str, Any],
    ) -> None:
        self._open_stream = open_stream
        self._prompt_tokens = prompt_tokens
        self._callbacks = callback_manager
        self._model_dict = model_dict
        self._prompt = prompt
        self._details = details
        self._stream: AnswerStream | None = None
        self._span_id: str | None = None
        self._event_id = ""
        self._ended: list[Callable[[Usage], None]] = []
        self.usage: Usage | None = None

    @property
    def stats(self) -> MethodStats:
        """The method's stats (complete once the first token is out)."""
        if self._stream is None:
            raise RuntimeError("the answer has not started")
        return self._stream.stats

    def on_end(self, hook: Callable[[Usage], None]) -> None:
        """Call ``hook`` with the token counts when the answer ends (now, if it has)."""
        if self.usage is not None:
            hook(self.usage)
        else:
            self._ended.append(hook)

    def text(self) -> str:
        """The whole answer, generated in this thread."""
        self._start()
        try:
            text = "".join(self._deltas())
        except BaseException as e:
            self._fail(e)
            raise
        self._end(text)
        return text

    async def atext(self) -> str:
        """The whole answer, generated in a worker thread."""
        self._start()
        try:
            text = await asyncio.to_thread(lambda: "".join(self._deltas()))
        except BaseException as e:
            self._fail(e)
            raise
        self._end(text)
        return text

    def stream(self) -> Generator[str, None, None]:
        """The answer's deltas, generated in a worker thread; runs to the first token first."""
        self._start()
        deltas = iter_in_thread(self._deltas)
        try:
            first = next(deltas, None)
        except BaseException as e:
            self._fail(e)
            raise
        return self._reported(first, deltas)

    async def astream(self) -> AsyncGenerator[str, None]:
        """:meth:`stream` for an event loop."""
        self._start()
        deltas = aiter_in_thread(self._deltas)
        try:
            first = await anext(deltas, None)
        except BaseException as e:
            self._fail(e)
            raise
        return self._areported(first, deltas)

    def _deltas(self) -> Iterator[str]:
        self._stream = self._open_stream()
        return iter(self._stream)

    def _reported(self, first: str | None, rest: Iterator[str]) -> Generator[str, None, None]:
        text = ""
        try:
            for delta in _prepend(first, rest):
                text += delta
                self._progress(text, delta)
                yield delta
        except BaseException as e:
            self._fail(e)
            raise
        self._end(text)

    async def _areported(
        self, first: str | None, rest: AsyncIterator[str]
    ) -> AsyncGenerator[str, None]:
        text = ""
        try:
            if first is not None:
                text += first
                self._progress(text, first)
                yield first
            async for delta in rest:
                text += delta
                self._progress(text, delta)
                yield delta
        except BaseException as e:
            self._fail(e)
            raise
        self._end(text)

    def _start(self) -> None:
        self._span_id = active_span_id.get()
        dispatcher.event(
            LLMCompletionStartEvent(
                model_dict=self._model_dict,
                prompt=self._prompt,
                additional_kwargs=self._details,
                span_id=self._span_id,
            )
        )
        self._event_id = self._callbacks.on_event_start(
            CBEventType.LLM,
            payload={
                EventPayload.PROMPT: self._prompt,
                EventPayload.ADDITIONAL_KWARGS: self._details,
                EventPayload.SERIALIZED: self._model_dict,
            },
        )

    def _progress(self, text: str, delta: str) -> None:
        response = CompletionResponse(text=text, delta=delta)
        dispatcher.event(
            LLMCompletionInProgressEvent(
                prompt=self._prompt, response=response, span_id=self._span_id
            )
        )

    def _end(self, text: str) -> None:
        stream = self._stream
        if stream is None:
            raise RuntimeError("the answer has not started")
        prompt_tokens = self._prompt_tokens(stream.stats)
        completion_tokens = len(stream.answer.token_ids)
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        response = CompletionResponse(text=text, raw={"usage": dict(self.usage)})
        self._callbacks.on_event_end(
            CBEventType.LLM,
            payload={EventPayload.PROMPT: self._prompt, EventPayload.COMPLETION: response},
            event_id=self._event_id,
        )
        dispatcher.event(
            LLMCompletionEndEvent(prompt=self._prompt, response=response, span_id=self._span_id)
        )
        for hook in self._ended:
            hook(self.usage)

    def _fail(self, error: BaseException) -> None:
        self._callbacks.on_event_end(
            CBEventType.LLM, payload={EventPayload.EXCEPTION: error}, event_id=self._event_id
        )
        dispatcher.event(ExceptionEvent(exception=error, span_id=self._span_id))


def _prepend(first: str | None, rest: Iterator[str]) -> Iterator[str]:
    if first is not None:
        yield first
    yield from rest
