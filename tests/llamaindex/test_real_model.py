"""End to end on the embedded default model and the offline MiniLM embeddings."""

from __future__ import annotations

import math
import uuid
from typing import Any

import chromadb
import pytest
from llama_index.core import Document
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import MiniLMEmbedding, SamKVLLM, SamKVQueryEngine
from samkv_integrations import SamKVEngine
from samkv_integrations.methods import METHODS

from .conftest import ingest

pytestmark = pytest.mark.real_model

FACTS = [
    (
        "The Velvet Compass is a novel written by Arvid Lindqvist in 1962.",
        "Who wrote The Velvet Compass?",
        "Lindqvist",
    ),
    (
        "The Kestrel-9 weather satellite was launched from the island of Ternholm.",
        "From which island was the Kestrel-9 satellite launched?",
        "Ternholm",
    ),
    (
        "The Blue Heron Bakery was founded by Marisol Quintero in the town of Oskarvik.",
        "In which town was the Blue Heron Bakery founded?",
        "Oskarvik",
    ),
]


@pytest.fixture(scope="module")
def embed_model() -> MiniLMEmbedding:
    return MiniLMEmbedding()


def test_minilm_embeds_offline_and_ranks_the_right_document(embed_model: MiniLMEmbedding) -> None:
    texts = [text for text, _, _ in FACTS]
    vectors = embed_model.get_text_embedding_batch(texts)
    assert [len(v) for v in vectors] == [384] * 3
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-4)
    assert embed_model.get_text_embedding(texts[1]) == pytest.approx(vectors[1], abs=1e-5)
    for i, (_, question, _) in enumerate(FACTS):
        query = embed_model.get_query_embedding(question)
        scores = [sum(a * b for a, b in zip(query, v, strict=True)) for v in vectors]
        assert scores.index(max(scores)) == i, question


async def test_minilm_async_equals_sync(embed_model: MiniLMEmbedding) -> None:
    question = FACTS[0][1]
    assert await embed_model.aget_query_embedding(question) == pytest.approx(
        embed_model.get_query_embedding(question), abs=1e-6
    )


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(
            "samkv",
            marks=pytest.mark.skipif("samkv" not in METHODS, reason="samkv not registered"),
        ),
        "full",
    ],
)
async def test_query_engine_answers_from_the_right_document(
    default_engine: SamKVEngine, embed_model: MiniLMEmbedding, method: str
) -> None:
    llm = SamKVLLM(engine=default_engine, max_new_tokens=32)
    collection = chromadb.EphemeralClient().create_collection(
        f"samkv-{uuid.uuid4().hex}", embedding_function=None
    )
    vector_store = ChromaVectorStore(chroma_collection=collection)
    index, _ = ingest(llm, vector_store, embed_model, [Document(text=t) for t, _, _ in FACTS])

    def engine(streaming: bool) -> Any:
        return SamKVQueryEngine.from_index(
            index, llm, similarity_top_k=3, method=method, streaming=streaming
        )

    for text, question, fact in FACTS:
        response = engine(False).query(question)
        assert fact in response.response, (question, response.response)
        retrieved = index.as_retriever(similarity_top_k=3).retrieve(question)
        assert [n.node.node_id for n in response.source_nodes] == [
            n.node.node_id for n in retrieved
        ]
        assert response.source_nodes[0].node.get_content() == text
        stats = response.metadata["samkv"]
        assert stats["method"] == method
        assert stats["recomputed_documents"] == 0
    # Streaming and async take the same path: one question is enough.
    question = FACTS[0][1]
    text = engine(False).query(question).response
    streamed = engine(True).query(question)
    assert "".join(streamed.response_gen) == text
    assert (await engine(False).aquery(question)).response == text
