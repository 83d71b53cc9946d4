from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.synthesis import (
    SynthesizeEndEvent,
    SynthesizeStartEvent,
)
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, TextNode
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import SamKVCacheBuilder, SamKVLLM, SamKVQueryEngine, SamKVSynthesizer
from samkv_integrations import CacheMismatchError, KVCacheStore, SamKVEngine
from samkv_integrations.methods import DEFAULT_METHOD, METHODS, SamKVMethod
from samkv_integrations.models import LoadedModel
from samkv_integrations.records import METADATA_KEYS, ref_from_metadata

from .conftest import DOCS, KeywordEmbedding, ingest

QUESTION = "What grows in the apple orchard?"
# Methods that read the stored caches (``full`` re-encodes every document from its text).
CACHE_METHOD = DEFAULT_METHOD if METHODS[DEFAULT_METHOD].reads_cache else "reuse"


def method_param(name: str) -> Any:
    missing = pytest.mark.skipif(name not in METHODS, reason=f"method {name!r} not registered")
    return pytest.param(name, marks=missing)


METHOD_PARAMS = [method_param("samkv"), method_param("full"), method_param("reuse")]


def stats_of(response: Any) -> dict[str, Any]:
    return response.metadata["samkv"]


def test_builder_tags_nodes_and_fills_the_store(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    _, nodes = ingest(llm, vector_store, embed_model, DOCS)
    engine = llm.engine
    assert len(nodes) == len(DOCS)
    for node in nodes:
        ref = ref_from_metadata(node.metadata)
        assert ref is not None
        ids = engine.document_ids(node.get_content(metadata_mode=MetadataMode.NONE))
        assert (ref.model, ref.n_tokens) == (engine.fingerprint, len(ids))
        assert isinstance(node.metadata["samkv_format"], int)
        assert engine.store.get(ref.key, fingerprint=engine.fingerprint).token_ids == ids
        for key in METADATA_KEYS:
            assert key in node.excluded_embed_metadata_keys
            assert key in node.excluded_llm_metadata_keys
        for mode in (MetadataMode.EMBED, MetadataMode.LLM):
            assert "samkv_" not in node.get_content(metadata_mode=mode)
        assert ref.key in node.get_content(metadata_mode=MetadataMode.ALL)


def test_builder_is_idempotent(llm: SamKVLLM) -> None:
    nodes = [TextNode(text=d.text) for d in DOCS]
    builder = SamKVCacheBuilder(llm=llm)
    builder(nodes)
    before = [(dict(n.metadata), list(n.excluded_llm_metadata_keys)) for n in nodes]
    written = llm.engine.store.stats().bytes_written
    assert written > 0
    assert builder(nodes) is nodes
    assert [(dict(n.metadata), list(n.excluded_llm_metadata_keys)) for n in nodes] == before
    assert llm.engine.store.stats().bytes_written == written


def test_builder_names_the_node_it_cannot_cache(llm: SamKVLLM) -> None:
    too_long = TextNode(text="x" * 5000, id_="the-long-one")
    with pytest.raises(ValueError, match="the-long-one"):
        SamKVCacheBuilder(llm=llm)([too_long])
    empty = TextNode(text="  ")
    SamKVCacheBuilder(llm=llm)([empty])
    assert "samkv_cache_key" not in empty.metadata


@pytest.mark.parametrize("method", METHOD_PARAMS)
def test_query_engine_answers_from_the_retrieved_caches(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding, method: str
) -> None:
    index, _ = ingest(llm, vector_store, embed_model, DOCS)
    query_engine = SamKVQueryEngine.from_index(index, llm, similarity_top_k=2, method=method)
    response = query_engine.query(QUESTION)
    retrieved = index.as_retriever(similarity_top_k=2).retrieve(QUESTION)
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in retrieved]
    assert response.source_nodes[0].node.ref_doc_id == "doc-apple"
    stats = stats_of(response)
    assert stats["method"] == method
    assert stats["recomputed_documents"] == 0
    assert list(stats["kept_tokens_by_node"]) == [n.node.node_id for n in retrieved]
    assert 0 < stats["kept_fraction"] <= 1
    assert stats["ttft_s"] > 0
    refs = [ref_from_metadata(n.node.metadata, n.node.get_content()) for n in retrieved]
    direct = llm.engine.answer(QUESTION, refs, method, max_new_tokens=llm.max_new_tokens)
    assert response.response == direct.text
    assert stats["context_tokens"] == direct.stats.context_tokens
    framer = llm.engine.framer  # counted independently of the adapter
    question_tokens = len(framer.prefix_ids()) + len(framer.question_ids(QUESTION))
    assert stats["prompt_tokens"] == question_tokens + direct.stats.context_tokens
    # The response metadata keeps LlamaIndex's node-id -> metadata entries too.
    assert response.metadata[retrieved[0].node.node_id]["samkv_cache_key"] == refs[0].key


