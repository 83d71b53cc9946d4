"""``SamKVVectorStore``: any LangChain vector store, keeping the KV cache store in step with it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from langchain_samkv._tags import TAG_KEYS
from langchain_samkv.chat_models import ChatSamKV
from langchain_samkv.document_transformers import SamKVCacheBuilder
from samkv_integrations import SamKVEngine
from samkv_integrations.records import METADATA_KEYS

logger = logging.getLogger(__name__)

_KEY = METADATA_KEYS[0]


def _public(document: Document) -> Document:
    """``document`` as it was added: without the adapter's ``samkv_*`` metadata."""
    metadata = {k: v for k, v in document.metadata.items() if k not in TAG_KEYS}
    return Document(page_content=document.page_content, metadata=metadata, id=document.id)


def _keys_in(metadatas: Iterable[Mapping[str, Any] | None]) -> set[str]:
    """The cache keys that metadata dicts reference."""
    keys = {(metadata or {}).get(_KEY) for metadata in metadatas}
    return {key for key in keys if isinstance(key, str) and key}


def _keys_of(documents: Iterable[Document]) -> set[str]:
    return _keys_in(doc.metadata for doc in documents)


class SamKVVectorStore(VectorStore):
    """Wraps any LangChain ``VectorStore``: documents go in with their KV caches computed.

    Adding documents computes and stores each one's KV cache (once per distinct text: the
    same text added twice shares one cache) and writes its key into the metadata the wrapped
    store keeps (the flat ``samkv_*`` scalars ``SamKVCacheBuilder`` writes), then delegates.
    Searches, retrievers and ``get_by_ids`` delegate too, and return documents as they were
    added, without the ``samkv_*`` keys (the wrapped store still shows them); ``ChatSamKV``
    finds a document's cache from its text, so answers come from the caches all the same.

    Deleting or replacing documents (adding under an existing id) deletes the caches that
    no remaining document uses. That needs the wrapped store to find documents by id
    (``get_by_ids``) and to list the documents that reference a cache key: stores with
    Chroma's ``get(where=..., include=[...])`` can (``langchain_chroma.Chroma``). With
    another store the caches are kept and a warning says so; subclass and override
    :meth:`keys_in_use` for it, or delete caches with ``llm.engine.delete_caches(keys)``.
    A cache deleted while another process adds the same text is re-encoded at that
    document's first query (and reported in ``recomputed_documents``), never read stale.

    Args:
        vectorstore: The store to wrap (e.g. ``Chroma``), holding its own embeddings.
        llm: The ``ChatSamKV`` that will answer (its engine computes the caches, so both
            share one model and store), or a ``SamKVEngine``.
        progress: Show a progress bar while encoding.

    Examples:
        >>> import chromadb
        >>> from langchain_chroma import Chroma
        >>> from langchain_core.documents import Document
        >>> from langchain_samkv import ChatSamKV, MiniLMEmbeddings, SamKVVectorStore
        >>> llm = ChatSamKV(store="./kvcache")
        >>> chroma = Chroma("docs", MiniLMEmbeddings(), client=chromadb.EphemeralClient())
        >>> store = SamKVVectorStore(chroma, llm)
        >>> store.add_documents([Document("Mount Fuji is 3,776 metres high.", id="fuji")])
        ['fuji']
        >>> store.similarity_search("How high is Mount Fuji?", k=1)
        [Document(id='fuji', metadata={}, page_content='Mount Fuji is 3,776 metres high.')]
        >>> sorted(chroma.get_by_ids(["fuji"])[0].metadata)
        ['samkv_cache_key', 'samkv_dtype', 'samkv_format', 'samkv_model', 'samkv_n_tokens']
        >>> store.delete(["fuji"])  # and its cache, which no other document uses
    """

    def __init__(
        self, vectorstore: VectorStore, llm: ChatSamKV | SamKVEngine, *, progress: bool = False
    ) -> None:
        if not isinstance(vectorstore, VectorStore):
            raise ValueError(
                f"vectorstore: expected a LangChain VectorStore, got {type(vectorstore).__name__}"
            )
        if isinstance(vectorstore, SamKVVectorStore):
            raise ValueError("vectorstore: already a SamKVVectorStore")
        self.vectorstore = vectorstore
        self._builder = SamKVCacheBuilder(llm, progress=progress)

    @property
    def engine(self) -> SamKVEngine:
        """The engine that computes and deletes the caches (a chat model's loads on first use)."""
        return self._builder.engine

    @property
    def embeddings(self) -> Embeddings | None:
        """The wrapped store's embeddings."""
        return self.vectorstore.embeddings

    # --- Writing -----------------------------------------------------------------------

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Compute the documents' caches, tag copies with their keys and add those.

        Keyword arguments go to the wrapped store's ``add_documents`` (``ids`` among them).
        Documents replaced under an existing id lose their caches if no document uses them.
        Documents without text are added untagged. The originals are not modified.

        Raises:
            ValueError: A document is longer than the model's context.
        """
        documents = list(documents)
        ids = kwargs.get("ids") or [doc.id for doc in documents]
        replaced = self._stored_keys([i for i in ids if i is not None])
        tagged = self._tag(documents)
        added = self.vectorstore.add_documents(tagged, **kwargs)
        self._delete_unused(replaced - _keys_of(tagged), "replacing documents")
        return added

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[Any, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """As :meth:`add_documents`, for texts with their metadata and ids."""
        texts = list(texts)
        metadatas = metadatas or [{} for _ in texts]
        if len(metadatas) != len(texts):
            raise ValueError(f"metadatas: {len(metadatas)} for {len(texts)} texts")
        documents = [
            Document(page_content=t, metadata=dict(m))
            for t, m in zip(texts, metadatas, strict=True)
        ]
        return self.add_documents(documents, **({"ids": ids} if ids else {}), **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete documents by id from the wrapped store, then the caches no document uses.

        Without ``ids`` (a store-specific delete by keyword), the deleted documents cannot
        be found beforehand: their caches are kept, and a warning says so.
        """
        if ids is None:
            logger.warning(
                "SamKVVectorStore.delete without ids: the caches of the deleted documents "
                "cannot be found and are kept; delete by ids to delete them too"
            )
            return self.vectorstore.delete(None, **kwargs)
        doomed = self._stored_keys(ids)
        result = self.vectorstore.delete(ids, **kwargs)
        self._delete_unused(doomed, "deleting documents")
        return result

    def keys_in_use(self, keys: Sequence[str]) -> set[str] | None:
        """The cache keys among ``keys`` that documents in the wrapped store still reference.

        Returns:
            The keys in use, or ``None`` if the wrapped store cannot list documents by
            metadata (then no cache is deleted). Uses Chroma's ``get(where=..., include=...)``;
            override it for a store that lists documents another way.
        """
        get: Callable[..., dict[str, Any]] | None = getattr(self.vectorstore, "get", None)
        if get is None or not keys:
            return None if get is None else set()
        found = get(where={_KEY: {"$in": list(keys)}}, include=["metadatas"])
        return _keys_in(found.get("metadatas") or [])

    def _tag(self, documents: list[Document]) -> list[Document]:
        """Copies of ``documents``, each with text tagged with its cache key (computed now)."""
        with_text = [i for i, doc in enumerate(documents) if doc.page_content.strip()]
        tagged = list(self._builder.transform_documents([documents[i] for i in with_text]))
        out = [_public(doc) for doc in documents]  # copies; no stale keys on textless ones
        for i, doc in zip(with_text, tagged, strict=True):
            out[i] = doc
        return out

    def _stored_keys(self, ids: Sequence[str]) -> set[str]:
        """The cache keys of the stored documents under ``ids`` (empty if it cannot tell)."""
        if not ids:
            return set()
        try:
            return _keys_of(self.vectorstore.get_by_ids(list(ids)))
        except NotImplementedError:
            logger.warning(
                "%s cannot get documents by id: the caches of deleted or replaced documents "
                "are kept",
                type(self.vectorstore).__name__,
            )
            return set()

    def _delete_unused(self, keys: set[str], doing: str) -> None:
        if not keys:
            return
        in_use = self.keys_in_use(sorted(keys))
        if in_use is None:
            logger.warning(
                "%s: %s cannot list documents by metadata, so %d caches that may now be unused "
                "are kept (override SamKVVectorStore.keys_in_use, or delete them with "
                "engine.delete_caches)",
                doing,
                type(self.vectorstore).__name__,
                len(keys),
            )
            return
        deleted = self.engine.delete_caches(sorted(keys - in_use))
        logger.info("%s: deleted %d unused caches, kept %d in use", doing, deleted, len(in_use))

    # --- Reading: delegated, returned as added ------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The documents under ``ids`` (missing ones are left out), as they were added."""
        return [_public(d) for d in self.vectorstore.get_by_ids(ids)]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The wrapped store's ``similarity_search``, documents as they were added."""
        return [_public(d) for d in self.vectorstore.similarity_search(query, k=k, **kwargs)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The wrapped store's ``similarity_search_with_score``."""
        found = self.vectorstore.similarity_search_with_score(query, k=k, **kwargs)
        return [(_public(d), score) for d, score in found]

    def similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The wrapped store's ``similarity_search_with_relevance_scores``."""
        found = self.vectorstore.similarity_search_with_relevance_scores(query, k=k, **kwargs)
        return [(_public(d), score) for d, score in found]

    def _similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        return self.similarity_search_with_relevance_scores(query, k=k, **kwargs)

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[Document]:
        """The wrapped store's ``similarity_search_by_vector``."""
        found = self.vectorstore.similarity_search_by_vector(embedding, k=k, **kwargs)
        return [_public(d) for d in found]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """The wrapped store's ``max_marginal_relevance_search``."""
        found = self.vectorstore.max_marginal_relevance_search(
            query, k=k, fetch_k=fetch_k, lambda_mult=lambda_mult, **kwargs
        )
        return [_public(d) for d in found]

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """The wrapped store's ``max_marginal_relevance_search_by_vector``."""
        found = self.vectorstore.max_marginal_relevance_search_by_vector(
            embedding, k=k, fetch_k=fetch_k, lambda_mult=lambda_mult, **kwargs
        )
        return [_public(d) for d in found]

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> SamKVVectorStore:
        """Not supported: wrap a store, then add to it.

        ``SamKVVectorStore(Chroma(...), llm).add_texts(texts, metadatas)`` does what this
        would, with the wrapped store built as its own class documents.
        """
        raise NotImplementedError(
            "SamKVVectorStore wraps a store: build it (e.g. Chroma(...)), then "
            "SamKVVectorStore(store, llm).add_texts(texts, metadatas)"
        )
