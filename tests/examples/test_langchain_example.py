"""examples/langchain_chroma_rag.py runs offline on a tiny random model, and re-runs without
encoding anything again. It runs as a script, in a fresh interpreter, as a reader runs it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from samkv_integrations import KVCacheStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(tmp_path: Path) -> tuple[list[str], dict[str, object]]:
    home = tmp_path / "example"
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "langchain_chroma_rag.py"),
            *("--model", "random:tiny-llama", "--embed", "mock", "--home", str(home)),
            *("--max-new-tokens", "4"),
        ],
        cwd=tmp_path,
        env={**os.environ, "SAMKV_HOME": str(tmp_path / "samkv-home"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *lines, stats = done.stdout.strip().splitlines()
    return lines, ast.literal_eval(stats)


def test_the_example_answers_from_caches_and_reruns_without_encoding(tmp_path: Path) -> None:
    lines, stats = run(tmp_path)
    sources = [line for line in lines if line.startswith("sources: ")]
    assert len(sources) == 1
    assert len(ast.literal_eval(sources[0].removeprefix("sources: "))) == 2
    assert stats["method"] == "samkv"
    assert stats["recomputed_documents"] == 0  # the placeholder prompt found the caches
    assert isinstance(stats["cache_read"], int) and stats["cache_read"] > 0
    store = tmp_path / "example" / "kvcache"
    created = {e.key: e.created for e in KVCacheStore(store).entries()}
    assert len(created) == 3  # one cache per document

    assert run(tmp_path)[1]["recomputed_documents"] == 0
    assert {e.key: e.created for e in KVCacheStore(store).entries()} == created  # none again
