"""The bench report: medians, ratios against ``full``, printed tables."""

from __future__ import annotations

import platform
import statistics
from typing import Any

import torch
import transformers

#: Ratio fields: (name in the JSON, measurement field). Each is method / full.
RATIO_FIELDS = (
    ("ttft", "ttft_s"),
    ("kv_bytes", "kv_bytes"),
    ("peak_memory", "peak_memory_bytes"),
    ("decode_batch1", "decode_tokens_per_s_batch1"),
    ("decode_max_batch", "decode_tokens_per_s_max_batch"),
)


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each method's measurements over ``full``'s from the same run (empty without ``full``)."""
    full = results.get("full")
    if full is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for method, result in results.items():
        out[method] = {}
        for name, key in RATIO_FIELDS:
            num, den = result.get(key), full.get(key)
            out[method][name] = num / den if num is not None and den else None
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """Device and library versions."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "device_type": device.type,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def print_report(report: dict[str, Any]) -> None:
    """Print one table per workload, with ratios against ``full``."""
    print(f"# {report['model']['name']} on {report['environment']['device']}")
    print(
        "(phases in ms; on CUDA each is its span on the device's timeline, and `load` is the "
        "fetch and queueing: for samkv the transfer to the GPU runs under `select`)"
    )
    for work in report["workloads"]:
        tokens, index_s = work["context_tokens"], work["index_s"]
        print(f"\n## {work['workload']} ({tokens} context tokens, indexed in {index_s:.2f} s)")
        # Methods are keyed by spec (``samkv+budget=0.15``): the first column fits the longest.
        width = max([11, *(len(m) + 1 for m in work["methods"])])
        print(
            f"{'method':<{width}}{'TTFT ms':>9}{'x full':>8}{'load':>8}{'assem':>8}{'select':>8}"
            f"{'recomp':>8}{'quest':>8}{'kept':>6}{'KV':>11}{'x full':>7}{'peak':>11}"
            f"{'tok/s b1':>10}{'B':>5}{'tok/s B':>10}{'x full':>7}"
        )
        for method, r in work["methods"].items():
            if "error" in r:
                print(f"{method:<{width}}failed: {r['error']}")
                continue
            ratio = work["ratios"].get(method, {})
            phases = r["phases"]

            def ms(name: str, phases: dict[str, float] = phases) -> str:
                return f"{phases[name] * 1000:.1f}" if name in phases else "-"

            def x(name: str, ratio: dict[str, float | None] = ratio) -> str:
                value = ratio.get(name)
                return "-" if value is None else f"{value:.3f}"

            print(
                f"{method:<{width}}{r['ttft_s'] * 1000:>9.1f}{x('ttft'):>8}{ms('load'):>8}"
                f"{ms('assemble'):>8}{ms('select'):>8}{ms('recompute'):>8}{ms('question'):>8}"
                f"{r['kept_fraction']:>6.0%}{_fmt_bytes(r['kv_bytes']):>11}"
                f"{x('kv_bytes'):>7}{_fmt_bytes(r['peak_memory_bytes']):>11}"
                f"{r.get('decode_tokens_per_s_batch1', 0):>10.1f}"
                f"{_or_dash(r.get('decode_max_batch'), 'd'):>5}"
                f"{_or_dash(r.get('decode_tokens_per_s_max_batch'), '.1f'):>10}"
                f"{x('decode_max_batch'):>7}"
            )
        _print_decode_paths(work["methods"])


def _or_dash(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` where there is none (not measured)."""
    return "-" if value is None else format(value, spec)


def _print_decode_paths(methods: dict[str, Any]) -> None:
    """Batch-1 tokens/s per decode path, with the share of the memory bound where known."""
    for method, r in methods.items():
        paths = r.get("decode_paths_batch1")
        if not paths:
            continue
        bound = r.get("decode_memory_bound_tokens_per_s")
        cells = [
            f"{path} {m['tokens_per_s']:.1f} tok/s"
            + (f" ({m['of_memory_bound']:.0%} of bound)" if m["of_memory_bound"] else "")
            + f", first step {m['first_step_s'] * 1000:.0f} ms"
            for path, m in paths.items()
        ]
        limit = f"; bound {bound:.1f} tok/s" if bound else ""
        print(f"  {method} batch 1: " + "; ".join(cells) + limit)


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians of repeated measurements (phases per phase)."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = {k: statistics.median(r[key].get(k, 0.0) for r in runs) for k in first}
        elif isinstance(first, int | float) and not isinstance(first, bool):
            out[key] = statistics.median(r[key] for r in runs)
        else:
            out[key] = first
    return out
