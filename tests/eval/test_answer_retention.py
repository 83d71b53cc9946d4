"""benchmarks/answer_retention.py: whether each method's kept tokens hold a gold answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "answer_retention.py"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, check=False
    )


def test_full_keeps_every_answer_and_a_rerun_resumes(tmp_path: Path, data: Path) -> None:
    out, summary = tmp_path / "rows.jsonl", tmp_path / "summary.json"
    argv = [
        "--data", str(data), "--model", "random:tiny-llama", "--methods",
        "full,samkv+budget=0.001+n_init=0+n_local=0", "--chunk-tokens", "0",
        "--store", str(tmp_path / "store"), "--out", str(out), "--summary", str(summary),
    ]  # fmt: skip
    done = _run(*argv)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    full = [r for r in rows if r["method"] == "full"]
    assert [r["answer_kept"] for r in full] == [1.0, 1.0]
    assert all(r["kept_fraction"] == 1.0 for r in full)
    # "London" sits in the first paragraph of q1, "Seine" in both of q2's.
    assert [r["gold_document"] for r in full] == [0, 0]
    sparse = [r for r in rows if r["method"] != "full"]
    assert [(r["kept_fraction"], r["answer_kept"]) for r in sparse] == [(0.0, 0.0)] * 2
    report = json.loads(summary.read_text())["methods"]
    assert report["full"]["answer_kept"]["mean"] == 1.0
    assert report["full"]["by_gold_document"] == {"0": {"n": 2, "answer_kept": 1.0}}
    assert report[sparse[0]["method"]]["vs_first"]["diff"] == -1.0
    again = _run(*argv)
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 4, "the rows already there are not recomputed"
    # Rows of a label that ran with other settings (a default changed since) are refused.
    rows[-1]["method_settings"] = "SamKVMethod(budget=0.5)"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = _run(*argv)
    assert refused.returncode != 0 and "run as SamKVMethod(budget=0.5), now" in refused.stderr


def test_kept_runs_are_decoded_apart() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from answer_retention import kept_text
    finally:
        sys.path.remove(str(SCRIPT.parent))

    class Words:
        def decode(self, ids: list[int]) -> str:
            return " ".join(f"w{i}" for i in ids)

    assert kept_text(Words(), [10, 11, 12, 13, 14, 15], [5, 0, 1, 3]) == ["w10 w11", "w13", "w15"]
