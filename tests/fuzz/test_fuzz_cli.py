"""Bad input through every ``samkv`` command, in-process: one line on stderr, never a traceback.

Each case runs ``samkv_integrations.cli.main`` in a fresh working directory, with a store
and a run directory of its own, and asserts that it exits non-zero with exactly one
``samkv <command>: ...`` line naming the cause, that no traceback was printed, that the
store it used holds only entries that load, and that nothing was written where it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations.cli import main
from tests.fuzz.common import Case, check_store

MODEL = ["--model", "random:tiny-llama", "--device", "cpu"]
ENGINE = [*MODEL, "--store", "{store}"]
GOOD_RECORD = {
    "id": "q1",
    "question": "Who keeps the lighthouse?",
    "contexts": [{"title": "Harbour", "text": "Marta keeps the lighthouse."}],
    "answers": ["Marta"],
}

#: Files the cases point at, by name: text documents and eval data files.
FILES: dict[str, bytes] = {
    "ok.txt": b"The lighthouse keeper rows to the island at dawn.",
    "empty.txt": b"",
    "blank.txt": b"  \n\t\n",
    "latin1.txt": "caf\u00e9 cr\u00e8me".encode("latin-1"),
    "utf16.txt": "hello".encode("utf-16"),
    "long.txt": b"word " * 5000,
    "good.jsonl": json.dumps(GOOD_RECORD).encode(),
    "empty.jsonl": b"",
    "blank.jsonl": b"\n \n",
    "latin1.jsonl": json.dumps(GOOD_RECORD).encode().replace(b"Marta", b"M\xe4rta"),
    "deep.jsonl": b"[" * 100_000,
    "notjson.jsonl": b"{oops",
    "array.jsonl": b"[1, 2]",
    "null.jsonl": b"null",
}


def record(**changes: Any) -> bytes:
    return json.dumps({**GOOD_RECORD, **changes}).encode()


FILES |= {
    "no-question.jsonl": json.dumps(
        {k: v for k, v in GOOD_RECORD.items() if k != "question"}
    ).encode(),
    "empty-question.jsonl": record(question="  "),
    "surrogate-question.jsonl": record(question="who \ud800?"),  # json escapes it: \ud800
    "int-question.jsonl": record(question=5),
    "contexts-string.jsonl": record(contexts="Marta keeps it."),
    "empty-context.jsonl": record(contexts=[{"title": "Harbour", "text": ""}]),
    "surrogate-context.jsonl": record(contexts=[{"title": "H", "text": "x\udc80"}]),
    "context-no-title.jsonl": record(contexts=[{"text": "Marta."}]),
    "empty-answers.jsonl": record(answers=[]),
    "int-answer.jsonl": record(answers=[5]),
    "list-id.jsonl": record(id=[1]),
    "repeated-id.jsonl": record() + b"\n" + record(),
    "hotpot-no-spans.jsonl": json.dumps(
        {
            "question_id": "h1",
            "question_text": "Who?",
            "answers_objects": [{"number": ""}],
            "contexts": [{"title": "T", "paragraph_text": "Marta."}],
        }
    ).encode(),
}


def cli(id: str, keyword: str, argv: list[str], **extra: Any) -> Case:
    """A command line; ``extra``: ``code`` (exit status), ``interrupt`` (what raises Ctrl-C),
    ``prefix`` (of the error line, when not ``samkv <command>:``)."""
    return Case(id, keyword, argv, extra.pop("gap", None), extra)


def ask(*argv: str, question: str = "Who rows?", files: tuple[str, ...] = ("{files}/ok.txt",)):
    return ["ask", *ENGINE, "--max-new-tokens", "2", *argv, question, *files]


def data(name: str, *argv: str) -> list[str]:
    return ["eval", *MODEL, "--store", "{store}", "--out", "{out}", "--no-progress",
            "--data", f"{{files}}/{name}", *argv]  # fmt: skip


INDEX_CASES = [
    cli("index-empty-file", "empty.txt: the file is empty", ["index", *ENGINE, "{files}/empty.txt"]),
    cli("index-blank-file", "blank.txt: the file is empty", ["index", *ENGINE, "{files}/blank.txt"]),
    cli("index-latin1-file", "not UTF-8", ["index", *ENGINE, "{files}/latin1.txt"]),
    cli("index-utf16-file", "not UTF-8", ["index", *ENGINE, "{files}/utf16.txt"]),
    cli("index-missing-file", "no such file", ["index", *ENGINE, "{files}/nope.txt"]),
    cli("index-directory", "is a directory", ["index", *ENGINE, "{files}"]),
    cli("index-too-long", "long.txt is 25011 tokens", ["index", *ENGINE, "{files}/long.txt"]),
    cli("index-second-file-empty", "empty.txt",
        ["index", *ENGINE, "{files}/ok.txt", "{files}/empty.txt"]),
    cli("index-no-files", "required", ["index", *ENGINE]),
    # argparse reports an unknown option of index or ask from the root parser: "samkv: ".
    cli("index-unknown-option", "unrecognized", ["index", *ENGINE, "--bogus", "{files}/ok.txt"],
        prefix="samkv:"),
    cli("index-store-empty", "--store: is empty", ["index", *MODEL, "--store", "", "{files}/ok.txt"]),
    cli("index-store-blank", "--store", ["index", *MODEL, "--store", "  ", "{files}/ok.txt"]),
    cli("index-store-under-file", "cannot create",
        ["index", *MODEL, "--store", "{files}/ok.txt/kv", "{files}/ok.txt"]),
    cli("index-store-is-file", "cannot create",
        ["index", *MODEL, "--store", "{files}/ok.txt", "{files}/ok.txt"]),
    cli("index-model-empty", "--model: is empty",
        ["index", "--model", "", "--store", "{store}", "{files}/ok.txt"]),
    cli("index-model-unknown", "'nope' is not a registry model",
        ["index", "--model", "nope", "--store", "{store}", "{files}/ok.txt"]),
    cli("index-model-missing-path", "does not exist",
        ["index", "--model", "/no/such/model", "--store", "{store}", "{files}/ok.txt"]),
    cli("index-model-no-config", "config.json",
        ["index", "--model", "{files}", "--store", "{store}", "{files}/ok.txt"]),
    cli("index-model-random-shape", "unknown shape",
        ["index", "--model", "random:nope", "--store", "{store}", "{files}/ok.txt"]),
    *[
        cli(f"index-device-{device}", keyword,
            ["index", "--model", "random:tiny-llama", "--device", device, "--store", "{store}",
             "{files}/ok.txt"])
        for device, keyword in [
            ("cuda", "no CUDA device"), ("cuda:3", "CUDA"), ("mps", "no MPS device"),
            ("meta", "meta"), ("bogus", "not a torch device"), ("", "--device: is empty"),
            ("cuda:x", "not a torch device"),
        ]
    ],
]  # fmt: skip

ASK_CASES = [
    cli("ask-empty-question", "question is empty", ask(question="")),
    cli("ask-blank-question", "question is empty", ask(question=" \t ")),
    cli("ask-surrogate-question", "not valid text", ask(question="who\udcff?")),
    cli("ask-too-long-question", "context", ask(question="why " * 5000)),
    *[
        cli(f"ask-max-new-tokens-{name}", "--max-new-tokens", ask("--max-new-tokens", value))
        for name, value in [("zero", "0"), ("negative", "-1"), ("text", "x"), ("float", "1.5"),
                            ("empty", "")]
    ],
    cli("ask-max-new-tokens-huge", "max_new_tokens=100000000",
        ask("--max-new-tokens", "100000000")),
    *[
        cli(f"ask-method-{name}", keyword, ask("--method", value))
        for name, value, keyword in [
            ("unknown", "nope", "unknown method"), ("empty", "", "unknown method"),
            ("budget", "samkv+budget=2", "budget"), ("option", "samkv+budgt=1", "budgt"),
            ("not-key-value", "samkv+ranking", "key=value"), ("two", "full,samkv", "unknown method"),
        ]
    ],
    cli("ask-empty-file", "the file is empty", ask(files=("{files}/empty.txt",))),
    cli("ask-latin1-file", "not UTF-8", ask(files=("{files}/latin1.txt",))),
    cli("ask-missing-file", "no such file", ask(files=("{files}/nope.txt",))),
    cli("ask-too-long-file", "long.txt is 25011 tokens", ask(files=("{files}/long.txt",))),
    cli("ask-no-files", "required", ["ask", *ENGINE, "Who rows?"]),
    cli("ask-store-empty", "--store", ["ask", *MODEL, "--store", "", "Who?", "{files}/ok.txt"]),
    cli("ask-device-cuda", "no CUDA device",
        ["ask", "--model", "random:tiny-llama", "--device", "cuda", "--store", "{store}",
         "Who?", "{files}/ok.txt"]),
    cli("ask-model-unknown", "nope",
        ["ask", "--model", "nope", "--store", "{store}", "Who?", "{files}/ok.txt"]),
]  # fmt: skip

EVAL_CASES = [
    cli("eval-missing-data", "no such file", data("nope.jsonl")),
    cli("eval-data-directory", "no such file", ["eval", *MODEL, "--data", "{files}"]),
    cli("eval-data-empty-path", "--data: is empty", ["eval", *MODEL, "--data", ""]),
    *[
        cli(f"eval-data-{name.removesuffix('.jsonl')}", keyword, data(name))
        for name, keyword in [
            ("empty.jsonl", "holds no questions"), ("blank.jsonl", "holds no questions"),
            ("latin1.jsonl", "latin1.jsonl:1: not UTF-8"), ("deep.jsonl", "nested too deeply"),
            ("notjson.jsonl", "not valid JSON"), ("array.jsonl", "expected a JSON object"),
            ("null.jsonl", "expected a JSON object"), ("no-question.jsonl", "'question'"),
            ("empty-question.jsonl", "'question' is empty"),
            ("surrogate-question.jsonl", "'question' is not valid text"),
            ("int-question.jsonl", "'question' must be a string"),
            ("contexts-string.jsonl", "'contexts' must be a list"),
            ("empty-context.jsonl", "contexts[0].text"),
            ("surrogate-context.jsonl", "contexts[0].text' is not valid text"),
            ("context-no-title.jsonl", "contexts[0].title"),
            ("empty-answers.jsonl", "'answers' is an empty list"),
            ("int-answer.jsonl", "answers[0]"), ("list-id.jsonl", "'id'"),
            ("repeated-id.jsonl", "repeats"), ("hotpot-no-spans.jsonl", "spans"),
        ]
    ],
    *[
        cli(f"eval-{option.strip('-')}-{name}", option, data("good.jsonl", option, value))
        for option, name, value in [
            ("--limit", "zero", "0"), ("--limit", "text", "all"),
            ("--chunk-tokens", "zero", "0"), ("--chunk-tokens", "negative", "-5"),
            ("--max-new-tokens", "zero", "0"), ("--out", "empty", ""), ("--runs-root", "empty", ""),
            ("--store", "empty", ""), ("--model", "empty", ""),
            ("--workers", "zero", "0"), ("--workers", "text", "many"),
        ]
    ],
    cli("eval-methods-empty", "no method given", data("good.jsonl", "--methods", "")),
    cli("eval-methods-unknown", "unknown method", data("good.jsonl", "--methods", "full,nope")),
    cli("eval-methods-repeated", "repeated", data("good.jsonl", "--methods", "full,full")),
    cli("eval-device-cuda", "no CUDA device", data("good.jsonl", "--device", "cuda")),
    cli("eval-device-bogus", "device", data("good.jsonl", "--device", "tpu")),
    cli("eval-model-unknown", "nope", data("good.jsonl", "--model", "nope")),
    cli("eval-out-is-a-file", "ok.txt", data("good.jsonl", "--out", "{files}/ok.txt")),
    cli("eval-no-data", "--data", ["eval", *MODEL]),
]  # fmt: skip

BENCH = ["bench", "--shape", "tiny-llama", "--device", "cpu", "--store", "{store}",
         "--workloads", "1x16", "--repeats", "1", "--warmup", "0", "--decode-steps", "0",
         "--output", "{out}/bench.json"]  # fmt: skip
BENCH_CASES = [
    *[
        cli(f"bench-{option.strip('-')}-{name}", keyword, [*BENCH, option, value])
        for option, name, value, keyword in [
            ("--workloads", "not-dxt", "axb", "not DxT"), ("--workloads", "empty", "", "no workload"),
            ("--workloads", "zero", "0x16", "at least 1 document"),
            ("--workloads", "comma", ",", "no workload"),
            ("--dtype", "bogus", "float8", "--dtype"), ("--repeats", "zero", "0", "--repeats"),
            ("--warmup", "negative", "-1", "--warmup"),
            ("--decode-steps", "negative", "-1", "--decode-steps"),
            ("--max-batch", "zero", "0", "--max-batch"),
            ("--memory-gib", "negative", "-1", "--memory-gib"),
            ("--memory-gib", "nan", "nan", "--memory-gib"),
            ("--sdpa-backends", "bogus", "fast", "unknown backend"),
            ("--shape", "unknown", "nope", "unknown shape"), ("--seed", "text", "x", "--seed"),
            ("--methods", "budget", "samkv+budget=2", "budget"),
            ("--methods", "empty", "", "no method"), ("--store", "empty", "", "--store"),
            ("--output", "empty", "", "--output"),
            ("--output", "directory", "{files}", "is a directory"),
            ("--device", "cuda", "cuda", "no CUDA device"),
            ("--model", "with-shape", "x", "not allowed with argument"),
        ]
    ],
    cli("bench-method-fails-at-run-time", "check_layer 99 >= the model's",
        [*BENCH, "--methods", "full,cacheblend+check_layer=99"], code=1),
]  # fmt: skip

DEMO = ["--store", "{store}", "--chroma-path", "{out}/chroma"]
DEMO_CASES = [
    *[
        cli(f"{command}-{option.strip('-')}-{name}", keyword, [command, *DEMO, option, value])
        for command in ("demo", "serve")
        for option, name, value, keyword in [
            ("--corpus", "empty", "", "--corpus: is empty"),
            ("--corpus", "missing", "{files}/nope", "corpus: "),
            ("--corpus", "file", "{files}/ok.txt", "is not a directory"),
            ("--top-k", "zero", "0", "--top-k"), ("--chunk-tokens", "small", "8", "--chunk-tokens"),
            ("--chroma-port", "zero", "0", "--chroma-port"),
            ("--chroma-port", "big", "70000", "--chroma-port"),
            ("--chroma-path", "empty", "", "--chroma-path"),
            ("--chroma-host", "empty", "", "--chroma-host"),
            ("--max-new-tokens", "zero", "0", "--max-new-tokens"),
            ("--method", "unknown", "nope", "unknown method"), ("--store", "empty", "", "--store"),
            ("--device", "cuda", "cuda", "no CUDA device"), ("--model", "unknown", "nope", "nope"),
        ]
    ],
    *[
        cli(f"demo-question-{name}", keyword, ["demo", *DEMO, "--question", value])
        for name, value, keyword in [("empty", "", "question is empty"),
                                     ("surrogate", "\udcff", "not valid text")]
    ],
    *[
        cli(f"serve-{option.strip('-')}-{name}", option, ["serve", *DEMO, option, value])
        for option, name, value in [
            ("--port", "zero", "0"), ("--port", "big", "65536"), ("--port", "text", "http"),
            ("--host", "empty", ""), ("--allow-host", "empty", ""),
            ("--max-body-bytes", "tiny", "10"), ("--max-body-bytes", "text", "64k"),
        ]
    ],
]  # fmt: skip

# Ctrl-C at the first step of each command: one line, status 130, nothing else.
INTERRUPT_CASES = [
    cli("interrupt-index", "interrupted", ["index", *ENGINE, "{files}/ok.txt"], code=130,
        interrupt="samkv_integrations.SamKVEngine.from_pretrained"),
    cli("interrupt-ask", "interrupted", ask(), code=130,
        interrupt="samkv_integrations.SamKVEngine.from_pretrained"),
    cli("interrupt-eval", "run the same command again to resume", data("good.jsonl"), code=130,
        interrupt="samkv_integrations.eval.cli.execute_run"),
    cli("interrupt-bench", "interrupted", BENCH, code=130,
        interrupt="samkv_integrations.bench.cli._model"),
    cli("interrupt-demo", "interrupted", ["demo", *DEMO], code=130,
        interrupt="samkv_chroma_demo.cli.open_demo"),
    cli("interrupt-serve", "interrupted", ["serve", *DEMO], code=130,
        interrupt="samkv_chroma_demo.cli.open_demo"),
]  # fmt: skip

TOP_CASES = [
    cli("no-command", "required", []),
    cli("unknown-command", "invalid choice", ["bogus"]),
    cli(
        "unknown-top-option",
        "unrecognized",
        ["--bogus", "index", "{files}/ok.txt"],
        prefix="samkv:",
    ),
]

CLI_CASES = (
    INDEX_CASES + ASK_CASES + EVAL_CASES + BENCH_CASES + DEMO_CASES + INTERRUPT_CASES + TOP_CASES
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-files")
    for name, content in FILES.items():
        (root / name).write_bytes(content)
    return root


def _interrupt(*args: Any, **kwargs: Any) -> Any:
    raise KeyboardInterrupt


def _prefix(argv: list[str]) -> str:
    command = next((a for a in argv if not a.startswith("-")), None)
    known = {"index", "ask", "eval", "bench", "demo", "serve"}
    return f"samkv {command}:" if command in known else "samkv:"


@pytest.mark.parametrize("case", [c.param() for c in CLI_CASES])
def test_bad_command_line_is_one_named_line(
    case: Case,
    files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    where = {"files": files, "store": tmp_path / "kv", "out": tmp_path / "out"}
    argv = [arg.format(**where) for arg in case.args]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if "interrupt" in case.extra:
        monkeypatch.setattr(case.extra["interrupt"], _interrupt)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()

    assert "Traceback" not in err and "Traceback" not in out, err
    assert code not in (0, None), out
    if "code" in case.extra:
        assert code == case.extra["code"], err
    prefix = case.extra.get("prefix", _prefix(argv))
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    assert case.keyword.lower() in lines[0].lower(), lines[0]
    check_store(tmp_path / "kv")
    assert not list(cwd.iterdir()), "wrote into the working directory"
