"""SamKVCacheBuilder: compute each node's KV cache at ingestion and tag the node with its key.

What a node's cache holds: the node's text without any metadata
(``node.get_content(metadata_mode=MetadataMode.NONE)``), framed by the engine as one
document. Titles and other metadata stay out on purpose: the cache key then depends on the
text alone, so editing metadata never invalidates a cache, the same chunk ingested twice
shares one cache, and the text a vector store returns (Chroma stores exactly this text) is
all the synthesizer needs to re-encode a missing cache. Put anything the model must read
into the node text before the builder runs.

Besides the reference (``samkv_cache_key``, ``samkv_model``, ``samkv_format``,
``samkv_n_tokens``), a node records the dtype its cache was written in (``samkv_dtype``), so
that an engine running another dtype can name the ``dtype`` that serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.indices.vector_store import VectorStoreIndex
from llama_index.core.schema import BaseNode, MetadataMode, TransformComponent
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

from llama_index.llms.samkv.base import OnForeignCache, SamKVLLM
from samkv_integrations.engine import SamKVEngine
from samkv_integrations.errors import CacheMismatchError
from samkv_integrations.lazy_engine import dtype_mismatch, dtype_name
from samkv_integrations.records import METADATA_KEYS, CacheRef, ref_from_metadata, ref_metadata

logger = logging.getLogger(__name__)

#: A progress bar for a handful of nodes is noise; from this many on, one is shown.
PROGRESS_MIN_NODES = 32

_KEY = METADATA_KEYS[0]
#: The dtype the node's cache was written in (``"float32"``).
DTYPE_KEY = "samkv_dtype"
#: Every metadata key the builder writes: kept out of embeddings and LLM prompts.
TAG_KEYS = (*METADATA_KEYS, DTYPE_KEY)


def node_text(node: BaseNode) -> str:
    """The text a node's KV cache is computed from (and re-encoded from when missing)."""
    return node.get_content(metadata_mode=MetadataMode.NONE)


def node_ref(
    engine: SamKVEngine, node: BaseNode, on_foreign_cache: OnForeignCache = "error"
) -> CacheRef:
    """The reference to use for a retrieved node.

    A node tagged by another model keeps its tag, so that the engine refuses it (or
    re-encodes it, when asked). Otherwise the key is recomputed from the node's text and
    must match the tag: a node without a tag, or whose text no longer hashes to its tag,
    gets the key of its current text, which the engine encodes on the spot if the store
    lacks it (and reports in ``stats.recomputed_documents``).

    Raises:
        CacheMismatchError: The node's cache was written in another dtype than the
            engine's and ``on_foreign_cache`` is ``"error"``; the message names the
            ``dtype`` that serves it.
    """
    text = node_text(node)
    tagged = ref_from_metadata(node.metadata, text)
    if tagged is not None and tagged.model != engine.fingerprint:
        why = dtype_mismatch(
            engine, node.metadata.get(DTYPE_KEY), on_foreign_cache=on_foreign_cache
        )
        if why is not None:
            raise CacheMismatchError(f"node {node.node_id}: its KV cache {tagged.key}: {why}")
        return tagged
    ref = engine.cache_ref(text, label=node.node_id)
    if tagged is not None and tagged.key != ref.key:
        logger.warning(
            "node %s: its cache key does not match its text under this engine (text edited "
            "or store format changed since indexing); using the cache of its current text",
            node.node_id,
        )
    return ref


def tag_node(node: BaseNode, ref: CacheRef, dtype: str) -> None:
    """Write ``ref`` and the cache's dtype into the node's metadata, hidden from prompts."""
    node.metadata.update(ref_metadata(ref))
    node.metadata[DTYPE_KEY] = dtype
    for excluded in (node.excluded_embed_metadata_keys, node.excluded_llm_metadata_keys):
        excluded.extend([key for key in TAG_KEYS if key not in excluded])


def cache_nodes(engine: SamKVEngine, nodes: Sequence[BaseNode], *, show_progress: bool) -> None:
    """Compute and store the caches of ``nodes`` (those with text) and tag each node.

    Raises:
        ValueError: A node's text is longer than the model's context allows; the message
            names the node.
    """
    todo = [node for node in nodes if node_text(node).strip()]
    if len(todo) < len(nodes):
        logger.info("%d nodes have no text and get no KV cache", len(nodes) - len(todo))
    # Framed once, each error naming its node; the engine encodes what it lacks.
    ids = [engine.document_ids(node_text(node), index=node.node_id) for node in todo]
    progress = show_progress and len(todo) >= PROGRESS_MIN_NODES
    refs = engine.index_token_ids(ids, progress=progress)
    dtype = dtype_name(engine.model.dtype)
    for node, ref in zip(todo, refs, strict=True):
        tag_node(node, ref, dtype)


