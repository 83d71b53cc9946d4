"""The one import guard for this package's Triton kernel modules.

PyTorch's CUDA wheels carry Triton and its CPU wheels do not, so a kernel module is imported
only where Triton is installed and imports; its callers keep an eager path for elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def import_kernels(module: str) -> Any:
    """The kernel module ``module`` (a dotted name), or None without a working Triton.

    Typed ``Any``: the kernels are typed by Triton's JIT, not by Python annotations.
    """
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:  # a Triton that does not import is no Triton
        return None
