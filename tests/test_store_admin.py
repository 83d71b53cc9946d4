"""Store administration: one-file atomic entries, listing, verify, gc, stale temps, ``samkv cache``."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from test_store import FP, Backend, backend, make_doc

from samkv_integrations import store_files
from samkv_integrations.cache_format import cache_key, pack
from samkv_integrations.cli import main
from samkv_integrations.errors import CacheCorruptedError, CacheMissError
from samkv_integrations.store import KVCacheStore
from samkv_integrations.store_files import TEMP_MAX_AGE_S, StoreFiles

__all__ = ["backend"]  # test_store's fixture, used here too

HOUR = 3600.0


def entry_bytes(seed: int) -> bytes:
    doc = make_doc(seed)
    tensors = {"keys": doc.keys, "values": doc.values, **doc.extras}
    return pack(doc.fingerprint, doc.token_ids, doc.prefix_len, tensors)[0]


def age(path: Path, seconds: float, *, accessed: float | None = None) -> None:
    """Set a local file's modification time ``seconds`` ago (access time: ``accessed`` ago)."""
    now = time.time()
    used = now - (seconds if accessed is None else accessed)
    os.utime(path, (used, now - seconds))


def test_writers_of_one_key_never_mix_their_entries(backend: Backend) -> None:
    """Two writers of one key with different bytes: the entry is always one of them, whole."""
    files = StoreFiles(backend.url, {})
    key = cache_key(FP, make_doc().token_ids)
    blobs = [entry_bytes(0), entry_bytes(0)[:-8] + b"\x01" * 8]  # same key, other bytes
    for _ in range(30):
        start = threading.Barrier(2)

        def write(blob: bytes, start: threading.Barrier) -> None:
            start.wait()
            files.write(key, blob)

        threads = [threading.Thread(target=write, args=(blob, start)) for blob in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert backend.read(key) in blobs
    assert backend.files() == [f"{key[:2]}/{key}.safetensors"]  # no temp file left


def test_entries_list_keys_sizes_and_times(backend: Backend) -> None:
    store = backend.open()
    before = time.time() - 5
    keys = sorted(store.put(make_doc(seed)) for seed in range(3))
    entries = store.entries()
    assert [e.key for e in entries] == keys
    for entry in entries:
        assert entry.nbytes == len(backend.read(entry.key))
        assert before <= entry.created <= entry.last_used <= time.time() + 5


def test_verify_checks_storage_without_keeping_anything(backend: Backend) -> None:
    doc = make_doc()
    store = backend.open(memory_bytes=10 * doc.nbytes)
    key = store.put(doc)
    store.verify(key, fingerprint=FP, prefix_len=doc.prefix_len, extras=("query_means",))
    stats = store.stats()
    assert (stats.hits, stats.memory_hits) == (0, 0)
    data = bytearray(backend.read(key))
    data[-1] ^= 0xFF
    backend.write(key, bytes(data))
    store.get(key)  # the memory tier still holds the good copy
    with pytest.raises(CacheCorruptedError, match="tensors checksum"):
        store.verify(key)
    with pytest.raises(CacheMissError):
        store.verify("0" * 64)


def test_gc_keeps_only_the_keys_asked(backend: Backend) -> None:
    store = backend.open(memory_bytes=1 << 20)
    keys = [store.put(make_doc(seed)) for seed in range(4)]
    report = store.gc(keep=[keys[1], keys[3], "f" * 64])
    assert sorted(report.deleted) == sorted([keys[0], keys[2]])
    assert report.freed_bytes == sum(len(entry_bytes(s)) for s in (0, 2))
    assert (report.kept_entries, report.kept_bytes) == (2, len(entry_bytes(1)) * 2)
    assert [e.key for e in store.entries()] == sorted([keys[1], keys[3]])
    assert not store.contains(keys[0])  # gone from the memory tier too
    assert store.gc().deleted == []  # no keep list, no cap: nothing to delete


def test_gc_evicts_the_least_recently_used_down_to_max_bytes(tmp_path: Path) -> None:
    store = KVCacheStore(tmp_path)
    keys = [store.put(make_doc(seed)) for seed in range(4)]
    paths = {key: next(tmp_path.glob(f"*/{key}.safetensors")) for key in keys}
    for i, key in enumerate(keys):  # all written a day ago; read an hour apart, keys[0] last
        age(paths[key], 24 * HOUR, accessed=(i + 1) * HOUR)
    store.get(keys[3])  # a read now makes it the most recently used
    size = paths[keys[0]].stat().st_size
    report = store.gc(max_bytes=2 * size + 1)
    assert report.deleted == [keys[2], keys[1]]  # least recently used first
    assert {e.key for e in store.entries()} == {keys[0], keys[3]}
    assert store.gc(max_bytes=0).kept_entries == 0
    with pytest.raises(ValueError, match="max_bytes"):
        store.gc(max_bytes=-1)


def test_stale_temp_files_are_removed_on_open_and_by_gc(tmp_path: Path) -> None:
    store = KVCacheStore(tmp_path)
    key = store.put(make_doc())
    stale = tmp_path / ".tmp" / f"{key}.dead.tmp"
    fresh = tmp_path / ".tmp" / f"{key}.live.tmp"  # a writer may be at work on it
    legacy = tmp_path / key[:2] / f".{key}.json.dead.tmp"  # where format 3 wrote its temps
    for path in (stale, fresh, legacy):
        path.write_bytes(b"partial")
    age(stale, TEMP_MAX_AGE_S + 60)
    age(legacy, TEMP_MAX_AGE_S + 60)
    KVCacheStore(tmp_path)  # opening cleans .tmp/ only
    assert (stale.exists(), fresh.exists(), legacy.exists()) == (False, True, True)
    assert store.gc().temps_removed == 1
    assert (fresh.exists(), legacy.exists()) == (True, False)
    assert store.gc(temp_max_age_s=0).temps_removed == 1
    assert [e.key for e in store.entries()] == [key]


def test_stale_temps_on_fsspec_storage_are_removed(backend: Backend) -> None:
    store = backend.open()
    tmp = f"{backend.root}/.tmp/{'a' * 64}.x.tmp"
    backend.fs.pipe_file(tmp, b"partial")
    assert store.gc().temps_removed == 0  # just written
    assert store.gc(temp_max_age_s=0).temps_removed == 1
    assert backend.files() == []


def test_timestamps_of_the_fsspec_backends_are_read() -> None:
    from datetime import UTC, datetime

    stamp = datetime(2026, 1, 2, tzinfo=UTC)
    for info in ({"mtime": 5.0}, {"LastModified": stamp}, {"updated": "2026-01-02T00:00:00Z"}):
        assert store_files._timestamp(info) in (5.0, stamp.timestamp())
    assert store_files._timestamp({"size": 3}) is None


def run_cli(*args: str) -> int:
    return main(["cache", *args])


def test_cache_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = KVCacheStore(tmp_path)
    keys = sorted(store.put(make_doc(seed)) for seed in range(3))
    assert run_cli("ls", "--store", str(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == keys
    assert "3 entries" in err

    path = next(tmp_path.glob(f"*/{keys[0]}.safetensors"))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    assert run_cli("verify", "--store", str(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert out.startswith(keys[0]) and "checksum" in out and "1 broken" in err
    assert run_cli("verify", "--store", str(tmp_path), "--repair") == 0
    assert "1 deleted" in capsys.readouterr().err
    assert [e.key for e in store.entries()] == keys[1:]
    assert run_cli("verify", "--store", str(tmp_path)) == 0

    keep = tmp_path / "keep.txt"
    keep.write_text(f"{keys[2]}\n\n")
    assert run_cli("gc", "--store", str(tmp_path), "--keep", str(keep)) == 0
    assert "deleted 1 entries" in capsys.readouterr().out
    assert [e.key for e in store.entries()] == keys[2:]
    assert run_cli("gc", "--store", str(tmp_path), "--max-bytes", "1K") == 0
    assert store.entries() == []


@pytest.mark.parametrize(("text", "nbytes"), [("123", 123), ("2K", 2048), ("1.5GiB", 3 << 29)])
def test_sizes_parse(text: str, nbytes: int) -> None:
    from samkv_integrations.cache_cli import parse_size

    assert parse_size(text) == nbytes


def test_bad_size_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("gc", "--store", str(tmp_path), "--max-bytes", "lots")
    assert info.value.code == 2
    assert "--max-bytes" in capsys.readouterr().err
