"""benchmarks/paired.py: every method of a run paired with one chosen method."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_differences_are_paired_by_question_on_the_shared_ones(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "method": "base", "contains_gold": i < 4, "f1": 0.5} for i in range(10)]
    # "variant" gains the answer on q4 and q5, answers 3 questions "base" did not, and
    # scores F1 0.25 higher wherever both answered.
    rows += [
        {"id": f"q{i}", "method": "variant", "contains_gold": i < 6, "f1": 0.75} for i in range(13)
    ]
    rows += [
        {"id": f"q{i}", "method": "same", "contains_gold": i < 4, "f1": 0.5} for i in range(10)
    ]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "paired.json"
    done = _run("--predictions", str(predictions), "--against", "base", "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert table["against"] == "base" and set(table["methods"]) == {"variant", "same"}
    variant, same = table["methods"]["variant"], table["methods"]["same"]
    assert variant["n"] == 10 and same["n"] == 10
    assert variant["contains_gold"]["diff"] == 0.2  # 2 of the 10 shared questions gained
    assert variant["contains_gold"]["low"] >= 0.0 and variant["contains_gold"]["high"] <= 0.5
    assert variant["f1"] == {"diff": 0.25, "low": 0.25, "high": 0.25}  # the same gain on each
    assert same["contains_gold"] == same["f1"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["method", "n"]
    assert lines[1].split()[:3] == ["variant", "10", "+20.0"]
    assert lines[2].split() == ["same", "10", "+0.0", "[+0.0,", "+0.0]", "+0.0", "[+0.0,", "+0.0]"]


def test_an_unknown_method_names_the_ones_there(tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"id": "q", "method": m, "contains_gold": True, "f1": 1.0} for m in ("full", "samkv")]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    done = _run("--predictions", str(predictions), "--against", "samkv+budget=0.3")
    assert done.returncode == 2
    assert "--against 'samkv+budget=0.3': no such method" in done.stderr
    assert "it holds full, samkv" in done.stderr


def test_unreadable_input_is_named(tmp_path: Path) -> None:
    missing = _run("--predictions", str(tmp_path / "none.jsonl"), "--against", "samkv")
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
    broken = tmp_path / "predictions.jsonl"
    broken.write_text('{"id": "q", "method": "samkv"}\n{"id": "q"}\n', encoding="utf-8")
    done = _run("--predictions", str(broken), "--against", "samkv")
    assert done.returncode == 2 and "predictions.jsonl:2: not a prediction record" in done.stderr
    alone = tmp_path / "alone.jsonl"
    alone.write_text('{"id": "q", "method": "samkv"}\n', encoding="utf-8")
    done = _run("--predictions", str(alone), "--against", "samkv")
    assert done.returncode == 2 and "holds no method but 'samkv'" in done.stderr
