"""Checks of a method's hyperparameters, each raising a ``ValueError`` that names the field.

Methods are dataclasses whose fields are their options (``BaseMethod``); these run in their
``__post_init__`` on the fields named, so that a spec such as ``samkv+budget=2`` fails when
it is parsed, with the field and the value in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_ints(method: Any, lows: Mapping[str, int]) -> None:
    """Each field named in ``lows`` is an int (not a bool) at least its low."""
    for field, low in lows.items():
        value = getattr(method, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{field} must be an int >= {low}, got {value!r}")


def check_odd(method: Any, fields: tuple[str, ...]) -> None:
    """Each field named is an odd int >= 1 (a window centred on its entry)."""
    for field in fields:
        value = getattr(method, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
            raise ValueError(f"{field} must be an odd int >= 1, got {value!r}")


def check_choices(method: Any, choices: Mapping[str, tuple[Any, ...]]) -> None:
    """Each field named in ``choices`` holds one of its allowed values."""
    for field, allowed in choices.items():
        if getattr(method, field) not in allowed:
            raise ValueError(f"{field} must be one of {allowed}, got {getattr(method, field)!r}")


def check_fractions(
    method: Any, fractions: Mapping[str, bool], *, optional: tuple[str, ...] = ()
) -> None:
    """Each field named in ``fractions`` is a number in (0, 1], or [0, 1] where it maps to True.

    Fields in ``optional`` may also be ``None``.
    """
    for field, closed in fractions.items():
        value = getattr(method, field)
        if value is None and field in optional:
            continue
        number = isinstance(value, float) or type(value) is int
        if not (number and (0 < value <= 1 or (closed and value == 0))):
            raise ValueError(f"{field} must be in {'[' if closed else '('}0, 1], got {value!r}")
