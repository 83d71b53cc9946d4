from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from samkv_chroma_demo.cli import add_arguments, run


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_bad_corpus_folder_is_an_error_before_any_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run(parse("--corpus", str(tmp_path / "nope"), "--chroma-path", str(tmp_path / "chroma")))
        == 2
    )
    assert "samkv demo: error: corpus: " in capsys.readouterr().err


def answer_rows(out: str, section: str) -> dict[str, str]:
    block = out.split(section, 1)[1].split("sources:", 1)[0]
    rows = [line.strip() for line in block.splitlines() if "TTFT" in line]
    return {row.split()[0]: row.split("answer: ", 1)[1] for row in rows}


@pytest.mark.real_model
def test_user_folder_is_answered_through_both_frameworks_then_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "harbour.txt").write_text(
        "The harbour of Port Elwin has two high tides a day. Its lighthouse keeper is Marta Ruiz.",
        "utf-8",
    )
    (docs / "sub" / "bridge.md").write_text(
        "# Bridge\n\nThe Elwin bridge opened in 1911 and is painted green.", "utf-8"
    )
    argv = [
        "--corpus", str(docs), "--question", "Who keeps the lighthouse of Port Elwin?",
        "--chroma-path", str(tmp_path / "chroma"), "--store", str(tmp_path / "kv"),
        "--top-k", "2", "--max-new-tokens", "12", "--device", "cpu",
    ]  # fmt: skip

    assert run(parse(*argv)) == 0
    first = capsys.readouterr().out
    assert "ingested 2 chunks" in first and "2 KV caches computed, 0 already stored" in first
    llamaindex = answer_rows(first, "LlamaIndex query engine")
    langchain = answer_rows(first, "LangChain chain")
    assert set(llamaindex) == set(langchain) == {"samkv", "full"}
    # One collection, one store: both frameworks answer from the same chunks and caches.
    assert llamaindex == langchain
    assert "sources: harbour.txt #1; sub/bridge.md #1" in first

    assert run(parse(*argv)) == 0
    second = capsys.readouterr().out
    assert "reused collection" in second and "(2 chunks) and 2/2 KV caches from the store" in second
    assert answer_rows(second, "LlamaIndex query engine") == llamaindex
