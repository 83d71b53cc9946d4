"""Every script in examples/ runs, offline, and the README shows it as it is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    """Run ``examples/<name>`` on a tiny random model with a store in ``tmp_path``."""
    env = {**os.environ, "SAMKV_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--model", "random:tiny-llama", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done.stdout


def test_quickstart_answers_and_streams(tmp_path: Path) -> None:
    out = run_example("quickstart.py", tmp_path, "--store", str(tmp_path / "kv"))
    lines = out.splitlines()
    assert re.fullmatch(r"kept \d+% of \d+ context tokens", lines[-2])
    assert lines[-1].startswith("streamed: ")
    # Indexing stored one cache per document, each a safetensors file and its metadata.
    assert len(list((tmp_path / "kv").rglob("*.safetensors"))) == 2


def test_compare_methods_prints_both_methods(tmp_path: Path) -> None:
    out = run_example(
        "compare_methods.py",
        tmp_path,
        "--store",
        str(tmp_path / "kv"),
        "--method",
        "samkv+budget=0.3",
    )
    headers = [line for line in out.splitlines() if line.startswith("[")]
    assert [h.split("]")[0] for h in headers] == ["[full", "[samkv+budget=0.3"]
    kept = [int(re.search(r"kept (\d+)%", h).group(1)) for h in headers]  # type: ignore[union-attr]
    assert kept[0] == 100 and kept[1] <= 30


def test_every_example_is_run_by_a_test() -> None:
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts, "examples/ holds no scripts"
    missing = [name for name in scripts if f'"{name}"' not in tests_text]
    assert missing == []


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_readme_shows_the_example_as_it_is(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    body = (EXAMPLES / name).read_text()
    assert f"```python\n{body}```" in readme, f"README does not show examples/{name} verbatim"
