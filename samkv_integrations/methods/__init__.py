"""The methods that build a decode cache from independently cached documents."""

from typing import Any

from samkv_integrations.methods.base import BaseMethod, ContextCache, MethodInput
from samkv_integrations.methods.cacheblend import CacheBlendMethod
from samkv_integrations.methods.epic import EpicMethod
from samkv_integrations.methods.full import FullMethod
from samkv_integrations.methods.reuse import ReuseMethod
from samkv_integrations.methods.samkv import SamKVMethod

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "BaseMethod",
    "CacheBlendMethod",
    "ContextCache",
    "EpicMethod",
    "FullMethod",
    "MethodInput",
    "ReuseMethod",
    "SamKVMethod",
    "get_method",
]

#: Registered methods by name.
METHODS: dict[str, type[BaseMethod]] = {
    cls.name: cls for cls in (FullMethod, ReuseMethod, CacheBlendMethod, EpicMethod, SamKVMethod)
}

#: The method used when none is named.
DEFAULT_METHOD = "samkv"


def get_method(method: str | BaseMethod, **options: Any) -> BaseMethod:
    """Return a method instance from its name (with hyperparameters) or pass one through."""
    if isinstance(method, BaseMethod):
        if options:
            raise ValueError("method options are only accepted with a method name")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[method](**options)
