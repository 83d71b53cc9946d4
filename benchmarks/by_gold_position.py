"""Contains-gold rate per method by where the gold passage sits in the prompt.

A RAG prompt's documents are laid out in order; a selection that favours the documents
nearest the question loses most when the answer is early. For each question of a generic-
format data file (``contexts`` with ``text``, ``answers``), the gold position is the first
context that contains a gold answer (case-insensitive), as ``nq_dev_300_30doc.jsonl`` is
built; questions are bucketed by that position and each method's ``contains_gold`` from a
run's ``predictions.jsonl`` is averaged per bucket.

Run: python benchmarks/by_gold_position.py --data DATA.jsonl --predictions RUN/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def gold_positions(data: Path) -> dict[str, int | None]:
    """Question id -> index of the first context holding a gold answer (None: none does)."""
    positions: dict[str, int | None] = {}
    for line in data.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers = [a.lower() for a in row["answers"]]
        texts = [c["text"].lower() for c in row["contexts"]]
        positions[str(row["id"])] = next(
            (i for i, text in enumerate(texts) if any(a in text for a in answers)), None
        )
    return positions


def by_bucket(
    predictions: Path, positions: dict[str, int | None], width: int
) -> dict[str, dict[str, tuple[float, int]]]:
    """Method -> bucket label (``"1-10"``, ...) -> (mean contains_gold, questions)."""
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in predictions.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        position = positions.get(str(row["id"]))
        low = None if position is None else position // width * width + 1
        label = "none" if low is None else f"{low}-{low + width - 1}"
        hits[row["method"]][label].append(float(row["contains_gold"]))
    return {
        method: {label: (sum(v) / len(v), len(v)) for label, v in sorted(buckets.items())}
        for method, buckets in hits.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the run's question file")
    parser.add_argument("--predictions", type=Path, required=True, help="predictions.jsonl")
    parser.add_argument("--width", type=int, default=10, help="positions per bucket")
    args = parser.parse_args(argv)
    table = by_bucket(args.predictions, gold_positions(args.data), args.width)
    for method, buckets in table.items():
        cells = "  ".join(f"{label}: {rate:.2f} (n={n})" for label, (rate, n) in buckets.items())
        print(f"{method:<45} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