def keys_of(nodes: Iterable[BaseNode]) -> list[str]:
    """The distinct cache keys the nodes carry, sorted."""
    keys = {node.metadata.get(_KEY) for node in nodes}
    return sorted(key for key in keys if isinstance(key, str) and key)


class SamKVCacheBuilder(TransformComponent):
    """Computes each node's KV cache into the engine's store and tags the node with its key.

    Use it in an ``IngestionPipeline`` (before the embedding model) or call it on nodes.
    Each node gets five flat metadata fields, ``samkv_cache_key``, ``samkv_model``,
    ``samkv_format`` (int), ``samkv_n_tokens`` (int) and ``samkv_dtype``, which round-trip
    through Chroma and are excluded from both the embedding text and the LLM text.
    :class:`SamKVVectorStore` does the same inside any vector store's ``add``, and also
    deletes the caches of deleted nodes. Running it again is cheap:
    caches already in the store are not recomputed. Nodes without text are left untagged.

    Args:
        llm: The :class:`SamKVLLM` whose engine computes and stores the caches.
        show_progress: Show a progress bar when at least ``PROGRESS_MIN_NODES`` nodes are
            encoded in one call.

    Examples:
        >>> from llama_index.core.ingestion import IngestionPipeline
        >>> from llama_index.core.node_parser import SentenceSplitter
        >>> from llama_index.llms.samkv import SamKVCacheBuilder, SamKVLLM
        >>> llm = SamKVLLM(store="./kvcache")
        >>> pipeline = IngestionPipeline(
        ...     transformations=[SentenceSplitter(), SamKVCacheBuilder(llm=llm), embed_model],
        ...     vector_store=vector_store,
        ... )  # doctest: +SKIP
        >>> nodes = pipeline.run(documents=documents)  # doctest: +SKIP
        >>> sorted(k for k in nodes[0].metadata if k.startswith("samkv_"))  # doctest: +SKIP
        ['samkv_cache_key', 'samkv_dtype', 'samkv_format', 'samkv_model', 'samkv_n_tokens']
    """

    llm: SamKVLLM = Field(description="The SamKVLLM whose engine computes the caches.")
    show_progress: bool = Field(default=True, description="Show a progress bar on long runs.")

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this class under."""
        return "SamKVCacheBuilder"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Compute and store the caches of ``nodes`` and tag them; returns the same nodes.

        Raises:
            ValueError: If a node's text is longer than the model's context allows.
        """
        cache_nodes(self.llm.engine, nodes, show_progress=self.show_progress)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """:meth:`__call__` in a worker thread."""
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)

    def evict(self, nodes: Iterable[BaseNode]) -> int:
        """Delete the stored caches of ``nodes``.

        Caches are content-addressed: another node with the same text shares the cache and
        will have it re-encoded on its next query. :meth:`delete_ref_doc` avoids that.

        Returns:
            The number of store entries deleted.
        """
        return self.llm.engine.delete_caches(keys_of(nodes))

    def delete_ref_doc(self, index: VectorStoreIndex, ref_doc_id: str) -> int:
        """Delete a source document's nodes from ``index`` and the caches nobody else uses.

        Needs a vector store that implements ``get_nodes`` with metadata filters (Chroma
        does): it reads the document's nodes before deleting them, then keeps each cache
        that a remaining node still references. An index over a :class:`SamKVVectorStore`
        needs none of this: its own ``delete_ref_doc`` does the same.

        Returns:
            The number of store entries deleted.

        Raises:
            ValueError: If the vector store cannot list nodes by metadata.
        """
        vector_store = index.vector_store
        try:
            nodes = vector_store.get_nodes(None, filters=_equals("ref_doc_id", ref_doc_id))
        except NotImplementedError as e:
            raise ValueError(
                f"{type(vector_store).__name__} cannot list a document's nodes; delete them "
                "with index.delete_ref_doc and pass the nodes to SamKVCacheBuilder.evict"
            ) from e
        index.delete_ref_doc(ref_doc_id, delete_from_docstore=True)
        unused = [k for k in keys_of(nodes) if not vector_store.get_nodes(None, _equals(_KEY, k))]
        deleted = self.llm.engine.delete_caches(unused)
        logger.info("deleted document %s: %d nodes, %d caches", ref_doc_id, len(nodes), deleted)
        return deleted


def _equals(key: str, value: str) -> MetadataFilters:
    return MetadataFilters(filters=[MetadataFilter(key=key, value=value)])
