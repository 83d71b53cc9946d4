"""Missing, corrupted and foreign caches, seen through the LangChain adapter.

As documented on ``ChatSamKV``: a missing or corrupted cache is re-encoded from the
document block's text, stored again, and counted in ``recomputed_documents``; a cache that
another model wrote raises ``CacheMismatchError`` unless ``on_foreign_cache="recompute"``;
a cache key that no longer matches the document's text (edited text, or keys computed
before a text splitter) warns and is replaced by the key of the current text.
"""

from __future__ import annotations

import copy
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_chroma import Chroma
from langchain_core.documents import Document

from langchain_samkv import (
    ChatSamKV,
    SamKVCacheBuilder,
    StaleCacheKeyWarning,
    create_samkv_rag_chain,
    document_message,
)
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


# --- Stale keys: a Document whose text no longer matches its cache key ------------------


def _edited(doc: Document, text: str) -> Document:
    """``doc`` with new text and its old metadata (cache key included), as an edit leaves it."""
    return Document(text, metadata=dict(doc.metadata))


def test_edited_text_is_answered_from_its_own_cache_with_a_warning(llm: ChatSamKV) -> None:
    docs = _docs(SamKVCacheBuilder(llm))
    edited = [docs[0], _edited(docs[1], "ZULU-NINE, not ALPHA-ONE, is the password of the vault.")]
    fresh = _docs_of(llm, [TEXTS[0], edited[1].page_content])
    expected, fresh_meta = _ask(llm, fresh, method="reuse")
    # The edited text's cache is the one to read: as many tokens as the new text has.
    assert fresh_meta["context_tokens"] != _ask(llm, docs, method="reuse")[1]["context_tokens"]
    llm.engine.delete_caches([llm.engine.cache_ref(edited[1].page_content)])

    with pytest.warns(StaleCacheKeyWarning, match="1 of 2 documents"):
        text, meta = _ask(llm, edited, method="reuse")
    assert (text, meta["recomputed_documents"]) == (expected, 1)  # encoded now, and said so
    assert meta["context_tokens"] == fresh_meta["context_tokens"]
    with pytest.warns(StaleCacheKeyWarning):
        again, meta = _ask(llm, edited, method="reuse")
    assert (again, meta["recomputed_documents"]) == (expected, 0)  # stored by the first call
    assert llm.engine.has_cache(llm.engine.cache_ref(edited[1].page_content))


def _docs_of(llm: ChatSamKV, texts: list[str]) -> list[Document]:
    return list(SamKVCacheBuilder(llm).transform_documents([Document(t) for t in texts]))


def _split(doc: Document, size: int) -> list[Document]:
    """What a LangChain text splitter does: chunks of the text, each with the parent's metadata."""
    text = doc.page_content
    return [
        Document(text[i : i + size], metadata=dict(doc.metadata)) for i in range(0, len(text), size)
    ]


def test_builder_before_a_splitter_answers_each_chunk_from_its_own_cache(llm: ChatSamKV) -> None:
    (parent,) = _docs_of(llm, [" ".join(TEXTS)])
    chunks = _split(parent, 30)
    assert len(chunks) == 3
    assert {c.metadata["samkv_cache_key"] for c in chunks} == {parent.metadata["samkv_cache_key"]}
    expected, _ = _ask(llm, _docs_of(llm, [c.page_content for c in chunks]))
    llm.engine.delete_caches([llm.engine.cache_ref(c.page_content) for c in chunks])

    with pytest.warns(StaleCacheKeyWarning, match="3 of 3 documents.*after splitting"):
        text, meta = _ask(llm, chunks)
    assert (text, meta["recomputed_documents"]) == (expected, 3)
    assert meta["context_tokens"] == sum(
        llm.engine.cache_ref(c.page_content).n_tokens for c in chunks
    )


def test_matching_keys_do_not_warn(llm: ChatSamKV) -> None:
    docs = _docs(SamKVCacheBuilder(llm))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCacheKeyWarning)
        assert _ask(llm, docs)[1]["recomputed_documents"] == 0
        assert _ask(llm, [Document(t) for t in TEXTS])[1]["recomputed_documents"] == 0


def test_usage_counts_cached_and_encoded_document_tokens(llm: ChatSamKV) -> None:
    docs = _docs(SamKVCacheBuilder(llm))
    sizes = [d.metadata["samkv_n_tokens"] for d in docs]
    llm.engine.delete_caches([docs[1].metadata["samkv_cache_key"]])
    reply = llm.invoke([document_message(QUESTION, docs)])
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == {
        "cache_read": sizes[0],
        "cache_creation": sizes[1],
    }
    reply = llm.invoke([document_message(QUESTION, docs)])
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == {
        "cache_read": sum(sizes),
        "cache_creation": 0,
    }
    # ``full`` re-prompts the raw text: it reads no cache.
    reply = llm.invoke([document_message(QUESTION, docs)], method="full")
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == {"cache_read": 0, "cache_creation": 0}


@pytest.mark.real_model
def test_real_model_answers_the_edited_text(default_engine: SamKVEngine) -> None:
    llm = ChatSamKV.from_engine(default_engine, max_tokens=24)
    (doc,) = _docs_of(llm, ["The password of the vault is ALPHA-ONE."])
    edited = _edited(doc, "The password of the vault is ZULU-NINE.")
    with pytest.warns(StaleCacheKeyWarning):
        reply = llm.invoke([document_message("What is the password of the vault?", [edited])])
    assert "ZULU-NINE" in reply.text and "ALPHA" not in reply.text
    assert reply.response_metadata["recomputed_documents"] == 1


def test_a_cache_written_in_another_dtype_names_the_dtype(
    llm: ChatSamKV, talkative: LoadedModel
) -> None:
    bf16 = LoadedModel.from_module(
        copy.deepcopy(talkative.model).to(torch.bfloat16), talkative.tokenizer, talkative.name
    )
    docs = _docs(SamKVCacheBuilder(SamKVEngine(bf16, llm.engine.store)))
    assert {d.metadata["samkv_dtype"] for d in docs} == {"bfloat16"}
    with pytest.raises(CacheMismatchError, match="dtype='bfloat16'"):
        _ask(llm, docs)
    assert _ask(llm, docs, on_foreign_cache="recompute")[1]["recomputed_documents"] == 2
