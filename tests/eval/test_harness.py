from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.eval import cli
from samkv_integrations.eval.harness import EvalConfig, plan_run, run_eval
from samkv_integrations.methods import METHODS, BaseMethod, ReuseMethod
from samkv_integrations.methods.specs import MethodSpec, parse_methods
from samkv_integrations.models import LoadedModel

REQUIRED = (
    "f1",
    "em",
    "agree_full",
    "first_token_kl",
    "kept_fraction",
    "recomputed_fraction",
    "ttft_s_median",
)


@dataclass
class ToyMethod(ReuseMethod):
    """Naive reuse with hyperparameters, to exercise option parsing end to end."""

    name = "toy"
    ratio: float = 0.5
    layers: tuple[int, ...] = ()
    exact: bool = False
    mode: str = "plain"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "toy", ToyMethod)


def config(tmp_path: Path, data: Path, **overrides: Any) -> EvalConfig:
    settings: dict[str, Any] = dict(
        data=data,
        methods="full,reuse",
        model="random:tiny-llama",
        device="cpu",
        out=tmp_path / "run",
        store=str(tmp_path / "kvcache"),
        max_new_tokens=8,
        progress=False,
    )
    return EvalConfig(**{**settings, **overrides})


def read_predictions(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_parse_methods_adds_full_first(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        specs = parse_methods("reuse")
    assert [s.label for s in specs] == ["full", "reuse"]
    assert "adding 'full'" in caplog.text
    assert [s.label for s in parse_methods(["reuse", "full"])] == ["full", "reuse"]


def test_parse_method_options(toy: None) -> None:
    specs = parse_methods("full, toy+ratio=0.25+layers=-1/-2/-4+exact=true+mode=fancy,toy")
    assert [s.label for s in specs] == [
        "full",
        "toy+ratio=0.25+layers=-1/-2/-4+exact=true+mode=fancy",
        "toy",
    ]
    assert specs[1].name == "toy"
    assert specs[1].options == {
        "ratio": 0.25,
        "layers": (-1, -2, -4),
        "exact": True,
        "mode": "fancy",
    }
    assert parse_methods("toy+ratio=1")[1].options == {"ratio": 1}
    # A lone integer for a tuple field is a one-element tuple.
    assert parse_methods("toy+layers=-1")[1].options == {"layers": (-1,)}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("full,nope", "unknown method 'nope'"),
        ("full,reuse+ratio=0.5", "unknown option 'ratio' of 'reuse'"),
        ("toy+depth=3", "unknown option 'depth' of 'toy'.*ratio, layers, exact, mode"),
        ("toy+ratio", "'ratio' of 'toy\\+ratio' is not key=value"),
        ("toy+ratio=2", "ratio must be in"),
        ("toy+layers=1/x", "list must hold integers"),
        ("full,reuse,reuse", "repeated reuse"),
        (" , ", "no method given"),
    ],
)
def test_bad_method_specs(toy: None, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_methods(spec)


def test_unknown_method_fails_before_loading_a_model(tmp_path: Path, data: Path) -> None:
    # Loading this model would fail with "does not exist": the method error must come first.
    bad = config(tmp_path, data, methods="full,nope", model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_eval(bad)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("full,nope", "unknown method 'nope'"),
        ("full,samkv+budgt=0.2", "unknown option 'budgt' of 'samkv'"),
        ("samkv+budget=0", "budget must be in (0, 1]"),
        ("reuse,reuse", "repeated reuse"),
    ],
)
def test_bad_specs_fail_while_parsing_the_command(
    tmp_path: Path, data: Path, methods: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--data", str(data), "--methods", methods, "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "samkv eval: error: argument --methods: " in err and message in err


def test_cli_spec_options_reach_the_method(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = "samkv+ranking=global+budget=0.5+n_init=2+n_local=2+block_size=4"
    argv = ["--data", str(data), "--methods", spec, "--model", "random:tiny-llama",
            "--device", "cpu", "--max-new-tokens", "2", "--out", str(tmp_path / "run"),
            "--store", str(tmp_path / "kvcache"), "--no-progress", "--discard-kv"]  # fmt: skip
    assert cli.run(_parse(argv)) == 0
    assert KVCacheStore(tmp_path / "kvcache").entries() == []
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["full", spec]
    assert 0 < metrics["methods"][spec]["kept_fraction"] <= 0.5
    assert metrics["methods"]["full"]["kept_fraction"] == 1.0


def test_run_writes_config_predictions_and_metrics(
    tmp_path: Path, data: Path, tiny_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    metrics = run_eval(config(tmp_path, data))
    run_dir = tmp_path / "run"
    assert metrics == json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["model"] == "random:tiny-llama"
        and metrics["data"] == str(data)
        and metrics["n"] == 2
    )
    assert list(metrics["methods"]) == ["full", "reuse"]
    for row in metrics["methods"].values():
        assert all(isinstance(row[key], float) for key in REQUIRED), row
        assert row["n"] == 2
    full, reuse = metrics["methods"]["full"], metrics["methods"]["reuse"]
    assert full["agree_full"] == 1.0 and full["first_token_kl"] == 0.0
    assert full["kept_fraction"] == 1.0 and full["recomputed_fraction"] == 1.0
    assert reuse["kept_fraction"] == 1.0 and reuse["recomputed_fraction"] == 0.0
    # Several independently cached documents: reuse loses cross-document attention.
    assert reuse["first_token_kl"] > 0

    predictions = read_predictions(run_dir)
    assert [(p["id"], p["method"]) for p in predictions] == [
        ("q1", "full"),
        ("q1", "reuse"),
        ("q2", "full"),
        ("q2", "reuse"),
    ]
    assert [p["n_documents"] for p in predictions] == [3, 3, 2, 2]
    assert predictions[2]["gold"] == ["the Seine", "Seine"]
    for p in predictions:
        assert {"prediction", "f1", "em", "kept_fraction", "ttft_s", "first_token_kl"} <= set(p)
    assert reuse["first_token_kl"] == pytest.approx(
        (predictions[1]["first_token_kl"] + predictions[3]["first_token_kl"]) / 2
    )

    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model_fingerprint"] == tiny_llama.fingerprint
    assert (
        saved["fingerprint"]
        == metrics["fingerprint"]
        == SamKVEngine(tiny_llama, memory_store).fingerprint
    )
    assert saved["args"]["methods"] == "full,reuse" and saved["args"]["max_new_tokens"] == 8
    assert {"torch", "transformers"} <= set(saved["versions"])
    assert len(saved["data_sha256"]) == 64 and saved["created"]
    assert not list(run_dir.glob(".*tmp"))


def test_one_chunk_makes_reuse_equal_full(tmp_path: Path, data: Path) -> None:
    # Naive reuse of a single document equals full recompute (DESIGN.md invariant).
    metrics = run_eval(config(tmp_path, data, chunk_tokens=2000))
    assert {p["n_documents"] for p in read_predictions(tmp_path / "run")} == {1}
    reuse = metrics["methods"]["reuse"]
    assert reuse["agree_full"] == 1.0
    assert reuse["first_token_kl"] < 1e-6


@pytest.mark.parametrize("discard", [False, True])
def test_discard_kv_leaves_the_store_as_it_found_it(
    tmp_path: Path, data: Path, discard: bool
) -> None:
    store = KVCacheStore(tmp_path / "kvcache")
    kept = run_eval(config(tmp_path, data, discard_kv=discard, out=tmp_path / f"run-{discard}"))
    assert kept["n"] == 2 and kept["methods"]["reuse"]["n"] == 2
    entries = store.entries()
    assert (entries == []) if discard else len(entries) >= 2


def test_question_too_long_for_the_model_is_skipped(tmp_path: Path, data: Path) -> None:
    long = {
        "id": "long",
        "question": "Too long?",
        # Each paragraph fits tiny-llama's 4096-token context; together they do not.
        # "huge" has one paragraph that alone does not fit.
        "contexts": [{"title": f"P{i}", "text": "x " * 800} for i in range(3)],
        "answers": ["no"],
    }
    huge = {**long, "id": "huge", "contexts": [{"title": "One", "text": "y " * 2100}]}
    lines = data.read_text().splitlines()
    rows = [lines[0], json.dumps(long), json.dumps(huge), lines[1]]
    data.write_text("\n".join(rows) + "\n")
    metrics = run_eval(config(tmp_path, data))
    assert metrics["n"] == 2 and metrics["skipped_too_long"] == ["long", "huge"]
    assert metrics["methods"]["reuse"]["n"] == 2
    assert {p["id"] for p in read_predictions(tmp_path / "run")} == {"q1", "q2"}


def test_second_identical_run_is_skipped(tmp_path: Path, data: Path) -> None:
    settings = dict(out=None, runs_root=tmp_path / "runs", limit=1)
    first = run_eval(config(tmp_path, data, **settings))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"tiny-qa-random-tiny-llama-n1-para-[0-9a-f]{8}", run_dir.name)
    files = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}

    again = config(tmp_path, data, **settings)
    plan = plan_run(again)
    assert plan.run_dir == run_dir and plan.completed == first
    assert run_eval(again) == first
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == files

    # A setting that changes results gets a directory of its own.
    run_eval(config(tmp_path, data, **{**settings, "limit": 2}))
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_force_reruns_and_other_runs_are_refused(tmp_path: Path, data: Path) -> None:
    run_eval(config(tmp_path, data, limit=1))
    run_dir = tmp_path / "run"
    lines = read_predictions(run_dir)
    lines[0]["prediction"] = "TAMPERED"
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match=r"holds another run .*differs in limit"):
        plan_run(config(tmp_path, data, limit=2))
    run_eval(config(tmp_path, data, limit=1, force=True))
    assert "TAMPERED" not in (run_dir / "predictions.jsonl").read_text()


