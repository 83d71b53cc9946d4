"""Indexing streams batches to the store, verifies what it finds and repairs broken entries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import KVCacheStore, SamKVEngine, indexing
from samkv_integrations.models import LoadedModel

DOCS = [f"Document {i} says {'more ' * (i % 5)}about topic {i}." for i in range(8)]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What indexing did, in order: ``encode <n docs>`` per batch and ``put`` per entry."""
    log: list[str] = []
    real_encode = indexing.encode_batches
    real_put = KVCacheStore.put

    def encode(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in real_encode(*args, **kwargs):
            log.append(f"encode {len(batch)}")
            yield batch

    def put(self: KVCacheStore, doc: Any) -> str:
        log.append("put")
        return real_put(self, doc)

    monkeypatch.setattr(indexing, "encode_batches", encode)
    monkeypatch.setattr(KVCacheStore, "put", put)
    return log


def test_each_batch_is_stored_before_the_next_is_encoded(
    tiny_llama: LoadedModel, memory_store: KVCacheStore, events: list[str]
) -> None:
    engine = SamKVEngine(tiny_llama, memory_store, batch_tokens=1)  # one document per batch
    engine.index(DOCS, progress=False)
    assert events == ["encode 1", "put"] * len(DOCS)


def test_a_crash_mid_way_keeps_the_batches_written(
    tiny_llama: LoadedModel, memory_store: KVCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = SamKVEngine(tiny_llama, memory_store, batch_tokens=1)
    real_encode = indexing.encode_batches

    def dies_after_three(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, batch in enumerate(real_encode(*args, **kwargs)):
            if i == 3:
                raise MemoryError("killed")
            yield batch

    monkeypatch.setattr(indexing, "encode_batches", dies_after_three)
    with pytest.raises(MemoryError):
        engine.index(DOCS, progress=False)
    assert len(memory_store.entries()) == 3
    monkeypatch.undo()
    refs = engine.index(DOCS, progress=False)
    assert {e.key for e in memory_store.entries()} == {ref.key for ref in refs}


def test_stored_entries_are_verified_and_broken_ones_re_encoded(
    tiny_llama: LoadedModel, tmp_path: Path, events: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    engine = SamKVEngine(tiny_llama, KVCacheStore(tmp_path))
    refs = engine.index(DOCS[:3], progress=False)
    good = {ref.key: engine.store.get(ref.key) for ref in refs}
    path = next(tmp_path.glob(f"*/{refs[1].key}.safetensors"))
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    events.clear()
    assert engine.index(DOCS[:3], progress=False) == refs
    assert events == ["encode 1", "put"]  # the broken one only
    assert "tensors checksum mismatch" in caplog.text
    for ref in refs:
        engine.store.verify(ref.key, fingerprint=engine.fingerprint)
        assert engine.store.get(ref.key).token_ids == good[ref.key].token_ids
    events.clear()
    engine.index(DOCS[:3], progress=False)
    assert events == []  # all verify: nothing encoded, nothing written


def test_a_document_given_twice_is_encoded_once(
    tiny_llama: LoadedModel, memory_store: KVCacheStore, events: list[str]
) -> None:
    engine = SamKVEngine(tiny_llama, memory_store)
    refs = engine.index([DOCS[0], DOCS[1], DOCS[0]], progress=False)
    assert refs[0] == refs[2] != refs[1]
    assert events == ["encode 2", "put", "put"]


def test_token_ids_are_checked_before_anything_is_encoded(
    tiny_llama: LoadedModel, memory_store: KVCacheStore, events: list[str]
) -> None:
    engine = SamKVEngine(tiny_llama, memory_store)
    with pytest.raises(ValueError, match="document 1: 0 token ids"):
        engine.index_token_ids([[5, 6, 7], []], progress=False)
    assert events == []
