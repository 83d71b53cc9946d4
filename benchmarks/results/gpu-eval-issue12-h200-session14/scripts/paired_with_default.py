"""Paired bootstrap of each resident variant against the default samkv of the same run.

Run from the repository root: ``python benchmarks/results/gpu-eval-issue12-h200-session14/scripts/paired_with_default.py``.
Differences in points (variant minus default), 95% interval, 2,000 resamples, seed 0: the
eval's own ``paired_bootstrap``.
"""

import json
from collections import defaultdict
from pathlib import Path

from samkv_integrations.eval.metrics import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("samkv+budget=0.2+resident=0.15", "samkv+budget=0.3+resident=0.15")

for run in ("nq15-resident", "hl15-resident", "nq05-resident"):
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in (ROOT / run / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["method"]][row["id"]] = row
    default = rows["samkv"]
    for variant in VARIANTS:
        ids = sorted(default)
        for key in ("contains_gold", "f1"):
            diffs = [float(rows[variant][i][key]) - float(default[i][key]) for i in ids]
            b = paired_bootstrap(diffs)
            assert b is not None
            print(
                f"{run:14s} {variant:32s} {key:13s} "
                f"{100 * b['diff']:+.1f} [{100 * b['low']:+.1f}, {100 * b['high']:+.1f}]"
            )
