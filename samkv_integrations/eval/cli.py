"""``samkv eval``: measure methods' answers against full recompute on a question-answering file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from samkv_integrations.cli import add_engine_arguments, int_at_least, method_specs, not_empty
from samkv_integrations.eval.curves import CURVES_JSON, CURVES_PNG, Sweep
from samkv_integrations.eval.harness import EvalConfig, execute_run, plan_run
from samkv_integrations.eval.tasks import DEFAULT_TASK, SUMMARIZE_TEMPLATE, TASKS
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

comparison with full:
  dF1 and dcontains are each method's mean difference from full, question by question,
  with a 95%% percentile bootstrap interval (2000 resamples of the questions, seed 0): an
  interval that holds 0 is a difference this sample cannot tell from none.

sweep:
  --sweep budget=0.05,0.15,0.3 runs every method of --methods but full once per value
  (samkv+budget=0.05, ...) and writes curves.json and curves.png into the run directory:
  per method, the kept fraction against F1 and contains and their differences from full
  with intervals. Every method swept must have the option. Needs matplotlib (the 'plot'
  extra).

generation:
  Greedy, at most --max-new-tokens tokens; with --task qa cut at the first newline
  (HotpotQA answers are short spans; what a small model adds after a newline is
  commentary). A question whose prompt does not fit the model's context is skipped by
  every method, with a warning, and listed under "skipped_too_long" in metrics.json.

tasks:
  qa         (default) the question as written; %(qa_tokens)d new tokens, cut at the
             first newline.
  summarize  each question becomes the prompt
               "%(template)s"
             over the same documents, answered in %(summarize_tokens)d new tokens (an
             explicit --max-new-tokens wins) with no newline cut: the answer runs to end
             of sequence or the cap. Gold-answer metrics are still computed, but the
             table leads with the answer's agreement with full's. The task is part of
             the run's identity (a run directory of the other task is never resumed)
             and of the default directory name.

agreement with full's answer (metrics.json, every task):
  rouge_l_full           ROUGE-L F1 (Lin, 2004): longest common subsequence of the
                         normalised words of the answer and of full's answer.
  token_agreement_full   fraction of full's answer tokens that the answer has at the
                         same position.
  prefix_agreement_full  length of the common token prefix / length of full's answer.
  Full scores 1 on all three; the others' means come with a 95%% bootstrap interval
  over questions. The table shows them for --task summarize, for --max-new-tokens >=
  %(long)d, or with --agreement-columns.

workers:
  --workers N starts N processes, each loading the model onto --device once and answering
  whole questions (every method) as they take them from a shared queue; the parent writes
  the run directory and prints the table. Decoding short answers is launch-bound, so
  several workers keep one GPU busy; results do not depend on N (TTFTs include their
  contention: measure speed with samkv bench). On NVIDIA GPUs the MPS daemon
  (nvidia-cuda-mps-control -d, started by you) lets the workers' kernels run
  concurrently. An error in any worker stops them all and is reported once.

run directory:
  Without --out: <runs-root>/<data stem>-<model>-n<limit|all>-<c<chunk>|para>[-<task>]-
  <run id> (the task only when not qa), where the run id hashes the settings that change
  results (data sha256, methods and every option each one ran with, defaults included,
  model, device, limit, chunk size, generation, task). A
  second identical run is SKIPPED: it prints the stored metrics and exits 0. An
  interrupted run is resumed: questions every method already answered are kept. --force
  starts the directory over. An --out directory that holds a different run is an error
  (without --force).
  Files: config.json, predictions.jsonl (one line per question per method), metrics.json
  (written atomically, last).
"""

#: What ``samkv`` adds to "interrupted": an interrupted run resumes where it stopped.
INTERRUPT_HINT = "; run the same command again to resume"

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
    ("dF1 [95% CI]", "vs_full.f1"),
    ("dcontains [95% CI]", "vs_full.contains_gold"),
)
#: Scores against full's answer, with their bootstrap intervals (``metrics.mean_interval``).
_AGREEMENT_COLUMNS = (
    ("ROUGE-L_full [95% CI]", "intervals.rouge_l_full"),
    ("tok_agree_full [95% CI]", "intervals.token_agreement_full"),
    ("prefix_full", "prefix_agreement_full"),
)
#: From this answer length on, the table shows ``_AGREEMENT_COLUMNS`` without being asked:
#: answers this long rarely match full's whole, so agree_full alone says little.
LONG_ANSWER_TOKENS = 64


