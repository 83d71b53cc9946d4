"""Plot TTFT and KV memory against context length per method from one bench JSON.

Usage: ``python benchmarks/plot.py RESULT.json [MORE.json ...] OUT.png`` (needs matplotlib, which the
project's .venv does not carry; the GPU machine has it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(sources: list[str], target: str) -> None:
    reports = [json.loads(Path(source).read_text()) for source in sources]
    report = reports[0]
    series: dict[str, list[tuple[int, float, float, float]]] = {}
    for work in (w for r in reports for w in r["workloads"]):
        for method, r in work["methods"].items():
            if "error" not in r:
                point = (
                    work["context_tokens"],
                    r["ttft_s"] * 1000,
                    r["kv_bytes"] / 2**30,
                    r.get("decode_tokens_per_s_max_batch") or 0.0,
                )
                series.setdefault(method, []).append(point)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, points in series.items():
        points.sort()
        x = [p[0] for p in points]
        for ax, column in zip(axes, (1, 2, 3), strict=True):
            ax.plot(x, [p[column] for p in points], marker="o", label=method)
    titles = (
        "time to first token (ms)",
        "KV held for decoding (GiB)",
        "decode tokens/s, largest batch",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    env = report["environment"]
    fig.suptitle(f"{report['model']['name']} ({report['model']['dtype']}) on {env['device']}")
    fig.tight_layout()
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
