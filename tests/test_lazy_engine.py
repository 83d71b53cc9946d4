"""LazyEngine builds the engine once, on first use, whichever thread asks first."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.lazy_engine import LazyEngine
from samkv_integrations.models import LoadedModel


def test_nothing_is_built_until_asked(tmp_path: Path) -> None:
    lazy = LazyEngine(str(tmp_path / "no-such-model"), str(tmp_path / "kv"))
    assert not lazy.built
    with pytest.raises(ValueError, match="does not exist"):
        lazy.get()
    assert not lazy.built  # a failed build is retried on the next call


def test_concurrent_first_calls_build_once(
    monkeypatch: pytest.MonkeyPatch, talkative_llama: LoadedModel
) -> None:
    calls: list[tuple[Any, ...]] = []

    def slow_build(*args: Any, **kwargs: Any) -> SamKVEngine:
        calls.append((*args, *kwargs.values()))
        time.sleep(0.05)  # long enough for every thread to arrive while building
        return SamKVEngine(talkative_llama, KVCacheStore("memory://lazy"))

    monkeypatch.setattr(SamKVEngine, "from_pretrained", slow_build)
    lazy = LazyEngine("some-model", "memory://lazy", "cpu", "float32")
    start = threading.Barrier(8)
    got: list[SamKVEngine] = []

    def ask() -> None:
        start.wait()
        got.append(lazy.get())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [("some-model", "memory://lazy", "cpu", "float32")]
    assert len(got) == 8 and all(engine is got[0] for engine in got)
    assert lazy.built and lazy.get() is got[0]


def test_of_hands_out_the_given_engine(talkative_llama: LoadedModel) -> None:
    engine = SamKVEngine(talkative_llama, KVCacheStore("memory://lazy-of"))
    lazy = LazyEngine.of(engine)
    assert lazy.built and lazy.get() is engine
    with pytest.raises(ValueError, match="engine"):
        LazyEngine.of("not an engine")  # type: ignore[arg-type]
