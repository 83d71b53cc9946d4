"""benchmarks/by_gold_position.py: questions bucketed by where their gold passage sits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "by_gold_position.py"


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rates_per_gold_position_bucket(tmp_path: Path) -> None:
    def question(qid: str, gold_at: int | None) -> dict[str, object]:
        texts = ["nothing here"] * 4
        if gold_at is not None:
            texts[gold_at] = "It was Ada Lovelace."
        return {"id": qid, "answers": ["ada lovelace"], "contexts": [{"text": t} for t in texts]}

    data = _write(tmp_path / "data.jsonl", [question("a", 0), question("b", 1), question("c", 3), question("d", None)])  # fmt: skip
    hits = {"a": 1, "b": 0, "c": 1, "d": 0}
    predictions = _write(
        tmp_path / "predictions.jsonl",
        [{"id": q, "method": "m", "contains_gold": bool(h)} for q, h in hits.items()],
    )
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(data), "--predictions", str(predictions),
         "--width", "2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # Positions 0 and 1 fall in 1-2 (one of two hits), 3 in 3-4, and "d" has no gold.
    assert out.stdout.split() == ["m", "1-2:", "0.50", "(n=2)", "3-4:", "1.00", "(n=1)", "none:", "0.00", "(n=1)"]  # fmt: skip
