"""Missing, corrupted and foreign caches, seen through the LangChain adapter.

As documented on ``ChatSamKV``: a missing or corrupted cache is re-encoded from the
document block's text, stored again, and counted in ``recomputed_documents``; a cache that
another model wrote raises ``CacheMismatchError`` unless ``on_foreign_cache="recompute"``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_chroma import Chroma
from langchain_core.documents import Document

from langchain_samkv import ChatSamKV, SamKVCacheBuilder, create_samkv_rag_chain, document_message
from samkv_integrations import CacheMismatchError, KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel

TEXTS = ["Paris is the capital of France.", "Mount Fuji is the highest mountain in Japan."]
QUESTION = "How high is Mount Fuji?"


def _docs(builder: SamKVCacheBuilder) -> list[Document]:
    return list(builder.transform_documents([Document(t) for t in TEXTS]))


def _ask(llm: ChatSamKV, docs: list[Document], **kwargs: Any) -> tuple[str, dict[str, Any]]:
    reply = llm.invoke([document_message(QUESTION, docs)], **kwargs)
    return reply.text, reply.response_metadata


@pytest.fixture
def llm(engine: SamKVEngine) -> ChatSamKV:
    return ChatSamKV.from_engine(engine, max_tokens=8)


def test_intact_caches_are_read_not_recomputed(llm: ChatSamKV) -> None:
    docs = _docs(SamKVCacheBuilder(llm))
    _, meta = _ask(llm, docs)
    assert meta["recomputed_documents"] == 0
    assert meta["context_tokens"] == sum(d.metadata["samkv_n_tokens"] for d in docs)


def test_missing_cache_is_recomputed_stored_and_reported(llm: ChatSamKV) -> None:
    docs = _docs(SamKVCacheBuilder(llm))
    expected, _ = _ask(llm, docs)
    key = docs[1].metadata["samkv_cache_key"]
    assert llm.engine.store.delete(key)

    text, meta = _ask(llm, docs)
    assert meta["recomputed_documents"] == 1
    assert text == expected
    assert llm.engine.store.contains(key)
    assert _ask(llm, docs)[1]["recomputed_documents"] == 0


def test_corrupted_cache_is_recomputed_and_reported(talkative: LoadedModel, tmp_path: Path) -> None:
    llm = ChatSamKV.from_engine(SamKVEngine(talkative, KVCacheStore(tmp_path)), max_tokens=8)
    docs = _docs(SamKVCacheBuilder(llm))
    expected, _ = _ask(llm, docs)
    key = docs[0].metadata["samkv_cache_key"]
    tensors = tmp_path / key[:2] / f"{key}.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-16:] = bytes(16)  # zero the last tensor bytes: the checksum no longer matches
    tensors.write_bytes(bytes(data))

    text, meta = _ask(llm, docs)
    assert meta["recomputed_documents"] == 1
    assert text == expected
    assert _ask(llm, docs)[1]["recomputed_documents"] == 0


def test_document_without_cache_key_is_encoded_once(llm: ChatSamKV) -> None:
    plain = [Document(t) for t in TEXTS]  # never went through the builder
    first, meta = _ask(llm, plain)
    assert meta["recomputed_documents"] == 2
    again, meta = _ask(llm, plain)
    assert meta["recomputed_documents"] == 0
    assert again == first
    assert first == _ask(llm, _docs(SamKVCacheBuilder(llm)))[0]


def test_foreign_cache_is_an_error_by_default(llm: ChatSamKV, talkative_other: LoadedModel) -> None:
    foreign = SamKVEngine(talkative_other, llm.engine.store)
    docs = _docs(SamKVCacheBuilder(foreign))
    with pytest.raises(CacheMismatchError, match="on_foreign_cache='recompute'"):
        _ask(llm, docs)


def test_foreign_cache_is_recomputed_when_asked(
    llm: ChatSamKV, talkative_other: LoadedModel
) -> None:
    foreign_docs = _docs(SamKVCacheBuilder(SamKVEngine(talkative_other, llm.engine.store)))
    text, meta = _ask(llm, foreign_docs, on_foreign_cache="recompute")
    assert meta["recomputed_documents"] == 2
    own_store = KVCacheStore(f"memory://{uuid.uuid4().hex}")
    own_docs = _docs(SamKVCacheBuilder(SamKVEngine(llm.engine.model, own_store)))
    expected, _ = _ask(llm, own_docs)
    assert text == expected

    # The Documents still point at the other model's caches; the next call finds this
    # model's own cache of the same text instead of encoding it again.
    as_field = llm.model_copy(update={"on_foreign_cache": "recompute"})
    again, meta = _ask(as_field, foreign_docs)
    assert (again, meta["recomputed_documents"]) == (expected, 0)
    rebuilt = _docs(SamKVCacheBuilder(llm))
    assert _ask(llm, rebuilt)[1]["recomputed_documents"] == 0


def test_foreign_cache_error_reaches_the_chain_caller(
    llm: ChatSamKV,
    talkative_other: LoadedModel,
    keyword_chroma: Callable[[list[str], list[Document]], Chroma],
) -> None:
    docs = _docs(SamKVCacheBuilder(SamKVEngine(talkative_other, llm.engine.store)))
    store = keyword_chroma(["paris", "fuji"], docs)
    retriever = store.as_retriever(search_kwargs={"k": 1})
    with pytest.raises(CacheMismatchError):
        create_samkv_rag_chain(retriever, llm).invoke(QUESTION)
    forgiving = llm.model_copy(update={"on_foreign_cache": "recompute"})
    out = create_samkv_rag_chain(retriever, forgiving).invoke(QUESTION)
    assert [d.page_content for d in out["documents"]] == [TEXTS[1]]
    assert out["answer"]
