"""The load test script runs end to end on a tiny shape and writes a complete JSON report.

It runs in a subprocess: the demo server listens on a loopback port, which the test
process itself may not open (pytest-socket). Only fields and sanity are checked, never speed.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_load_test_reports_every_round(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "load_test.py"),
        "--shape", "tiny-llama",
        "--device", "cpu",
        "--workload", "2x40",
        "--concurrency", "1,2",
        "--methods", "samkv,full",
        "--max-new-tokens", "3",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "load_test.py" in report["command"] and "--out" in report["command"]
    assert report["device"].startswith("cpu")
    assert (report["shape"], report["workload"], report["max_new_tokens"]) == (
        "tiny-llama",
        "2x40",
        3,
    )
    assert report["min_new_tokens"] == 3  # by default, as many as max_new_tokens
    rounds = {(r["interface"], r["method"], r["concurrency"]): r for r in report["results"]}
    assert set(rounds) == {
        (i, m, n) for i in ("serial", "api", "server") for m in ("samkv", "full") for n in (1, 2)
    }
    for (_, _, n), r in rounds.items():
        assert r["errors"] == [] and r["requests"] == r["completed"] == n
        assert r["generated_tokens"] == 3 * n  # every answer runs to max_new_tokens
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["wall_s"]
        assert r["request_tokens_per_s_p50"] > 0
        assert len(r["timings"]) == n
    for (interface, _, n), r in rounds.items():
        # Only the Python API sees when a prefill ends; one prefill has no interval.
        interval = r["prefill_interval_s"]
        assert (interval is None) == (n == 1 or interface == "server")
        ends = sorted(t["prefilled_s"] for t in r["timings"] if t["prefilled_s"] is not None)
        assert interval is None or interval == pytest.approx(ends[-1] - ends[0])
    for (interface, _, _), r in rounds.items():
        # Whether two answers overlap depends on thread timing; the counts must add up.
        counts = r.get("batched_decode")
        assert (counts is not None) == (interface == "api")
        if counts is not None:
            assert {"steps", "rebuilds", "captures"} <= set(counts)
            assert 0 <= counts["rebuilds"] <= counts["steps"] and counts["captures"] == 0
            if counts["steps"]:  # the stamped steps of the round
                assert 0 <= counts["first_step_s"] <= counts["last_step_end_s"] <= r["wall_s"]
                assert counts["step_ms_median"] > 0 and 1 <= counts["rows_median"] <= 2
                steps = counts["steps_ms"]
                assert len(steps) == counts["steps"]
                assert all(0 <= b <= e and 1 <= rows <= 2 for b, e, rows in steps)
                assert all(a[1] <= b[0] for a, b in itertools.pairwise(steps))
    for (interface, _, _), r in rounds.items():
        # The engine's rounds record each prefill: its phases, and when it ended.
        for timing in r["timings"]:
            if interface == "server":
                assert timing["phases"] is None and timing["prefilled_s"] is None
            else:
                assert timing["prefill_s"] == pytest.approx(sum(timing["phases"].values()))
                assert 0 < timing["prefilled_s"] <= timing["ttft_s"]
    assert {(s["interface"], s["method"], s["concurrency"]) for s in report["speedups"]} == {
        (i, m, n) for i in ("api", "server") for m in ("samkv", "full") for n in (1, 2)
    }
    assert all(s["over_serial"] > 0 for s in report["speedups"])
