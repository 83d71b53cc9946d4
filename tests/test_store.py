"""KVCacheStore on a real directory and on fsspec's in-memory filesystem."""

from __future__ import annotations

import dataclasses
import doctest
import hashlib
import json
import re
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from samkv_integrations import store as store_module
from samkv_integrations.cache_format import FORMAT_VERSION, META_FIELD, cache_key, meta_checksum
from samkv_integrations.errors import CacheCorruptedError, CacheMismatchError, CacheMissError
from samkv_integrations.records import DocumentKV
from samkv_integrations.store import KVCacheStore

FP = "model-a@abc123"


def make_doc(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, fingerprint: str = FP, n: int = 5
) -> DocumentKV:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (n,), generator=g).tolist()
    return DocumentKV(
        token_ids=ids,
        keys=torch.randn(2, 2, n, 4, generator=g).to(dtype),
        values=torch.randn(2, 2, n, 4, generator=g).to(dtype),
        fingerprint=fingerprint,
        prefix_len=7,
        extras={"query_means": torch.randn(2, 4, 4, generator=g).to(dtype)},
    )


def assert_same(a: DocumentKV, b: DocumentKV) -> None:
    assert a.token_ids == b.token_ids
    assert a.fingerprint == b.fingerprint
    assert a.prefix_len == b.prefix_len
    assert sorted(a.extras) == sorted(b.extras)
    pairs = {"keys": (a.keys, b.keys), "values": (a.values, b.values)}
    for name, (x, y) in {**pairs, **{n: (t, b.extras[n]) for n, t in a.extras.items()}}.items():
        assert x.dtype == y.dtype, name
        assert x.device.type == "cpu", name
        assert torch.equal(x, y), name


