"""SamKVVectorStore: any LlamaIndex vector store, with each node's KV cache kept alongside.

The wrapper adds caching to ``add`` and cache collection to the deletes, and hands
everything else to the wrapped store. Caches are content-addressed and may be shared: two
nodes with the same text share one cache, so a delete removes only the caches that no
remaining node of the wrapped store references. To know that, it asks the wrapped store
for the nodes that carry those keys (``get_nodes`` with a metadata filter, as Chroma and
most stores that keep text do).

A store that cannot list its nodes (``get_nodes`` raises ``NotImplementedError``, as
``SimpleVectorStore`` does) still works for ``add``, ``query`` and the deletes, but the
caches of deleted nodes stay in the KV store: a warning says so once. They are reused if
the same text is indexed again; reclaim them with the store's own tools.

The KV store may be shared with other collections (``$SAMKV_HOME/kvcache`` is the default
for everyone); only this collection is asked. A cache deleted here that another collection
still references is re-encoded from its text on that collection's next query and counted
in ``recomputed_documents``: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryResult,
)

from llama_index.llms.samkv.base import SamKVLLM
from llama_index.llms.samkv.cache_builder import cache_nodes, keys_of
from samkv_integrations.records import METADATA_KEYS

logger = logging.getLogger(__name__)

_KEY = METADATA_KEYS[0]

#: Cache keys asked about in one ``get_nodes`` call.
KEYS_PER_QUERY = 256


class SamKVVectorStore(BasePydanticVectorStore):
    """Wraps a vector store: ``add`` stores each node's KV cache, deletes drop unused ones.

    ``add`` computes the cache of every node with text (caches already stored are not
    recomputed), tags the node with its reference as :class:`SamKVCacheBuilder` does, and
    hands the nodes to the wrapped store. ``delete``, ``delete_nodes`` and ``clear`` read
    the keys of the nodes they remove, delete them from the wrapped store, then delete each
    cache that no remaining node references. ``query``, ``get_nodes`` and ``persist`` are
    the wrapped store's. So ``VectorStoreIndex.delete_ref_doc`` and an ``IngestionPipeline``
    upsert (``DocstoreStrategy.UPSERTS``) keep the KV store in step with the collection.

    Args:
        vector_store: The store to wrap (Chroma, or any ``BasePydanticVectorStore``).
        llm: The :class:`SamKVLLM` whose engine computes and stores the caches.
        show_progress: Show a progress bar when many nodes are encoded at once.

    Examples:
        >>> import chromadb
        >>> from llama_index.core import StorageContext, VectorStoreIndex
        >>> from llama_index.vector_stores.chroma import ChromaVectorStore
        >>> from llama_index.llms.samkv import SamKVLLM, SamKVQueryEngine, SamKVVectorStore
        >>> llm = SamKVLLM(store="./kvcache")
        >>> collection = chromadb.EphemeralClient().get_or_create_collection(
        ...     "docs", embedding_function=None
        ... )
        >>> vector_store = SamKVVectorStore(ChromaVectorStore(chroma_collection=collection), llm=llm)
        >>> index = VectorStoreIndex.from_documents(
        ...     documents,
        ...     storage_context=StorageContext.from_defaults(vector_store=vector_store),
        ...     embed_model=embed_model,
        ... )  # doctest: +SKIP
        >>> response = SamKVQueryEngine.from_index(index, llm).query("Who wrote it?")  # doctest: +SKIP
        >>> response.metadata["samkv"]["recomputed_documents"]  # doctest: +SKIP
        0
        >>> index.delete_ref_doc(documents[0].doc_id)  # its caches go too  # doctest: +SKIP
    """

    stores_text: bool = True
    flat_metadata: bool = True
    show_progress: bool = True

    _store: BasePydanticVectorStore = PrivateAttr()
    _llm: SamKVLLM = PrivateAttr()
    _unlisted_warned: bool = PrivateAttr(default=False)

    def __init__(
        self,
        vector_store: BasePydanticVectorStore,
        *,
        llm: SamKVLLM,
        show_progress: bool = True,
    ) -> None:
        if not isinstance(vector_store, BasePydanticVectorStore):
            raise ValueError(
                f"vector_store: expected a LlamaIndex vector store, got {type(vector_store).__name__}"
            )
        if not isinstance(llm, SamKVLLM):
            raise ValueError(f"llm: SamKVVectorStore needs a SamKVLLM, got {type(llm).__name__}")
        super().__init__(
            stores_text=vector_store.stores_text,
            is_embedding_query=vector_store.is_embedding_query,
        )
        self.flat_metadata = getattr(vector_store, "flat_metadata", True)
        self.show_progress = show_progress
        self._store = vector_store
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this class under."""
        return "SamKVVectorStore"

    @property
    def vector_store(self) -> BasePydanticVectorStore:
        """The wrapped store."""
        return self._store

    @property
    def llm(self) -> SamKVLLM:
        """The LLM whose engine holds the caches."""
        return self._llm

    @property
    def client(self) -> Any:
        """The wrapped store's client."""
        return self._store.client

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Store the nodes' caches, tag the nodes, then add them to the wrapped store.

        Raises:
            ValueError: A node's text is too long for the model; the message names it.
        """
        cache_nodes(self._llm.engine, nodes, show_progress=self.show_progress)
        try:
            return list(self._store.add(nodes, **add_kwargs))
        except BaseException:
            self._release(keys_of(nodes))  # the caches only these nodes would have used
            raise

    async def async_add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """:meth:`add`, caching in a worker thread and adding with the store's ``async_add``."""
        await asyncio.to_thread(
            cache_nodes, self._llm.engine, nodes, show_progress=self.show_progress
        )
        try:
            return list(await self._store.async_add(nodes, **add_kwargs))
        except BaseException:
            await asyncio.to_thread(self._release, keys_of(nodes))
            raise

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete a source document's nodes, then the caches no remaining node uses."""
        keys = self._keys(None, _equals("ref_doc_id", ref_doc_id))
        self._store.delete(ref_doc_id, **delete_kwargs)
        self._release(keys)

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """:meth:`delete` with the store's ``adelete``; the bookkeeping in a worker thread."""
        keys = await asyncio.to_thread(self._keys, None, _equals("ref_doc_id", ref_doc_id))
        await self._store.adelete(ref_doc_id, **delete_kwargs)
        await asyncio.to_thread(self._release, keys)

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete nodes by id and/or filter, then the caches no remaining node uses."""
        keys = self._keys(node_ids, filters)
        self._store.delete_nodes(node_ids, filters, **delete_kwargs)
        self._release(keys)

    async def adelete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """:meth:`delete_nodes` with the store's ``adelete_nodes``."""
        keys = await asyncio.to_thread(self._keys, node_ids, filters)
        await self._store.adelete_nodes(node_ids, filters, **delete_kwargs)
        await asyncio.to_thread(self._release, keys)

    def clear(self) -> None:
        """Delete every node, then every cache they used."""
        keys = self._keys(None, None)
        self._store.clear()
        self._release(keys)

    async def aclear(self) -> None:
        """:meth:`clear` with the store's ``aclear``."""
        keys = await asyncio.to_thread(self._keys, None, None)
        await self._store.aclear()
        await asyncio.to_thread(self._release, keys)

    def get_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        """The wrapped store's ``get_nodes``."""
        return list(self._store.get_nodes(node_ids, filters))

    async def aget_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        """The wrapped store's ``aget_nodes``."""
        return list(await self._store.aget_nodes(node_ids, filters))

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The wrapped store's ``query``."""
        return self._store.query(query, **kwargs)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The wrapped store's ``aquery``."""
        return await self._store.aquery(query, **kwargs)

    def persist(self, persist_path: str, fs: Any = None) -> None:
        """The wrapped store's ``persist``."""
        self._store.persist(persist_path, fs=fs)

    def _keys(
        self, node_ids: list[str] | None, filters: MetadataFilters | None
    ) -> list[str] | None:
        """The cache keys of the nodes a delete will remove; ``None`` if the store can't say."""
        try:
            return keys_of(self._store.get_nodes(node_ids, filters))
        except NotImplementedError:
            self._warn_unlisted()
            return None

    def _release(self, keys: list[str] | None) -> int:
        """Delete the caches among ``keys`` that no node of the wrapped store references."""
        if not keys:
            return 0
        try:
            used = self._used(keys)
        except NotImplementedError:
            self._warn_unlisted()
            return 0
        unused = [key for key in keys if key not in used]
        deleted = self._llm.engine.delete_caches(unused)
        logger.info("deleted %d of %d caches (the rest are still used)", deleted, len(keys))
        return deleted

    def _used(self, keys: list[str]) -> set[str]:
        used: set[str] = set()
        for start in range(0, len(keys), KEYS_PER_QUERY):
            batch = keys[start : start + KEYS_PER_QUERY]
            within = MetadataFilter(key=_KEY, value=batch, operator=FilterOperator.IN)
            nodes = self._store.get_nodes(None, MetadataFilters(filters=[within]))
            used.update(keys_of(nodes))
        return used

    def _warn_unlisted(self) -> None:
        if not self._unlisted_warned:
            self._unlisted_warned = True
            logger.warning(
                "%s cannot list its nodes (get_nodes): the KV caches of deleted nodes stay in "
                "the KV store",
                type(self._store).__name__,
            )


def _equals(key: str, value: str) -> MetadataFilters:
    return MetadataFilters(filters=[MetadataFilter(key=key, value=value)])
