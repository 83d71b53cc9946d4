"""The eval run directory: its files, written atomically, and what a resumed run may trust.

``config.json`` is written before the first question, so any predictions a run appends
come after a config that names their run. Rows are reused only under that config
(``check_provenance``), only when it records the same settings (``check_same_run``: data,
methods, model, generation and, for any task but ``qa``, the task and its prompt), and only where the file is consistent (``resume_rows``): a
directory whose ``predictions.jsonl`` has no readable ``config.json`` beside it, or holds
two different rows for one question and method, mixes runs, and resuming it would score
one run's answers under another's labels. Both are errors that name the way out
(``--force`` or another ``--out``) rather than guesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "check_provenance",
    "check_same_run",
    "default_run_name",
    "read_json",
    "resume_rows",
    "write_atomic",
]

logger = logging.getLogger(__name__)

CONFIG_FILE, PREDICTIONS_FILE, METRICS_FILE = "config.json", "predictions.jsonl", "metrics.json"


def default_run_name(
    data: Path,
    model: str,
    limit: int | None,
    chunk_tokens: int | None,
    task: str | None,
    run_id: str,
) -> str:
    """``<data stem>-<model>-n<limit|all>-<c<chunk>|para>[-<task>]-<run id[:8]>``.

    The name is for people (what ran, at a glance); the run id in it is what tells runs
    apart. ``task`` is ``None`` for the default task, whose names predate tasks.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.replace(":", "-")).name or model)
    parts = [
        data.stem,
        slug.strip("-"),
        f"n{limit or 'all'}",
        f"c{chunk_tokens}" if chunk_tokens else "para",
        *([task] if task else []),
        run_id[:8],
    ]
    return "-".join(parts)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when it is missing or unreadable (logged)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return None
    return value if isinstance(value, dict) else None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_provenance(run_dir: Path, config: dict[str, Any] | None) -> None:
    """Refuse predictions that no readable ``config.json`` vouches for.

    Args:
        run_dir: The run directory.
        config: Its ``config.json``, as ``read_json`` read it (``None``: missing or unreadable).

    Raises:
        ValueError: ``predictions.jsonl`` holds rows but ``config`` is ``None``.
    """
    predictions = run_dir / PREDICTIONS_FILE
    if config is None and predictions.is_file() and predictions.stat().st_size > 0:
        raise ValueError(
            f"out: {predictions} has no readable {CONFIG_FILE} beside it, so nothing says which "
            "model, data or methods wrote its rows; pass --force to start over or choose "
            "another --out"
        )


def check_same_run(
    run_dir: Path, config: dict[str, Any], identity: dict[str, Any], run_id: str
) -> None:
    """Refuse a run directory whose ``config.json`` records another run.

    Args:
        run_dir: The run directory.
        config: Its ``config.json``.
        identity: This run's settings that change results (``harness.plan_run``).
        run_id: The hash of ``identity``.

    Raises:
        ValueError: ``config`` has another run id; the message names the settings that
            differ, including those only one side records (a ``summarize`` run records its
            task, a ``qa`` run does not).
    """
    if config.get("run_id") == run_id:
        return
    theirs = config.get("identity")
    theirs = theirs if isinstance(theirs, dict) else {}
    differ = sorted(k for k in identity.keys() | theirs.keys() if theirs.get(k) != identity.get(k))
    raise ValueError(
        f"out: {run_dir} holds another run (differs in {', '.join(differ) or 'run_id'}); "
        "pass --force to overwrite it or choose another --out"
    )


def resume_rows(
    path: Path, question_ids: Sequence[str], labels: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """Rows of the questions every method already answered; rewrites the file to just those.

    A line that is not JSON (the torn last line of an interrupted run) is dropped; the
    same row twice counts once.

    Args:
        path: The run's ``predictions.jsonl``.
        question_ids: The run's questions, in order.
        labels: The run's method labels, in order.

    Returns:
        ``{question id: [row per label]}``, in question order.

    Raises:
        ValueError: Two different rows answer one question for one method.
    """
    if not path.exists():
        return {}
    found: dict[str, dict[str, dict[str, Any]]] = {}
    line_of: dict[tuple[str, str], int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        qid, label = str(row.get("id")), str(row.get("method"))
        earlier = found.setdefault(qid, {}).get(label)
        if earlier is not None and earlier != row:
            raise ValueError(
                f"out: {path} lines {line_of[qid, label]} and {number} give different rows for "
                f"question {qid!r}, method {label!r}: the file mixes runs; pass --force to "
                "start over or choose another --out"
            )
        found[qid][label] = row
        line_of.setdefault((qid, label), number)
    done = {
        qid: [found[qid][label] for label in labels]
        for qid in question_ids
        if all(label in found.get(qid, {}) for label in labels)
    }
    write_atomic(path, "".join(json.dumps(row) + "\n" for rows in done.values() for row in rows))
    if done:
        logger.info(
            "resuming %s: %d of %d questions already answered",
            path.parent,
            len(done),
            len(question_ids),
        )
    return done
