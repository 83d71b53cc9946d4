"""Long answers: agreement with full's answer (token, prefix, ROUGE-L) and the summarize task."""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import SamKVEngine
from samkv_integrations.eval import cli
from samkv_integrations.eval.harness import EvalConfig, plan_run, run_eval
from samkv_integrations.eval.metrics import (
    FULL_ANSWER_SCORES,
    lcs_length,
    mean_interval,
    prefix_agreement,
    rouge_l_f1,
    summarize,
    token_agreement,
)
from samkv_integrations.eval.tasks import SUMMARIZE_TEMPLATE, get_task


def test_token_and_prefix_agreement_by_hand() -> None:
    assert token_agreement([5, 6, 7], [5, 6, 7]) == prefix_agreement([5, 6, 7], [5, 6, 7]) == 1
    assert token_agreement([1, 2, 3], [4, 5, 6]) == prefix_agreement([1, 2, 3], [4, 5, 6]) == 0
    # One token differs at position 2: 3 of 4 positions agree, the prefix stops at 2.
    assert token_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.75
    assert prefix_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    # Positions past the method's end disagree; tokens past full's end are ignored.
    assert token_agreement([1], [1, 2, 3, 4]) == prefix_agreement([1], [1, 2, 3, 4]) == 0.25
    assert token_agreement([1, 2, 3, 7, 7], [1, 2, 3]) == 1.0
    # A shift by one token agrees nowhere in place, though the text is almost the same.
    assert token_agreement([0, 1, 2, 3], [1, 2, 3, 4]) == 0.0
    # Full stopped at once: only an empty answer agrees.
    assert token_agreement([], []) == prefix_agreement([], []) == 1.0
    assert token_agreement([3], []) == prefix_agreement([3], []) == 0.0


def test_lcs_length_worked_example_and_brute_force() -> None:
    # The textbook example (Cormen et al.): LCS of ABCBDAB and BDCABA has length 4 (BCBA).
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], list("abc")) == lcs_length(list("abc"), []) == 0
    rng = random.Random(0)
    for _ in range(40):
        a = [rng.choice("xyz") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("xyz") for _ in range(rng.randint(0, 6))]
        brute = max(
            (
                k
                for k in range(len(a) + 1)
                for sub in itertools.combinations(a, k)
                if _is_subsequence(list(sub), b)
            ),
            default=0,
        )
        assert lcs_length(a, b) == lcs_length(b, a) == brute, (a, b)


def _is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)


def test_rouge_l_by_hand() -> None:
    assert rouge_l_f1("Paris is on the Seine.", "paris is on the seine") == 1.0
    assert rouge_l_f1("London fog", "Paris Seine river") == 0.0
    # Reference w1..w5, prediction w1 w3 x w5: LCS 3, P = 3/4, R = 3/5, F1 = 2/3.
    assert rouge_l_f1("w1 w3 x w5", "w1 w2 w3 w4 w5") == pytest.approx(2 / 3)
    # Lin (2004)'s example after normalisation drops "the": LCS(police kill gunman,
    # police killed gunman) = 2, so P = R = F1 = 2/3.
    assert rouge_l_f1("police kill the gunman", "police killed the gunman") == pytest.approx(2 / 3)
    # Order matters, unlike bag-of-words F1: the reversed sentence shares one in-order word.
    assert rouge_l_f1("d c b", "b c d") == pytest.approx(1 / 3)
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("", "text") == 0.0
    assert rouge_l_f1("text", "the") == 0.0  # the reference normalises to nothing


def _record(method: str, qid: str, score: float) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        id=qid, method=method, f1=1.0, em=1.0, contains_gold=True, agree_full=True,
        first_token_kl=0.0, kept_fraction=1.0, recomputed_fraction=1.0, ttft_s=1.0,
        context_tokens=10,
    )  # fmt: skip
    return base | {key: score for key in FULL_ANSWER_SCORES}


