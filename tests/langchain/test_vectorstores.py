"""SamKVVectorStore over real Chroma collections: LangChain's standard vector-store suite, and
the KV cache store kept in step with the documents (DESIGN.md: through the vector-store
adapters, the store holds exactly the caches of live documents).

The KV store is checked through the engine façade: for every text a test added, the cache of
that text exists exactly when a live document in the wrapped store has that text.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chromadb
import pytest
from langchain_chroma import Chroma
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.outputs import LLMResult
from langchain_core.vectorstores import InMemoryVectorStore, VectorStore
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests

from langchain_samkv import ChatSamKV, SamKVVectorStore, create_samkv_rag_chain, document_message
from samkv_integrations import SamKVEngine
from samkv_integrations.records import METADATA_KEYS

TEXTS = {
    "paris": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "fuji": "Mount Fuji, the highest mountain in Japan, rises 3,776 metres above sea level.",
    "bridge": "The Golden Gate Bridge in San Francisco opened to traffic in 1937.",
}
KEYWORDS = ["eiffel", "fuji", "golden gate"]


def _live_texts(chroma: Chroma) -> list[str]:
    return list(chroma.get(include=["documents"])["documents"])


def assert_caches_are_the_live_ones(engine: SamKVEngine, chroma: Chroma, texts: list[str]) -> None:
    """The cache of each text exists exactly when a live document has that text."""
    live = set(_live_texts(chroma))
    held = {t for t in texts if t.strip() and engine.has_cache(engine.cache_ref(t))}
    assert held == {t for t in texts if t in live}


class TestSamKVVectorStoreStandard(VectorStoreIntegrationTests):
    """LangChain's standard suite, on an EphemeralClient Chroma with the suite's embeddings."""

    # Every text the standard tests add.
    ADDED = ("foo", "bar", "baz", "new foo")

    @pytest.fixture
    def vectorstore(self, engine: SamKVEngine) -> Iterator[VectorStore]:
        chroma = Chroma(
            collection_name=f"samkv-{uuid.uuid4().hex}",
            embedding_function=self.get_embeddings(),
            client=chromadb.EphemeralClient(),
        )
        yield SamKVVectorStore(chroma, engine)
        # Beyond the suite: whatever it added, replaced and deleted, the KV store holds
        # exactly the caches of the documents left.
        assert_caches_are_the_live_ones(engine, chroma, list(self.ADDED))
        chroma.delete_collection()


class _Answers(BaseCallbackHandler):
    """Collects each chat model answer's response metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, Any]] = []

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        for generations in response.generations:
            for generation in generations:
                self.metadata.append(generation.message.response_metadata)  # type: ignore[attr-defined]


@pytest.fixture
def llm(engine: SamKVEngine) -> ChatSamKV:
    return ChatSamKV.from_engine(engine, max_tokens=6)


Embed = Callable[[list[str]], Embeddings]


def _persistent_chroma(path: Path, embed: Embed) -> Chroma:
    return Chroma(
        collection_name="docs",
        embedding_function=embed(KEYWORDS),
        client=chromadb.PersistentClient(str(path)),
    )


def test_ingest_query_delete_reingest_keeps_exactly_the_live_caches(
    llm: ChatSamKV, tmp_path: Path, keyword_embeddings: Embed
) -> None:
    store = SamKVVectorStore(_persistent_chroma(tmp_path / "chroma", keyword_embeddings), llm)
    ids = store.add_documents([Document(t, id=k, metadata={"topic": k}) for k, t in TEXTS.items()])
    assert ids == list(TEXTS)
    answers = _Answers()
    config = {"callbacks": [answers]}
    chain = create_samkv_rag_chain(store.as_retriever(search_kwargs={"k": 2}), llm)

    out = chain.invoke("How high is Mount Fuji?", config=config)
    assert out["documents"][0] == Document(TEXTS["fuji"], id="fuji", metadata={"topic": "fuji"})
    assert out["answer"]

    # A later process: the cache keys live in Chroma's metadata, not in the adapter.
    store = SamKVVectorStore(_persistent_chroma(tmp_path / "chroma", keyword_embeddings), llm)
    store.delete(["paris"])
    edited = TEXTS["fuji"].replace("3,776", "3,777")
    store.add_documents([Document(edited, id="fuji", metadata={"topic": "fuji"})])
    chain = create_samkv_rag_chain(store.as_retriever(search_kwargs={"k": 2}), llm)
    out = chain.invoke("How high is Mount Fuji?", config=config)
    assert [d.page_content for d in out["documents"]] == [edited, TEXTS["bridge"]]
    chain.invoke("When did the Golden Gate Bridge open?", config=config)

    assert sorted(_live_texts(store.vectorstore)) == sorted([edited, TEXTS["bridge"]])  # type: ignore[arg-type]
    assert_caches_are_the_live_ones(
        llm.engine,
        store.vectorstore,  # type: ignore[arg-type]
        [*TEXTS.values(), edited],
    )
    assert len(answers.metadata) == 3
    for meta in answers.metadata:
        assert meta["method"] == "samkv"
        assert meta["recomputed_documents"] == 0  # every answer came from the caches


