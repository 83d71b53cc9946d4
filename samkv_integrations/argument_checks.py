"""Checks of the engine's public arguments, each raising one error that names what was wrong.

The engine's entry points take user data (texts, token ids, refs, options). Caught here,
a wrong type or an out-of-range id becomes a ``TypeError`` or ``ValueError`` naming the
argument, instead of an ``AttributeError`` or an index error deep inside the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from samkv_integrations.records import CacheRef


def check_sequence(value: Any, what: str, of: str) -> None:
    """``value`` is a sequence (of ``of``, each checked later), not one string, bytes or a scalar."""
    if isinstance(value, str):
        raise TypeError(f"{what} must be a sequence of {of}, not one string")
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a sequence of {of}, got {type(value).__name__}")


def check_token_ids(ids: Any, vocab_size: int, *, what: str) -> list[int]:
    """``ids`` as a list of ints, each a token id in ``[0, vocab_size)``.

    Args:
        ids: The token ids given.
        vocab_size: Rows of the model's input embedding.
        what: The argument's name, for the error.

    Raises:
        TypeError: ``ids`` is not a sequence of ints.
        ValueError: A token id lies outside the vocabulary.
    """
    check_sequence(ids, what, "int token ids")
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"{what}[{position}]: token id must be an int, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"{what}[{position}]: token id {token} is outside the vocabulary [0, {vocab_size})"
            )
    return list(ids)


def check_refs(refs: Any) -> list[CacheRef]:
    """``refs`` as a list of ``CacheRef`` (what ``index`` and ``cache_ref`` return)."""
    check_sequence(refs, "refs", "CacheRef")
    for position, ref in enumerate(refs):
        if not isinstance(ref, CacheRef):
            raise TypeError(
                f"refs[{position}] must be a CacheRef (from engine.index or engine.cache_ref), "
                f"got {type(ref).__name__}"
            )
    return list(refs)


def check_method_options(options: Any) -> dict[str, Any]:
    """``method_options`` as a dict of hyperparameters (``None``: none)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"method_options must be a mapping of option names to values, "
            f"got {type(options).__name__}"
        )
    return dict(options)
