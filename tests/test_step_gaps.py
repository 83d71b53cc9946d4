"""The step-gap diagnostic runs on a tiny shape and reports every stamped step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_gaps_reports_the_batched_steps(tmp_path: Path) -> None:
    out = tmp_path / "gaps.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "step_gaps.py"), "--answers", "3",
               "--max-new-tokens", "4", "--documents", "2", "--words", "10", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    # The first answer starts alone (nobody to batch with), then shares the others' steps.
    assert report["steps"] >= 1 and sum(report["batch_sizes"].values()) == report["steps"]
    assert all(1 <= int(size) <= 3 for size in report["batch_sizes"])
    assert report["step_ms_median"] > 0
    assert (report["gap_ms_median"] is None) == (report["steps"] < 2)
