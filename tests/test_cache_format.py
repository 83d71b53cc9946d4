"""The stored format: every field that changes an answer is verified, extras are declared."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from test_store import (
    FP,
    Backend,
    assert_same,
    backend,
    join_entry,
    make_doc,
    split_entry,
    tensors_sha256,
)

from samkv_integrations import store_files
from samkv_integrations.cache_format import (
    EXTRAS,
    FORMAT_VERSION,
    QUERY_WINDOW,
    cache_key,
    declared_extras,
    meta_checksum,
)
from samkv_integrations.encode import capture_queries, encode_documents, encode_prefix
from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError
from samkv_integrations.methods import METHODS, SamKVMethod
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import DocumentKV
from samkv_integrations.store import KVCacheStore

__all__ = ["backend"]  # test_store's fixture, used here too


def rewrite_tensors(backend: Backend, key: str, **tensors: torch.Tensor | None) -> None:
    """Replace (None: drop) stored tensors and reseal the metadata, as a buggy writer would."""
    old_header, _ = split_entry(backend.read(key))
    stored = load_safetensors(backend.read(key))
    stored.update({n: t for n, t in tensors.items() if t is not None})
    for name in [n for n, t in tensors.items() if t is None]:
        del stored[name]
    header, data = split_entry(save_safetensors(stored))
    backend.write(key, join_entry({**header, "__metadata__": old_header["__metadata__"]}, data))
    extras = {n: EXTRAS[n].version for n in stored if n not in ("keys", "values")}
    backend.edit_meta(key, reseal=True, tensors_sha256=tensors_sha256(header, data), extras=extras)


def test_checksum_is_over_every_other_field_but_created(backend: Backend) -> None:
    key = backend.open().put(make_doc())
    meta = backend.meta(key)
    assert meta["format"] == FORMAT_VERSION == 4
    assert meta["extras"] == {"query_means": 1}
    fields = {k: v for k, v in meta.items() if k not in ("checksum", "created")}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    assert meta["checksum"] == hashlib.sha256(canonical).hexdigest() == meta_checksum(meta)


@pytest.mark.parametrize(
    "changes",
    [
        {"prefix_len": 436},
        {"prefix_len": 6},
        {"extras": {}},
        {"nbytes": 1},
        {"tensors_sha256": "0" * 64},
    ],
)
def test_edited_checksummed_field_is_corruption(backend: Backend, changes: dict) -> None:
    store = backend.open()
    key = store.put(make_doc())
    backend.edit_meta(key, **changes)
    field = next(iter(changes))
    with pytest.raises(CacheCorruptedError, match=f"{key}.*checksum.*{field}"):
        store.get(key)


def test_prefix_len_must_match_the_reader(backend: Backend) -> None:
    doc = make_doc()
    store = backend.open()
    key = store.put(doc)
    assert_same(store.get(key, prefix_len=doc.prefix_len), doc)
    backend.edit_meta(key, reseal=True, prefix_len=436)  # consistent, but not this prefix
    with pytest.raises(CacheCorruptedError, match=r"prefix_len 436.*7 tokens"):
        store.get(key, prefix_len=7)
    backend.edit_meta(key, reseal=True, prefix_len=-1)
    with pytest.raises(CacheCorruptedError, match="prefix_len must be an int >= 0"):
        store.get(key)


def test_memory_tier_checks_prefix_len_and_extras() -> None:
    doc = make_doc()
    store = KVCacheStore(f"memory://samkv-test-{uuid.uuid4().hex}", memory_bytes=10 * doc.nbytes)
    key = store.put(dataclasses.replace(doc, extras={}))
    assert store.get(key, prefix_len=7).extras == {}
    with pytest.raises(CacheCorruptedError, match="prefix_len 7"):
        store.get(key, prefix_len=8)
    with pytest.raises(CacheMissError, match="query_means"):
        store.get(key, extras=("query_means",))
    assert (store.stats().memory_hits, store.stats().misses) == (1, 1)


@pytest.mark.parametrize("prefix_len", [-1, True, 2.0])
def test_put_rejects_a_bad_prefix_len(backend: Backend, prefix_len: object) -> None:
    doc = dataclasses.replace(make_doc(), prefix_len=prefix_len)
    with pytest.raises(ValueError, match="prefix_len"):
        backend.open().put(doc)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: dataclasses.replace(d, values=d.values[:, :, :-1]), "values"),
        (lambda d: dataclasses.replace(d, values=d.values.double()), "values"),
        (lambda d: dataclasses.replace(d, keys=d.keys[0]), "keys"),
        (lambda d: dataclasses.replace(d, token_ids=d.token_ids[:-1]), "keys"),
        (lambda d: dataclasses.replace(d, extras={"query_means": torch.zeros(3, 4, 4)}), "query"),
        (lambda d: dataclasses.replace(d, extras={"query_means": torch.zeros(2, 3, 4)}), "query"),
        (lambda d: dataclasses.replace(d, extras={"query_means": torch.zeros(2, 4, 5)}), "query"),
        (lambda d: dataclasses.replace(d, extras={"mystery": torch.zeros(1)}), "mystery"),
    ],
)
def test_put_rejects_shapes_that_do_not_fit(backend: Backend, change, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        backend.open().put(change(make_doc()))
    assert backend.committed() == []


@pytest.mark.parametrize(
    ("tensors", "field"),
    [
        ({"values": torch.zeros(2, 2, 4, 4)}, "values"),
        ({"values": torch.zeros(2, 3, 5, 4)}, "values"),
        ({"keys": torch.zeros(2, 2, 6, 4), "values": torch.zeros(2, 2, 6, 4)}, "keys"),
        ({"query_means": torch.zeros(2, 4, 3)}, "query_means"),
        ({"query_means": torch.zeros(2, 4, 4, dtype=torch.int32)}, "query_means"),
    ],
)
def test_stored_shapes_that_do_not_fit_are_corruption(
    backend: Backend, tensors: dict, field: str
) -> None:
    store = backend.open()
    key = store.put(make_doc())
    rewrite_tensors(backend, key, **tensors)
    with pytest.raises(CacheCorruptedError, match=f"{key}.*{field}"):
        store.get(key)


def test_tensors_other_than_listed_are_corruption(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    rewrite_tensors(backend, key, query_means=None)
    backend.edit_meta(key, reseal=True, extras={"query_means": 1})
    with pytest.raises(CacheCorruptedError, match="metadata lists"):
        store.get(key)


def test_missing_extra_is_a_miss_and_put_fills_it_in(backend: Backend) -> None:
    store = backend.open()
    full = make_doc()
    key = store.put(dataclasses.replace(full, extras={}))
    assert store.get(key).extras == {}
    with pytest.raises(CacheMissError, match=f"{key}.*query_means"):
        store.get(key, extras=("query_means",))
    written = store.stats().bytes_written
    assert store.put(dataclasses.replace(full, extras={})) == key  # nothing new: kept
    assert store.stats().bytes_written == written
    assert store.put(full) == key  # it holds the extra: rewritten
    assert store.stats().bytes_written > written
    assert_same(backend.open().get(key, extras=("query_means",)), full)
    assert store.put(dataclasses.replace(full, extras={})) == key
    assert_same(backend.open().get(key), full)  # the stored extra is kept


def test_extra_of_another_version_counts_as_absent(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.open()
    key = store.put(make_doc())
    bumped = dataclasses.replace(EXTRAS["query_means"], version=2)
    monkeypatch.setitem(EXTRAS, "query_means", bumped)
    assert store.get(key).extras == {}
    with pytest.raises(CacheMissError, match="query_means"):
        store.get(key, extras=("query_means",))
    store.put(make_doc())
    assert backend.meta(key)["extras"] == {"query_means": 2}


def test_entry_of_the_previous_format_is_a_mismatch_not_an_answer(backend: Backend) -> None:
    doc = make_doc()
    old_key = cache_key(FP, doc.token_ids, 2)
    tensors = {"keys": doc.keys, "values": doc.values, "query_means": doc.query_means}
    data = save_safetensors(tensors)
    meta = {  # exactly what format 2 wrote
        "format": 2,
        "fingerprint": FP,
        "token_ids": doc.token_ids,
        "prefix_len": 436,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    backend.write(old_key, data)
    sidecar = backend.path(old_key).removesuffix(".safetensors") + ".json"
    backend.fs.pipe_file(sidecar, json.dumps(meta).encode())
    store = backend.open()
    with pytest.raises(CacheMismatchError, match=r"format 3 or older.*this version reads 4"):
        store.get(old_key)
    assert not store.contains(cache_key(FP, doc.token_ids))
    assert [e.key for e in store.entries()] == [old_key]  # listed, so that gc can remove it
    assert store.delete(old_key)
    assert backend.files() == []  # the .json beside it went too


def test_unreadable_entry_is_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = KVCacheStore(tmp_path)
    key = store.put(make_doc())
    real_open = open

    def locked_open(path: str, mode: str = "r", *args: object, **kwargs: object):
        if mode == "rb" and str(path).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_files, "open", locked_open, raising=False)
    with pytest.raises(CacheCorruptedError, match=f"{key}.*cannot read its file.*denied"):
        store.get(key)
    monkeypatch.undo()
    (entry,) = tmp_path.rglob(f"{key}.safetensors")
    entry.unlink()
    entry.mkdir()  # a directory where the file should be
    with pytest.raises(CacheCorruptedError, match=f"{key}.*cannot read its file"):
        store.get(key)
    assert not store.contains(key)
    assert not store.delete(key)  # nothing could be deleted: the directory stays (logged)
    assert entry.is_dir()


def test_declared_extras_are_a_checked_union() -> None:
    assert declared_extras([(), ("query_means",), ("query_means",)]) == ("query_means",)
    assert declared_extras([]) == ()
    with pytest.raises(ValueError, match="'mystery'"):
        declared_extras([("query_means", "mystery")])


def test_registered_methods_declare_known_extras_and_every_extra_is_used() -> None:
    assert SamKVMethod.stored_extras == ("query_means",)
    declared = declared_extras(m.stored_extras for m in METHODS.values())
    assert declared == tuple(sorted(EXTRAS))


def test_the_prefix_is_encoded_under_inference_mode(tiny_llama: LoadedModel) -> None:
    """Called from anywhere, the shared prefix's KV carries no autograd state."""
    prefix = encode_prefix(tiny_llama.model, [1, 2, 3])
    assert all(t.is_inference() for t in [*prefix.keys, *prefix.values])


