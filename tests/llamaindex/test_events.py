"""The cache path reports itself as an LLM completion: events, callbacks, token counts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import (
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import SamKVLLM, SamKVQueryEngine, SamKVSynthesizer
from samkv_integrations.records import ref_from_metadata

from .conftest import DOCS, KeywordEmbedding, ingest

QUESTION = "What grows in the apple orchard?"


def counter() -> TokenCountingHandler:
    # Any tokenizer: the counts come from the responses' raw["usage"], not from tokenizing.
    return TokenCountingHandler(tokenizer=lambda text: text.split())


@pytest.fixture
def settings_callbacks() -> Iterator[TokenCountingHandler]:
    previous = Settings._callback_manager
    handler = counter()
    Settings.callback_manager = CallbackManager([handler])
    yield handler
    Settings._callback_manager = previous


@pytest.fixture
def index(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> VectorStoreIndex:
    return ingest(llm, vector_store, embed_model, DOCS)[0]


def engine_counts(llm: SamKVLLM, response: Any) -> tuple[int, int]:
    """Prompt and completion tokens as the engine reports them, answering directly."""
    refs = [ref_from_metadata(n.node.metadata, n.node.get_content()) for n in response.source_nodes]
    direct = llm.engine.answer(QUESTION, refs, llm.method, max_new_tokens=llm.max_new_tokens)
    prompt = llm.engine.prompt_tokens(QUESTION) + direct.stats.context_tokens
    return prompt, len(direct.token_ids)


async def test_token_counting_handler_counts_the_cache_path(
    llm: SamKVLLM, index: VectorStoreIndex, settings_callbacks: TokenCountingHandler
) -> None:
    def query_engine(streaming: bool) -> SamKVQueryEngine:
        return SamKVQueryEngine.from_index(index, llm, similarity_top_k=2, streaming=streaming)

    response = query_engine(False).query(QUESTION)
    prompt, completion = engine_counts(llm, response)
    assert prompt > 0 and completion > 0
    stats = response.metadata["samkv"]
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (prompt, completion)
    counts = settings_callbacks.llm_token_counts
    assert [(c.prompt_token_count, c.completion_token_count) for c in counts] == [
        (prompt, completion)
    ]
    assert counts[0].prompt == QUESTION and counts[0].completion == response.response

    settings_callbacks.reset_counts()
    streamed = query_engine(True).query(QUESTION)
    assert settings_callbacks.llm_token_counts == []  # counted when the stream ends
    assert "".join(streamed.response_gen) == response.response
    assert streamed.metadata["samkv"]["completion_tokens"] == completion
    assert settings_callbacks.prompt_llm_token_count == prompt
    assert settings_callbacks.completion_llm_token_count == completion

    settings_callbacks.reset_counts()
    await query_engine(False).aquery(QUESTION)
    astreamed = await query_engine(True).aquery(QUESTION)
    assert "".join([d async for d in astreamed.async_response_gen()]) == response.response
    assert settings_callbacks.prompt_llm_token_count == 2 * prompt
    assert settings_callbacks.completion_llm_token_count == 2 * completion


def test_an_llm_callback_manager_counts_once(llm: SamKVLLM, index: VectorStoreIndex) -> None:
    handler = counter()
    counted = SamKVLLM(
        engine=llm.engine, max_new_tokens=8, callback_manager=CallbackManager([handler])
    )
    SamKVQueryEngine.from_index(index, counted, similarity_top_k=1).query(QUESTION)
    assert len(handler.llm_token_counts) == 1
    # The same handler on the synthesizer's manager too: still one count.
    shared = CallbackManager([handler])
    synthesizer = SamKVSynthesizer(counted, callback_manager=shared)
    assert counted.callback_manager is shared  # a synthesizer hands its manager to its LLM
    handler.reset_counts()
    index.as_query_engine(llm=counted, response_synthesizer=synthesizer).query(QUESTION)
    assert len(handler.llm_token_counts) == 1
    counted.callback_manager = CallbackManager([])
    handler.reset_counts()
    index.as_query_engine(llm=counted, response_synthesizer=synthesizer).query(QUESTION)
    assert len(handler.llm_token_counts) == 1  # the synthesizer's manager alone


class _Recorder(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


def test_the_cache_path_emits_llm_completion_events(llm: SamKVLLM, index: VectorStoreIndex) -> None:
    recorder = _Recorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    try:
        response = SamKVQueryEngine.from_index(index, llm, similarity_top_k=2).query(QUESTION)
    finally:
        root.event_handlers.remove(recorder)
    starts = [e for e in recorder.events if isinstance(e, LLMCompletionStartEvent)]
    ends = [e for e in recorder.events if isinstance(e, LLMCompletionEndEvent)]
    assert len(starts) == len(ends) == 1
    assert starts[0].span_id and starts[0].span_id == ends[0].span_id
    assert starts[0].model_dict["model_name"] == "random:tiny-llama"
    assert starts[0].additional_kwargs == {"samkv_method": llm.method.name, "documents": 2}
    stats = response.metadata["samkv"]
    assert ends[0].response.text == response.response
    assert ends[0].response.raw["usage"] == {
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
    }


async def test_the_plain_llm_reports_its_token_usage(llm: SamKVLLM) -> None:
    handler = counter()
    llm.callback_manager = CallbackManager([handler])
    prompt = "Name a colour."
    n_prompt = len(llm.engine.chat_ids([{"role": "user", "content": prompt}]))
    expected = (n_prompt, llm.max_new_tokens)  # the talkative model never stops early
    assert llm.complete(prompt).raw["usage"]["prompt_tokens"] == n_prompt
    assert "".join(r.delta or "" for r in llm.stream_complete(prompt))
    await llm.acomplete(prompt)
    assert [r async for r in await llm.astream_complete(prompt)]
    llm.chat([ChatMessage(content=prompt)])
    assert [r for r in llm.stream_chat([ChatMessage(content=prompt)])]
    counts = [(c.prompt_token_count, c.completion_token_count) for c in handler.llm_token_counts]
    assert counts == [expected] * 6
