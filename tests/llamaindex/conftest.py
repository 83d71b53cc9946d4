"""Fixtures for the LlamaIndex adapter tests: tiny models, Chroma collections, fake embeddings.

A random-weight model may pick EOS (or a special token that decodes to nothing) as its
first greedy token; an empty answer would make "stream equals complete" vacuous. The
``talkative`` model zeroes the output-embedding rows of the special tokens, so greedy
decoding never stops early and every answer is ``max_new_tokens`` bytes long.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import chromadb
import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import SamKVCacheBuilder, SamKVLLM
from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel

#: Three documents, each about one keyword of ``KEYWORDS``.
KEYWORDS = ["apple", "river", "violin"]
DOCS = [
    Document(text="The apple orchard sits on a hill.", doc_id="doc-apple"),
    Document(text="A river runs through the valley.", doc_id="doc-river"),
    Document(text="She plays the violin every evening.", doc_id="doc-violin"),
]


class KeywordEmbedding(BaseEmbedding):
    """One-hot embeddings: dimension ``i`` is hot when the text mentions keyword ``i``.

    Retrieval is then exact and known in advance; embeddings are not under test here.
    """

    model_name: str = "keyword-one-hot"

    def _vector(self, text: str) -> Embedding:
        lower = text.lower()
        hot = next((i for i, k in enumerate(KEYWORDS) if k in lower), len(KEYWORDS))
        return [1.0 if i == hot else 0.0 for i in range(len(KEYWORDS) + 1)]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._vector(text)


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> KVCacheStore:
    """A KV cache store in a directory of its own (its files can be tampered with)."""
    return KVCacheStore(tmp_path_factory.mktemp("kvcache"))


@pytest.fixture
def llm(talkative_llama: LoadedModel, store: KVCacheStore) -> SamKVLLM:
    return SamKVLLM(engine=SamKVEngine(talkative_llama, store), max_new_tokens=8)


@pytest.fixture
def embed_model() -> KeywordEmbedding:
    return KeywordEmbedding()


@pytest.fixture
def vector_store() -> Iterator[ChromaVectorStore]:
    """A Chroma collection of its own; never Chroma's default embedding function."""
    client = chromadb.EphemeralClient()
    name = f"samkv-{uuid.uuid4().hex}"
    collection = client.create_collection(name, embedding_function=None)
    yield ChromaVectorStore(chroma_collection=collection)
    client.delete_collection(name)


def ingest(
    llm: SamKVLLM,
    vector_store: ChromaVectorStore,
    embed_model: BaseEmbedding,
    documents: list[Document],
) -> tuple[VectorStoreIndex, list[BaseNode]]:
    """Run documents through the builder and the embedder into the vector store."""
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(), SamKVCacheBuilder(llm=llm), embed_model],
        vector_store=vector_store,
    )
    nodes = pipeline.run(documents=[d.model_copy(deep=True) for d in documents])
    return VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model), list(nodes)
