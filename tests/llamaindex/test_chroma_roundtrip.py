from __future__ import annotations

from pathlib import Path

import chromadb
from chromadb.api.client import SharedSystemClient
from llama_index.core.schema import MetadataMode
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import SamKVLLM
from samkv_integrations.records import METADATA_KEYS

from .conftest import DOCS, KeywordEmbedding, ingest

TYPES = {"samkv_cache_key": str, "samkv_model": str, "samkv_format": int, "samkv_n_tokens": int}


def test_cache_metadata_round_trips_through_a_persistent_chroma(
    llm: SamKVLLM, embed_model: KeywordEmbedding, tmp_path: Path
) -> None:
    client = chromadb.PersistentClient(path=str(tmp_path))
    collection = client.create_collection("docs", embedding_function=None)
    _, written = ingest(llm, ChromaVectorStore(chroma_collection=collection), embed_model, DOCS)
    expected = {n.node_id: {k: n.metadata[k] for k in METADATA_KEYS} for n in written}
    del client, collection
    # Drop the in-process client cache so that the new client reads the files back.
    SharedSystemClient.clear_system_cache()

    reopened = chromadb.PersistentClient(path=str(tmp_path)).get_collection("docs")
    raw = reopened.get(include=["metadatas"])
    for metadata in raw["metadatas"] or []:
        for value in metadata.values():
            assert isinstance(value, str | int | float | bool), metadata

    nodes = ChromaVectorStore(chroma_collection=reopened).get_nodes(None)
    assert {n.node_id for n in nodes} == set(expected)
    for node in nodes:
        got = {k: node.metadata[k] for k in METADATA_KEYS}
        assert got == expected[node.node_id]
        assert {k: type(v) for k, v in got.items()} == TYPES
        assert set(METADATA_KEYS) <= set(node.excluded_embed_metadata_keys)
        assert set(METADATA_KEYS) <= set(node.excluded_llm_metadata_keys)
        for mode in (MetadataMode.EMBED, MetadataMode.LLM):
            assert "samkv_" not in node.get_content(metadata_mode=mode)
        assert llm.engine.store.contains(got["samkv_cache_key"])
