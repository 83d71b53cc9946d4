"""The demo's index: chunks in a Chroma collection, their KV caches in the engine's store.

Ingestion goes through LlamaIndex (``SamKVCacheBuilder`` then the embedding model, into a
``ChromaVectorStore``). The same collection then answers three ways: the LlamaIndex query
engine, the LangChain RAG chain (``langchain_chroma`` reads what LlamaIndex wrote: the text,
the vector and the flat ``samkv_*`` metadata) and, for the web page, the engine itself,
which also reports which tokens each method kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.indices.vector_store import VectorStoreIndex
from llama_index.core.schema import BaseNode, MetadataMode, TextNode
from llama_index.vector_stores.chroma import ChromaVectorStore
from samkv_chroma_demo.corpus import Passage, corpus_digest

from llama_index.llms.samkv import SamKVCacheBuilder, SamKVLLM, SamKVQueryEngine
from llama_index.llms.samkv.cache_builder import node_ref
from samkv_integrations.engine import AnswerStream, SamKVEngine
from samkv_integrations.records import CacheRef

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from langchain_core.embeddings import Embeddings
    from langchain_core.runnables import Runnable

__all__ = [
    "DemoIndex",
    "IngestReport",
    "RetrievedChunk",
    "collection_name",
    "folder_slug",
    "open_client",
    "token_pieces",
]

logger = logging.getLogger(__name__)

#: Collection metadata that records what an ingested collection holds.
_DIGEST_KEY = "samkv_corpus_digest"
_MODEL_KEY = "samkv_model"
_SHOWN_METADATA = ["title", "source"]


@dataclass(slots=True)
class IngestReport:
    """What :meth:`DemoIndex.ingest` did.

    Attributes:
        collection: The Chroma collection name.
        chunks: Chunks in the collection.
        reused_collection: The collection already held this corpus (nothing re-embedded).
        caches_reused: KV caches that were already in the store.
        caches_computed: KV caches computed now.
        seconds: Seconds per phase (``kv_caches``, ``embeddings``, ``chroma``).
    """

    collection: str
    chunks: int
    reused_collection: bool
    caches_reused: int
    caches_computed: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class RetrievedChunk:
    """One retrieved chunk and the cache it is answered from.

    Attributes:
        id: The Chroma id.
        title: Display name.
        text: The chunk text (what was cached).
        score: LlamaIndex's similarity score.
        ref: The chunk's cache reference.
    """

    id: str
    title: str
    text: str
    score: float
    ref: CacheRef


def open_client(
    path: str | Path | None = None, *, host: str | None = None, port: int = 8000
) -> ClientAPI:
    """A Chroma ``HttpClient`` when ``host`` is given, else a ``PersistentClient`` at ``path``.

    Raises:
        ValueError: neither or both were given, or the server cannot be reached.
    """
    import chromadb

    if (host is None) == (path is None):
        raise ValueError("chroma: give either a local path or a server host, not both or neither")
    if host is None:
        return chromadb.PersistentClient(path=str(path))
    try:
        client = chromadb.HttpClient(host=host, port=port)
        client.heartbeat()
    except Exception as e:  # chromadb raises transport-specific errors here
        raise ValueError(f"chroma-host: no Chroma server at {host}:{port} ({e})") from e
    return client


def collection_name(slug: str, fingerprint: str) -> str:
    """A collection per corpus and model: the caches the chunks point at are per model."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in slug).strip("-_") or "docs"
    return f"samkv-demo-{safe[:40]}-{fingerprint[:12]}"


def folder_slug(folder: str | Path) -> str:
    """Slug of a user folder: its name and a hash of its absolute path."""
    resolved = Path(folder).expanduser().resolve()
    return f"{resolved.name[:24]}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def token_pieces(engine: SamKVEngine, text: str) -> list[str]:
    """The text of each of the framed document's tokens, in order, for display.

    Decoding token by token would split multi-byte characters into replacement marks, so
    each piece is the growth of the decoded prefix; a token that completes no character
    shows as an empty piece.
    """
    tokenizer = engine.model.tokenizer
    ids = engine.document_ids(text)
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        current = str(tokenizer.decode(ids[:end], skip_special_tokens=False))
        if current.startswith(previous) and not current.endswith("\ufffd"):
            pieces.append(current[len(previous) :])
            previous = current
        else:
            pieces.append("")
    return pieces