def split_entry(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """An entry file's safetensors header and its data, as the format describes them."""
    (size,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def join_entry(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensors_sha256(header: dict[str, Any], data: bytes) -> str:
    """The format's tensors digest, written out: header entries (canonical JSON), then data."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical + data).hexdigest()


@dataclass
class Backend:
    """A store location plus direct access to its files, for tampering."""

    url: str
    fs: Any
    root: str

    def open(self, **kwargs: Any) -> KVCacheStore:
        return KVCacheStore(self.url, **kwargs)

    def path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.safetensors"

    def read(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(key)))

    def write(self, key: str, data: bytes) -> None:
        self.fs.makedirs(f"{self.root}/{key[:2]}", exist_ok=True)
        self.fs.pipe_file(self.path(key), data)

    def committed(self) -> list[str]:
        """Every entry file under the root, as a key."""
        names = [p.rsplit("/", 1)[-1] for p in self.fs.find(self.root)]
        return sorted(n.removesuffix(".safetensors") for n in names if n.endswith(".safetensors"))

    def files(self) -> list[str]:
        """Every file under the root, relative to it."""
        return sorted(p[len(self.root) + 1 :] for p in self.fs.find(self.root))

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads(split_entry(self.read(key))[0]["__metadata__"][META_FIELD])

    def write_meta_raw(self, key: str, raw: str) -> None:
        """Replace the metadata string in the entry's header, keeping its tensors."""
        header, data = split_entry(self.read(key))
        header["__metadata__"] = {META_FIELD: raw}
        self.write(key, join_entry(header, data))

    def edit_meta(self, key: str, *, reseal: bool = False, **changes: Any) -> None:
        """Edit metadata fields; ``reseal`` also rewrites the checksum, as a buggy writer would."""
        meta = self.meta(key)
        meta.update(changes)
        if reseal:
            meta["checksum"] = meta_checksum(meta)
        self.write_meta_raw(key, json.dumps(meta))


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield Backend(str(tmp_path / "store"), fsspec.filesystem("file"), str(tmp_path / "store"))
        return
    name = f"samkv-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield Backend(f"memory://{name}", fs, f"/{name}")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(backend: Backend, dtype: torch.dtype) -> None:
    store = backend.open()
    doc = make_doc(dtype=dtype)
    key = store.put(doc)
    assert key == cache_key(FP, doc.token_ids)
    assert_same(store.get(key), doc)
    meta = backend.meta(key)
    assert meta["format"] == FORMAT_VERSION
    assert meta["token_ids"] == doc.token_ids
    assert meta["nbytes"] == doc.nbytes


def test_put_accepts_non_contiguous_tensors(backend: Backend) -> None:
    store = backend.open()
    doc = make_doc()
    doc.keys = doc.keys.transpose(0, 1).contiguous().transpose(0, 1)
    assert not doc.keys.is_contiguous()
    assert_same(store.get(store.put(doc)), doc)


def test_put_accepts_tensors_sharing_storage(backend: Backend) -> None:
    store = backend.open()
    doc = make_doc()
    kv = torch.stack([doc.keys, doc.values])  # keys and values as views of one buffer
    shared = dataclasses.replace(doc, keys=kv[0], values=kv[1])
    assert_same(store.get(store.put(shared)), doc)
    other = make_doc(seed=1)
    same = dataclasses.replace(other, values=other.keys, prefix_len=3)
    assert torch.equal(backend.open().get(store.put(same)).values, other.keys)


def test_cache_key_is_deterministic_and_sensitive() -> None:
    ids = [1, 2, 3, 4]
    key = cache_key(FP, ids)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == cache_key(FP, list(ids)) == cache_key(FP, tuple(ids), FORMAT_VERSION)
    others = {
        cache_key("model-b", ids),
        cache_key(FP, [1, 2, 3, 5]),
        cache_key(FP, [2, 1, 3, 4]),
        cache_key(FP, ids[:-1]),
        cache_key(FP, ids, FORMAT_VERSION + 1),
        cache_key(FP + "\x00", ids),
    }
    assert key not in others
    assert len(others) == 6
    # Fields are separated: moving bytes between fingerprint and token ids changes the key.
    assert cache_key("a", [0x62]) != cache_key("ab", [])
    with pytest.raises(ValueError, match="token_ids"):
        cache_key(FP, [1.5])  # type: ignore[list-item]


def test_contains_and_delete(backend: Backend) -> None:
    store = backend.open(memory_bytes=1 << 20)
    doc = make_doc()
    key = cache_key(FP, doc.token_ids)
    assert not store.contains(key)
    assert not store.delete(key)
    store.put(doc)
    assert store.contains(key)
    assert backend.committed() == [key]
    assert store.delete(key)
    assert not store.contains(key)
    assert backend.files() == []
    assert store.stats().entries_in_memory == 0
    assert not store.delete(key)
    with pytest.raises(CacheMissError, match=key):
        store.get(key)


def test_put_is_idempotent(backend: Backend) -> None:
    store = backend.open()
    doc = make_doc()
    key = store.put(doc)
    written = store.stats().bytes_written
    before = backend.read(key)
    assert store.put(make_doc()) == key
    assert store.stats().bytes_written == written
    assert backend.read(key) == before


def test_put_rewrites_a_corrupted_entry(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    backend.write(key, backend.read(key)[:-3])
    store.put(make_doc())
    assert_same(store.get(key), make_doc())


def test_stats_count_hits_misses_and_bytes(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    size = len(backend.read(key))
    assert store.stats().bytes_written == size
    store.get(key)
    store.get(key, fingerprint=FP)
    with pytest.raises(CacheMissError):
        store.get("0" * 64)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.memory_hits) == (2, 1, 0)
    assert stats.bytes_read == 2 * size


def test_miss_names_key_and_url(backend: Backend) -> None:
    store = backend.open()
    key = "ab" * 32
    with pytest.raises(CacheMissError, match=f"{key}.*{re.escape(store.url)}"):
        store.get(key)


def test_invalid_key_is_rejected(backend: Backend) -> None:
    store = backend.open()
    with pytest.raises(ValueError, match="key"):
        store.get("../../etc/passwd")
    with pytest.raises(ValueError, match="key"):
        store.contains("ABC")


def test_flipped_tensor_byte_is_corruption(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    data = bytearray(backend.read(key))
    data[-1] ^= 0xFF
    backend.write(key, bytes(data))
    with pytest.raises(CacheCorruptedError, match=f"{key}.*checksum"):
        store.get(key)


def test_unparsable_tensors_with_matching_checksum_is_corruption(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    header, _ = split_entry(backend.read(key))
    junk = b"not the tensors the header describes"
    backend.write(key, join_entry(header, junk))
    backend.edit_meta(key, reseal=True, tensors_sha256=tensors_sha256(header, junk))
    with pytest.raises(CacheCorruptedError, match=f"{key}.*unparsable safetensors \\("):
        store.get(key)


@pytest.mark.parametrize(
    "blob", [b"", b"\x05\x00\x00", b"\xff" * 8 + b"{}", b"\x02" + b"\x00" * 7 + b"[]"]
)
def test_unparsable_header_is_corruption(backend: Backend, blob: bytes) -> None:
    store = backend.open()
    key = store.put(make_doc())
    backend.write(key, blob)
    with pytest.raises(CacheCorruptedError, match=f"{key}.*unparsable safetensors header"):
        store.get(key)


def test_tensors_checksum_covers_dtype_and_shape(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    header, data = split_entry(backend.read(key))
    header["keys"]["shape"] = list(reversed(header["keys"]["shape"]))  # same bytes, other shape
    backend.write(key, join_entry(header, data))
    with pytest.raises(CacheCorruptedError, match=f"{key}.*tensors checksum"):
        store.get(key)


def test_plain_safetensors_without_metadata_is_a_mismatch(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    header, data = split_entry(backend.read(key))
    del header["__metadata__"]  # as format 3 wrote it, its metadata in a .json beside it
    backend.write(key, join_entry(header, data))
    with pytest.raises(CacheMismatchError, match=r"format 3 or older.*reads 4"):
        store.get(key)


@pytest.mark.parametrize(
    "changes",
    [{"token_ids": [1, 2, 3, 4, 5]}, {"fingerprint": "model-b"}, {"format": FORMAT_VERSION + 1}],
)
def test_edited_metadata_no_longer_hashes_to_key(backend: Backend, changes: dict) -> None:
    store = backend.open()
    key = store.put(make_doc())
    backend.edit_meta(key, **changes)
    with pytest.raises(CacheCorruptedError, match=f"{key}.*hash"):
        store.get(key)


@pytest.mark.parametrize("raw", ['{"format": 2, "fingerp', "[1, 2]", '{"format": 2}', ""])
def test_unreadable_json_is_corruption(backend: Backend, raw: str) -> None:
    store = backend.open()
    key = store.put(make_doc())
    backend.write_meta_raw(key, raw)
    with pytest.raises(CacheCorruptedError, match=f"{key}.*metadata"):
        store.get(key)


def test_other_fingerprint_is_mismatch(backend: Backend) -> None:
    store = backend.open()
    key = store.put(make_doc())
    with pytest.raises(CacheMismatchError, match=f"written by model '{FP}'.*runs model 'model-b'"):
        store.get(key, fingerprint="model-b")


def test_other_token_ids_is_mismatch(backend: Backend) -> None:
    store = backend.open()
    doc = make_doc()
    key = store.put(doc)
    assert_same(store.get(key, token_ids=tuple(doc.token_ids)), doc)
    with pytest.raises(CacheMismatchError, match="token ids"):
        store.get(key, token_ids=doc.token_ids[:-1])


def test_other_format_version_is_mismatch(backend: Backend) -> None:
    store = backend.open()
    doc = make_doc()
    key = store.put(doc)
    old_key = cache_key(FP, doc.token_ids, FORMAT_VERSION - 1)
    backend.write(old_key, backend.read(key))
    backend.edit_meta(old_key, format=FORMAT_VERSION - 1)
    with pytest.raises(CacheMismatchError, match=f"format {FORMAT_VERSION - 1}"):
        store.get(old_key)


def test_interrupted_write_is_not_an_entry(backend: Backend) -> None:
    store = backend.open()
    doc = make_doc()
    key = cache_key(FP, doc.token_ids)
    data = backend.read(store.put(make_doc(seed=1)))
    # A crash while writing: part of the file, under a temp name.
    backend.fs.pipe_file(f"{backend.root}/.tmp/{key}.{uuid.uuid4().hex}.tmp", data[:100])
    assert not store.contains(key)
    assert backend.committed() == [cache_key(FP, make_doc(seed=1).token_ids)]
    with pytest.raises(CacheMissError, match=key):
        store.get(key)
    assert_same(store.get(store.put(doc)), doc)


def test_uncreatable_path_raises_value_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "store"
    with pytest.raises(ValueError, match=re.escape(str(target))) as info:
        KVCacheStore(target)
    assert isinstance(info.value.__cause__, OSError)


def test_negative_memory_bytes_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_bytes"):
        KVCacheStore(tmp_path, memory_bytes=-1)


def test_urls_are_normalised(tmp_path: Path) -> None:
    assert KVCacheStore(tmp_path / "x" / ".." / "y").url == str(tmp_path / "y")
    via_url = KVCacheStore(f"file://{tmp_path}/z")
    assert via_url.url == str(tmp_path / "z")
    key = via_url.put(make_doc())
    assert KVCacheStore(tmp_path / "z").contains(key)


def test_memory_hit_skips_storage(backend: Backend) -> None:
    doc = make_doc()
    store = backend.open(memory_bytes=10 * doc.nbytes)
    key = store.put(doc)
    backend.fs.rm_file(backend.path(key))
    got = store.get(key, fingerprint=FP)
    assert_same(got, doc)
    stats = store.stats()
    assert (stats.hits, stats.memory_hits, stats.bytes_read) == (1, 1, 0)
    assert (stats.entries_in_memory, stats.memory_bytes_used) == (1, doc.nbytes)
    with pytest.raises(CacheMismatchError, match="model-b"):
        store.get(key, fingerprint="model-b")
    with pytest.raises(CacheMismatchError, match="token ids"):
        store.get(key, token_ids=[1, 2])


def test_memory_tier_hands_out_copies(backend: Backend) -> None:
    doc = make_doc()
    store = backend.open(memory_bytes=10 * doc.nbytes)
    key = store.put(doc)
    doc.keys.zero_()  # the caller's tensors are not the cached ones
    first = store.get(key)
    first.values.zero_()
    second = store.get(key)
    assert_same(second, make_doc())
    assert store.stats().memory_hits == 2


def test_shared_get_hands_out_the_tiers_own_tensors(backend: Backend) -> None:
    doc = make_doc()
    key = backend.open().put(doc)
    store = backend.open(memory_bytes=10 * doc.nbytes)  # empty tier: the first get reads disk
    from_disk = store.get(key, shared=True)
    from_tier = store.get(key, shared=True)
    assert from_tier.keys.data_ptr() == from_disk.keys.data_ptr()  # one entry, never copied
    assert store.get(key).keys.data_ptr() != from_tier.keys.data_ptr()  # unshared: a copy
    assert_same(from_tier, make_doc())


def test_disk_read_fills_memory_tier(backend: Backend) -> None:
    doc = make_doc()
    key = backend.open().put(doc)
    store = backend.open(memory_bytes=doc.nbytes)
    store.get(key)
    store.get(key)
    stats = store.stats()
    assert (stats.hits, stats.memory_hits) == (2, 1)
    assert stats.bytes_read == len(backend.read(key))


def test_lru_evicts_least_recently_used(backend: Backend) -> None:
    docs = [make_doc(seed) for seed in range(3)]
    store = backend.open(memory_bytes=2 * docs[0].nbytes)
    keys = [store.put(d) for d in docs[:2]]
    store.get(keys[0])  # keys[1] is now the least recently used
    keys.append(store.put(docs[2]))
    stats = store.stats()
    assert (stats.entries_in_memory, stats.memory_bytes_used) == (2, 2 * docs[0].nbytes)
    assert stats.memory_hits == 1
    store.get(keys[0])
    store.get(keys[2])
    assert store.stats().memory_hits == 3
    store.get(keys[1])  # evicted: read from storage
    assert store.stats().memory_hits == 3
    assert store.stats().bytes_read > 0


def test_entry_larger_than_cap_is_not_kept(backend: Backend) -> None:
    doc = make_doc()
    store = backend.open(memory_bytes=doc.nbytes - 1)
    key = store.put(doc)
    store.get(key)
    stats = store.stats()
    assert (stats.entries_in_memory, stats.memory_bytes_used, stats.memory_hits) == (0, 0, 0)


def test_concurrent_put_and_get(backend: Backend) -> None:
    docs = [make_doc(seed) for seed in range(4)]
    store = backend.open(memory_bytes=2 * docs[0].nbytes)
    errors: list[BaseException] = []

    def work(doc: DocumentKV) -> None:
        try:
            for _ in range(3):
                assert_same(store.get(store.put(doc), fingerprint=FP), doc)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = store.stats()
    assert stats.hits == 12
    assert stats.memory_bytes_used <= 2 * docs[0].nbytes
    assert backend.committed() == sorted(cache_key(FP, d.token_ids) for d in docs)


def test_class_docstring_example_runs() -> None:
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(store_module) if t.name.endswith("KVCacheStore")]
    assert tests and tests[0].examples
    result = doctest.DocTestRunner().run(tests[0])
    assert result.failed == 0