@pytest.mark.parametrize("method", METHOD_PARAMS)
async def test_streaming_and_async_answers_agree(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding, method: str
) -> None:
    index, _ = ingest(llm, vector_store, embed_model, DOCS)

    def engine(streaming: bool) -> SamKVQueryEngine:
        return SamKVQueryEngine.from_index(
            index, llm, similarity_top_k=3, method=method, streaming=streaming
        )

    text = engine(False).query(QUESTION).response
    assert text
    streamed = engine(True).query(QUESTION)
    assert stats_of(streamed)["method"] == method  # in place before the first delta is read
    assert "".join(streamed.response_gen) == text
    assert len(streamed.source_nodes) == 3
    assert (await engine(False).aquery(QUESTION)).response == text
    astreamed = await engine(True).aquery(QUESTION)
    assert stats_of(astreamed)["context_tokens"] == stats_of(streamed)["context_tokens"]
    assert "".join([d async for d in astreamed.async_response_gen()]) == text


def _next_in_a_new_thread(deltas: Iterator[str]) -> str | None:
    got: list[str | None] = []
    thread = threading.Thread(target=lambda: got.append(next(deltas, None)))
    thread.start()
    thread.join()
    return got[0]


def test_a_streaming_response_can_be_read_from_changing_threads(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    # As Starlette's iterate_in_threadpool reads a sync generator: each item in some thread.
    index, _ = ingest(llm, vector_store, embed_model, DOCS)
    text = SamKVQueryEngine.from_index(index, llm).query(QUESTION).response
    streamed = SamKVQueryEngine.from_index(index, llm, streaming=True).query(QUESTION)
    deltas: list[str] = []
    while (delta := _next_in_a_new_thread(streamed.response_gen)) is not None:
        deltas.append(delta)
    assert "".join(deltas) == text
    # The engine is free again: another query in this thread does not deadlock or raise.
    assert SamKVQueryEngine.from_index(index, llm).query(QUESTION).response == text


class _Recorder(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


def test_synthesize_emits_llama_index_events(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    index, _ = ingest(llm, vector_store, embed_model, DOCS)
    recorder = _Recorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    try:
        response = SamKVQueryEngine.from_index(index, llm, similarity_top_k=1).query(QUESTION)
    finally:
        root.event_handlers.remove(recorder)
    starts = [e for e in recorder.events if isinstance(e, SynthesizeStartEvent)]
    ends = [e for e in recorder.events if isinstance(e, SynthesizeEndEvent)]
    assert len(starts) == len(ends) == 1
    assert ends[0].response is response


def test_a_node_without_a_cache_is_encoded_and_reported(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    index = VectorStoreIndex.from_documents(
        [DOCS[0].model_copy(deep=True)],
        storage_context=StorageContext.from_defaults(vector_store=vector_store),
        embed_model=embed_model,
    )
    query_engine = SamKVQueryEngine.from_index(index, llm, method=CACHE_METHOD)
    first = query_engine.query(QUESTION)
    assert "samkv_cache_key" not in first.source_nodes[0].node.metadata
    assert stats_of(first)["recomputed_documents"] == 1
    engine = llm.engine
    assert engine.store.contains(engine.cache_ref(DOCS[0].text).key)  # stored on the spot
    second = query_engine.query(QUESTION)
    assert stats_of(second)["recomputed_documents"] == 0
    assert second.response == first.response


def test_a_corrupted_cache_is_recomputed_and_reported(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    index, nodes = ingest(llm, vector_store, embed_model, DOCS[:1])
    query_engine = SamKVQueryEngine.from_index(index, llm, method=CACHE_METHOD)
    clean = query_engine.query(QUESTION)
    assert stats_of(clean)["recomputed_documents"] == 0
    key = nodes[0].metadata["samkv_cache_key"]
    path = Path(llm.engine.store.url) / key[:2] / f"{key}.safetensors"
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])
    path.write_bytes(bytes(data))
    recovered = query_engine.query(QUESTION)
    assert stats_of(recovered)["recomputed_documents"] == 1
    assert recovered.response == clean.response
    assert stats_of(query_engine.query(QUESTION))["recomputed_documents"] == 0


def test_a_cache_of_another_model_is_an_error_unless_recompute_is_asked(
    llm: SamKVLLM,
    vector_store: ChromaVectorStore,
    embed_model: KeywordEmbedding,
    talkative_qwen2: LoadedModel,
    store: KVCacheStore,
) -> None:
    index, nodes = ingest(llm, vector_store, embed_model, DOCS[:1])
    other = SamKVLLM(engine=SamKVEngine(talkative_qwen2, store), max_new_tokens=8)
    strict = SamKVQueryEngine.from_index(index, other, method=CACHE_METHOD)
    with pytest.raises(CacheMismatchError, match="on_foreign_cache='recompute'"):
        strict.query(QUESTION)
    streaming = SamKVQueryEngine.from_index(index, other, method=CACHE_METHOD, streaming=True)
    with pytest.raises(CacheMismatchError):
        streaming.query(QUESTION)
    lenient = SamKVQueryEngine.from_index(
        index, other, method=CACHE_METHOD, on_foreign_cache="recompute"
    )
    response = lenient.query(QUESTION)
    assert stats_of(response)["recomputed_documents"] == 1
    again = lenient.query(QUESTION)  # re-encoded once: its own cache is used from then on
    assert stats_of(again)["recomputed_documents"] == 0
    assert again.response == response.response
    own = other.engine.index([nodes[0].get_content()])
    assert (
        response.response == other.engine.answer(QUESTION, own, CACHE_METHOD, max_new_tokens=8).text
    )


def test_delete_ref_doc_evicts_only_unshared_caches(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    twin = DOCS[0].model_copy(update={"id_": "doc-apple-twin"}, deep=True)
    index, nodes = ingest(llm, vector_store, embed_model, [*DOCS, twin])
    key_of = {n.ref_doc_id: n.metadata["samkv_cache_key"] for n in nodes}
    assert key_of["doc-apple"] == key_of["doc-apple-twin"]
    builder = SamKVCacheBuilder(llm=llm)
    store = llm.engine.store

    assert builder.delete_ref_doc(index, "doc-river") == 1
    assert not store.contains(key_of["doc-river"])
    remaining = vector_store.get_nodes(None)
    assert sorted(n.ref_doc_id or "" for n in remaining) == [
        "doc-apple",
        "doc-apple-twin",
        "doc-violin",
    ]
    assert builder.delete_ref_doc(index, "doc-apple") == 0  # the twin still uses the cache
    assert store.contains(key_of["doc-apple"])
    assert builder.delete_ref_doc(index, "doc-apple-twin") == 1
    assert not store.contains(key_of["doc-apple"])
    assert store.contains(key_of["doc-violin"])


def test_evict_deletes_the_nodes_caches(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    index, nodes = ingest(llm, vector_store, embed_model, DOCS)
    assert SamKVCacheBuilder(llm=llm).evict(nodes) == len(DOCS)
    assert not any(llm.engine.store.contains(n.metadata["samkv_cache_key"]) for n in nodes)
    response = SamKVQueryEngine.from_index(
        index, llm, similarity_top_k=1, method=CACHE_METHOD
    ).query(QUESTION)
    assert stats_of(response)["recomputed_documents"] == 1


async def test_no_nodes_gives_the_empty_response(llm: SamKVLLM) -> None:
    assert str(SamKVSynthesizer(llm).synthesize(QUESTION, [])) == "Empty Response"
    assert str(await SamKVSynthesizer(llm).asynthesize(QUESTION, [])) == "Empty Response"
    streamed = SamKVSynthesizer(llm, streaming=True).synthesize(QUESTION, [])
    assert "".join(streamed.response_gen) == "Empty Response"


async def test_get_response_answers_from_text_chunks(llm: SamKVLLM) -> None:
    texts = [d.text for d in DOCS]
    synthesizer = SamKVSynthesizer(llm, method=CACHE_METHOD)
    expected = llm.engine.answer(QUESTION, llm.engine.index(texts), CACHE_METHOD, max_new_tokens=8)
    assert synthesizer.get_response(QUESTION, texts) == expected.text
    assert await synthesizer.aget_response(QUESTION, texts) == expected.text


def test_a_method_spec_fails_or_binds_when_the_query_engine_is_built(
    llm: SamKVLLM, vector_store: ChromaVectorStore, embed_model: KeywordEmbedding
) -> None:
    # Long enough for the budget to bind (SamKV always keeps each document's ends).
    long_docs = [Document(text=d.text * 8, doc_id=d.doc_id) for d in DOCS]
    index, _ = ingest(llm, vector_store, embed_model, long_docs)
    with pytest.raises(ValueError, match="bogus"):
        SamKVQueryEngine.from_index(index, llm, method="samkv+bogus=1")
    fractions = {}
    for budget in (0.2, 0.6):
        engine = SamKVQueryEngine.from_index(index, llm, method=f"samkv+budget={budget}")
        stats = stats_of(engine.query(QUESTION))
        assert stats["method"] == "samkv"
        fractions[budget] = stats["kept_fraction"]
        assert 0 < fractions[budget] <= budget + 1e-9
    assert fractions[0.2] < fractions[0.6]
    instance = SamKVQueryEngine.from_index(index, llm, method=SamKVMethod(budget=0.2))
    assert stats_of(instance.query(QUESTION))["kept_fraction"] == fractions[0.2]


def test_synthesizer_validates_its_arguments(llm: SamKVLLM) -> None:
    with pytest.raises(ValueError, match="llm"):
        SamKVSynthesizer(MockLLM())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        SamKVSynthesizer(llm, method="nope")
    with pytest.raises(ValueError, match="budget"):
        SamKVSynthesizer(llm, method="samkv+budget=0")
    with pytest.raises(ValueError, match="on_foreign_cache"):
        SamKVSynthesizer(llm, on_foreign_cache="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompts"):
        SamKVSynthesizer(llm).update_prompts({"text_qa_template": None})  # type: ignore[dict-item]