def test_added_documents_carry_cache_keys_in_the_wrapped_store_only(
    llm: ChatSamKV, keyword_chroma: Any
) -> None:
    chroma = keyword_chroma(KEYWORDS, [])
    store = SamKVVectorStore(chroma, llm)
    original = Document(TEXTS["fuji"], metadata={"topic": "fuji"})
    (doc_id,) = store.add_documents([original])
    assert original == Document(TEXTS["fuji"], metadata={"topic": "fuji"})  # not modified

    (stored,) = chroma.get_by_ids([doc_id])
    ref = llm.engine.cache_ref(TEXTS["fuji"])
    assert stored.metadata == {
        "topic": "fuji",
        "samkv_cache_key": ref.key,
        "samkv_model": ref.model,
        "samkv_format": ref.format,
        "samkv_n_tokens": ref.n_tokens,
        "samkv_dtype": "float32",
    }
    assert llm.engine.has_cache(ref)
    expected = Document(TEXTS["fuji"], id=doc_id, metadata={"topic": "fuji"})
    assert store.get_by_ids([doc_id]) == [expected]
    assert store.similarity_search("fuji", k=1) == [expected]
    ((found, _),) = store.similarity_search_with_score("fuji", k=1)
    assert found == expected
    retriever = store.as_retriever(search_kwargs={"k": 1})
    assert retriever.invoke("fuji") == [expected]
    for search_type, kwargs in (
        ("mmr", {"k": 1, "fetch_k": 1}),
        ("similarity_score_threshold", {"k": 1, "score_threshold": 0.5}),
    ):
        other = store.as_retriever(search_type=search_type, search_kwargs=kwargs)
        assert other.invoke("fuji") == [expected]

    # The model finds the cache from the text alone: nothing is encoded again.
    reply = llm.invoke([document_message("How high?", [expected])])
    assert reply.response_metadata["recomputed_documents"] == 0


def test_same_text_twice_stores_one_cache_kept_while_used(
    llm: ChatSamKV, keyword_chroma: Any
) -> None:
    chroma = keyword_chroma(KEYWORDS, [])
    store = SamKVVectorStore(chroma, llm)
    store.add_documents([Document(TEXTS["fuji"], id="a")])
    written = llm.engine.store.stats().bytes_written
    store.add_texts([TEXTS["fuji"]], [{"copy": True}], ids=["b"])
    assert llm.engine.store.stats().bytes_written == written  # one cache for both

    ref = llm.engine.cache_ref(TEXTS["fuji"])
    store.delete(["a"])
    assert llm.engine.has_cache(ref)  # "b" still uses it
    store.delete(["b"])
    assert not llm.engine.has_cache(ref)
    store.delete(["b", "never-added"])  # deleting what is not there is fine


def test_replacing_a_document_deletes_its_old_cache(llm: ChatSamKV, keyword_chroma: Any) -> None:
    chroma = keyword_chroma(KEYWORDS, [])
    store = SamKVVectorStore(chroma, llm)
    store.add_documents([Document(TEXTS["paris"], id="x"), Document(TEXTS["bridge"], id="y")])
    store.add_documents([Document(TEXTS["fuji"], id="x")])
    assert_caches_are_the_live_ones(llm.engine, chroma, list(TEXTS.values()))
    # Re-adding a document unchanged keeps its cache.
    store.add_documents([Document(TEXTS["fuji"], id="x")])
    assert llm.engine.has_cache(llm.engine.cache_ref(TEXTS["fuji"]))


def test_documents_without_text_are_added_untagged(llm: ChatSamKV, keyword_chroma: Any) -> None:
    chroma = keyword_chroma(KEYWORDS, [])
    store = SamKVVectorStore(chroma, llm)
    stale = {"samkv_cache_key": "0" * 64, "samkv_model": "m", "samkv_format": 1, "kind": "x"}
    store.add_documents([Document(" ", id="blank", metadata=stale), Document("fuji", id="f")])
    assert chroma.get_by_ids(["blank"])[0].metadata == {"kind": "x"}
    assert "samkv_cache_key" in chroma.get_by_ids(["f"])[0].metadata


def test_a_store_that_cannot_list_keeps_the_caches_and_says_so(
    llm: ChatSamKV, caplog: pytest.LogCaptureFixture, keyword_embeddings: Embed
) -> None:
    memory = InMemoryVectorStore(keyword_embeddings(KEYWORDS))
    store = SamKVVectorStore(memory, llm)
    store.add_documents([Document(TEXTS["fuji"], id="f")])
    ref = llm.engine.cache_ref(TEXTS["fuji"])
    with caplog.at_level(logging.WARNING, logger="langchain_samkv.vectorstores"):
        store.delete(["f"])
    assert "cannot list documents by metadata" in caplog.text
    assert llm.engine.has_cache(ref)  # kept: it cannot tell whether another uses it

    class ListingStore(SamKVVectorStore):
        def keys_in_use(self, keys: Any) -> set[str]:
            live = {d["metadata"].get("samkv_cache_key") for d in memory.store.values()}
            return live & set(keys)

    listing = ListingStore(memory, llm)
    listing.add_documents([Document(TEXTS["fuji"], id="g")])
    listing.delete(["g"])
    assert not llm.engine.has_cache(ref)


def test_invalid_arguments_are_refused(
    llm: ChatSamKV, keyword_chroma: Any, keyword_embeddings: Embed
) -> None:
    chroma = keyword_chroma(KEYWORDS, [])
    with pytest.raises(ValueError, match="vectorstore"):
        SamKVVectorStore(object(), llm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine"):
        SamKVVectorStore(chroma, "not an llm")  # type: ignore[arg-type]
    store = SamKVVectorStore(chroma, llm)
    with pytest.raises(ValueError, match="vectorstore"):
        SamKVVectorStore(store, llm)
    with pytest.raises(ValueError, match="metadatas"):
        store.add_texts(["a", "b"], [{}])
    with pytest.raises(NotImplementedError, match="wraps a store"):
        SamKVVectorStore.from_texts(["a"], keyword_embeddings(KEYWORDS))
    assert METADATA_KEYS[0] == "samkv_cache_key"
