from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from langchain_core.embeddings import Embeddings
from samkv_chroma_demo import cli as demo_cli
from samkv_chroma_demo.cli import DemoSession, add_arguments, run
from samkv_chroma_demo.pipeline import DemoIndex

from samkv_integrations.cli import main
from tests.demo.conftest import KeywordEmbedding


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_bad_corpus_folder_is_an_error_before_any_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--corpus", str(tmp_path / "nope"), "--chroma-path", str(tmp_path / "chroma")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "samkv demo: error: corpus: " in err and "Traceback" not in err


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


class KeywordEmbeddings(Embeddings):
    """LangChain's side of the fixture index's one-hot keyword embeddings."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [KeywordEmbedding()._vector(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return KeywordEmbedding()._vector(text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("samkv+budgt=0.2", "unknown option 'budgt' of 'samkv'"),
        ("cacheblend+recompute_ratio=3", "recompute_ratio"),
        ("magic", "unknown method 'magic'"),
    ],
)
def test_bad_method_spec_fails_while_parsing(
    spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--method", spec)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --method: " in err and message in err


def kept_percent(out: str, section: str) -> dict[str, int]:
    block = out.split(section, 1)[1].split("sources:", 1)[0]
    rows = [line.split() for line in block.splitlines() if "TTFT" in line]
    return {row[0]: int(row[row.index("kept") + 1].rstrip("%")) for row in rows}


def test_method_spec_reaches_both_frameworks(
    demo_index: DemoIndex, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import langchain_samkv

    session = DemoSession(demo_index, [], "test corpus")
    monkeypatch.setattr(demo_cli, "open_demo", lambda args: session)
    monkeypatch.setattr(langchain_samkv, "MiniLMEmbeddings", lambda device: KeywordEmbeddings())
    spec = "samkv+ranking=global+budget=0.3"
    argv = ["--question", "What is special about the glacier?", "--method", spec,
            "--top-k", "3", "--max-new-tokens", "4"]  # fmt: skip
    assert run(parse(*argv)) == 0
    out = capsys.readouterr().out
    for section in ("LlamaIndex query engine", "LangChain chain"):
        kept = kept_percent(out, section)
        assert set(kept) == {spec, "full"}
        assert kept["full"] == 100 and 20 <= kept[spec] <= 30, kept
