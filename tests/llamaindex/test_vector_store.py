"""SamKVVectorStore over real Chroma collections: the KV store follows the collection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.api.client import SharedSystemClient
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode, TextNode
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.vector_stores import SimpleVectorStore
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import SamKVLLM, SamKVQueryEngine, SamKVVectorStore
from samkv_integrations import KVCacheStore

from .conftest import DOCS, KeywordEmbedding

QUESTION = "What grows in the apple orchard?"
EDITED = Document(text="The apple orchard was sold to a violin maker.", doc_id="doc-apple")


def stored_keys(store: KVCacheStore) -> set[str]:
    return {entry.key for entry in store.entries()}


def live_keys(vector_store: SamKVVectorStore) -> set[str]:
    return {n.metadata["samkv_cache_key"] for n in vector_store.get_nodes(None)}


def pipeline(
    vector_store: SamKVVectorStore, embed_model: KeywordEmbedding, docstore: SimpleDocumentStore
) -> IngestionPipeline:
    return IngestionPipeline(
        transformations=[SentenceSplitter(), embed_model],
        vector_store=vector_store,
        docstore=docstore,
        docstore_strategy=DocstoreStrategy.UPSERTS,
    )


def ingest(pipe: IngestionPipeline, documents: list[Document]) -> list[BaseNode]:
    return list(pipe.run(documents=[d.model_copy(deep=True) for d in documents]))


def ask(index: VectorStoreIndex, llm: SamKVLLM, top_k: int = 3) -> dict[str, Any]:
    response = SamKVQueryEngine.from_index(index, llm, similarity_top_k=top_k).query(QUESTION)
    stats = response.metadata["samkv"]
    assert stats["recomputed_documents"] == 0, "answered from the caches"
    return stats


def test_ingest_query_delete_and_upsert_leave_exactly_the_live_caches(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    store = llm.engine.store
    wrapped = SamKVVectorStore(vector_store, llm=llm)
    pipe = pipeline(wrapped, embed_model, SimpleDocumentStore())
    nodes = ingest(pipe, DOCS)
    assert len(nodes) == 3 and all("samkv_cache_key" in n.metadata for n in nodes)
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 3

    index = VectorStoreIndex.from_vector_store(wrapped, embed_model=embed_model)
    assert ask(index, llm)["context_tokens"] > 0

    index.delete_ref_doc("doc-river")
    assert sorted(n.ref_doc_id or "" for n in wrapped.get_nodes(None)) == [
        "doc-apple",
        "doc-violin",
    ]
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 2

    old_apple = next(n.metadata["samkv_cache_key"] for n in nodes if n.ref_doc_id == "doc-apple")
    assert len(ingest(pipe, [EDITED, DOCS[2]])) == 1  # the unchanged violin is skipped
    assert old_apple not in stored_keys(store)
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 2
    stats = ask(index, llm, top_k=2)
    assert stats["context_tokens"] > 0


def test_the_same_text_twice_stores_one_cache_until_both_are_gone(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    store = llm.engine.store
    wrapped = SamKVVectorStore(vector_store, llm=llm)
    twin = DOCS[0].model_copy(update={"id_": "doc-apple-twin"}, deep=True)
    index = VectorStoreIndex.from_documents(
        [d.model_copy(deep=True) for d in [*DOCS, twin]],
        storage_context=StorageContext.from_defaults(vector_store=wrapped),
        embed_model=embed_model,
    )
    assert len(wrapped.get_nodes(None)) == 4
    assert len(stored_keys(store)) == 3
    index.delete_ref_doc("doc-apple")
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 3
    index.delete_ref_doc("doc-apple-twin")
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 2
    ask(index, llm)


def test_delete_nodes_and_clear_collect_the_unused_caches(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    store = llm.engine.store
    wrapped = SamKVVectorStore(vector_store, llm=llm)
    nodes = [
        TextNode(text=d.text, id_=f"n{i}", embedding=[1.0, 0, 0, 0]) for i, d in enumerate(DOCS)
    ]
    nodes.append(TextNode(text=DOCS[0].text, id_="n0-twin", embedding=[1.0, 0, 0, 0]))
    assert wrapped.add(nodes) == ["n0", "n1", "n2", "n0-twin"]
    wrapped.delete_nodes(["n0", "n1"])
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 2
    on_key = MetadataFilter(key="samkv_cache_key", value=nodes[2].metadata["samkv_cache_key"])
    # Ids and a filter (llama-index-vector-stores-chroma refuses a filter without ids).
    wrapped.delete_nodes(["n2", "n0-twin"], filters=MetadataFilters(filters=[on_key]))
    assert [n.node_id for n in wrapped.get_nodes(None)] == ["n0-twin"]
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 1
    wrapped.clear()
    assert wrapped.get_nodes(None) == [] and stored_keys(store) == set()


async def test_async_add_and_delete(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    store = llm.engine.store
    wrapped = SamKVVectorStore(vector_store, llm=llm)
    nodes = [
        TextNode(text=d.text, id_=d.doc_id, embedding=embed_model.get_text_embedding(d.text))
        for d in DOCS
    ]
    await wrapped.async_add(nodes)
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 3
    await wrapped.adelete_nodes([DOCS[0].doc_id])
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 2
    await wrapped.aclear()
    assert stored_keys(store) == set()


def test_a_failed_add_leaves_no_orphan_caches(
    llm: SamKVLLM,
    vector_store: ChromaVectorStore,
    embed_model: KeywordEmbedding,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrapped = SamKVVectorStore(vector_store, llm=llm)
    kept = TextNode(text=DOCS[0].text, id_="kept", embedding=[1.0, 0, 0, 0])
    wrapped.add([kept])

    def refuse(self: ChromaVectorStore, nodes: Any, **kwargs: Any) -> list[str]:
        raise OSError("disk full")

    monkeypatch.setattr(ChromaVectorStore, "add", refuse)
    failing = [TextNode(text=d.text, embedding=[0, 1.0, 0, 0]) for d in DOCS]
    with pytest.raises(OSError, match="disk full"):
        wrapped.add(failing)
    assert stored_keys(llm.engine.store) == {kept.metadata["samkv_cache_key"]}


def test_a_persistent_collection_keeps_the_refs_and_the_caches(
    llm: SamKVLLM, embed_model: KeywordEmbedding, tmp_path: Path
) -> None:
    store = llm.engine.store
    client = chromadb.PersistentClient(path=str(tmp_path))
    collection = client.create_collection("docs", embedding_function=None)
    docstore = SimpleDocumentStore()
    pipe = pipeline(
        SamKVVectorStore(ChromaVectorStore(chroma_collection=collection), llm=llm),
        embed_model,
        docstore,
    )
    ingest(pipe, DOCS)
    del client, collection, pipe
    SharedSystemClient.clear_system_cache()  # the next client reads the files back

    reopened = chromadb.PersistentClient(path=str(tmp_path)).get_collection("docs")
    wrapped = SamKVVectorStore(ChromaVectorStore(chroma_collection=reopened), llm=llm)
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 3
    ingest(pipeline(wrapped, embed_model, docstore), [EDITED])
    assert stored_keys(store) == live_keys(wrapped) and len(stored_keys(store)) == 3
    ask(VectorStoreIndex.from_vector_store(wrapped, embed_model=embed_model), llm)


def test_a_store_that_cannot_list_keeps_the_caches_and_says_so(
    llm: SamKVLLM, embed_model: KeywordEmbedding, caplog: pytest.LogCaptureFixture
) -> None:
    store = llm.engine.store
    wrapped = SamKVVectorStore(SimpleVectorStore(), llm=llm)
    assert not wrapped.stores_text  # the nodes live in the index's docstore, tagged
    index = VectorStoreIndex.from_documents(
        [d.model_copy(deep=True) for d in DOCS],
        storage_context=StorageContext.from_defaults(vector_store=wrapped),
        embed_model=embed_model,
    )
    assert len(stored_keys(store)) == 3
    ask(index, llm)
    with caplog.at_level(logging.WARNING):
        index.delete_ref_doc("doc-river", delete_from_docstore=True)
        index.delete_ref_doc("doc-violin", delete_from_docstore=True)
    warned = [r for r in caplog.records if "cannot list its nodes" in r.getMessage()]
    assert len(warned) == 1
    assert len(stored_keys(store)) == 3  # documented: the caches stay


def test_the_wrapper_validates_its_arguments(
    llm: SamKVLLM, vector_store: ChromaVectorStore
) -> None:
    with pytest.raises(ValueError, match="vector_store"):
        SamKVVectorStore(object(), llm=llm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="llm"):
        SamKVVectorStore(vector_store, llm=object())  # type: ignore[arg-type]
    wrapped = SamKVVectorStore(vector_store, llm=llm)
    assert wrapped.vector_store is vector_store and wrapped.client is vector_store.client
    assert wrapped.stores_text and wrapped.flat_metadata
