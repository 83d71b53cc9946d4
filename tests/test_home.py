"""Cross-process locks under ``$SAMKV_HOME`` (filelock: POSIX and Windows alike)."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from pathlib import Path

import pytest

from samkv_integrations.models import home


def test_file_lock_excludes_a_second_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAMKV_HOME", str(tmp_path))
    times: dict[str, float] = {}

    def second() -> None:
        with home.file_lock("model"):
            times["acquired"] = time.monotonic()

    with home.file_lock("model"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        times["released"] = time.monotonic()
    thread.join(timeout=10)
    assert times["acquired"] >= times["released"]
    assert (tmp_path / "locks" / "model.lock").exists()
    with home.file_lock("model"), home.file_lock("other"):  # other names do not wait
        pass


def test_home_imports_where_fcntl_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: importing it fails
    try:
        importlib.reload(home)
    finally:
        monkeypatch.undo()
        importlib.reload(home)