def test_encode_computes_the_extras_asked_for(tiny_llama: LoadedModel) -> None:
    model = tiny_llama.model
    prefix = encode_prefix(model, [1, 2, 3])
    ids = [list(range(10, 30))]
    (none,) = encode_documents(model, prefix, ids, "fp", progress=False, extras=())
    (every,) = encode_documents(model, prefix, ids, "fp", progress=False)
    assert none.extras == {}
    assert set(every.extras) == {"query_means"}
    torch.testing.assert_close(none.keys, every.keys)
    n_layers, _, _, head_dim = every.keys.shape
    n_heads = model.config.num_attention_heads
    assert every.query_means.shape == (n_layers, n_heads, head_dim)
    with pytest.raises(ValueError, match="mystery"):
        encode_documents(model, prefix, ids, "fp", progress=False, extras=("mystery",))


def test_query_means_is_the_mean_of_the_last_window_of_queries(tiny_llama: LoadedModel) -> None:
    """Written out: one document alone, every query captured, the last QUERY_WINDOW averaged."""
    model = tiny_llama.model
    prefix = encode_prefix(model, [1, 2, 3])
    docs = [list(range(10, 13)), list(range(20, 40)), list(range(50, 61))]  # 3 < window < 11, 20
    batched = encode_documents(model, prefix, docs, "fp", progress=False)
    n_heads = model.config.num_attention_heads
    for ids, doc in zip(docs, batched, strict=True):
        with torch.inference_mode(), capture_queries(model) as queries:
            model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.arange(3, 3 + len(ids))[None],
                **with_cache(model, prefix.cache(model)),
                use_cache=True,
            )
        last = [
            q[0, -QUERY_WINDOW:].view(min(len(ids), QUERY_WINDOW), n_heads, -1) for q in queries
        ]
        expected = torch.stack([q.float().mean(0) for q in last])
        torch.testing.assert_close(doc.query_means, expected, atol=1e-5, rtol=1e-4)


def test_document_without_the_extra_names_it() -> None:
    doc = DocumentKV([1], torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), "fp", 0)
    with pytest.raises(CacheMissError, match=r"query_means.*stored_extras"):
        _ = doc.query_means
    assert doc.nbytes == 16
    assert doc.to("cpu", torch.float16).nbytes == 8


def test_capture_queries_can_stop_the_forward_after_a_layer(tiny_llama: LoadedModel) -> None:
    model = tiny_llama.model
    ids = torch.tensor([list(range(10, 30))])
    with torch.inference_mode(), capture_queries(model) as every:
        model(input_ids=ids)
    ran: list[int] = []
    after = model.get_decoder().layers[2].register_forward_pre_hook(lambda *_: ran.append(2))
    try:
        with torch.inference_mode(), capture_queries(model, stop_after=1) as early:
            model(input_ids=ids)
    finally:
        after.remove()
    assert ran == [], "the layer after the stop ran"
    assert early[2:] == [None] * (len(every) - 2)
    for got, expected in zip(early[:2], every[:2], strict=True):
        assert got is not None and expected is not None
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The hooks are gone: a later forward runs to its end.
    assert model(input_ids=ids).logits.shape[1] == ids.shape[1]
