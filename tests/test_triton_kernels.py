"""``import_kernels``: a kernel module only where Triton is installed and the module imports."""

from __future__ import annotations

import importlib.util
import json

import pytest

from samkv_integrations import triton_kernels
from samkv_integrations.triton_kernels import import_kernels


def test_without_triton_nothing_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(triton_kernels.importlib, "import_module", lambda name: pytest.fail(name))
    assert import_kernels("json") is None


def test_with_triton_the_module_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert import_kernels("json") is json


def test_a_module_that_fails_to_import_counts_as_no_triton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert import_kernels("samkv_integrations.no_such_kernels") is None
