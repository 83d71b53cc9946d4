"""How this transformers release names the cache argument of ``forward``.

transformers 5.x renames ``past_key_values=`` to ``cache=`` (the old name warns from 5.24
and goes away in 5.40), while the releases before the rename know only the old name and
would silently drop ``cache=`` into ``**kwargs``. Every forward call that passes a cache
asks this module for the name its module's signature actually has.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = ["cache_argument", "with_cache"]

#: Names of the cache parameter, newest first.
_NAMES = ("cache", "past_key_values", "past_key_value")


@functools.cache
def _name_for(module_type: type[torch.nn.Module]) -> str:
    # The deprecation decorators keep the wrapped signature (functools.wraps), so the
    # signature lists the name the current release reads.
    parameters = inspect.signature(module_type.forward).parameters
    for name in _NAMES:
        if name in parameters:
            return name
    raise TypeError(
        f"{module_type.__name__}.forward takes none of {', '.join(_NAMES)}: "
        "this transformers release passes caches in a way samkv-integrations does not know"
    )


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its KV cache."""
    module_type: Any = type(module)  # classes hash by identity; mypy sees Module.__hash__
    return _name_for(module_type)


def with_cache(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass as ``module(..., **with_cache(module, cache))``."""
    return {cache_argument(module): cache}
