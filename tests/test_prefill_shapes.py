"""The prefill-shapes diagnostic runs on a tiny shape and times every case in both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prefill_shapes_times_each_case_with_cudnn_off_and_on(tmp_path: Path) -> None:
    out = tmp_path / "shapes.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "prefill_shapes.py"), "--shape",
               "tiny-llama", "--device", "cpu", "--workload", "3x40", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["prefill_ms"]) == {"engine", "cudnn"}
    for times in report["prefill_ms"].values():
        assert len(times["repeated_shape"]) == 4 and len(times["new_thread_each"]) == 4
        assert len(times["new_question_lengths"]) == 5
        assert set(times["new_document_counts"]) == {"1", "2", "4", "5"}  # 3 documents, plus 2
        assert all(ms > 0 for ms in times["repeated_shape"] + times["new_thread_each"])
