"""Full-content sha256 of weight files, cached by file identity under ``$SAMKV_HOME``.

A model's fingerprint must change when any byte of its weights changes (a fine-tune saved
over the same folder), so every weight file is hashed in full. Hashing 16 GB takes about a
minute, so each digest is kept in ``$SAMKV_HOME/digests.json`` under the file's resolved
path, with the file's identity when it was hashed: size, ``mtime_ns``, ``ctime_ns``, inode
and device. Rewriting a file changes at least one of them (``ctime`` cannot be set back, even
when ``mtime`` is), and the file is hashed again.

File timestamps are coarse (a few ms on Linux, 2 s on FAT), so a file rewritten within the
tick in which it was hashed could keep its mtime. A digest taken less than 2 s after the
file's last modification is therefore stored but not trusted: the next lookup hashes again,
as git does with "racily clean" index entries.

The cache only saves time, it is never trusted blindly: an unreadable, corrupt or foreign
cache file is ignored and rewritten, malformed entries are dropped, and a failed write only
costs a rehash later. Writes are atomic (temp file, then ``os.replace``) under a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from samkv_integrations.models.home import file_lock, samkv_home

__all__ = [
    "CACHE_FILE",
    "WEIGHT_SUFFIXES",
    "content_identity",
    "file_sha256",
    "weight_digests",
    "weight_files",
]

logger = logging.getLogger(__name__)

#: Suffixes of the files whose bytes make up a model's weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: The digest cache, under ``$SAMKV_HOME``.
CACHE_FILE = "digests.json"

_FORMAT = "samkv-weight-digests-v1"
_CHUNK = 8 << 20
_BAR_MIN = 64 << 20  # smaller files hash in well under a second: no progress bar
_RACY_NS = 2_000_000_000
_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def weight_files(path: Path) -> list[Path]:
    """Return the weight files of ``path``: itself if a file, else its top-level weight files.

    Raises:
        ValueError: ``path`` is a directory without weight files (message names it).
    """
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"name_or_path: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return files


def weight_digests(path: Path) -> dict[str, str]:
    """Return ``{file name: sha256 hex of its full content}`` for the weight files of ``path``.

    Raises:
        ValueError: ``path`` is a directory without weight files.
    """
    return {file.name: file_sha256(file) for file in weight_files(path)}


def content_identity(digests: Mapping[str, str]) -> str:
    """Return a sha256 hex over each weight file's name and full-content digest."""
    payload = "".join(f"{name}|{sha}\n" for name, sha in sorted(digests.items()))
    return hashlib.sha256(f"{_FORMAT}\n{payload}".encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """Return the sha256 hex of ``path``'s full content, hashing it only when it changed.

    Raises:
        OSError: ``path`` cannot be read.
    """
    resolved = path.resolve()
    before = _identity(resolved)
    entry = _load().get(str(resolved))
    if entry is not None and _trusted(entry, before):
        return str(entry["sha256"])
    started = time.time_ns()
    digest = _hash_file(resolved, before["size"])
    if _identity(resolved) != before:
        # The bytes read may mix two versions: usable once, never worth remembering.
        logger.warning("%s changed while it was hashed; its digest is not cached", resolved)
        return digest
    _store(str(resolved), {**before, "hashed_ns": started, "sha256": digest})
    return digest


def _identity(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


def _trusted(entry: Mapping[str, Any], identity: Mapping[str, int]) -> bool:
    if any(entry[key] != value for key, value in identity.items()):
        return False
    # A write after hashing began, within the mtime's tick, would have kept the mtime.
    return bool(entry["hashed_ns"] - identity["mtime_ns"] > _RACY_NS)


def _hash_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    with (
        open(path, "rb") as fh,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            leave=False,
            disable=True if size < _BAR_MIN else None,
        ) as bar,
    ):
        while count := fh.readinto(buffer):
            digest.update(view[:count])
            bar.update(count)
    logger.info("Hashed %s (%.1f MB) in %.2fs", path, size / 1e6, time.perf_counter() - start)
    return digest.hexdigest()


def _valid(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    numbers = (entry.get(key) for key in (*_STAT_KEYS, "hashed_ns"))
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        return False
    sha = entry.get("sha256")
    return isinstance(sha, str) and _SHA256.fullmatch(sha) is not None


def _load() -> dict[str, dict[str, Any]]:
    path = samkv_home() / CACHE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError covers bad JSON and bad UTF-8
        logger.warning("Ignoring unreadable digest cache %s (%s); rebuilding it", path, e)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(files, dict):
        logger.warning("Ignoring digest cache %s: not a %s file; rebuilding it", path, _FORMAT)
        return {}
    return {key: entry for key, entry in files.items() if _valid(entry)}


def _store(key: str, entry: dict[str, Any]) -> None:
    path = samkv_home() / CACHE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with file_lock("digests"):
            # Re-read under the lock: another process may have added entries meanwhile.
            files = _load()
            files[key] = entry
            # Entries of deleted files (temp dirs, replaced checkpoints) would only pile up.
            files = {k: v for k, v in files.items() if os.path.exists(k)}
            tmp.write_text(json.dumps({"format": _FORMAT, "files": files}, indent=1) + "\n")
            os.replace(tmp, path)
    except OSError as e:
        logger.warning("Could not update digest cache %s (%s); files will be rehashed", path, e)
    finally:
        tmp.unlink(missing_ok=True)
