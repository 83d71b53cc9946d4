"""examples/llamaindex_chroma.py runs offline on a tiny random model, and re-runs incrementally."""

from __future__ import annotations

import ast
import runpy
from collections.abc import Iterator
from pathlib import Path

import pytest
from chromadb.api.client import SharedSystemClient

from samkv_integrations import KVCacheStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llamaindex_chroma.py"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SAMKV_HOME", str(tmp_path / "samkv-home"))
    yield tmp_path / "example"
    SharedSystemClient.clear_system_cache()


def run(home: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, object]]:
    main = runpy.run_path(str(EXAMPLE))["main"]
    args = ["--model", "random:tiny-llama", "--embed", "mock", "--home", str(home)]
    main([*args, "--max-new-tokens", "4"])
    ingested, *_, stats = capsys.readouterr().out.strip().splitlines()
    return ingested, ast.literal_eval(stats)


def test_the_example_ingests_once_answers_from_caches_and_upserts(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ingested, stats = run(home, capsys)
    assert ingested == "ingested 3 new or changed chunks"
    assert stats["method"] == "samkv" and stats["recomputed_documents"] == 0
    assert run(home, capsys)[0] == "ingested 0 new or changed chunks"

    (home / "docs" / "novel.txt").write_text("The Velvet Compass was written by Ada Berg.")
    ingested, stats = run(home, capsys)
    assert ingested == "ingested 1 new or changed chunks"
    assert stats["recomputed_documents"] == 0
    assert len(KVCacheStore(home / "kvcache").entries()) == 3  # the old chunk's cache is gone
