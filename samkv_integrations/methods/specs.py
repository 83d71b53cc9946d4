"""Method specs as named on the command line: ``name[+option=value...]``, parsed and validated.

Validation instantiates each method once with its options, so that an unknown method, an
unknown option or a bad value is reported before any model loads. A decoding policy rides
on any method: ``decode=`` and the ``retro_*`` options are peeled off and wrap the built
method in ``RetroMethod`` (e.g. ``samkv+decode=retro+retro_pages=4``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
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
        decoding: The decoding policy's options (``decode`` and ``retro_*``); empty for the
            method's own decoding.
    """

    label: str
    name: str
    options: dict[str, Any]
    decoding: dict[str, Any] = field(default_factory=dict)

    @property
    def all_options(self) -> dict[str, Any]:
        """The method's options and the decoding policy's, as the spec named them."""
        return {**self.options, **self.decoding}

    def build(self) -> BaseMethod:
        """A new method instance with these options, wrapped in its decoding policy if any."""
        from samkv_integrations.methods import METHODS
        from samkv_integrations.methods.retro import RetroMethod

        method = METHODS[self.name](**self.options)
        return RetroMethod(method, **self.decoding) if self.decoding else method

    @property
    def settings(self) -> str:
        """What this label runs: the built method's every option, defaults resolved.

        Records of a run keep it beside the label, so that a default changed since makes
        another run rather than mixing the label's old and new meaning.
        """
        return repr(self.build())


def decoding_options() -> list[str]:
    """The options that belong to the decoding policy rather than to the method."""
    from samkv_integrations.methods.retro import RetroMethod

    return [f.name for f in dataclasses.fields(RetroMethod) if f.init and f.name != "inner"]


def split_decoding(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into the method's and the decoding policy's.

    Raises:
        ValueError: A ``retro_*`` option without ``decode``; the message names it.
    """
    names = decoding_options()
    decoding = {k: v for k, v in options.items() if k in names}
    stray = sorted(k for k in decoding if k != "decode")
    if stray and "decode" not in decoding:
        raise ValueError(f"option {stray[0]!r} needs a decoding policy: add +decode=retro")
    return {k: v for k, v in options.items() if k not in names}, decoding


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
    known = list(fields) + decoding_options()
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
        if type(value) is int and str(fields.get(key)).startswith("tuple"):
            value = (value,)
        options[key] = value
    try:
        method_options, decoding = split_decoding(options)
        spec = MethodSpec(label, name, method_options, decoding)
        spec.build()
    except (TypeError, ValueError) as e:
        raise ValueError(f"methods: {label!r}: {e}") from e
    return spec


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
    # ``full+decode=retro`` decodes differently from the reference: it is not the reference.
    first = [s for s in specs if s.name == REFERENCE and not s.decoding]
    if not first:
        logger.warning(
            "methods: adding %r, the reference that agree_full and KL compare with", REFERENCE
        )
        first = [MethodSpec(REFERENCE, REFERENCE, {})]
    return first + [s for s in specs if s not in first]


def default_methods() -> tuple[str, ...]:
    """The methods of ``DEFAULT_METHODS`` that are registered."""
    from samkv_integrations.methods import METHODS

    return tuple(m for m in DEFAULT_METHODS if m in METHODS)