def _sweep(text: str) -> str:
    try:
        Sweep.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _path(text: str) -> Path:
    # An empty path would be the current directory.
    return Path(not_empty(text))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``samkv eval`` arguments to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG % {
        "template": SUMMARIZE_TEMPLATE,
        "long": LONG_ANSWER_TOKENS,
        "qa_tokens": TASKS["qa"].max_new_tokens,
        "summarize_tokens": TASKS["summarize"].max_new_tokens,
    }
    parser.add_argument("--data", required=True, type=_path, help="JSON Lines question file")
    parser.add_argument(
        "--methods",
        type=method_specs,
        default=",".join(default_methods()),
        metavar="SPECS",
        help="comma-separated method specs name[+option=value...] (default: %(default)s)",
    )
    add_engine_arguments(parser, model_default=DEFAULT_MODEL)
    parser.add_argument(
        "--limit", type=int_at_least(1), default=None, help="evaluate the first N questions"
    )
    parser.add_argument(
        "--chunk-tokens",
        type=int_at_least(1),
        default=None,
        help="pack consecutive paragraphs, in order, into documents of at most N tokens "
        "(as the engine frames them); a paragraph longer than N is never split and becomes "
        "a document of its own (default: one paragraph per document)",
    )
    parser.add_argument(
        "--task",
        choices=tuple(TASKS),
        default=DEFAULT_TASK,
        help="what is asked about each question (see below; default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=None,
        help="answer length cap (default: "
        + ", ".join(f"{t.max_new_tokens} for --task {t.name}" for t in TASKS.values())
        + ")",
    )
    parser.add_argument(
        "--agreement-columns",
        action="store_true",
        help="show ROUGE-L and token agreement with full's answer in the table whatever the "
        "task and answer length",
    )
    parser.add_argument("--out", type=_path, default=None, help="run directory (see below)")
    parser.add_argument(
        "--runs-root",
        type=_path,
        default=Path("runs/eval"),
        help="parent of default run directories (default: %(default)s)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun even if the run directory is complete"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--discard-kv",
        action="store_true",
        help="delete each question's document caches from the store once every method has "
        "answered it (long sets on larger models otherwise leave tens of GB; a rerun "
        "encodes them again)",
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=1,
        help="processes sharing the device, each with its own copy of the model (see "
        "below; default: %(default)s, in this process)",
    )
    parser.add_argument(
        "--sweep",
        type=_sweep,
        default=None,
        metavar="OPTION=V1,V2,...",
        help="run each method but full once per value of OPTION and draw accuracy against "
        "kept fraction into curves.json and curves.png (see below)",
    )


def _cell(key: str | None, label: str, row: dict[str, Any]) -> str:
    if key is None:
        return label
    if key.startswith("vs_full."):
        interval = (row.get("vs_full") or {}).get(key.removeprefix("vs_full."))
        if interval is None:
            return "-"
        return f"{interval['diff']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"
    if key.startswith("intervals."):
        name = key.removeprefix("intervals.")
        interval = (row.get("intervals") or {}).get(name)
        if interval is None:  # the reference (1 by definition) or no rows: the mean alone
            return _cell(name, label, row)
        return f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"
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


def _columns(metrics: dict[str, Any], agreement: bool) -> tuple[tuple[str, str | None], ...]:
    if metrics.get("task", DEFAULT_TASK) != DEFAULT_TASK:
        # Long-answer tasks have no gold text worth leading with: agreement with full first.
        return _COLUMNS[:2] + _AGREEMENT_COLUMNS + _COLUMNS[2:]
    if agreement or (metrics.get("max_new_tokens") or 0) >= LONG_ANSWER_TOKENS:
        return _COLUMNS + _AGREEMENT_COLUMNS
    return _COLUMNS


def format_table(metrics: dict[str, Any], *, agreement: bool = False) -> str:
    """The per-method metrics as an aligned text table.

    Args:
        metrics: ``metrics.json``'s content.
        agreement: Show the agreement-with-full columns (ROUGE-L, token agreement) even for
            a ``qa`` run with answers shorter than ``LONG_ANSWER_TOKENS``; a ``summarize``
            run always leads with them.
    """
    columns = _columns(metrics, agreement)
    rows = [[title for title, _ in columns]]
    for label, row in metrics["methods"].items():
        rows.append([_cell(key, label, row) for _, key in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``samkv eval``; return the exit status.

    Raises:
        ValueError: A bad data file, run directory or question (``samkv`` prints it).
    """
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
        sweep=args.sweep,
        workers=args.workers,
        task=args.task,
        discard_kv=args.discard_kv,
    )
    plan = plan_run(config)
    if plan.completed is not None:
        print(f"skipped: {plan.run_dir} already holds this run's metrics (--force reruns it)")
    start = time.perf_counter()
    metrics = execute_run(plan)
    skipped = metrics.get("skipped_too_long") or []
    note = f" ({len(skipped)} skipped: too long for the model)" if skipped else ""
    print(f"{metrics['model']} on {metrics['data']}: {metrics['n']} questions{note}")
    print(format_table(metrics, agreement=args.agreement_columns))
    if plan.completed is None:
        print(f"wrote {plan.run_dir} in {time.perf_counter() - start:.1f}s")
    if plan.sweep is not None:
        print(f"curves: {plan.run_dir / CURVES_JSON}, {plan.run_dir / CURVES_PNG}")
    return 0