class DemoIndex:
    """One Chroma collection of chunks whose KV caches live in the engine's store.

    Args:
        engine: Computes the caches and answers.
        client: A Chroma client (persistent, ephemeral or HTTP).
        name: The collection name.
        embed_model: The LlamaIndex embedding model the chunks and questions are embedded with.
    """

    def __init__(
        self, engine: SamKVEngine, client: ClientAPI, name: str, embed_model: BaseEmbedding
    ) -> None:
        self.engine = engine
        self.client = client
        self.name = name
        self.embed_model = embed_model
        self.collection: Collection = client.get_or_create_collection(name, embedding_function=None)
        self.llm = SamKVLLM(engine=engine)

    @property
    def vector_store(self) -> ChromaVectorStore:
        """The collection as a LlamaIndex vector store."""
        return ChromaVectorStore(chroma_collection=self.collection)

    def count(self) -> int:
        """Chunks in the collection."""
        return self.collection.count()

    def ingest(self, passages: Sequence[Passage], *, progress: bool = True) -> IngestReport:
        """Make the collection hold exactly ``passages``, with every chunk's cache stored.

        A collection already holding this corpus (same digest, same count) is reused; only
        caches missing from the store (evicted, or a fresh store) are computed. Otherwise
        the collection is rebuilt through LlamaIndex: cache builder, embedding model, Chroma.
        """
        if not passages:
            raise ValueError("passages: nothing to ingest")
        digest = corpus_digest(passages)
        metadata = self.collection.metadata or {}
        if metadata.get(_DIGEST_KEY) == digest and self.count() == len(passages):
            return self._refresh_caches()
        if self.count():
            logger.info("collection %s holds another corpus: rebuilding it", self.name)
            self.client.delete_collection(self.name)
            self.collection = self.client.get_or_create_collection(
                self.name, embedding_function=None
            )
        keys = [self.engine.cache_ref(p.text, label=p.id).key for p in passages]
        stored = sum(self.engine.store.contains(key) for key in keys)
        nodes: list[BaseNode] = [
            TextNode(
                id_=p.id,
                text=p.text,
                metadata={"title": p.title, "source": p.source},
                excluded_embed_metadata_keys=list(_SHOWN_METADATA),
                excluded_llm_metadata_keys=list(_SHOWN_METADATA),
            )
            for p in passages
        ]
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        nodes = list(SamKVCacheBuilder(llm=self.llm, show_progress=progress)(nodes))
        seconds["kv_caches"] = time.perf_counter() - start
        start = time.perf_counter()
        nodes = list(self.embed_model(nodes, show_progress=progress))
        seconds["embeddings"] = time.perf_counter() - start
        start = time.perf_counter()
        self.vector_store.add(nodes)
        self.collection.modify(metadata={_DIGEST_KEY: digest, _MODEL_KEY: self.engine.fingerprint})
        seconds["chroma"] = time.perf_counter() - start
        return IngestReport(self.name, len(nodes), False, stored, len(nodes) - stored, seconds)

    def _refresh_caches(self) -> IngestReport:
        start = time.perf_counter()
        rows = self.collection.get(include=["documents", "metadatas"])
        texts = rows["documents"] or []
        metadatas = rows["metadatas"] or []
        missing = [
            text
            for text, meta in zip(texts, metadatas, strict=True)
            if not self.engine.store.contains(str(meta.get("samkv_cache_key", "")))
        ]
        if missing:
            logger.info(
                "%d chunks' KV caches are missing from the store: computing them", len(missing)
            )
            refs = self.engine.index(missing)
            # The keys are content-addressed: recomputing under the same model gives the same keys.
            recorded = {str(m.get("samkv_cache_key")) for m in metadatas}
            stale = [ref.key for ref in refs if ref.key not in recorded]
            if stale:
                raise ValueError(
                    f"collection {self.name}: {len(stale)} chunks' caches no longer match their "
                    "recorded keys (model or store format changed); delete the collection"
                )
        seconds = {"kv_caches": time.perf_counter() - start}
        return IngestReport(
            self.name, len(texts), True, len(texts) - len(missing), len(missing), seconds
        )

    def index(self) -> VectorStoreIndex:
        """The collection as a LlamaIndex index (queries are embedded with ``embed_model``)."""
        return VectorStoreIndex.from_vector_store(self.vector_store, embed_model=self.embed_model)

    def retrieve(self, question: str, top_k: int) -> list[RetrievedChunk]:
        """The ``top_k`` chunks nearest to ``question``, with their cache references."""
        found = self.index().as_retriever(similarity_top_k=top_k).retrieve(question)
        return [
            RetrievedChunk(
                id=hit.node.node_id,
                title=str(hit.node.metadata.get("title", hit.node.node_id)),
                text=hit.node.get_content(metadata_mode=MetadataMode.NONE),
                score=float(hit.score or 0.0),
                ref=node_ref(self.engine, hit.node),
            )
            for hit in found
        ]

    def stream(
        self,
        question: str,
        chunks: Sequence[RetrievedChunk],
        method: str,
        *,
        method_options: dict[str, Any] | None = None,
        max_new_tokens: int = 64,
    ) -> AnswerStream:
        """Answer from the chunks' caches with ``method`` (the engine, for token-level detail)."""
        return self.engine.stream(
            question,
            [chunk.ref for chunk in chunks],
            method,
            method_options=method_options,
            max_new_tokens=max_new_tokens,
        )

    def query_engine(self, method: str, *, top_k: int, max_new_tokens: int) -> SamKVQueryEngine:
        """The LlamaIndex query engine over this collection (``method`` is a spec)."""
        return SamKVQueryEngine.from_index(
            self.index(),
            SamKVLLM(engine=self.engine, max_new_tokens=max_new_tokens),
            similarity_top_k=top_k,
            method=method,
        )

    def langchain_chain(
        self, embeddings: Embeddings, method: str, *, top_k: int, max_new_tokens: int
    ) -> Runnable[str, dict[str, Any]]:
        """The LangChain RAG chain over this collection (``{"answer", "documents"}``).

        ``method`` is a spec, ``name[+option=value...]``.
        """
        from langchain_chroma import Chroma

        from langchain_samkv import ChatSamKV, create_samkv_rag_chain

        store = Chroma(client=self.client, collection_name=self.name, embedding_function=embeddings)
        chat = ChatSamKV.from_engine(self.engine, max_tokens=max_new_tokens, method=method)
        return create_samkv_rag_chain(store.as_retriever(search_kwargs={"k": top_k}), chat)