def test_a_label_whose_defaults_changed_is_another_run(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run directory records what each label ran; after a default changes, the same
    # label must not resume (or return) the rows answered under the old meaning.
    settings = dict(methods="full,sagekv", limit=1)
    run_eval(config(tmp_path, data, **settings))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "kernel=5" in recorded["identity"]["method_settings"][1]
    build = MethodSpec.build

    def old_default(spec: MethodSpec) -> BaseMethod:
        method = build(spec)
        return dataclasses.replace(method, kernel=1) if spec.name == "sagekv" else method

    monkeypatch.setattr(MethodSpec, "build", old_default)
    with pytest.raises(ValueError, match=r"holds another run .*differs in method_settings"):
        plan_run(config(tmp_path, data, **settings))


def test_interrupted_run_resumes(tmp_path: Path, data: Path) -> None:
    run_dir = tmp_path / "run"
    complete = run_eval(config(tmp_path, data))
    rows = read_predictions(run_dir)
    # Interrupted after q1, in the middle of writing q2's first line; q1's full F1 marked
    # so that we can tell a kept line from a recomputed one.
    rows[0]["f1"] = 0.25
    kept = "".join(json.dumps(r) + "\n" for r in rows[:2])
    (run_dir / "predictions.jsonl").write_text(kept + json.dumps(rows[2])[:20])
    (run_dir / "metrics.json").unlink()

    resumed = run_eval(config(tmp_path, data))
    assert [(p["id"], p["method"]) for p in read_predictions(run_dir)] == [
        ("q1", "full"),
        ("q1", "reuse"),
        ("q2", "full"),
        ("q2", "reuse"),
    ]
    assert resumed["methods"]["full"]["f1"] == pytest.approx((0.25 + rows[2]["f1"]) / 2)
    assert resumed["methods"]["reuse"] == complete["methods"]["reuse"] | {
        key: resumed["methods"]["reuse"][key]
        for key in ("ttft_s_median", "ttft_s_p90", "ttft_s_mean", "vs_full")
    }
    # The paired difference from full sees the kept (marked) full row of q1.
    expected = ((rows[1]["f1"] - 0.25) + (rows[3]["f1"] - rows[2]["f1"])) / 2
    assert resumed["methods"]["reuse"]["vs_full"]["f1"]["diff"] == pytest.approx(expected)


def test_predictions_without_config_are_not_reused_for_another_model(
    tmp_path: Path, data: Path
) -> None:
    # Issue 14 item 10: with config.json gone, tiny-qwen2 must not take tiny-llama's rows
    # as its own answers.
    run_dir = tmp_path / "run"
    run_eval(config(tmp_path, data))
    llama_rows = read_predictions(run_dir)
    (run_dir / "config.json").unlink()
    (run_dir / "metrics.json").unlink()
    qwen = config(tmp_path, data, model="random:tiny-qwen2")
    with pytest.raises(ValueError, match=r"no readable config\.json .*--force"):
        run_eval(qwen)
    assert read_predictions(run_dir) == llama_rows and not (run_dir / "config.json").exists()
    # An unreadable config.json vouches for nothing either.
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"no readable config\.json"):
        plan_run(qwen)
    metrics = run_eval(config(tmp_path, data, model="random:tiny-qwen2", force=True))
    qwen_rows = read_predictions(run_dir)
    assert metrics["model"] == "random:tiny-qwen2" and len(qwen_rows) == len(llama_rows)
    assert [r["ttft_s"] for r in qwen_rows] != [r["ttft_s"] for r in llama_rows]
    # An empty predictions file holds no rows to misattribute.
    (run_dir / "config.json").unlink()
    (run_dir / "metrics.json").unlink()
    (run_dir / "predictions.jsonl").write_text("")
    assert run_eval(qwen)["n"] == 2