def test_summary_means_and_intervals_of_agreement() -> None:
    scores = [0.2, 0.4, 0.9]
    records = [_record("full", f"q{i}", 1.0) for i in range(3)]
    records += [_record("reuse", f"q{i}", s) for i, s in enumerate(scores)]
    # A row from before these scores existed counts in n but not in their means.
    records.append({k: v for k, v in _record("old", "q0", 0.0).items() if k != "rouge_l_full"})
    summary = summarize(records, ["full", "reuse", "old"], reference="full")
    assert summary["full"]["rouge_l_full"] == 1.0 and summary["full"]["intervals"] is None
    reuse = summary["reuse"]
    assert reuse["token_agreement_full"] == pytest.approx(0.5)
    interval = reuse["intervals"]["rouge_l_full"]
    assert interval == mean_interval(scores)
    assert interval["mean"] == pytest.approx(0.5)
    assert 0.2 <= interval["low"] < 0.5 < interval["high"] <= 0.9
    assert summary["old"]["rouge_l_full"] is None
    assert summary["old"]["intervals"]["rouge_l_full"] is None
    assert mean_interval([0.3] * 5) == pytest.approx({"mean": 0.3, "low": 0.3, "high": 0.3})
    assert mean_interval([]) is None


def _metrics(task: str, max_new_tokens: int) -> dict[str, Any]:
    records = [_record("full", "q0", 1.0), _record("reuse", "q0", 0.25)]
    methods = summarize(records, ["full", "reuse"], reference="full")
    return {"task": task, "max_new_tokens": max_new_tokens, "methods": methods}


def test_table_shows_agreement_only_for_long_answers_or_when_asked() -> None:
    short = cli.format_table(_metrics("qa", 32)).splitlines()
    assert "ROUGE-L" not in short[0] and short[0].rstrip().endswith("dcontains [95% CI]")
    # Metrics written before tasks existed read as qa.
    legacy = {k: v for k, v in _metrics("qa", 32).items() if k != "task"}
    assert cli.format_table(legacy).splitlines()[0] == short[0]
    for table in (
        cli.format_table(_metrics("qa", 32), agreement=True),
        cli.format_table(_metrics("qa", cli.LONG_ANSWER_TOKENS)),
    ):
        header = table.splitlines()[0]
        assert header.startswith(short[0].rstrip()) and "ROUGE-L_full" in header
    header, full, reuse = cli.format_table(_metrics("summarize", 256)).splitlines()
    assert header.split()[:3] == ["method", "n", "ROUGE-L_full"]
    assert full.split()[2:4] == ["1.000", "1.000"]  # the reference: its mean, no interval
    assert reuse.split()[2:5] == ["0.250", "[0.250,", "0.250]"]


def _config(tmp_path: Path, data: Path, **overrides: Any) -> EvalConfig:
    settings: dict[str, Any] = dict(
        data=data, methods="full,reuse", model="random:tiny-llama", device="cpu",
        out=tmp_path / "run", store=str(tmp_path / "kvcache"), progress=False,
    )  # fmt: skip
    return EvalConfig(**(settings | overrides))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="samkv eval")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_task_sets_the_answer_length_unless_given(tmp_path: Path, data: Path) -> None:
    assert plan_run(_config(tmp_path, data)).max_new_tokens == 32
    plan = plan_run(_config(tmp_path, data, task="summarize"))
    assert plan.max_new_tokens == 256 and plan.task.stop == ()
    assert plan.questions[0].question == SUMMARIZE_TEMPLATE.format(question="Where was Ada born?")
    assert plan.questions[0].answers == ("London",)  # gold answers still scored
    assert plan_run(_config(tmp_path, data, task="summarize", max_new_tokens=8)).max_new_tokens == 8
    args = _parse(["--data", str(data), "--task", "summarize"])
    assert args.task == "summarize" and args.max_new_tokens is None
    assert _parse(["--data", str(data)]).task == "qa"
    with pytest.raises(ValueError, match="task must be one of qa, summarize, got 'poem'"):
        _config(tmp_path, data, task="poem")
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("QA")


