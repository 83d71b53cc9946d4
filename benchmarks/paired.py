"""Each method of an eval run against another of the same run, question by question.

``samkv eval`` pairs every method with ``full``; choosing between two settings needs them
paired with each other. For each method of a run's ``predictions.jsonl`` other than
``--against``, this pairs its ``contains_gold`` and ``f1`` with ``--against``'s on the
questions both answered, and prints the mean difference in points with the eval's own 95%
paired bootstrap interval (2,000 resamples, seed 0), as ``metrics.json`` gives ``vs_full``.

Run: python benchmarks/paired.py --predictions RUN/predictions.jsonl --against samkv [--out F]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from samkv_integrations.eval.metrics import compare_with_reference


def paired_with(predictions: Path, against: str) -> dict[str, dict[str, Any]]:
    """Method label -> ``compare_with_reference`` of its rows against ``against``'s rows.

    Raises:
        ValueError: A line is not a prediction record (its number is named), or ``against``
            answered no question in ``predictions`` (the message lists the methods that did).
        OSError: ``predictions`` cannot be read.
    """
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for number, line in enumerate(predictions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["method"]].append(row)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{predictions}:{number}: not a prediction record ({error})") from None
    if against not in rows:
        there = ", ".join(rows) or "no methods"
        raise ValueError(
            f"--against {against!r}: no such method in {predictions}; it holds {there}"
        )
    return {
        label: compare_with_reference(method_rows, rows[against])
        for label, method_rows in rows.items()
        if label != against
    }


def _points(interval: dict[str, float] | None) -> str:
    if interval is None:
        return "-"
    diff, low, high = (100 * interval[k] for k in ("diff", "low", "high"))
    return f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True, help="predictions.jsonl")
    parser.add_argument("--against", required=True, help="the method label to pair with")
    parser.add_argument("--out", type=Path, help="also write the differences as JSON here")
    args = parser.parse_args(argv)
    try:
        table = paired_with(args.predictions, args.against)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if not table:
        parser.error(f"{args.predictions} holds no method but {args.against!r} to pair with it")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: its folder does not exist")
    width = max([len(label) for label in table] + [6])
    print(f"{'method':<{width}}  {'n':>4}  {'dcontains [95% CI]':>22}  {'dF1 [95% CI]':>22}")
    for label, pair in table.items():
        contains, f1 = _points(pair["contains_gold"]), _points(pair["f1"])
        print(f"{label:<{width}}  {pair['n']:>4}  {contains:>22}  {f1:>22}")
    if args.out is not None:
        args.out.write_text(
            json.dumps({"against": args.against, "methods": table}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
