"""A stored cache the engine cannot trust is re-encoded from its text and reported, never used."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fsspec
import pytest
from test_store import join_entry, split_entry

from samkv_integrations import CacheCorruptedError, CacheRef, KVCacheStore, SamKVEngine, store_files
from samkv_integrations.cache_format import META_FIELD, meta_checksum
from samkv_integrations.models import LoadedModel

DOCS = ["Alpha is the first letter.", "Omega is the last letter of the Greek alphabet."]
ASK = dict(method="samkv", max_new_tokens=4)


def edit_meta(store: KVCacheStore, key: str, *, reseal: bool, **changes: object) -> None:
    """Edit a stored entry's metadata, as a faulty disk (or, resealed, a buggy writer) would."""
    fs, root = fsspec.core.url_to_fs(store.url)
    path = f"{root}/{key[:2]}/{key}.safetensors"
    header, data = split_entry(fs.cat_file(path))
    meta = json.loads(header["__metadata__"][META_FIELD])
    meta.update(changes)
    if reseal:
        meta["checksum"] = meta_checksum(meta)
    header["__metadata__"][META_FIELD] = json.dumps(meta)
    fs.pipe_file(path, join_entry(header, data))


@pytest.mark.parametrize("reseal", [False, True])
def test_edited_prefix_len_is_re_encoded_not_answered_from(
    tiny_engine: SamKVEngine, reseal: bool
) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    expected = tiny_engine.answer("Which?", refs, **ASK)
    edit_meta(tiny_engine.store, refs[1].key, reseal=reseal, prefix_len=436)
    bare = CacheRef(key=refs[1].key, n_tokens=refs[1].n_tokens, model=refs[1].model)
    with pytest.raises(CacheCorruptedError, match="prefix_len"):
        tiny_engine.answer("Which?", [refs[0], bare], **ASK)
    answer = tiny_engine.answer("Which?", refs, **ASK)
    assert answer.stats.recomputed_documents == 1
    assert answer.token_ids == expected.token_ids
    assert tiny_engine.store.get(refs[1].key).prefix_len == tiny_engine.prefix.length


def test_cache_lacking_an_extra_is_re_encoded_and_reported(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    expected = tiny_engine.answer("Which?", refs, **ASK)
    store = tiny_engine.store
    stripped = dataclasses.replace(store.get(refs[0].key), extras={})
    store.delete(refs[0].key)
    store.put(stripped)  # as a writer that knew no extras would have stored it
    assert store.get(refs[0].key).extras == {}
    answer = tiny_engine.answer("Which?", refs, **ASK)
    assert answer.stats.recomputed_documents == 1
    assert answer.token_ids == expected.token_ids
    assert set(store.get(refs[0].key).extras) == {"query_means"}  # stored whole again
    assert tiny_engine.answer("Which?", refs, **ASK).stats.recomputed_documents == 0


def test_indexing_stores_the_extras_registered_methods_declare(tiny_engine: SamKVEngine) -> None:
    (ref,) = tiny_engine.index(DOCS[:1], progress=False)
    assert set(tiny_engine.store.get(ref.key).extras) == {"query_means"}


def test_unreadable_cache_file_is_re_encoded(
    tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = SamKVEngine(tiny_llama, KVCacheStore(tmp_path))
    refs = engine.index(DOCS, progress=False)
    expected = engine.answer("Which?", refs, **ASK)
    real_open = open

    def locked_open(path: str, mode: str = "r", *args: object, **kwargs: object):
        if mode == "rb" and refs[0].key in str(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_files, "open", locked_open, raising=False)
    answer = engine.answer("Which?", refs, **ASK)
    assert answer.stats.recomputed_documents == 1
    assert answer.token_ids == expected.token_ids


def test_directory_in_place_of_a_cache_file_is_re_encoded(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    engine = SamKVEngine(tiny_llama, KVCacheStore(tmp_path))
    refs = engine.index(DOCS, progress=False)
    expected = engine.answer("Which?", refs, **ASK)
    (tensors,) = tmp_path.rglob(f"{refs[0].key}.safetensors")
    tensors.unlink()
    tensors.mkdir()  # nothing can be written there either: the answer goes on without it
    for _ in range(2):
        answer = engine.answer("Which?", refs, **ASK)
        assert answer.stats.recomputed_documents == 1
        assert answer.token_ids == expected.token_ids
    assert tensors.is_dir()
