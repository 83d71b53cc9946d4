from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import SamKVEngine
from samkv_integrations.eval import cli
from samkv_integrations.eval.curves import Sweep, curves, wrap_spec
from samkv_integrations.eval.harness import EvalConfig, plan_run, run_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_config(tmp_path: Path, data: Path, **overrides: Any) -> EvalConfig:
    settings: dict[str, Any] = dict(
        data=data,
        methods="sagekv",
        sweep="budget=0.2,1.0",
        model="random:tiny-llama",
        device="cpu",
        out=tmp_path / "run",
        store=str(tmp_path / "kvcache"),
        max_new_tokens=4,
        progress=False,
    )
    return EvalConfig(**{**settings, **overrides})


def test_sweep_expands_each_method_but_full() -> None:
    sweep = Sweep.parse("budget=0.05, 0.15")
    assert sweep == Sweep("budget", ("0.05", "0.15"))
    methods = ["full,sagekv", "samkv+ranking=global"]
    assert sweep.series(methods) == {
        "sagekv": ["sagekv+budget=0.05", "sagekv+budget=0.15"],
        "samkv+ranking=global": [
            "samkv+ranking=global+budget=0.05",
            "samkv+ranking=global+budget=0.15",
        ],
    }
    assert sweep.expand(methods)[:3] == ["full", "sagekv+budget=0.05", "sagekv+budget=0.15"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("budget", "not option=value"),
        ("=0.1", "not option=value"),
        ("budget=", "not option=value"),
        ("budget=0.1,,0.2", "empty value"),
        ("budget=0.1+n_init=2", "'\\+'"),
        ("budget=0.1,0.1", "repeats a value"),
    ],
)
def test_bad_sweeps_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"sweep: .*{message}"):
        Sweep.parse(text)


@pytest.mark.parametrize(
    ("methods", "sweep", "message"),
    [
        ("sagekv+budget=0.5", "budget=0.2,1.0", "already sets 'budget'"),
        ("samkv+decode=quest+retro_pages=2", "retro_pages=1,4", "already sets 'retro_pages'"),
        ("full", "budget=0.2,1.0", "no method but 'full'"),
        ("sagekv,reuse", "budget=0.2,1.0", "unknown option 'budget' of 'reuse'"),
    ],
)
def test_sweeps_that_cannot_run_fail_before_a_model_loads(
    tmp_path: Path, data: Path, methods: str, sweep: str, message: str
) -> None:
    missing = str(tmp_path / "no-such-model")
    bad = sweep_config(tmp_path, data, methods=methods, sweep=sweep, model=missing)
    with pytest.raises(ValueError, match=message):
        run_eval(bad)
    assert not (tmp_path / "run").exists()


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("a finished run must not load a model")


def test_sweep_writes_curve_json_and_png(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    metrics = run_eval(sweep_config(tmp_path, data))
    assert list(metrics["methods"]) == ["full", "sagekv+budget=0.2", "sagekv+budget=1.0"]
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "curves.json").read_text())
    assert saved == curves(metrics, Sweep.parse("budget=0.2,1.0"), ["sagekv"])
    assert saved["option"] == "budget" and saved["values"] == ["0.2", "1.0"]
    assert saved["reference"]["label"] == "full" and saved["reference"]["kept_fraction"] == 1.0
    assert saved["bootstrap"]["level"] == 0.95
    low, high = saved["methods"]["sagekv"]
    assert (low["value"], low["label"]) == (0.2, "sagekv+budget=0.2")
    assert (high["value"], high["label"]) == (1.0, "sagekv+budget=1.0")
    assert 0 < low["kept_fraction"] <= 0.2 and high["kept_fraction"] == 1.0
    for point in (low, high):
        assert point["n"] == 2
        assert point["f1"] == metrics["methods"][point["label"]]["f1"]
        assert point["f1_vs_full"] == metrics["methods"][point["label"]]["vs_full"]["f1"]
    # Keeping every token answers as full does: no difference, and an interval of [0, 0].
    assert high["f1_vs_full"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    assert high["contains_gold_vs_full"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    # A finished run is skipped, and still gives its curves, from metrics.json alone.
    (run_dir / "curves.json").unlink()
    (run_dir / "curves.png").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(SamKVEngine, "from_pretrained", _no_model)
        assert run_eval(sweep_config(tmp_path, data)) == metrics
    assert json.loads((run_dir / "curves.json").read_text()) == saved
    assert (run_dir / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(
        ValueError, match=r"needs matplotlib; pip install 'samkv-integrations\[plot\]'"
    ):
        plan_run(sweep_config(tmp_path, data))
    assert plan_run(sweep_config(tmp_path, data, sweep=None)).sweep is None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="samkv eval")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_sweep_flag(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    argv = ["--data", str(data), "--methods", "sagekv", "--sweep", "budget=0.5,1.0",
            "--model", "random:tiny-llama", "--device", "cpu", "--max-new-tokens", "2",
            "--limit", "1", "--out", str(tmp_path / "run"), "--store", str(tmp_path / "kv"),
            "--no-progress"]  # fmt: skip
    assert cli.run(_parse(argv)) == 0
    out = capsys.readouterr().out
    assert "sagekv+budget=0.5" in out and "sagekv+budget=1.0" in out
    assert f"curves: {tmp_path / 'run' / 'curves.json'}, {tmp_path / 'run' / 'curves.png'}" in out
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--data", str(data), "--sweep", "budget"])
    assert exit_info.value.code == 2
    assert "argument --sweep: sweep: 'budget' is not option=value" in capsys.readouterr().err


def test_a_decoding_option_can_be_swept(tmp_path: Path, data: Path) -> None:
    pytest.importorskip("matplotlib")
    methods = "samkv+budget=0.3+decode=quest"
    config = sweep_config(tmp_path, data, methods=methods, sweep="retro_pages=0,64")
    metrics = run_eval(config)
    saved = json.loads((tmp_path / "run" / "curves.json").read_text())
    points = saved["methods"][methods]
    assert [p["value"] for p in points] == [0, 64]
    assert [p["label"] for p in points] == [f"{methods}+retro_pages={v}" for v in (0, 64)]
    assert set(metrics["methods"]) == {"full", *(p["label"] for p in points)}


def test_long_specs_wrap_before_their_options_in_the_legend() -> None:
    label = "samkv+score_positions=adjacent+question_context=all+block_size=32"
    wrapped = wrap_spec(label)
    assert wrapped.replace("\n", "") == label
    lines = wrapped.split("\n")
    assert len(lines) > 1 and all(line.startswith("+") for line in lines[1:])
    assert wrap_spec("samkv+budget=0.1") == "samkv+budget=0.1"
