"""Stock LlamaIndex wiring: SamKVLLM answers like any LLM, and says once that caches went unused."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest
from llama_index.core import Settings
from llama_index.core.prompts import PromptTemplate
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import SamKVCachesSkippedWarning, SamKVLLM, SamKVQueryEngine

from .conftest import DOCS, KeywordEmbedding, ingest

QUESTION = "What grows in the apple orchard?"


@pytest.fixture
def settings_llm() -> Iterator[None]:
    previous = Settings._llm
    yield
    Settings._llm = previous


def skipped(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if "stored KV caches are not used" in r.getMessage()]


def test_a_stock_query_engine_re_prompts_and_warns_once(
    llm: SamKVLLM,
    vector_store: ChromaVectorStore,
    embed_model: KeywordEmbedding,
    caplog: pytest.LogCaptureFixture,
) -> None:
    index, _ = ingest(llm, vector_store, embed_model, DOCS)
    query_engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    with (
        caplog.at_level(logging.WARNING),
        pytest.warns(SamKVCachesSkippedWarning, match="SamKVSynthesizer") as warned,
    ):
        first = query_engine.query(QUESTION)
    assert len(warned) == 1
    assert "SamKVQueryEngine.from_index" in str(warned[0].message)
    assert len(skipped(caplog.records)) == 1
    assert first.response and "samkv" not in (first.metadata or {})  # answered from the text
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamKVCachesSkippedWarning)
        assert query_engine.query(QUESTION).response == first.response  # once per LLM
    assert len(skipped(caplog.records)) == 1


async def test_settings_llm_and_streaming_warn_too(
    llm: SamKVLLM,
    vector_store: ChromaVectorStore,
    embed_model: KeywordEmbedding,
    settings_llm: None,
) -> None:
    index, _ = ingest(llm, vector_store, embed_model, DOCS)
    Settings.llm = SamKVLLM(engine=llm.engine, max_new_tokens=8)
    with pytest.warns(SamKVCachesSkippedWarning):  # the stock stream starts when read
        streamed = index.as_query_engine(streaming=True).query(QUESTION)
        assert "".join(streamed.response_gen)
    async_llm = SamKVLLM(engine=llm.engine, max_new_tokens=8)
    with pytest.warns(SamKVCachesSkippedWarning):
        answer = await index.as_query_engine(llm=async_llm).aquery(QUESTION)
    assert answer.response


def test_the_cache_wiring_and_plain_prompts_do_not_warn(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    index, _ = ingest(llm, vector_store, embed_model, DOCS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamKVCachesSkippedWarning)
        response = SamKVQueryEngine.from_index(index, llm).query(QUESTION)
        assert response.metadata["samkv"]["recomputed_documents"] == 0
        assert llm.predict(PromptTemplate("Name a {thing}."), thing="colour")
