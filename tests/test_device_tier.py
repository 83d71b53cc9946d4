"""The device tier: documents' KV kept where the model runs, between answers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from samkv_integrations import (
    CacheMismatchError,
    CacheMissError,
    KVCacheStore,
    SamKVEngine,
)
from samkv_integrations.bench.cli import main as bench_main
from samkv_integrations.device_tier import DeviceTier
from samkv_integrations.methods import METHODS
from samkv_integrations.models import LoadedModel
from samkv_integrations.records import CacheRef, DocumentKV

DOCS = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Gustave Eiffel also engineered the frame of the Statue of Liberty.",
]
QUESTION = "Which structures did Eiffel work on?"
#: Methods that read the stored KV, with options that make samkv drop and recompute tokens.
READERS = [
    "samkv+n_init=2+n_local=2+block_size=4+budget=0.5" if name == "samkv" else name
    for name, method in METHODS.items()
    if method.reads_cache
]


def doc_of(n_tokens: int) -> DocumentKV:
    """A document of ``n_tokens`` (1 layer, 1 head, head size 2: 16 bytes a token in fp32)."""
    kv = torch.zeros(1, 1, n_tokens, 2)
    return DocumentKV(list(range(n_tokens)), kv, kv.clone(), "model", 0)


def test_least_recently_used_documents_go_first_past_the_cap() -> None:
    tier = DeviceTier(capacity_bytes=3 * 16 * 10)  # three 10-token documents
    for key in "abc":
        tier.put(key, doc_of(10))
    assert tier.get("a") is not None  # now the most recently used
    tier.put("d", doc_of(10))
    assert tier.get("b") is None
    assert all(tier.get(key) is not None for key in "acd")
    assert tier.usage() == (3, 3 * 16 * 10)
    assert (tier.hits, tier.misses) == (4, 1)


def test_a_document_larger_than_the_cap_is_not_kept_and_nothing_is_evicted_for_it() -> None:
    tier = DeviceTier(capacity_bytes=16 * 10)
    tier.put("small", doc_of(10))
    tier.put("big", doc_of(11))
    assert tier.get("big") is None and tier.get("small") is not None


def test_discard_and_replace_keep_the_byte_count() -> None:
    tier = DeviceTier(capacity_bytes=1000)
    tier.put("a", doc_of(10))
    tier.put("a", doc_of(20))
    assert tier.usage() == (1, 16 * 20)
    tier.discard("a")
    tier.discard("a")
    assert tier.usage() == (0, 0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must be >= 0, got -1"),
        (0.5, "must be an int >= 0, got 0.5"),
        (True, "must be an int >= 0, got True"),
    ],
)
def test_a_bad_capacity_is_named(
    tiny_llama: LoadedModel, memory_store: KVCacheStore, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=f"device_cache_bytes {message}"):
        SamKVEngine(tiny_llama, memory_store, device_cache_bytes=value)  # type: ignore[arg-type]


@pytest.fixture
def engines(tiny_llama: LoadedModel, memory_store: KVCacheStore) -> tuple[SamKVEngine, SamKVEngine]:
    """Two engines over one store: with a device tier, and without."""
    tiered = SamKVEngine(tiny_llama, memory_store, device_cache_bytes=2**30)
    return tiered, SamKVEngine(tiny_llama, memory_store)


@pytest.fixture
def filled(engines: tuple[SamKVEngine, SamKVEngine]) -> tuple[SamKVEngine, list[CacheRef]]:
    """The engine with the tier, ``DOCS`` indexed and held in its tier by one answer."""
    tiered, _ = engines
    refs = tiered.index(DOCS, progress=False)
    tiered.answer(QUESTION, refs, method="reuse", max_new_tokens=1)
    return tiered, refs


def test_a_second_answer_reads_its_documents_from_the_tier_not_the_store(
    engines: tuple[SamKVEngine, SamKVEngine],
) -> None:
    tiered, _ = engines
    refs = tiered.index(DOCS, progress=False)
    first = tiered.answer(QUESTION, refs, method="reuse", max_new_tokens=6)
    store_hits = tiered.store.stats().hits
    second = tiered.answer(QUESTION, refs, method="reuse", max_new_tokens=6)
    assert tiered.store.stats().hits == store_hits
    assert tiered.device_tier is not None and tiered.device_tier.hits == len(DOCS)
    assert second.text == first.text


def test_full_reads_no_stored_kv_and_leaves_the_tier_alone(
    engines: tuple[SamKVEngine, SamKVEngine],
) -> None:
    tiered, _ = engines
    refs = tiered.index(DOCS, progress=False)
    tiered.answer(QUESTION, refs, method="full", max_new_tokens=2)
    assert tiered.device_tier is not None and tiered.device_tier.usage() == (0, 0)


@pytest.mark.parametrize("method", READERS)
def test_answers_match_without_the_tier_and_no_method_writes_its_documents(
    engines: tuple[SamKVEngine, SamKVEngine], method: str
) -> None:
    tiered, plain = engines
    refs = tiered.index(DOCS, progress=False)
    tiered.answer(QUESTION, refs, method=method, max_new_tokens=1)  # fills the tier
    assert tiered.device_tier is not None
    kept = [tiered.device_tier.get(ref.key) for ref in refs]
    before = [doc.map_tensors(torch.Tensor.clone) for doc in kept if doc is not None]
    assert len(before) == len(refs)
    with_tier = tiered.answer(QUESTION, refs, method=method, max_new_tokens=8)
    without = plain.answer(QUESTION, refs, method=method, max_new_tokens=8)
    assert with_tier.token_ids == without.token_ids
    for ref, doc, copy in zip(refs, kept, before, strict=True):
        stored = tiered.store.get(ref.key)  # a fresh read: the memory store keeps no tensors
        for held in (copy, stored):
            assert doc is not None
            assert torch.equal(doc.keys, held.keys) and torch.equal(doc.values, held.values)
            assert all(torch.equal(doc.extras[k], held.extras[k]) for k in held.extras)


def test_a_document_deleted_from_the_store_is_not_answered_from_the_tier(
    filled: tuple[SamKVEngine, list[CacheRef]],
) -> None:
    tiered, refs = filled
    tiered.store.delete(refs[0].key)
    textless = [dataclasses.replace(ref, text=None) for ref in refs]
    with pytest.raises(CacheMissError):
        tiered.answer(QUESTION, textless, method="reuse", max_new_tokens=1)
    assert tiered.device_tier is not None and tiered.device_tier.get(refs[0].key) is None


def test_a_foreign_ref_is_not_served_from_the_tier(
    filled: tuple[SamKVEngine, list[CacheRef]],
) -> None:
    tiered, refs = filled
    foreign = [dataclasses.replace(refs[0], model="f" * 64, text=None), refs[1]]
    with pytest.raises(CacheMismatchError, match="written by model ffffffffffff"):
        tiered.answer(QUESTION, foreign, method="reuse", max_new_tokens=1)


def test_documents_from_the_tier_and_the_store_mix_in_any_order(
    engines: tuple[SamKVEngine, SamKVEngine],
) -> None:
    tiered, plain = engines
    refs = tiered.index([*DOCS, "Paris is the capital city of France."], progress=False)
    tiered.answer(QUESTION, refs[:2], method="reuse", max_new_tokens=1)
    mixed = [refs[2], refs[0], refs[1], refs[0]]  # the third from the store, one twice
    with_tier = tiered.answer(QUESTION, mixed, method="cacheblend", max_new_tokens=8)
    without = plain.answer(QUESTION, mixed, method="cacheblend", max_new_tokens=8)
    assert with_tier.token_ids == without.token_ids
    assert tiered.device_tier is not None
    for ref in refs:  # each entry is its own key's cache, unwritten
        kept, stored = tiered.device_tier.get(ref.key), tiered.store.get(ref.key)
        assert kept is not None and kept.token_ids == stored.token_ids
        assert torch.equal(kept.keys, stored.keys) and torch.equal(kept.values, stored.values)


def test_a_re_encoded_document_is_not_kept(engines: tuple[SamKVEngine, SamKVEngine]) -> None:
    tiered, _ = engines
    refs = tiered.index(DOCS, progress=False)
    tiered.store.delete(refs[0].key)
    answer = tiered.answer(QUESTION, refs, method="reuse", max_new_tokens=1)
    assert answer.stats.recomputed_documents == 1
    assert tiered.device_tier is not None
    assert refs[0].key not in tiered.device_tier and refs[1].key in tiered.device_tier


def test_full_on_refs_without_text_does_not_fill_the_tier(
    tiny_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    indexer = SamKVEngine(tiny_llama, memory_store)  # remembers no ids for the other engine
    refs = [dataclasses.replace(r, text=None) for r in indexer.index(DOCS, progress=False)]
    tiered = SamKVEngine(tiny_llama, memory_store, device_cache_bytes=2**30)
    tiered.answer(QUESTION, refs, method="full", max_new_tokens=1)
    assert tiered.device_tier is not None and tiered.device_tier.usage() == (0, 0)


def test_deleting_caches_frees_the_tier(filled: tuple[SamKVEngine, list[CacheRef]]) -> None:
    tiered, refs = filled
    assert tiered.delete_caches(refs[:1]) == 1
    assert tiered.device_tier is not None
    assert tiered.device_tier.usage()[0] == 1 and refs[0].key not in tiered.device_tier


def test_a_tier_hit_stamps_the_entry_s_last_use_for_gc(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    tiered = SamKVEngine(tiny_llama, KVCacheStore(tmp_path), device_cache_bytes=2**30)
    refs = tiered.index(DOCS, progress=False)
    tiered.answer(QUESTION, refs, method="reuse", max_new_tokens=1)
    for path in tmp_path.rglob("*.safetensors"):  # as if written and last read a day ago
        os.utime(path, (path.stat().st_atime - 86400, path.stat().st_mtime - 86400))
    before = {e.key: e.last_used for e in tiered.store.entries()}
    store_hits = tiered.store.stats().hits
    tiered.answer(QUESTION, refs, method="reuse", max_new_tokens=1)
    assert tiered.store.stats().hits == store_hits  # served from the tier
    after = {e.key: e.last_used for e in tiered.store.entries()}
    assert all(after[ref.key] > before[ref.key] + 3600 for ref in refs)


def test_the_bench_reports_the_tier(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = bench_main(
        ["--shape", "tiny-llama", "--device", "cpu", "--workloads", "2x32", "--methods",
         "reuse", "--repeats", "1", "--warmup", "1", "--decode-steps", "0",
         "--device-cache-gib", "1", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    tier = json.loads(out.read_text())["workloads"][0]["methods"]["reuse"]["device_tier"]
    assert tier["hits"] == 2 and tier["documents"] == 2 and tier["bytes"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_tier_hit_waits_for_the_copy_and_answers_as_a_load(
    talkative_cuda_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    store = memory_store
    tiered = SamKVEngine(talkative_cuda_llama, store, device_cache_bytes=2**30)
    plain = SamKVEngine(talkative_cuda_llama, store)
    refs = tiered.index(DOCS, progress=False)
    method = READERS[-1]
    filled = tiered.answer(QUESTION, refs, method=method, max_new_tokens=8)
    assert tiered.device_tier is not None
    kept = tiered.device_tier.get(refs[0].key)
    assert kept is not None and kept.keys.device.type == "cuda"
    again = tiered.answer(QUESTION, refs, method=method, max_new_tokens=8)
    assert tiered.device_tier.hits >= len(refs) + 1
    assert again.token_ids == filled.token_ids
    assert (
        again.token_ids == plain.answer(QUESTION, refs, method=method, max_new_tokens=8).token_ids
    )
