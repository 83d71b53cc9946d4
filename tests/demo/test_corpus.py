from __future__ import annotations

from pathlib import Path

import pytest
from samkv_chroma_demo.corpus import (
    Passage,
    build_bundled,
    bundled_passages,
    corpus_digest,
    folder_passages,
    sample_questions,
)

DATA = Path(__file__).parents[2] / "examples" / "chroma_demo" / "data"


def test_bundled_corpus_is_a_few_hundred_unique_paragraphs() -> None:
    passages = bundled_passages()
    assert 150 <= len(passages) <= 300
    assert len({p.title for p in passages}) == len(passages)
    assert len({p.id for p in passages}) == len(passages)
    assert all(
        p.text.startswith(p.title + "\n") and len(p.text) > len(p.title) + 20 for p in passages
    )


def test_sample_questions_are_answerable_from_the_corpus() -> None:
    passages = {p.title: p.text for p in bundled_passages()}
    samples = sample_questions()
    assert len(samples) == 3
    for sample in samples:
        assert sample.answers and len(sample.supporting) == 2
        assert set(sample.supporting) <= set(passages), sample.question
        supporting_text = " ".join(passages[t] for t in sample.supporting)
        assert any(answer in supporting_text for answer in sample.answers), sample.question


def test_attribution_names_source_and_licence() -> None:
    text = (DATA / "ATTRIBUTION.md").read_text("utf-8")
    for needle in ("HotpotQA", "CC BY-SA 4.0", "Yang", "Wikipedia"):
        assert needle in text


def test_folder_chunks_text_and_markdown_only(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("Short note about tides.", "utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "long.md").write_text(
        " ".join(f"Sentence number {i} is here." for i in range(200)), "utf-8"
    )
    (tmp_path / "code.py").write_text("print('not a document')", "utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden", "utf-8")
    (tmp_path / "empty.txt").write_text("   \n", "utf-8")

    passages = folder_passages(tmp_path, chunk_tokens=64, chunk_overlap=8, tokenizer=str.split)

    sources = {p.source for p in passages}
    assert sources == {"notes.txt", "sub/long.md"}
    long_chunks = [p for p in passages if p.source == "sub/long.md"]
    assert len(long_chunks) > 10
    assert all(len(p.text.split()) <= 64 for p in long_chunks)
    assert "Sentence number 0 is here." in long_chunks[0].text
    assert "Sentence number 199 is here." in long_chunks[-1].text
    assert len({p.id for p in passages}) == len(passages)


def test_folder_errors_name_the_corpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"corpus: .* is not a directory"):
        folder_passages(tmp_path / "missing")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="corpus: no non-empty"):
        folder_passages(tmp_path)


def test_digest_changes_with_any_text() -> None:
    a = [Passage("1", "t", "some text", "s")]
    b = [Passage("1", "t", "some text!", "s")]
    assert corpus_digest(a) == corpus_digest(list(a))
    assert corpus_digest(a) != corpus_digest(b)


def _row(qid: str, titles: list[str], supporting: list[str]) -> dict[str, object]:
    return {
        "question_id": qid,
        "question_text": f"question {qid}?",
        "answers_objects": [{"spans": [f"answer {qid}"]}],
        "contexts": [
            {"title": t, "paragraph_text": f"About {t}.", "is_supporting": t in supporting}
            for t in titles
        ],
    }


def test_build_bundled_dedupes_by_title_and_stops_at_the_limit() -> None:
    rows = [
        _row("q1", ["A", "B", "C"], ["A", "B"]),
        _row("q2", ["B", "D"], ["B", "D"]),
        _row("q3", ["E", "F", "G"], ["E", "F"]),
    ]
    passages, questions = build_bundled(rows, max_passages=5, sample_ids=["q2"])
    assert [p.title for p in passages] == ["A", "B", "C", "D"]
    assert passages[1].text == "B\nAbout B."
    assert questions[0].supporting == ("B", "D") and questions[0].answers == ("answer q2",)
    with pytest.raises(ValueError, match="sample_ids"):
        build_bundled(rows, max_passages=5, sample_ids=["q3"])
