"""The RAG chain and the cache builder, driven through real LangChain and Chroma objects.

Tiny-model tests check the plumbing exactly (same answer through every entry point, the
right documents, metadata that survives Chroma); hand-set keyword embeddings make
retrieval known in advance. The ``real_model`` tests run the embedded SmolLM2 with the
offline MiniLM embeddings and check that answers come from the right document.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import chromadb
import pytest
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableLambda

from langchain_samkv import (
    ChatSamKV,
    MiniLMEmbeddings,
    SamKVCacheBuilder,
    create_samkv_rag_chain,
    document_message,
)
from samkv_integrations import SamKVEngine
from samkv_integrations.methods import METHODS
from samkv_integrations.records import METADATA_KEYS

TEXTS = {
    "paris": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "fuji": "Mount Fuji, the highest mountain in Japan, rises 3,776 metres above sea level.",
    "bridge": "The Golden Gate Bridge in San Francisco opened to traffic in 1937.",
}
# One embedding axis per document, for the tiny-model tests' hand-set embeddings.
KEYWORDS = ["eiffel", "fuji", "golden gate"]
QUESTIONS = {
    "fuji": "How high is Mount Fuji?",
    "paris": "When was the Eiffel Tower completed?",
    "bridge": "When did the Golden Gate Bridge open?",
}


def _minilm_chroma(docs: list[Document]) -> Chroma:
    store = Chroma(
        collection_name=f"samkv-{uuid.uuid4().hex}",
        embedding_function=MiniLMEmbeddings(device="cpu"),
        client=chromadb.EphemeralClient(),
    )
    store.add_documents(docs)
    return store


def _source_docs(builder: SamKVCacheBuilder) -> list[Document]:
    return list(
        builder.transform_documents(
            [Document(text, id=key, metadata={"topic": key}) for key, text in TEXTS.items()]
        )
    )


@pytest.fixture
def llm(engine: SamKVEngine) -> ChatSamKV:
    return ChatSamKV.from_engine(engine, max_tokens=8)


KeywordChroma = Callable[[list[str], list[Document]], Chroma]


@pytest.fixture
def chain(llm: ChatSamKV, keyword_chroma: KeywordChroma) -> Runnable[str, dict[str, Any]]:
    store = keyword_chroma(KEYWORDS, _source_docs(SamKVCacheBuilder(llm)))
    return create_samkv_rag_chain(store.as_retriever(search_kwargs={"k": 1}), llm)


def test_builder_adds_cache_metadata_and_is_idempotent(llm: ChatSamKV) -> None:
    builder = SamKVCacheBuilder(llm)
    first = _source_docs(builder)
    written = llm.engine.store.stats().bytes_written
    again = list(builder.transform_documents(first))

    assert llm.engine.store.stats().bytes_written == written  # nothing encoded twice
    assert [d.metadata for d in again] == [d.metadata for d in first]
    assert [(d.id, d.page_content, d.metadata["topic"]) for d in first] == [
        (key, text, key) for key, text in TEXTS.items()
    ]
    for doc in first:
        assert set(METADATA_KEYS) <= set(doc.metadata)
        assert llm.engine.store.contains(doc.metadata["samkv_cache_key"])
        assert doc.metadata["samkv_model"] == llm.engine.fingerprint


def test_builder_rejects_empty_documents(llm: ChatSamKV) -> None:
    with pytest.raises(ValueError, match="document 1"):
        SamKVCacheBuilder(llm).transform_documents([Document("text"), Document(" ")])


def test_chain_answers_over_the_retrieved_documents(
    chain: Runnable[str, dict[str, Any]], llm: ChatSamKV
) -> None:
    out = chain.invoke(QUESTIONS["fuji"])
    assert set(out) == {"answer", "documents"}
    (doc,) = out["documents"]
    assert doc.page_content == TEXTS["fuji"]
    assert doc.metadata["topic"] == "fuji"
    assert llm.engine.store.contains(doc.metadata["samkv_cache_key"])  # survived Chroma
    reply = llm.invoke([document_message(QUESTIONS["fuji"], [doc])])
    assert reply.response_metadata["recomputed_documents"] == 0
    assert out["answer"] == reply.text
    assert len(out["answer"]) > 0


def test_chain_method_is_passed_to_the_model(llm: ChatSamKV, keyword_chroma: KeywordChroma) -> None:
    store = keyword_chroma(KEYWORDS, _source_docs(SamKVCacheBuilder(llm)))
    retriever = store.as_retriever(search_kwargs={"k": 2})
    for method in ("full", "reuse", "samkv+budget=0.5"):
        out = create_samkv_rag_chain(retriever, llm, method=method).invoke(QUESTIONS["paris"])
        direct = llm.invoke([document_message(QUESTIONS["paris"], out["documents"])], method=method)
        assert direct.response_metadata["method"] == method.split("+")[0]
        assert out["answer"] == direct.text
    with pytest.raises(ValueError, match="method"):
        create_samkv_rag_chain(retriever, llm, method="nope")


def test_chain_resolves_its_method_when_built(llm: ChatSamKV) -> None:
    never = RunnableLambda(_never_called)
    for spec, named in (("samkv+budget=0", "budget"), ("samkv+top=3", "top"), ("x", "'x'")):
        with pytest.raises(ValueError, match=named):
            create_samkv_rag_chain(never, llm, method=spec)


def _never_called(question: str) -> list[Document]:
    raise AssertionError("the chain must fail before retrieving")


def test_stream_and_batch_agree_with_invoke(chain: Runnable[str, dict[str, Any]]) -> None:
    question = QUESTIONS["paris"]
    expected = chain.invoke(question)
    chunks = list(chain.stream(question))
    keys = [next(iter(c)) for c in chunks]
    assert keys[0] == "documents" and set(keys[1:]) == {"answer"}  # documents come first
    assert chunks[0]["documents"] == expected["documents"]
    assert [d.metadata["topic"] for d in expected["documents"]] == ["paris"]
    assert "".join(c["answer"] for c in chunks[1:]) == expected["answer"]
    assert len(chunks) > 2  # the answer really streams
    questions = list(QUESTIONS.values())
    assert chain.batch(questions) == [chain.invoke(q) for q in questions]


async def test_async_entry_points_agree_with_invoke(chain: Runnable[str, dict[str, Any]]) -> None:
    questions = list(QUESTIONS.values())
    expected = [chain.invoke(q) for q in questions]
    assert await chain.ainvoke(questions[0]) == expected[0]
    assert await chain.abatch(questions) == expected

    deltas, retrieved = [], None
    async for event in chain.astream_events(questions[1], version="v2"):
        if event["event"] == "on_chat_model_stream":
            deltas.append(event["data"]["chunk"].text)
        elif event["event"] == "on_retriever_end":
            retrieved = event["data"]["output"]
    assert "".join(deltas) == expected[1]["answer"]
    assert retrieved == expected[1]["documents"]


# --- End to end on the embedded default model ------------------------------------------


def _method_param(method: str) -> Any:
    return pytest.param(
        method,
        marks=pytest.mark.skipif(
            method not in METHODS, reason=f"method {method!r} is not registered yet"
        ),
    )


@pytest.fixture(scope="module")
def real_store(default_engine: SamKVEngine) -> Chroma:
    docs = _source_docs(SamKVCacheBuilder(default_engine))
    return _minilm_chroma(docs)


@pytest.mark.real_model
@pytest.mark.parametrize("method", [_method_param("samkv"), _method_param("full")])
async def test_real_model_answers_from_the_right_document(
    default_engine: SamKVEngine, real_store: Chroma, method: str
) -> None:
    llm = ChatSamKV.from_engine(default_engine, max_tokens=32)
    chain = create_samkv_rag_chain(
        real_store.as_retriever(search_kwargs={"k": 2}), llm, method=method
    )

    out = chain.invoke(QUESTIONS["fuji"])
    assert out["documents"][0].page_content == TEXTS["fuji"]
    assert "3,776" in out["answer"]
    streamed = [c["answer"] for c in chain.stream(QUESTIONS["fuji"]) if "answer" in c]
    assert "".join(streamed) == out["answer"]

    answers = await chain.abatch([QUESTIONS["fuji"], QUESTIONS["paris"], QUESTIONS["bridge"]])
    assert answers[0] == out
    assert "1889" in answers[1]["answer"]
    assert "1937" in answers[2]["answer"]
    assert [a["documents"][0].metadata["topic"] for a in answers] == ["fuji", "paris", "bridge"]
