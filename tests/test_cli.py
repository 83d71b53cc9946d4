"""The ``samkv`` command line: one method-spec syntax and one set of engine options for all."""

from __future__ import annotations

import argparse
import importlib
import random
import re
from pathlib import Path

import pytest

from samkv_integrations.cli import add_engine_arguments, main, method_spec, method_specs
from samkv_integrations.models.registry import DEFAULT_MODEL

# A model that cannot load: a spec error must come first, from argument parsing.
NO_MODEL = "/no/such/model"

# (command, argv before the spec, the spec option): every command that names methods.
COMMANDS = [
    ("ask", ["--model", NO_MODEL], "--method"),
    ("eval", ["--data", "none.jsonl", "--model", NO_MODEL], "--methods"),
    ("bench", ["--model", NO_MODEL], "--methods"),
    ("demo", ["--model", NO_MODEL], "--method"),
    ("serve", ["--model", NO_MODEL], "--method"),
]

BAD_SPECS = [
    ("samkv+budgt=0.2", "unknown option 'budgt' of 'samkv'"),
    ("samkv+budget=2", "budget must be in (0, 1]"),
    ("samkv+ranking", "option 'ranking' of 'samkv+ranking' is not key=value"),
    ("magic", "unknown method 'magic'"),
]


@pytest.mark.parametrize(("command", "before", "option"), COMMANDS)
@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_spec_fails_at_parse_time_naming_the_field(
    command: str,
    before: list[str],
    option: str,
    spec: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [command, *before, option, spec]
    if command == "ask":
        argv += ["question?", "missing.txt"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"samkv {command}: error: argument {option}: " in err
    assert message in err
    assert "Traceback" not in err


def test_spec_types_return_valid_specs_unchanged() -> None:
    assert method_spec("samkv+budget=0.2") == "samkv+budget=0.2"
    assert method_specs("full, samkv+ranking=global") == "full, samkv+ranking=global"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^unknown option 'x' of 'full'"):
        method_spec("full+x=1")
    with pytest.raises(argparse.ArgumentTypeError, match="repeated reuse"):
        method_specs("reuse,reuse")


def _documents(tmp_path: Path) -> list[str]:
    words = ["harbour", "lighthouse", "keeper", "bridge", "river", "city", "tide", "boat"]
    files = []
    for i in range(2):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(" ".join(random.Random(i).choice(words) for _ in range(80)), "utf-8")
        files.append(str(path))
    return files


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_ask_spec_options_reach_the_method(
    budget: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"samkv+ranking=global+budget={budget}"
    argv = ["ask", "--model", "random:tiny-llama", "--device", "cpu",
            "--store", str(tmp_path / "kv"), "--method", spec, "--max-new-tokens", "2",
            "Who keeps the lighthouse?", *_documents(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    found = re.search(rf"\[{re.escape(spec)}\] TTFT \d+ ms, kept (\d+)% of (\d+) context", out)
    assert found, out
    # Global ranking fills the budget up to a block: the kept share follows the option.
    assert abs(int(found[1]) - budget * 100) <= 2


def _parser(module: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    return parser


def test_engine_arguments_keep_each_commands_defaults() -> None:
    eval_args = _parser("samkv_integrations.eval.cli").parse_args(["--data", "x.jsonl"])
    assert (eval_args.model, eval_args.device, eval_args.store) == (DEFAULT_MODEL, None, None)
    bench = _parser("samkv_integrations.bench.cli")
    bench_args = bench.parse_args([])
    assert (bench_args.model, bench_args.shape, bench_args.store) == (None, None, None)
    assert "a temporary one" in bench.format_help()
    for module in ("samkv_chroma_demo.cli", "samkv_chroma_demo.server"):
        args = _parser(module).parse_args(["--device", "cuda:1"])
        assert (args.model, args.device, args.store, args.method) == (None, "cuda:1", None, "samkv")


def test_bench_model_and_shape_stay_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser("samkv_integrations.bench.cli").parse_args(
            ["--model", "x", "--shape", "tiny-llama"]
        )
    assert "not allowed with argument" in capsys.readouterr().err


def test_model_group_takes_model_only() -> None:
    parser = argparse.ArgumentParser()
    group = parser.add_mutually_exclusive_group()
    add_engine_arguments(parser, model_default="m", store_help="here", model_group=group)
    assert [a.dest for a in group._group_actions] == ["model"]
    args = parser.parse_args(["--store", "s"])
    assert (args.model, args.device, args.store) == ("m", None, "s")
