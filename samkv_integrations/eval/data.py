"""Question-answering data sets for the eval harness, and packing paragraphs into documents.

Two JSON Lines formats are read, detected per file from its first record:

- generic: ``{"id", "question", "contexts": [{"title", "text"}], "answers": [str]}``;
- HotpotQA as processed by IRCoT: ``{"question_id", "question_text",
  "answers_objects": [{"spans": [str]}], "contexts": [{"title", "paragraph_text"}]}``.

Both become :class:`Question` records. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Paragraph",
    "Question",
    "file_sha256",
    "pack_paragraphs",
    "read_questions",
]

#: What separates two paragraphs packed into one document.
PARAGRAPH_SEPARATOR = "\n\n"


@dataclass(slots=True, frozen=True)
class Paragraph:
    """One context paragraph.

    Attributes:
        title: Its title (the Wikipedia page, for HotpotQA); may be empty.
        text: Its text.
    """

    title: str
    text: str

    @property
    def document_text(self) -> str:
        r"""The paragraph as document text: ``"{title}\n{text}"`` (titles help multi-hop)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(slots=True, frozen=True)
class Question:
    """One question with its context paragraphs, in the data set's order.

    Attributes:
        id: The question's id, unique in its file.
        question: The question text.
        contexts: The context paragraphs.
        answers: The gold answers (at least one).
    """

    id: str
    question: str
    contexts: tuple[Paragraph, ...]
    answers: tuple[str, ...]


class _Record:
    """One parsed JSON line, whose lookups raise errors naming file, line and field."""

    def __init__(self, value: Any, path: Path, line: int) -> None:
        self.value = value
        self.where = f"{path}:{line}"

    def fail(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.where}: field {field!r} {problem}")

    def get(self, obj: Any, key: str | int, field: str, kind: type | tuple[type, ...]) -> Any:
        try:
            value = obj[key]
        except (KeyError, IndexError, TypeError):
            raise self.fail(field, "is missing") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.fail(field, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def text(self, obj: Any, key: str | int, field: str) -> str:
        value = self.get(obj, key, field, str)
        if not value.strip():
            raise self.fail(field, "is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" in the JSON
            raise self.fail(field, f"is not valid text: {e.reason}") from None
        return str(value)

    def strings(self, obj: Any, key: str, field: str) -> tuple[str, ...]:
        values = self.get(obj, key, field, list)
        if not values:
            raise self.fail(field, "is an empty list")
        return tuple(self.text(values, i, f"{field}[{i}]") for i in range(len(values)))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _paragraphs(rec: _Record, text_key: str) -> tuple[Paragraph, ...]:
    contexts = rec.get(rec.value, "contexts", "contexts", list)
    paragraphs = []
    for i, ctx in enumerate(contexts):
        title = rec.get(ctx, "title", f"contexts[{i}].title", str)
        paragraphs.append(
            Paragraph(title.strip(), rec.text(ctx, text_key, f"contexts[{i}].{text_key}"))
        )
    return tuple(paragraphs)


def _generic(rec: _Record) -> Question:
    qid = rec.get(rec.value, "id", "id", (str, int))
    return Question(
        id=str(qid),
        question=rec.text(rec.value, "question", "question"),
        contexts=_paragraphs(rec, "text"),
        answers=rec.strings(rec.value, "answers", "answers"),
    )


def _hotpotqa(rec: _Record) -> Question:
    answers = rec.get(rec.value, "answers_objects", "answers_objects", list)
    first = rec.get(answers, 0, "answers_objects[0]", dict)
    return Question(
        id=rec.text(rec.value, "question_id", "question_id"),
        question=rec.text(rec.value, "question_text", "question_text"),
        contexts=_paragraphs(rec, "paragraph_text"),
        answers=rec.strings(first, "spans", "answers_objects[0].spans"),
    )


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                raise ValueError(f"{path}:{number}: not UTF-8 text ({byte})") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON: {e.msg}") from e
            except RecursionError:
                raise ValueError(f"{path}:{number}: JSON nested too deeply") from None


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """Read the first ``limit`` questions (all when ``None``) of a JSON Lines file.

    The format (generic or HotpotQA/IRCoT) is detected from the first record: one with a
    ``question_text`` field is HotpotQA, one with ``question`` is generic. Blank lines
    are skipped.

    Raises:
        ValueError: The file is missing or empty, a line is not JSON, a field is missing,
            empty or of the wrong type, or an id repeats; the message names the file, the
            line number and the field.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not path.is_file():
        raise ValueError(f"data: no such file: {path}")
    questions: list[Question] = []
    seen: dict[str, int] = {}
    parse: Callable[[_Record], Question] | None = None
    for number, value in _lines(path):
        rec = _Record(value, path, number)
        if not isinstance(value, dict):
            raise ValueError(f"{rec.where}: expected a JSON object, got {type(value).__name__}")
        if parse is None:
            if "question_text" in value:
                parse = _hotpotqa
            elif "question" in value:
                parse = _generic
            else:
                raise rec.fail("question", "is missing (and so is 'question_text'): unknown format")
        question = parse(rec)
        if question.id in seen:
            raise rec.fail("id", f"repeats {question.id!r} from line {seen[question.id]}")
        seen[question.id] = number
        questions.append(question)
        if limit is not None and len(questions) == limit:
            break
    if not questions:
        raise ValueError(f"data: {path} holds no questions")
    return questions


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (recorded with every run)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pack_paragraphs(
    texts: Sequence[str], max_tokens: int | None, count_tokens: Callable[[str], int]
) -> list[str]:
    """Pack consecutive paragraphs, in order, into documents of at most ``max_tokens`` tokens.

    Greedy, as a RAG index chunks a stream of paragraphs: a paragraph joins the current
    document while the joined text still counts at most ``max_tokens``; otherwise it starts
    the next document. A paragraph that alone counts more than ``max_tokens`` becomes a
    document of its own: paragraphs are never split.

    Args:
        texts: The paragraphs' document texts, in order.
        max_tokens: The budget per document; ``None`` gives one paragraph per document.
        count_tokens: Token count of a candidate document as the engine frames it.

    Returns:
        The documents' texts; joining them in order gives back every paragraph once.
    """
    if max_tokens is None:
        return list(texts)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    documents: list[str] = []
    current: list[str] = []
    for text in texts:
        candidate = PARAGRAPH_SEPARATOR.join([*current, text])
        if current and count_tokens(candidate) > max_tokens:
            documents.append(PARAGRAPH_SEPARATOR.join(current))
            current = [text]
        else:
            current.append(text)
    if current:
        documents.append(PARAGRAPH_SEPARATOR.join(current))
    return documents
