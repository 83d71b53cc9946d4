"""The cache root ``$SAMKV_HOME`` and cross-process locks on what is kept under it.

Kept apart from :mod:`registry` so that both the registry and the weight digests
(:mod:`digests`) can use them without importing each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

__all__ = ["file_lock", "samkv_home"]


def samkv_home() -> Path:
    """Return the cache root: ``$SAMKV_HOME`` or ``~/.cache/samkv``, created on demand."""
    home = Path(os.environ.get("SAMKV_HOME") or Path.home() / ".cache" / "samkv").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``$SAMKV_HOME/locks/<name>.lock`` (across processes).

    ``filelock`` locks through ``fcntl`` on POSIX and ``msvcrt`` on Windows; the OS releases
    the lock when the process dies, so a crashed holder never blocks the others.
    """
    lock_dir = samkv_home() / "locks"
    lock_dir.mkdir(exist_ok=True)
    with FileLock(lock_dir / f"{name}.lock"):
        yield
