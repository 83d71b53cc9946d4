"""Full-content weight digests and their cache, on small files offline."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from samkv_integrations.models import digests


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAMKV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = digests._hash_file

    def spy(path: Path, size: int) -> str:
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(digests, "_hash_file", spy)
    return calls


def write(path: Path, data: bytes, age_s: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = path.stat().st_mtime_ns - age_s * 10**9
    os.utime(path, ns=(past, past))
    return path


def test_digest_is_the_full_content_sha256(tmp_path: Path, hashes: list[Path]) -> None:
    data = os.urandom(3 * digests._CHUNK // 2)  # more than one chunk
    file = write(tmp_path / "m" / "model.safetensors", data)
    assert digests.file_sha256(file) == hashlib.sha256(data).hexdigest()
    assert digests.file_sha256(file) == hashlib.sha256(data).hexdigest()
    assert hashes == [file.resolve()]


def test_freshly_written_file_is_rehashed_until_its_mtime_is_settled(
    tmp_path: Path, hashes: list[Path]
) -> None:
    # A rewrite within the mtime's tick would keep the mtime: a racy digest is not trusted.
    file = write(tmp_path / "w.bin", b"a" * 1000, age_s=0)
    digests.file_sha256(file)
    digests.file_sha256(file)
    assert len(hashes) == 2


def test_rewrite_that_restores_mtime_is_still_seen(tmp_path: Path, hashes: list[Path]) -> None:
    file = write(tmp_path / "w.safetensors", b"a" * 4096)
    stat = file.stat()
    before = digests.file_sha256(file)
    with open(file, "r+b") as fh:  # same size, same inode, mtime put back: only ctime moves
        fh.seek(2048)
        fh.write(b"b")
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_mtime_ns == stat.st_mtime_ns and file.stat().st_size == stat.st_size
    assert digests.file_sha256(file) != before
    assert len(hashes) == 2


def test_replaced_file_is_rehashed(tmp_path: Path) -> None:
    file = write(tmp_path / "w.safetensors", b"a" * 4096)
    before = digests.file_sha256(file)
    write(tmp_path / "new.safetensors", b"b" * 4096).replace(file)  # a new inode
    assert digests.file_sha256(file) == hashlib.sha256(b"b" * 4096).hexdigest() != before


def test_weight_files_and_identity(tmp_path: Path) -> None:
    model = tmp_path / "m"
    write(model / "model-00001.safetensors", b"one")
    write(model / "model-00002.safetensors", b"two")
    write(model / "config.json", b"{}")
    found = digests.weight_digests(model)
    assert sorted(found) == ["model-00001.safetensors", "model-00002.safetensors"]
    single = write(tmp_path / "x.gguf", b"gguf")
    assert digests.weight_digests(single) == {"x.gguf": hashlib.sha256(b"gguf").hexdigest()}
    # Names count: the same bytes under other names are other weights.
    renamed = {f"shard{i}": sha for i, sha in enumerate(found.values())}
    assert digests.content_identity(found) != digests.content_identity(renamed)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        (tmp_path / "empty").mkdir()
        digests.weight_digests(tmp_path / "empty")


def test_entries_of_deleted_files_are_pruned(tmp_path: Path, home: Path) -> None:
    gone = write(tmp_path / "gone.bin", b"x")
    kept = write(tmp_path / "kept.bin", b"y")
    digests.file_sha256(gone)
    gone.unlink()
    digests.file_sha256(kept)
    files = json.loads((home / digests.CACHE_FILE).read_text())["files"]
    assert list(files) == [str(kept.resolve())]


def test_unwritable_cache_only_costs_a_rehash(
    tmp_path: Path, home: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write(tmp_path / "w.bin", b"z" * 100)

    def refuse(*args: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(digests.os, "replace", refuse)
    assert digests.file_sha256(file) == hashlib.sha256(b"z" * 100).hexdigest()
    assert digests.file_sha256(file) == hashlib.sha256(b"z" * 100).hexdigest()
    assert len(hashes) == 2
    assert not (home / digests.CACHE_FILE).exists()
    assert [p.name for p in home.iterdir() if p.name.endswith(".tmp")] == []
