"""What every fuzz case asserts: the error a user sees is expected, named and harmless.

A case is a bad input and a keyword its error must contain. ``check_error`` accepts only
the documented error types (``ValueError`` / ``TypeError`` subclasses, the ``Cache*``
errors) and rejects what a bug raises (``AttributeError``, ``RuntimeError``, ``KeyError``,
``IndexError``); ``check_store`` loads every entry of a store a case used, so that a
rejected input can never have left a corrupt cache behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import KVCacheStore
from samkv_integrations.errors import CacheError

#: Exceptions that are bugs whenever they reach a caller (``CacheMissError`` is a
#: ``KeyError`` and a documented ``CacheError``: it is checked first).
BUG_TYPES = (AttributeError, RuntimeError, KeyError, IndexError, AssertionError)

_KEY = re.compile(r"^[0-9a-f]{64}")


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: The pytest id.
        keyword: A word the error must contain (case-insensitive): what was wrong.
        args: The input: a callable's arguments, a command line or a request.
        gap: Why this case is known to fail today (it runs as a strict xfail: it fails
            the suite once it passes, so that the mark is removed with the fix).
    """

    id: str
    keyword: str
    args: Any = None
    gap: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.gap)] if self.gap else []
        return pytest.param(self, id=self.id, marks=marks)


def check_error(error: BaseException, keyword: str) -> None:
    """``error`` is a documented, named user error that mentions ``keyword``."""
    documented = isinstance(error, CacheError) or (
        isinstance(error, ValueError | TypeError) and not isinstance(error, BUG_TYPES)
    )
    assert documented, f"{type(error).__name__} is not a documented error: {error}"
    assert keyword.lower() in str(error).lower(), f"{keyword!r} not in {error}"


def check_store(root: Path) -> int:
    """Load every entry under the local store ``root``; returns how many there were."""
    if not root.is_dir():
        return 0
    keys = {
        m[0]
        for p in root.rglob("*")
        if p.is_file() and not p.parent.name.startswith(".")
        if (m := _KEY.match(p.name))
    }
    store = KVCacheStore(root)
    for key in sorted(keys):
        store.get(key)  # raises CacheCorruptedError / CacheMismatchError on a bad entry
    return len(keys)
