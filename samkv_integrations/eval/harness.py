"""The eval loop: answer every question with every method and score them against full recompute.

A run directory holds three files:

- ``config.json``: the run's settings, model name and fingerprint, data sha256, library
  versions and a timestamp, written (atomically) before the first question;
- ``predictions.jsonl``: one line per question per method, appended as each question
  completes;
- ``metrics.json``: the per-method summary, written atomically once every question is done;
  each method's F1 and contains are compared with full's question by question (mean paired
  difference and 95% bootstrap interval, ``metrics.paired_bootstrap``), and its answer
  with full's (token agreement and ROUGE-L, means with intervals, ``metrics.mean_interval``).

The task (``eval.tasks``) says what is asked: ``qa`` the questions as written, short
answers cut at a newline; ``summarize`` a long-answer prompt built from each question, 256
new tokens by default and no stop string.

With a sweep (``EvalConfig.sweep``), ``curves.json`` and ``curves.png`` follow
(``eval.curves``).

The questions are answered in this process, or by ``EvalConfig.workers`` processes
(``eval.workers``) whose rows the parent appends as each question completes; once all are
in, ``predictions.jsonl`` is rewritten in question order, so neither it nor the metrics
depend on the worker count.

A question whose prompt does not fit the model's context is skipped by every method and
listed under ``skipped_too_long``; ``n`` counts the questions answered.

Run directory rule: the default directory is ``<runs_root>/<data stem>-<model>-<limit>-
<chunking>[-<task>]-<run id>`` (``rundir.default_run_name``), where the run id hashes
everything that changes the results (data sha256, method specs, model, device, limit,
chunk size, generation settings, and the task and its prompt for any task but ``qa``, so
that ``qa`` run ids from before tasks existed still hold). A second identical run
therefore finds the same directory: when its ``metrics.json`` exists the run is skipped and those metrics are returned; when only predictions exist (an interrupted
run), the questions already answered by every method are kept and the rest are run.
``force`` starts the directory over. A directory holding a different run is an error, and
so are predictions without a readable ``config.json`` or with two different rows for one
question and method (``eval.rundir``): nothing would say which run wrote them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from samkv_integrations.eval.answering import AnswerJob, EngineInfo, InProcess, Rows
from samkv_integrations.eval.curves import Sweep, draw_curves, require_matplotlib
from samkv_integrations.eval.data import Question, file_sha256, read_questions
from samkv_integrations.eval.metrics import BOOTSTRAP, summarize
from samkv_integrations.eval.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    check_provenance,
    check_same_run,
    default_run_name,
    read_json,
    resume_rows,
    write_atomic,
)
from samkv_integrations.eval.tasks import DEFAULT_TASK, Task, get_task
from samkv_integrations.eval.workers import WorkerPool
from samkv_integrations.methods.specs import MethodSpec, default_methods, parse_methods
from samkv_integrations.models.loading import local_model_path
from samkv_integrations.models.registry import DEFAULT_MODEL

__all__ = ["EvalConfig", "RunPlan", "execute_run", "plan_run", "run_eval"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EvalConfig:
    """Settings of one eval run.

    Attributes:
        data: JSON Lines file (generic or HotpotQA/IRCoT format).
        methods: Method specs, e.g. ``("full", "samkv+ranking=global")`` or one
            comma-separated string.
        model: Registry name, local path, hub id, or ``random:<shape>`` (random weights).
        device: ``cpu`` or ``cuda``; ``None`` picks CUDA when available.
        limit: Evaluate the first ``limit`` questions; ``None`` for all.
        chunk_tokens: Pack consecutive paragraphs into documents of at most this many
            tokens (a longer paragraph stays whole); ``None``: one paragraph per document.
        max_new_tokens: Greedy decoding stops after this many tokens or at the task's stop
            strings; ``None``: the task's default (32 for ``qa``, 256 for ``summarize``).
        out: The run directory; ``None`` derives it under ``runs_root`` (module docstring).
        runs_root: Where default run directories go.
        store: KV cache store directory or URL; ``None``: ``$SAMKV_HOME/kvcache``.
        force: Start the run directory over even if it holds a finished or other run.
        progress: Show a progress bar over questions.
        sweep: ``option=v1,v2,...``: run every method but full once per value and draw
            accuracy-against-kept-fraction curves (``eval.curves``); ``None``: no sweep.
        workers: Processes answering questions, each with its own copy of the model on
            ``device`` (``eval.workers``); 1 answers them in this process. Results do not
            depend on it, so it is not part of the run's identity; TTFTs measured with
            several workers sharing a GPU include their contention.
        task: What is asked about each question (``eval.tasks``): ``qa`` or ``summarize``.
        discard_kv: Delete each question's document caches from the store once every method
            has answered it. An eval otherwise keeps every question's KV (a resumed or
            repeated run reuses it), which on long sets and larger models outgrows a disk:
            the 1.5B's NQ and long HotpotQA runs filled a 64 GB one. Not part of the run's
            identity: results do not depend on it.
    """

    data: Path
    methods: Sequence[str] = field(default_factory=default_methods)
    model: str = DEFAULT_MODEL
    device: str | None = None
    limit: int | None = None
    chunk_tokens: int | None = None
    max_new_tokens: int | None = None
    out: Path | None = None
    runs_root: Path = Path("runs/eval")
    store: str | None = None
    force: bool = False
    progress: bool = True
    sweep: str | None = None
    workers: int = 1
    task: str = DEFAULT_TASK
    discard_kv: bool = False

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out) if self.out is not None else None
        self.runs_root = Path(self.runs_root)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        for name in ("limit", "chunk_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        get_task(self.task)  # an unknown task fails here, naming the known ones
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")


@dataclass(slots=True)
class RunPlan:
    """Everything decided before a model loads.

    Attributes:
        config: The settings.
        specs: The parsed methods, ``full`` first.
        questions: The questions to answer, rewritten into the task's prompts.
        data_sha256: sha256 of the data file.
        device: The resolved device.
        identity: The settings that change results.
        run_id: Hash of ``identity``.
        run_dir: The run directory.
        completed: The metrics of a finished identical run in ``run_dir`` (then nothing runs).
        task: The task.
        max_new_tokens: The answer length cap: the config's, else the task's default.
        sweep: The parsed sweep, if any.
    """

    config: EvalConfig
    specs: list[MethodSpec]
    questions: list[Question]
    data_sha256: str
    device: str
    identity: dict[str, Any]
    run_id: str
    run_dir: Path
    completed: dict[str, Any] | None
    task: Task
    max_new_tokens: int
    sweep: Sweep | None = None


def plan_run(config: EvalConfig) -> RunPlan:
    """Validate methods and data, pick the device and the run directory; load no model.

    Raises:
        ValueError: Bad methods or data, or ``run_dir`` holds a different run (without
            ``force``); the message says which settings differ.
    """
    import torch

    sweep = Sweep.parse(config.sweep) if config.sweep is not None else None
    if sweep is not None:
        require_matplotlib()
    specs = parse_methods(sweep.expand(config.methods) if sweep else config.methods)
    task = get_task(config.task)
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    questions = task.rewrite(read_questions(config.data, config.limit))
    data_sha256 = file_sha256(config.data)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but torch sees no CUDA device")
    identity = {
        "data_sha256": data_sha256,
        "methods": [s.label for s in specs],
        "method_settings": [s.settings for s in specs],
        "model": config.model,
        "device": device,
        "limit": config.limit,
        "chunk_tokens": config.chunk_tokens,
        "max_new_tokens": max_new_tokens,
        "stop": list(task.stop),
    }
    if task.name != DEFAULT_TASK:
        identity |= {"task": task.name, "prompt_template": task.template}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = default_run_name(
        config.data,
        config.model,
        config.limit,
        config.chunk_tokens,
        None if task.name == DEFAULT_TASK else task.name,
        run_id,
    )
    run_dir = config.out or config.runs_root / name
    previous = read_json(run_dir / CONFIG_FILE)
    completed = None
    if not config.force:
        check_provenance(run_dir, previous)
    if previous is not None and not config.force:
        check_same_run(run_dir, previous, identity, run_id)
        completed = read_json(run_dir / METRICS_FILE)
    return RunPlan(
        config=config,
        specs=specs,
        questions=questions,
        data_sha256=data_sha256,
        device=device,
        identity=identity,
        run_id=run_id,
        run_dir=run_dir,
        completed=completed,
        task=task,
        max_new_tokens=max_new_tokens,
        sweep=sweep,
    )


def _package_version() -> str | None:
    # None when running from a source tree that was never installed.
    try:
        return metadata.version("samkv-integrations")
    except metadata.PackageNotFoundError:
        return None


def _config_record(plan: RunPlan, info: EngineInfo) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "run_id": plan.run_id,
        "identity": plan.identity,
        "args": dataclasses.asdict(plan.config),
        "methods": [dataclasses.asdict(s) for s in plan.specs],
        "model": plan.config.model,
        "fingerprint": info.fingerprint,
        "model_fingerprint": info.model_fingerprint,
        "dtype": info.dtype,
        "device": plan.device,
        "data": str(plan.config.data),
        "data_sha256": plan.data_sha256,
        "n_questions": len(plan.questions),
        "task": {"name": plan.task.name, "prompt_template": plan.task.template},
        "generation": {
            "greedy": True,
            "max_new_tokens": plan.max_new_tokens,
            "stop": list(plan.task.stop),
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "samkv_integrations": _package_version(),
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def execute_run(plan: RunPlan) -> dict[str, Any]:
    """Run a planned eval (or return the finished run's metrics) and write the run directory.

    Returns:
        The metrics, as written to ``metrics.json``.

    Raises:
        ValueError: The run directory's earlier predictions came from another model
            fingerprint (without ``force``), or a question does not fit the model.
    """
    config, run_dir = plan.config, plan.run_dir
    if plan.completed is not None:
        logger.info("%s already holds this run's metrics; skipping (force reruns it)", run_dir)
        _draw(plan, plan.completed)
        return plan.completed
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.force:
        for name in (METRICS_FILE, PREDICTIONS_FILE):
            (run_dir / name).unlink(missing_ok=True)
    job = AnswerJob(
        config.model,
        config.store,
        plan.device,
        plan.specs,
        plan.questions,
        config.chunk_tokens,
        plan.max_new_tokens,
        plan.task.stop,
        config.discard_kv,
    )
    workers = min(config.workers, len(plan.questions))
    if workers > 1 and config.model is not None:
        local_model_path(config.model)  # a missing path fails now, not in every worker
    with WorkerPool(job, workers) if workers > 1 else InProcess(job) as answerer:
        info = answerer.ready()
        previous = read_json(run_dir / CONFIG_FILE)
        if (
            previous is not None
            and not config.force
            and previous.get("fingerprint") != info.fingerprint
        ):
            raise ValueError(
                f"model: {run_dir} was run with fingerprint {str(previous.get('fingerprint'))[:12]}, "
                f"the loaded {config.model} has {info.fingerprint[:12]}; pass --force to start over"
            )
        write_atomic(
            run_dir / CONFIG_FILE,
            json.dumps(_config_record(plan, info), indent=2, default=str) + "\n",
        )
        labels = [s.label for s in plan.specs]
        done = resume_rows(run_dir / PREDICTIONS_FILE, [q.id for q in plan.questions], labels)
        results: dict[int, Rows] = {
            i: done[q.id] for i, q in enumerate(plan.questions) if q.id in done
        }
        todo = [i for i in range(len(plan.questions)) if i not in results]
        with (
            open(run_dir / PREDICTIONS_FILE, "a", encoding="utf-8") as fh,
            tqdm(
                total=len(plan.questions),
                initial=len(results),
                desc="eval",
                unit="q",
                disable=not config.progress,
            ) as bar,
        ):
            for index, rows in answerer.answer(todo):
                # Appended as each question completes, so that a killed run resumes.
                fh.write("".join(json.dumps(row) + "\n" for row in rows or ()))
                fh.flush()
                results[index] = rows
                bar.update()
    ordered = [results[i] for i in range(len(plan.questions))]
    records = [row for rows in ordered if rows is not None for row in rows]
    skipped = [q.id for q, rows in zip(plan.questions, ordered, strict=True) if rows is None]
    # Workers complete questions in any order: put the file back in question order so
    # that a run's files, like its metrics, do not depend on the worker count.
    write_atomic(run_dir / PREDICTIONS_FILE, "".join(json.dumps(row) + "\n" for row in records))
    metrics = {
        "model": config.model,
        "fingerprint": info.fingerprint,
        "data": str(config.data),
        "data_sha256": plan.data_sha256,
        "n": len(plan.questions) - len(skipped),
        "skipped_too_long": skipped,
        "device": plan.device,
        "chunk_tokens": config.chunk_tokens,
        "max_new_tokens": plan.max_new_tokens,
        "task": plan.task.name,
        "prompt_template": plan.task.template,
        "reference": labels[0],
        "bootstrap": BOOTSTRAP,
        "methods": summarize(records, labels, reference=labels[0]),
    }
    write_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s", run_dir / METRICS_FILE)
    _draw(plan, metrics)
    return metrics


def _draw(plan: RunPlan, metrics: dict[str, Any]) -> None:
    if plan.sweep is not None:
        paths = draw_curves(plan.run_dir, metrics, plan.sweep, plan.config.methods)
        logger.info("wrote %s", " and ".join(map(str, paths)))


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.methods`` on ``config.data``; return the metrics (``metrics.json``)."""
    return execute_run(plan_run(config))
