"""SamKVQueryEngine: a RetrieverQueryEngine wired to answer from stored KV caches."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.indices.vector_store import VectorStoreIndex
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.vector_stores.types import BasePydanticVectorStore

from llama_index.llms.samkv.base import OnForeignCache, SamKVLLM
from llama_index.llms.samkv.synthesizer import SamKVSynthesizer
from samkv_integrations.methods import BaseMethod


class SamKVQueryEngine(RetrieverQueryEngine):
    """A ``RetrieverQueryEngine`` whose synthesizer is a :class:`SamKVSynthesizer`.

    It is plain LlamaIndex wiring, spelled out once: the same engine is
    ``index.as_query_engine(llm=llm, response_synthesizer=SamKVSynthesizer(llm))``.

    Examples:
        >>> import chromadb
        >>> from llama_index.vector_stores.chroma import ChromaVectorStore
        >>> from llama_index.llms.samkv import MiniLMEmbedding, SamKVLLM, SamKVQueryEngine
        >>> client = chromadb.PersistentClient("./chroma")  # doctest: +SKIP
        >>> collection = client.get_or_create_collection("docs", embedding_function=None)
        ... # doctest: +SKIP
        >>> engine = SamKVQueryEngine.from_vector_store(
        ...     ChromaVectorStore(chroma_collection=collection),
        ...     llm=SamKVLLM(),
        ...     embed_model=MiniLMEmbedding(),
        ... )  # doctest: +SKIP
        >>> print(engine.query("Who wrote The Velvet Compass?"))  # doctest: +SKIP
        The document mentions that the author of the novel The Velvet Compass is Arvid Lindqvist.
    """

    @classmethod
    def from_index(
        cls,
        index: VectorStoreIndex,
        llm: SamKVLLM,
        *,
        similarity_top_k: int = 4,
        node_postprocessors: list[BaseNodePostprocessor] | None = None,
        streaming: bool = False,
        method: str | BaseMethod | None = None,
        on_foreign_cache: OnForeignCache | None = None,
    ) -> SamKVQueryEngine:
        """Retrieve the top ``similarity_top_k`` nodes of ``index`` and answer from their caches.

        Args:
            index: The index (its embedding model embeds the queries).
            llm: The :class:`SamKVLLM` that answers.
            similarity_top_k: How many nodes to retrieve.
            node_postprocessors: Applied to the retrieved nodes before answering.
            streaming: Return streaming responses.
            method: Overrides the LLM's method: a spec (``"samkv+budget=0.2"``) or a
                ``BaseMethod``; a bad one fails here.
            on_foreign_cache: ``"error"`` or ``"recompute"`` for caches of another model.

        Returns:
            The query engine.
        """
        synthesizer = SamKVSynthesizer(
            llm,
            method=method,
            on_foreign_cache=on_foreign_cache,
            streaming=streaming,
        )
        return cls(
            retriever=index.as_retriever(similarity_top_k=similarity_top_k),
            response_synthesizer=synthesizer,
            node_postprocessors=node_postprocessors,
        )

    @classmethod
    def from_vector_store(
        cls,
        vector_store: BasePydanticVectorStore,
        llm: SamKVLLM,
        embed_model: BaseEmbedding,
        **kwargs: Any,
    ) -> SamKVQueryEngine:
        """Query an already filled vector store; ``kwargs`` are :meth:`from_index`'s.

        Args:
            vector_store: A store filled through a pipeline with :class:`SamKVCacheBuilder`.
            llm: The :class:`SamKVLLM` that answers.
            embed_model: The embedding model the store was filled with.
            **kwargs: ``similarity_top_k``, ``streaming``, ``method``, ...

        Returns:
            The query engine.
        """
        index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
        return cls.from_index(index, llm, **kwargs)
