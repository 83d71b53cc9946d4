"""``samkv eval --workers``: worker processes give the in-process answers, resume, and fail cleanly.

Each test here starts real ``spawn`` processes (each imports torch and builds the tiny
random model), so there are few of them and each does several checks.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import cli as samkv_cli
from samkv_integrations.eval.answering import AnswerJob
from samkv_integrations.eval.harness import EvalConfig, plan_run, run_eval
from samkv_integrations.eval.workers import WorkerPool

#: Row fields that are timings: they differ from run to run, and with the worker count.
TIMINGS = {"ttft_s", "seconds"}


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    """Six questions of three sizes, so that workers finish them out of order, and one too long."""
    rows = [
        {
            "id": f"q{i}",
            "question": f"Where was person {i} born?",
            "contexts": [
                {"title": f"Person {i}", "text": f"Person {i} was born in town {i}."},
                {"title": "Rivers", "text": "Rivers flow to the sea. " * (1 + 6 * (i % 3))},
            ],
            "answers": [f"town {i}"],
        }
        for i in range(6)
    ]
    # Too long for tiny-llama's 4096 tokens: skipped by whichever worker draws it.
    long = {"id": "long", "question": "?", "contexts": [{"title": "X", "text": "x " * 4200}]}
    rows.insert(3, {**long, "answers": ["no"]})
    path = tmp_path / "people.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path: Path, data: Path, name: str, **overrides: Any) -> EvalConfig:
    settings: dict[str, Any] = dict(
        data=data,
        methods="full,reuse",
        model="random:tiny-llama",
        device="cpu",
        out=tmp_path / name,
        store=str(tmp_path / f"kvcache-{name}"),
        max_new_tokens=4,
        progress=False,
    )
    return EvalConfig(**{**settings, **overrides})


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    """The per-method metrics but timings (``ttft_s_*``)."""
    return {
        label: {k: v for k, v in row.items() if not k.startswith("ttft")}
        for label, row in metrics["methods"].items()
    }


def test_workers_answer_as_one_process_does_and_resume(
    tmp_path: Path, questions: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A sweep, so that --workers is checked with it too: full, sagekv at two budgets.
    sweep = dict(methods="sagekv", sweep="budget=0.3,1.0")
    alone = run_eval(config(tmp_path, questions, "one", **sweep))
    with caplog.at_level(logging.WARNING):
        shared = run_eval(config(tmp_path, questions, "two", workers=2, **sweep))
    # The worker's warning reaches the parent's loggers.
    assert "skipping question 'long'" in caplog.text
    assert shared["skipped_too_long"] == alone["skipped_too_long"] == ["long"]

    ids = [f"q{i}" for i in range(6)]
    labels = ["full", "sagekv+budget=0.3", "sagekv+budget=1.0"]
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    # Back in question order, whichever worker finished first.
    assert [(r["id"], r["method"]) for r in two] == [(q, m) for q in ids for m in labels]
    assert without_timings(two) == without_timings(one)
    assert accuracy(shared) == accuracy(alone)
    assert shared["n"] == alone["n"] == 6
    # sagekv keeps less at the lower budget, so the rows compared are not all alike.
    kept = shared["methods"]["sagekv+budget=0.3"]["kept_fraction"]
    assert kept < shared["methods"]["sagekv+budget=1.0"]["kept_fraction"] == 1.0
    assert json.loads((tmp_path / "two" / "curves.json").read_text()) == json.loads(
        (tmp_path / "one" / "curves.json").read_text()
    )
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["args"]["workers"] == 2
    # The worker count changes no result, so it is not part of the run's identity.
    assert saved["run_id"] == json.loads((tmp_path / "one" / "config.json").read_text())["run_id"]
    assert multiprocessing.active_children() == []

    # Killed with q4 and q1 answered, out of order as workers finish them, in the middle
    # of a line; q4's full row marked so that a kept row can be told from a recomputed one.
    marked = {**two[12], "f1": 0.5}
    text = "".join(json.dumps(r) + "\n" for r in [marked, *two[13:15], *two[3:6]])
    (tmp_path / "two" / "predictions.jsonl").write_text(text + json.dumps(two[0])[:30])
    (tmp_path / "two" / "metrics.json").unlink()
    resumed = run_eval(config(tmp_path, questions, "two", workers=2, **sweep))
    again = rows_of(tmp_path / "two")
    assert again[12] == marked and again[3:6] == two[3:6]
    assert without_timings(again) == without_timings([*two[:12], marked, *two[13:]])
    full = [r["f1"] for r in again if r["method"] == "full"]
    assert resumed["methods"]["full"]["f1"] == pytest.approx(sum(full) / 6)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    ("overrides", "message", "via_cli"),
    [
        # Fails while every worker loads the model: the folder exists but holds no model.
        (
            {"model": "{tmp}/not-a-model"},
            r"not-a-model' is neither a .gguf file nor has config.json",
            False,
        ),
        # Valid as a spec, fails when a worker builds it: tiny-llama has 4 layers.
        (
            {"methods": "full,samkv+selection_layers=-9"},
            r"method 'samkv\+selection_layers=-9': selection_layers \(-9,\) out of range",
            True,
        ),
    ],
    ids=["model-load", "method-build"],
)
def test_a_failing_worker_is_one_error(
    tmp_path: Path,
    questions: Path,
    overrides: dict[str, str],
    message: str,
    via_cli: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "not-a-model").mkdir()
    overrides = {k: v.format(tmp=tmp_path) for k, v in overrides.items()}
    run = config(tmp_path, questions, "run", workers=2, **overrides)
    if via_cli:
        # One line on stderr, with the status of a user's mistake.
        argv = ["eval", "--data", str(questions), "--model", run.model, "--methods",
                overrides.get("methods", "full,reuse"), "--device", "cpu", "--max-new-tokens",
                "4", "--workers", "2", "--out", str(run.out), "--store", str(run.store),
                "--no-progress"]  # fmt: skip
        assert samkv_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.match(f"samkv eval: error: .*{message}", err[0]), err
    else:
        with pytest.raises(ValueError, match=message) as info:
            run_eval(run)
        assert "in eval worker" in str(info.value.__cause__)  # the worker's own traceback
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_missing_model_path_fails_before_any_worker_starts(
    tmp_path: Path, questions: Path
) -> None:
    run = config(tmp_path, questions, "run", workers=2, model=str(tmp_path / "no-such-dir"))
    with pytest.raises(ValueError, match="no-such-dir' does not exist") as info:
        run_eval(run)
    assert info.value.__cause__ is None  # raised here, not relayed from a worker
    assert multiprocessing.active_children() == []


def test_a_killed_worker_is_reported_not_waited_for(tmp_path: Path, questions: Path) -> None:
    plan = plan_run(config(tmp_path, questions, "run"))
    store = str(tmp_path / "kvcache")
    job = AnswerJob("random:tiny-llama", store, "cpu", plan.specs, plan.questions, None, 4)
    start = time.perf_counter()
    with (
        WorkerPool(job, 1) as pool,
        pytest.raises(RuntimeError, match=r"eval worker 0 was killed by SIGKILL"),
    ):
        pool.ready()
        (process,) = multiprocessing.active_children()
        os.kill(process.pid or 0, signal.SIGKILL)
        list(pool.answer([0, 1]))
    assert time.perf_counter() - start < 60
    assert multiprocessing.active_children() == []
