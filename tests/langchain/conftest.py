"""Fixtures for the LangChain adapter tests: a tiny random-weight chat model that always talks.

A random-weight model may pick EOS (or another special token, which decodes to nothing)
as its first greedy token, and an empty reply fails LangChain's standard tests. The
``talkative`` models zero the output-embedding rows of the tokenizer's special tokens:
their logits are then exactly 0 while the 256 byte tokens have random logits whose
maximum is positive, so greedy decoding never stops early and every reply is exactly
``max_new_tokens`` bytes (decoded with replacement characters where bytes are not UTF-8).
Greedy decoding makes the replies deterministic. Weights change, so the fingerprint is
recomputed after the edit.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import chromadb
import pytest
import torch
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.shapes import random_model


def talkative_model(shape: str = "tiny-llama", seed: int = 0) -> LoadedModel:
    """A random-weight model whose greedy replies never end before ``max_new_tokens``."""
    loaded = random_model(shape, device="cpu", seed=seed)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight[loaded.tokenizer.all_special_ids] = 0.0
    return LoadedModel.from_module(loaded.model, loaded.tokenizer, loaded.name)


@pytest.fixture(scope="session")
def talkative() -> LoadedModel:
    return talkative_model("tiny-llama", seed=0)


@pytest.fixture(scope="session")
def talkative_other() -> LoadedModel:
    """Same shape, other weights: another model fingerprint."""
    return talkative_model("tiny-llama", seed=1)


@pytest.fixture
def store_url() -> str:
    return f"memory://samkv-langchain-{uuid.uuid4().hex}"


@pytest.fixture
def engine(talkative: LoadedModel, store_url: str) -> SamKVEngine:
    return SamKVEngine(talkative, KVCacheStore(store_url))


class KeywordEmbeddings(Embeddings):
    """Hand-set embeddings: one axis per keyword, so retrieval is exact and known in advance.

    Embeddings are not under test where this is used; retrieval through a real Chroma
    collection is.
    """

    def __init__(self, keywords: list[str]) -> None:
        self.keywords = [k.lower() for k in keywords]

    def _embed(self, text: str) -> list[float]:
        lowered = text.lower()
        vector = [1.0 if k in lowered else 0.0 for k in self.keywords]
        return vector if any(vector) else [1e-3] * len(self.keywords)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._embed(text)


@pytest.fixture
def keyword_chroma() -> Callable[[list[str], list[Document]], Chroma]:
    """Build a Chroma collection (in-memory client, unique name) over keyword embeddings."""

    def build(keywords: list[str], docs: list[Document]) -> Chroma:
        store = Chroma(
            collection_name=f"samkv-{uuid.uuid4().hex}",
            embedding_function=KeywordEmbeddings(keywords),
            client=chromadb.EphemeralClient(),
        )
        if docs:
            store.add_documents(docs)
        return store

    return build


@pytest.fixture
def keyword_embeddings() -> Callable[[list[str]], Embeddings]:
    """``KeywordEmbeddings`` over the given keywords, for stores a test builds itself."""
    return KeywordEmbeddings
