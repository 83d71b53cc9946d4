"""``samkv eval``: measure methods' answers against full recompute on a question-answering file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from samkv_integrations.cli import add_engine_arguments, method_specs
from samkv_integrations.eval.harness import EvalConfig, execute_run, plan_run
from samkv_integrations.methods.specs import default_methods
from samkv_integrations.models.registry import DEFAULT_MODEL

_EPILOG = """\
data formats (detected per file):
  generic   {"id", "question", "contexts": [{"title", "text"}], "answers": [str]}
  HotpotQA  IRCoT format: question_id, question_text, answers_objects[0].spans,
            contexts[] with title, paragraph_text
  Each paragraph becomes the document text "<title>\\n<text>".

methods:
  Comma-separated; options follow a '+': samkv+ranking=global+update=fusion.
  Values are read as true/false, int, float, a '/'-separated list of ints
  (selection_layers=-1/-2/-3/-4) or a string. The label in every output is the whole
  spec. 'full' is the reference of agree_full and first_token_kl: it is added when absent.

generation:
  Greedy, at most --max-new-tokens tokens, cut at the first newline (HotpotQA answers are
  short spans; what a small model adds after a newline is commentary). A question whose
  prompt does not fit the model's context is skipped by every method, with a warning, and
  listed under "skipped_too_long" in metrics.json.

run directory:
  Without --out: <runs-root>/<data stem>-<model>-n<limit|all>-<c<chunk>|para>-<run id>,
  where the run id hashes the settings that change results (data sha256, methods, model,
  device, limit, chunk size, generation). A second identical run is SKIPPED: it prints the
  stored metrics and exits 0. An interrupted run is resumed: questions every method
  already answered are kept. --force starts the directory over. An --out directory that
  holds a different run is an error (without --force).
  Files: config.json, predictions.jsonl (one line per question per method), metrics.json
  (written atomically, last).
"""

_COLUMNS = (
    ("method", None),
    ("n", "n"),
    ("F1", "f1"),
    ("EM", "em"),
    ("contains", "contains_gold"),
    ("agree_full", "agree_full"),
    ("KL_first", "first_token_kl"),
    ("kept", "kept_fraction"),
    ("recomputed", "recomputed_fraction"),
    ("TTFT_med_ms", "ttft_s_median"),
    ("TTFT_p90_ms", "ttft_s_p90"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``samkv eval`` arguments to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("--data", required=True, type=Path, help="JSON Lines question file")
    parser.add_argument(
        "--methods",
        type=method_specs,
        default=",".join(default_methods()),
        metavar="SPECS",
        help="comma-separated method specs name[+option=value...] (default: %(default)s)",
    )
    add_engine_arguments(parser, model_default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions")
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="pack consecutive paragraphs, in order, into documents of at most N tokens "
        "(as the engine frames them); a paragraph longer than N is never split and becomes "
        "a document of its own (default: one paragraph per document)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="answer length cap (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=None, help="run directory (see below)")
    parser.add_argument(
        "--runs-root",
        type=Path,
        default=Path("runs/eval"),
        help="parent of default run directories (default: %(default)s)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun even if the run directory is complete"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _cell(key: str | None, label: str, row: dict[str, Any]) -> str:
    if key is None:
        return label
    value = row.get(key)
    if value is None:
        return "-"
    if key == "n":
        return str(value)
    if key.startswith("ttft"):
        return f"{value * 1000:.0f}"
    if key == "first_token_kl" and 0 < value < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4f}" if key == "first_token_kl" else f"{value:.3f}"


def format_table(metrics: dict[str, Any]) -> str:
    """The per-method metrics as an aligned text table."""
    rows = [[title for title, _ in _COLUMNS]]
    for label, row in metrics["methods"].items():
        rows.append([_cell(key, label, row) for _, key in _COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``samkv eval``; return the exit status (2 for bad arguments, 1 for a failed run)."""
    try:
        config = EvalConfig(
            data=args.data,
            methods=args.methods,
            model=args.model,
            device=args.device,
            limit=args.limit,
            chunk_tokens=args.chunk_tokens,
            max_new_tokens=args.max_new_tokens,
            out=args.out,
            runs_root=args.runs_root,
            store=args.store,
            force=args.force,
            progress=not args.no_progress,
        )
        plan = plan_run(config)
    except ValueError as e:
        print(f"samkv eval: error: {e}", file=sys.stderr)
        return 2
    if plan.completed is not None:
        print(f"skipped: {plan.run_dir} already holds this run's metrics (--force reruns it)")
    start = time.perf_counter()
    try:
        metrics = execute_run(plan)
    except ValueError as e:
        print(f"samkv eval: error: {e}", file=sys.stderr)
        return 1
    skipped = metrics.get("skipped_too_long") or []
    note = f" ({len(skipped)} skipped: too long for the model)" if skipped else ""
    print(f"{metrics['model']} on {metrics['data']}: {metrics['n']} questions{note}")
    print(format_table(metrics))
    if plan.completed is None:
        print(f"wrote {plan.run_dir} in {time.perf_counter() - start:.1f}s")
    return 0
