"""Method specs as named on the command line: ``name[+option=value...]``, parsed and validated.

Validation instantiates each method once with its options, so that an unknown method, an
unknown option or a bad value is reported before any model loads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from samkv_integrations.methods.base import BaseMethod

__all__ = [
    "DEFAULT_METHODS",
    "REFERENCE",
    "MethodSpec",
    "default_methods",
    "parse_methods",
    "parse_spec",
]

logger = logging.getLogger(__name__)

#: The reference every other method is compared with.
REFERENCE = "full"
#: The methods compared by default, where registered.
DEFAULT_METHODS = ("full", "reuse", "cacheblend", "epic", "samkv")


@dataclass(slots=True, frozen=True)
class MethodSpec:
    """One method as named on the command line: ``name[+option=value...]``.

    Attributes:
        label: The full spec string, used as the method's name in every output.
        name: The registered method name.
        options: Hyperparameters passed to the method.
    """

    label: str
    name: str
    options: dict[str, Any]

    def build(self) -> BaseMethod:
        """A new method instance with these options."""
        from samkv_integrations.methods import METHODS

        return METHODS[self.name](**self.options)


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if "/" in raw:
        try:
            return tuple(int(part) for part in raw.split("/"))
        except ValueError:
            raise ValueError(f"{raw!r}: a '/'-separated list must hold integers") from None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def parse_spec(label: str) -> MethodSpec:
    """Parse and validate one spec, ``name[+option=value...]``, without loading any model.

    Raises:
        ValueError: An unknown method or option, or an invalid value; the message names it.
    """
    from samkv_integrations.methods import METHODS

    name, *pairs = label.split("+")
    if name not in METHODS:
        raise ValueError(
            f"methods: unknown method {name!r} in {label!r}; choose from {', '.join(METHODS)}"
        )
    cls = METHODS[name]
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.init}
    known = list(fields)
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"methods: option {pair!r} of {label!r} is not key=value")
        if key not in known:
            choices = ", ".join(known) if known else "none"
            raise ValueError(
                f"methods: unknown option {key!r} of {name!r} in {label!r}; options: {choices}"
            )
        try:
            value = _parse_value(raw)
        except ValueError as e:
            raise ValueError(f"methods: option {key!r} of {label!r}: {e}") from None
        # A one-element list has no '/': read it as a tuple where the field is one.
        if type(value) is int and str(fields[key]).startswith("tuple"):
            value = (value,)
        options[key] = value
    try:
        cls(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"methods: {label!r}: {e}") from e
    return MethodSpec(label, name, options)


def parse_methods(methods: str | Sequence[str], *, reference: bool = True) -> list[MethodSpec]:
    """Parse and validate method specs (comma-separated), without loading any model.

    Options are ``+key=value``; values are read as bool (``true``/``false``), int, float,
    a tuple of ints (``-1/-2/-3``; a lone int for a tuple field) or else a string.
    With ``reference`` (the eval), ``full`` is always evaluated, first: it is the
    reference of ``agree_full`` and ``first_token_kl``; when absent it is added and a
    warning says so. Without it, the specs come back in the order given.

    Raises:
        ValueError: An unknown method or option, an invalid value, or a repeated spec.
    """
    items = [methods] if isinstance(methods, str) else list(methods)
    labels = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not labels:
        raise ValueError("methods: no method given")
    specs = [parse_spec(label) for label in labels]
    repeated = sorted({s.label for s in specs if labels.count(s.label) > 1})
    if repeated:
        raise ValueError(f"methods: repeated {', '.join(repeated)}")
    if not reference:
        return specs
    first = [s for s in specs if s.name == REFERENCE]
    if not first:
        logger.warning(
            "methods: adding %r, the reference that agree_full and KL compare with", REFERENCE
        )
        first = [MethodSpec(REFERENCE, REFERENCE, {})]
    return first + [s for s in specs if s.name != REFERENCE]


def default_methods() -> tuple[str, ...]:
    """The methods of ``DEFAULT_METHODS`` that are registered."""
    from samkv_integrations.methods import METHODS

    return tuple(m for m in DEFAULT_METHODS if m in METHODS)
