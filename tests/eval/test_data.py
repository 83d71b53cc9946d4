from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.eval.data import Paragraph, pack_paragraphs, read_questions
from samkv_integrations.models import LoadedModel

HOTPOTQA = Path("/work/shared/data/hotpotqa_dev_300.jsonl")


def write_jsonl(path: Path, rows: list[Any], raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generic_row(qid: str) -> dict[str, Any]:
    return {
        "id": qid,
        "question": f"Question {qid}?",
        "contexts": [{"title": "Alpha", "text": "Alpha text."}, {"title": "", "text": "Untitled."}],
        "answers": ["one", "uno"],
    }


def hotpot_row(qid: str) -> dict[str, Any]:
    return {
        "question_id": qid,
        "question_text": f"Which {qid}?",
        "answers_objects": [{"number": "", "date": {}, "spans": ["Chief of Protocol"]}],
        "contexts": [
            {
                "id": "0",
                "title": "Shirley Temple",
                "paragraph_text": "She was.",
                "is_supporting": True,
            },
            {"id": "1", "title": "Other", "paragraph_text": "Not it.", "is_supporting": False},
        ],
    }


def test_generic_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [generic_row("a"), generic_row("b")])
    questions = read_questions(path)
    assert [q.id for q in questions] == ["a", "b"]
    first = questions[0]
    assert first.question == "Question a?"
    assert first.answers == ("one", "uno")
    assert first.contexts == (Paragraph("Alpha", "Alpha text."), Paragraph("", "Untitled."))
    assert [p.document_text for p in first.contexts] == ["Alpha\nAlpha text.", "Untitled."]


def test_hotpotqa_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [hotpot_row("x1"), hotpot_row("x2")], {1: "   "})
    questions = read_questions(path)
    assert [q.id for q in questions] == ["x1", "x2"]
    assert questions[0].question == "Which x1?"
    assert questions[0].answers == ("Chief of Protocol",)
    assert questions[0].contexts[0].document_text == "Shirley Temple\nShe was."


@pytest.mark.skipif(not HOTPOTQA.exists(), reason="shared HotpotQA file not on this machine")
def test_shared_hotpotqa_file() -> None:
    questions = read_questions(HOTPOTQA, limit=3)
    assert len(questions) == 3
    assert questions[0].id == "5a8c7595554299585d9e36b6"
    assert questions[0].answers == ("Chief of Protocol",)
    assert len(questions[0].contexts) == 10
    assert questions[0].contexts[1].title == "Shirley Temple"


def test_limit_takes_the_first_questions(tmp_path: Path) -> None:
    rows = [generic_row(str(i)) for i in range(5)]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    assert [q.id for q in read_questions(path, limit=2)] == ["0", "1"]
    with pytest.raises(ValueError, match="limit"):
        read_questions(path, limit=0)


@pytest.mark.parametrize(
    ("row_fn", "damage", "field"),
    [
        (generic_row, lambda r: r["contexts"][1].pop("title"), r"'contexts\[1\]\.title'"),
        (generic_row, lambda r: r.pop("answers"), "'answers'"),
        (generic_row, lambda r: r.update(answers=[]), "'answers'"),
        (generic_row, lambda r: r.update(question="  "), "'question'"),
        (
            hotpot_row,
            lambda r: r["answers_objects"][0].pop("spans"),
            r"'answers_objects\[0\]\.spans'",
        ),
        (hotpot_row, lambda r: r.update(answers_objects=[]), r"'answers_objects\[0\]'"),
        (
            hotpot_row,
            lambda r: r["contexts"][0].pop("paragraph_text"),
            r"'contexts\[0\]\.paragraph_text'",
        ),
        (hotpot_row, lambda r: r.update(contexts="text"), "'contexts' must be a list"),
    ],
)
def test_malformed_line_names_file_line_and_field(
    tmp_path: Path, row_fn: Any, damage: Any, field: str
) -> None:
    rows = [row_fn("q0"), row_fn("q1"), row_fn("q2")]
    damage(rows[2])
    # A blank line before the bad record: line numbers count physical lines.
    path = write_jsonl(tmp_path / "bad.jsonl", rows, {1: ""})
    with pytest.raises(ValueError, match=rf"bad\.jsonl:4: field {field}"):
        read_questions(path)


def test_invalid_json_duplicate_id_and_unknown_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "j.jsonl", [generic_row("a")], {1: "{not json"})
    with pytest.raises(ValueError, match=r"j\.jsonl:2: not valid JSON"):
        read_questions(path)
    path = write_jsonl(tmp_path / "d.jsonl", [generic_row("a"), generic_row("b"), generic_row("a")])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: field 'id' repeats 'a' from line 1"):
        read_questions(path)
    path = write_jsonl(tmp_path / "u.jsonl", [{"query": "?"}])
    with pytest.raises(ValueError, match=r"u\.jsonl:1: field 'question' is missing"):
        read_questions(path)
    with pytest.raises(ValueError, match="no such file"):
        read_questions(tmp_path / "absent.jsonl")


def test_pack_respects_budget_and_order() -> None:
    texts = ["a" * 10, "b" * 10, "c" * 10, "d" * 50, "e" * 5, "f" * 5]
    docs = pack_paragraphs(texts, 25, len)
    assert docs == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10, "d" * 50, "e" * 5 + "\n\n" + "f" * 5]
    # Order and content survive: the documents are the paragraphs, regrouped.
    assert "\n\n".join(docs).split("\n\n") == texts
    assert all(len(d) <= 25 for d in docs if "\n\n" in d)
    assert pack_paragraphs(texts, None, len) == texts
    assert pack_paragraphs(texts, 1000, len) == ["\n\n".join(texts)]
    with pytest.raises(ValueError, match="max_tokens"):
        pack_paragraphs(texts, 0, len)


def test_pack_counts_with_the_engine_framing(tiny_llama: LoadedModel) -> None:
    engine = SamKVEngine(tiny_llama, KVCacheStore("memory://samkv-test-eval-pack"))
    texts = [f"Title {i}\n" + "word " * (5 + 7 * i) for i in range(6)]

    def count(text: str) -> int:
        return len(engine.document_ids(text))

    budget = 120
    docs = pack_paragraphs(texts, budget, count)
    assert len(docs) > 1
    assert "\n\n".join(docs) == "\n\n".join(texts)
    for doc in docs:
        # Only a lone paragraph may exceed the budget.
        assert count(doc) <= budget or doc in texts
    # Greedy: the next document's first paragraph would not have fitted.
    for doc, nxt in itertools.pairwise(docs):
        assert count(doc + "\n\n" + nxt.split("\n\n")[0]) > budget
