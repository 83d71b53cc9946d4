"""A small demo index on a tiny random model, hand-set embeddings and an in-memory Chroma.

The page and the API are under test here, not accuracy: retrieval is made exact by
one-hot keyword embeddings, and the model only has to produce tokens.
"""

from __future__ import annotations

import uuid

import chromadb
import pytest
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from samkv_chroma_demo.corpus import Passage
from samkv_chroma_demo.pipeline import DemoIndex

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel

KEYWORDS = ["lighthouse", "glacier", "orchestra", "volcano"]

PASSAGES = [
    Passage(
        id=f"p{i}",
        title=f"{word.title()} article",
        text=(
            f"The {word} is the subject of this paragraph. "
            + f"It has a long history and many visitors come to see the {word} every year. " * 3
        ),
        source=f"test:{word}",
    )
    for i, word in enumerate(KEYWORDS)
]


class KeywordEmbedding(BaseEmbedding):
    """Dimension ``i`` is hot when the text mentions keyword ``i`` (the last one otherwise)."""

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
def demo_engine(talkative_llama: LoadedModel) -> SamKVEngine:
    return SamKVEngine(talkative_llama, KVCacheStore(f"memory://samkv-demo-{uuid.uuid4().hex}"))


@pytest.fixture
def demo_index(demo_engine: SamKVEngine) -> DemoIndex:
    index = DemoIndex(
        demo_engine, chromadb.EphemeralClient(), f"demo-{uuid.uuid4().hex[:12]}", KeywordEmbedding()
    )
    index.ingest(PASSAGES, progress=False)
    return index
