"""Where a KV cache store keeps its entries: one file per key, on fsspec storage, written whole.

Under the store's root, an entry is ``<key[:2]>/<key>.safetensors`` (what it holds is
:mod:`samkv_integrations.cache_format`'s). A file is written under a unique name in
``.tmp/`` and renamed into place, so that a reader sees an entry whole or not at all, and
two writers of one key each put a whole file of their own there (the last rename wins):
their parts can never mix. A temp file a crash left behind is removed once it is older than
:data:`TEMP_MAX_AGE_S`, when a store opens (``.tmp/`` only) or on ``gc`` (anywhere).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["TEMP_DIR", "TEMP_MAX_AGE_S", "StoreEntry", "StoreFiles", "TempFile"]

logger = logging.getLogger(__name__)

#: The folder, under the root, that files are written in before they are renamed into place.
TEMP_DIR = ".tmp"

#: Age, in seconds, past which a temp file counts as left behind by a crash: no write of
#: one entry takes an hour.
TEMP_MAX_AGE_S = 3600.0

_SUFFIX = ".safetensors"
_ENTRY_RE = re.compile(r"^([0-9a-f]{2})[0-9a-f]{62}\.safetensors$")
# Written by versions that kept the metadata in a .json beside the tensors (format <= 3).
_LEGACY_SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One stored entry, as listed (its file is not read).

    Attributes:
        key: The entry's key.
        nbytes: Size of its file.
        created: When it was written, in POSIX seconds (0 if the storage does not say).
        last_used: When it was last read, in POSIX seconds: ``KVCacheStore.get`` stamps
            the access time of a local file; on other storage, when it was written.
    """

    key: str
    nbytes: int
    created: float
    last_used: float


@dataclass(frozen=True, slots=True)
class TempFile:
    """A file being written, or left behind by a writer that died.

    Attributes:
        path: Its path on the store's filesystem.
        modified: When it was last written, in POSIX seconds; None if the storage does not
            say (it is then never taken for left behind).
    """

    path: str
    modified: float | None


class StoreFiles:
    """The files of one store: paths, whole-file reads and atomic writes, listing.

    Args:
        url: A local directory (created if missing) or any fsspec URL.
        storage_options: Passed to fsspec for URLs.

    Raises:
        ValueError: The location cannot be created or written to.
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any]) -> None:
        text = os.fspath(url)
        if "://" in text:
            self.fs, root = fsspec.core.url_to_fs(text, **storage_options)
        else:
            self.fs, root = LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root: str = root.rstrip("/") or root
        self.url: str = self.root if self.local else self.fs.unstrip_protocol(self.root)
        try:
            self.fs.makedirs(f"{self.root}/{TEMP_DIR}", exist_ok=True)
            if self.local and not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError("the directory is not writable")
        except OSError as e:
            raise ValueError(f"cannot create the KV cache store at {self.url}: {e}") from e

    def path(self, key: str) -> str:
        """Where the entry of ``key`` lives."""
        return f"{self.root}/{key[:2]}/{key}{_SUFFIX}"

    def exists(self, key: str) -> bool:
        """Whether an entry file is in place under ``key``."""
        return bool(self.fs.isfile(self.path(key)))

    def read(self, key: str) -> bytes:
        """The whole entry file of ``key``.

        Raises:
            FileNotFoundError: There is none.
            OSError: It cannot be read.
        """
        if not self.local:
            return bytes(self.fs.cat_file(self.path(key)))
        with open(self.path(key), "rb") as f:
            return f.read()

    def write(self, key: str, data: bytes) -> None:
        """Put ``data`` in place as the entry of ``key``, atomically (temp file + rename)."""
        path = self.path(key)
        folder = path.rsplit("/", 1)[0]
        tmp = f"{self.root}/{TEMP_DIR}/{key}.{uuid.uuid4().hex}.tmp"
        try:
            if self.local:
                os.makedirs(f"{self.root}/{TEMP_DIR}", exist_ok=True)  # even if removed since
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.makedirs(folder, exist_ok=True)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(tmp, data)
                self.fs.makedirs(folder, exist_ok=True)
                self.fs.mv(tmp, path)
        except BaseException:
            self.rm(tmp)
            raise

    def remove(self, key: str) -> bool:
        """Remove the entry of ``key`` (and a format-3 ``.json`` beside it); False if none."""
        legacy = self.path(key).removesuffix(_SUFFIX) + _LEGACY_SUFFIX
        return any([self.rm(self.path(key)), self.rm(legacy)])

    def touch(self, key: str) -> None:
        """Stamp the access time of a local entry file (its last use, for ``gc``)."""
        if not self.local:
            return
        path = self.path(key)
        try:
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
        except OSError as e:  # a read-only store is still a store
            logger.debug("cannot stamp the access time of %s: %s", path, e)

    def rm(self, path: str) -> bool:
        """Remove one file; False if absent or if it cannot be removed (logged)."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            logger.warning("cannot remove %s from the KV cache store: %s", path, e)
            return False
        return True

    def scan(self) -> tuple[list[StoreEntry], list[TempFile]]:
        """Every entry and every temp file under the root (files of other names are ignored)."""
        entries: list[StoreEntry] = []
        temps: list[TempFile] = []
        for folder, name, info in self._files(None):
            match = _ENTRY_RE.match(name)
            if match and match.group(1) == folder:
                created = _timestamp(info) or 0.0
                used = max(created, float(info.get("atime", 0.0)))
                entries.append(StoreEntry(name.removesuffix(_SUFFIX), info["size"], created, used))
            elif name.endswith(".tmp"):
                temps.append(TempFile(f"{self.root}/{folder}/{name}", _timestamp(info)))
        return entries, temps

    def clean_temps(self, older_than_s: float, temps: Iterable[TempFile] | None = None) -> int:
        """Remove temp files older than ``older_than_s``; ``None``: those in ``.tmp/``.

        Returns:
            How many were removed. Storage errors are logged, not raised.
        """
        if temps is None:
            try:
                temps = [
                    TempFile(f"{self.root}/{TEMP_DIR}/{name}", _timestamp(info))
                    for _, name, info in self._files(TEMP_DIR)
                ]
            except OSError as e:
                logger.warning("cannot list the temp files of %s: %s", self.url, e)
                return 0
        now = time.time()
        old = [t for t in temps if t.modified is not None and now - t.modified > older_than_s]
        removed = sum(self.rm(t.path) for t in old)
        if removed:
            logger.info("removed %d stale temp files from %s", removed, self.url)
        return removed

    def _files(self, only: str | None) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
        """``(folder, name, info)`` of each file one folder below the root (or in ``only``)."""
        if self.local:
            folders = [only] if only else [e.name for e in os.scandir(self.root) if e.is_dir()]
            for folder in folders:
                try:
                    found = list(os.scandir(f"{self.root}/{folder}"))
                except FileNotFoundError:  # removed meanwhile
                    continue
                for item in found:
                    try:
                        st = item.stat()
                    except FileNotFoundError:
                        continue
                    if item.is_file():
                        info = {"size": st.st_size, "mtime": st.st_mtime, "atime": st.st_atime}
                        yield folder, item.name, info
            return
        top = f"{self.root}/{only}" if only else self.root
        for path, info in self.fs.find(top, detail=True).items():
            parts = path[len(self.root) + 1 :].split("/")
            if len(parts) == 2 and info.get("type", "file") == "file":
                yield parts[0], parts[1], info


def _timestamp(info: Mapping[str, Any]) -> float | None:
    """When a file was last written, from an fsspec info dict (field names vary by backend)."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
