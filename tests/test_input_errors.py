"""Issue 14, items 6 and 11: a user's mistake is one named error, a bug keeps its traceback.

Before this change: an int document raised ``AttributeError``, a string budget ``'<' not
supported``, ``temperature=nan`` a ``RuntimeError`` from sampling; ``--store ''`` wrote a
store into the working directory; ``ask`` said "recomputed 0%" after re-encoding a
document whose cache was unusable; Ctrl-C in ``eval`` printed a traceback; a bench whose
method failed exited 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import CacheRef, SamKVEngine
from samkv_integrations.cli import main
from samkv_integrations.decode import GenerationOptions
from samkv_integrations.methods import CacheBlendMethod, SamKVMethod

ENGINE = ["--model", "random:tiny-llama", "--device", "cpu"]


@pytest.fixture
def doc(tmp_path: Path) -> str:
    path = tmp_path / "doc.txt"
    path.write_text("The lighthouse keeper rows to the island at dawn. " * 4, "utf-8")
    return str(path)


def test_a_document_that_is_not_text_is_a_type_error_naming_it(tiny_engine: SamKVEngine) -> None:
    with pytest.raises(TypeError, match="document text must be a str, got int"):
        tiny_engine.index(["fine", 5])
    with pytest.raises(TypeError, match="not one string"):
        tiny_engine.index("hello")  # not five one-character documents


def test_a_budget_that_is_not_a_number_names_the_field(tiny_engine: SamKVEngine) -> None:
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got '0.2'"):
        SamKVMethod(budget="0.2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recompute_ratio"):
        CacheBlendMethod(recompute_ratio="0.2")  # type: ignore[arg-type]
    refs = tiny_engine.index(["A short document."], progress=False)
    with pytest.raises(ValueError, match="budget"):
        tiny_engine.answer("Which?", refs, "samkv", method_options={"budget": "0.2"})


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"min_new_tokens": -1}, ValueError),
        ({"min_new_tokens": 5, "max_new_tokens": 4}, ValueError),
        ({"min_new_tokens": 2.0}, TypeError),
        ({"min_new_tokens": True}, TypeError),
    ],
)
def test_min_new_tokens_outside_its_range_is_refused(
    options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error, match="min_new_tokens"):
        GenerationOptions(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sampling_options_are_refused_before_decoding(
    tiny_engine: SamKVEngine, field: str, value: float
) -> None:
    with pytest.raises(ValueError, match=f"{field} must be finite"):
        GenerationOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        tiny_engine.answer("Which?", [], "full", max_new_tokens=2, **{field: value})


def test_an_empty_store_path_is_refused_and_nothing_is_written(
    tmp_path: Path, doc: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        main(["index", *ENGINE, "--store", "", doc])
    assert exit_info.value.code == 2
    assert "samkv index: error: argument --store: is empty" in capsys.readouterr().err
    assert not list(cwd.iterdir())


def test_ask_reports_documents_encoded_because_no_stored_cache_was_usable(
    tmp_path: Path, doc: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "kv"
    argv = ["ask", *ENGINE, "--store", str(store), "--method", "reuse", "--max-new-tokens", "2"]

    def summary() -> str:
        assert main([*argv, "Who rows?", doc]) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    # reuse recomputes nothing itself: an encoded document is reported beside its 0%.
    first = summary()
    assert "recomputed 0%; encoded 1 of 1 documents first (no usable stored cache)" in first
    assert "encoded" not in summary()  # stored now
    for path in (p for p in store.rglob("*") if p.is_file()):
        path.write_bytes(b"not a cache")  # a disk fault: the entry is there, unusable
    assert "encoded 1 of 1 documents first" in summary()
    # A cache gone between indexing and answering is encoded while answering (in TTFT).
    index = SamKVEngine.index

    def index_then_lose(self: SamKVEngine, texts: list[str], **kwargs: Any) -> list[CacheRef]:
        refs = index(self, texts, **kwargs)
        self.delete_caches(refs)
        return refs

    monkeypatch.setattr(SamKVEngine, "index", index_then_lose)
    last = summary()
    assert "recomputed 0%; re-encoded 1 of 1 while answering" in last, last


def test_ctrl_c_in_eval_is_one_line_and_status_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "qa.jsonl"
    record = {"id": "q", "question": "Who?", "contexts": [{"title": "T", "text": "Ann."}],
              "answers": ["Ann"]}  # fmt: skip
    data.write_text(json.dumps(record) + "\n", "utf-8")

    def interrupted(plan: object) -> dict[str, object]:
        raise KeyboardInterrupt

    monkeypatch.setattr("samkv_integrations.eval.cli.execute_run", interrupted)
    code = main(["eval", *ENGINE, "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 130
    assert err == "samkv eval: interrupted; run the same command again to resume\n"


def test_a_bug_keeps_its_traceback(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the documented user errors become one line: anything else is not swallowed.
    def broken(*args: object, **kwargs: object) -> SamKVEngine:
        raise AttributeError("a bug")

    monkeypatch.setattr("samkv_integrations.SamKVEngine.from_pretrained", broken)
    with pytest.raises(AttributeError, match="a bug"):
        main(["index", *ENGINE, doc])


def test_verbose_logs_the_traceback_of_a_user_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="samkv_integrations.cli")
    assert main(["-v", "index", *ENGINE, str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    (failed,) = [r for r in caplog.records if r.name == "samkv_integrations.cli"]
    assert failed.exc_info is not None and failed.exc_info[0] is ValueError


def test_bench_exits_non_zero_when_a_method_fails_and_keeps_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--shape", "tiny-llama", "--device", "cpu", "--workloads", "1x16",
            "--methods", "full,cacheblend+check_layer=99", "--repeats", "1", "--warmup", "0",
            "--decode-steps", "0", "--output", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "samkv bench: error: cacheblend+check_layer=99 on 1x16: ValueError: check_layer" in err
    assert "Traceback" not in err
    (work,) = json.loads(out.read_text())["workloads"]
    assert work["methods"]["full"]["ttft_s"] > 0
    assert "check_layer 99" in work["methods"]["cacheblend+check_layer=99"]["error"]


def test_a_ref_to_a_missing_cache_without_text_is_a_cache_error(
    tiny_engine: SamKVEngine,
) -> None:
    from samkv_integrations import CacheMissError

    ref = CacheRef("0" * 64, 3, tiny_engine.fingerprint)
    with pytest.raises(CacheMissError, match="carries no text"):
        tiny_engine.answer("Which?", [ref], "samkv", max_new_tokens=2)
