"""``SamKVCacheBuilder``: compute each Document's KV cache before it goes into a vector store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import BaseDocumentTransformer, Document

from langchain_samkv._tags import DTYPE_KEY
from langchain_samkv.chat_models import ChatSamKV
from samkv_integrations import SamKVEngine
from samkv_integrations.lazy_engine import dtype_name
from samkv_integrations.records import ref_metadata


class SamKVCacheBuilder(BaseDocumentTransformer):
    """Stores each Document's KV cache and records its key in the Document's metadata.

    The metadata keys are the flat ``samkv_*`` scalars of
    ``samkv_integrations.records.METADATA_KEYS`` and ``samkv_dtype``, the dtype the cache
    was written in (the same as the LlamaIndex adapter writes), so they round-trip through
    Chroma; an engine running another dtype then names the ``dtype`` that serves the cache.
    The page content is left as it is: the key never enters the embedded text.
    Transforming again is a no-op (the store already holds the caches; the metadata is the
    same).

    Run it last, after any text splitter: a splitter copies the parent's metadata, key
    included, into every chunk, and ``ChatSamKV`` then warns (``StaleCacheKeyWarning``) and
    encodes each chunk's own cache at query time. ``SamKVVectorStore`` runs it for you on
    whatever is added.

    Args:
        engine: The engine that computes the caches, or the ``ChatSamKV`` that will answer
            from them (its engine is used, so both share one model and store).
        progress: Show a progress bar while encoding.

    Examples:
        >>> from langchain_core.documents import Document
        >>> from langchain_samkv import ChatSamKV, SamKVCacheBuilder
        >>> builder = SamKVCacheBuilder(ChatSamKV())
        >>> docs = builder.transform_documents([Document("Mount Fuji is 3,776 metres high.")])
        >>> sorted(docs[0].metadata)
        ['samkv_cache_key', 'samkv_dtype', 'samkv_format', 'samkv_model', 'samkv_n_tokens']
    """

    def __init__(self, engine: SamKVEngine | ChatSamKV, *, progress: bool = False) -> None:
        if not isinstance(engine, SamKVEngine | ChatSamKV):
            raise ValueError(
                f"engine: expected a SamKVEngine or a ChatSamKV, got {type(engine).__name__}"
            )
        self._source = engine
        self.progress = progress

    @property
    def engine(self) -> SamKVEngine:
        """The engine that computes the caches (a chat model's engine loads on first use)."""
        return self._source.engine if isinstance(self._source, ChatSamKV) else self._source

    def transform_documents(
        self, documents: Sequence[Document], **kwargs: Any
    ) -> Sequence[Document]:
        """Compute and store each Document's cache; return copies with the cache metadata added.

        Raises:
            ValueError: A Document is empty or longer than the model's context.
        """
        if kwargs:
            raise ValueError(
                f"SamKVCacheBuilder.transform_documents takes no options, got {sorted(kwargs)}"
            )
        documents = list(documents)
        if not documents:
            return []
        engine = self.engine
        refs = engine.index([doc.page_content for doc in documents], progress=self.progress)
        dtype = dtype_name(engine.model.dtype)
        return [
            Document(
                page_content=doc.page_content,
                metadata={**doc.metadata, **ref_metadata(ref), DTYPE_KEY: dtype},
                id=doc.id,
            )
            for doc, ref in zip(documents, refs, strict=True)
        ]