def test_summarize_end_to_end(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, Any]] = []
    answer = SamKVEngine.answer

    def spy(self: SamKVEngine, question: str, *args: Any, **kwargs: Any) -> Any:
        asked.append((question, kwargs["stop"]))
        return answer(self, question, *args, **kwargs)

    monkeypatch.setattr(SamKVEngine, "answer", spy)
    metrics = run_eval(_config(tmp_path, data, task="summarize", max_new_tokens=8))
    run_dir = tmp_path / "run"
    # Every method was asked the long-answer prompt, with no newline cut.
    prompt = SUMMARIZE_TEMPLATE.format(question="Which river runs through Paris?")
    assert asked[2:] == [(prompt, ()), (prompt, ())]
    assert metrics["task"] == "summarize" and metrics["prompt_template"] == SUMMARIZE_TEMPLATE
    assert metrics["max_new_tokens"] == 8
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task"]["name"] == "summarize" and saved["identity"]["task"] == "summarize"
    assert saved["generation"] == {"greedy": True, "max_new_tokens": 8, "stop": []}

    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["method"]) for r in rows] == [
        ("q1", "full"), ("q1", "reuse"), ("q2", "full"), ("q2", "reuse"),
    ]  # fmt: skip
    for full, reuse in (rows[0:2], rows[2:4]):
        assert all(full[key] == 1.0 for key in FULL_ANSWER_SCORES)
        assert reuse["rouge_l_full"] == rouge_l_f1(reuse["prediction"], full["prediction"])
        assert 0 <= reuse["prefix_agreement_full"] <= reuse["token_agreement_full"] <= 1
        assert {"f1", "em", "contains_gold"} <= set(reuse)  # gold metrics still computed
    summary = metrics["methods"]["reuse"]
    for key in FULL_ANSWER_SCORES:
        assert summary[key] == pytest.approx((rows[1][key] + rows[3][key]) / 2)
        interval = summary["intervals"][key]
        assert interval["low"] <= summary[key] <= interval["high"]
    assert metrics["methods"]["full"]["rouge_l_full"] == 1.0
    assert cli.format_table(metrics).splitlines()[0].split()[:3] == ["method", "n", "ROUGE-L_full"]

    # The same --out for the other task is another run: refused, naming the task.
    with pytest.raises(ValueError, match=r"holds another run .*differs in .*task"):
        plan_run(_config(tmp_path, data, task="qa", max_new_tokens=8))
    assert plan_run(_config(tmp_path, data, task="summarize", max_new_tokens=8)).completed


def test_default_directories_keep_the_tasks_apart(tmp_path: Path, data: Path) -> None:
    settings = dict(out=None, runs_root=tmp_path / "runs", limit=1, max_new_tokens=4)
    qa = run_eval(_config(tmp_path, data, **settings))
    (qa_dir,) = (tmp_path / "runs").iterdir()
    summarize_plan = plan_run(_config(tmp_path, data, task="summarize", **settings))
    # Not the qa run's directory, so its rows and metrics are never taken as this run's.
    assert summarize_plan.run_dir != qa_dir and summarize_plan.completed is None
    assert "-summarize-" in summarize_plan.run_dir.name and "-summarize-" not in qa_dir.name
    assert plan_run(_config(tmp_path, data, **settings)).completed == qa
    # Pointed at the qa run's directory, a summarize run refuses it rather than resume it.
    with pytest.raises(ValueError, match=r"differs in .*task"):
        plan_run(_config(tmp_path, data, task="summarize", **(settings | {"out": qa_dir})))
    # A qa summary of a 4-token run gained the new scores but keeps its table.
    assert qa["task"] == "qa" and qa["methods"]["reuse"]["rouge_l_full"] is not None
