"""The methods that build a decode cache from independently cached documents."""

from typing import Any

from samkv_integrations.methods.base import BaseMethod, ContextCache, DecodeState, MethodInput
from samkv_integrations.methods.cacheblend import CacheBlendMethod
from samkv_integrations.methods.epic import EpicMethod
from samkv_integrations.methods.full import FullMethod
from samkv_integrations.methods.retro import RetroMethod
from samkv_integrations.methods.reuse import ReuseMethod
from samkv_integrations.methods.sagekv import SageKVMethod
from samkv_integrations.methods.samkv import SamKVMethod
from samkv_integrations.methods.specs import MethodSpec, parse_spec, split_decoding

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "BaseMethod",
    "CacheBlendMethod",
    "ContextCache",
    "DecodeState",
    "EpicMethod",
    "FullMethod",
    "MethodInput",
    "MethodSpec",
    "RetroMethod",
    "ReuseMethod",
    "SageKVMethod",
    "SamKVMethod",
    "get_method",
    "parse_spec",
]

#: Registered methods by name.
METHODS: dict[str, type[BaseMethod]] = {
    cls.name: cls
    for cls in (FullMethod, ReuseMethod, CacheBlendMethod, EpicMethod, SamKVMethod, SageKVMethod)
}

#: The method used when none is named.
DEFAULT_METHOD = "samkv"


def get_method(method: str | BaseMethod, **options: Any) -> BaseMethod:
    """A method instance from a spec (``name[+option=value...]``), or one passed through.

    Keyword options are added to the spec's; a bad name, option or value raises
    ``ValueError`` naming it, so callers resolve methods once, when they are constructed.
    """
    if isinstance(method, BaseMethod):
        if options:
            raise ValueError("method options are only accepted with a method spec")
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a spec string or a BaseMethod, got {type(method).__name__}"
        )
    spec = parse_spec(method)
    try:
        merged, decoding = split_decoding({**spec.all_options, **options})
        return MethodSpec(spec.label, spec.name, merged, decoding).build()
    except TypeError as e:
        raise ValueError(f"method {method!r}: {e}") from e