def test_conflicting_duplicate_rows_stop_the_resume(tmp_path: Path, data: Path) -> None:
    # Issue 14 item 10: a second, different row for (q1, reuse) must not silently win.
    run_dir = tmp_path / "run"
    run_eval(config(tmp_path, data))
    rows = read_predictions(run_dir)
    (run_dir / "metrics.json").unlink()
    path = run_dir / "predictions.jsonl"
    identical = path.read_text() + json.dumps(rows[1]) + "\n"
    path.write_text(identical + json.dumps({**rows[1], "prediction": "Paris", "f1": 0.0}) + "\n")
    with pytest.raises(ValueError, match=r"lines 2 and 6 .*'q1', method 'reuse'.*--force"):
        run_eval(config(tmp_path, data))
    assert path.read_text().count("\n") == 6, "a refused resume must leave the file as it was"
    # The same row twice is one row: the run resumes with nothing left to answer.
    path.write_text(identical)
    metrics = run_eval(config(tmp_path, data))
    assert read_predictions(run_dir) == rows
    assert metrics["methods"]["reuse"]["f1"] == pytest.approx((rows[1]["f1"] + rows[3]["f1"]) / 2)


def test_metrics_and_table_compare_each_method_with_full(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = run_eval(config(tmp_path, data))
    assert metrics["reference"] == "full"
    assert metrics["bootstrap"] == {"resamples": 2000, "seed": 0, "level": 0.95}
    assert metrics["methods"]["full"]["vs_full"] is None
    rows = read_predictions(tmp_path / "run")
    paired = metrics["methods"]["reuse"]["vs_full"]
    assert paired["n"] == 2
    diffs = [rows[i + 1]["f1"] - rows[i]["f1"] for i in (0, 2)]
    assert paired["f1"]["diff"] == pytest.approx(sum(diffs) / 2)
    assert min(diffs) - 1e-9 <= paired["f1"]["low"] <= paired["f1"]["high"] <= max(diffs) + 1e-9
    table = cli.format_table(metrics).splitlines()
    assert "dF1 [95% CI]" in table[0] and "dcontains [95% CI]" in table[0]
    assert table[1].split()[-2:] == ["-", "-"]
    f1 = paired["f1"]
    assert f"{f1['diff']:+.3f} [{f1['low']:+.3f}, {f1['high']:+.3f}]" in table[2]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="samkv eval")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_prints_table_then_skips(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--data",
        str(data),
        "--methods",
        "reuse",
        "--model",
        "random:tiny-llama",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "cli-run"),
        "--store",
        str(tmp_path / "kvcache"),
        "--no-progress",
    ]
    assert cli.run(_parse(argv)) == 0
    out = capsys.readouterr().out
    header, full_row, reuse_row = out.splitlines()[1:4]
    assert header.split()[:4] == ["method", "n", "F1", "EM"]
    assert full_row.split()[:2] == ["full", "2"] and reuse_row.split()[:2] == ["reuse", "2"]
    assert full_row.split()[5:7] == ["1.000", "0.0000"]  # agree_full, KL of the reference
    assert "wrote" in out

    assert cli.run(_parse(argv)) == 0
    again = capsys.readouterr().out
    assert again.startswith("skipped:") and full_row in again
