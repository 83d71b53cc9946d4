"""The demo's documents: a bundled Wikipedia corpus, or the user's own folder of text files.

The bundled corpus is every paragraph (deduplicated by title) of the first HotpotQA dev
questions, supporting and distracting alike, so that retrieval has real work to do; its
sample questions are HotpotQA questions whose two supporting paragraphs are in it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "FOLDER_SUFFIXES",
    "Passage",
    "SampleQuestion",
    "build_bundled",
    "bundled_passages",
    "corpus_digest",
    "folder_passages",
    "sample_questions",
]

#: File types ``--corpus DIR`` ingests.
FOLDER_SUFFIXES = (".txt", ".md")

_CORPUS_FILE = "corpus.jsonl"
_QUESTIONS_FILE = "questions.json"


@dataclass(frozen=True, slots=True)
class Passage:
    """One chunk to index.

    Attributes:
        id: Stable identifier (the Chroma id).
        title: What the page shows as the chunk's name.
        text: The text that is embedded, cached and given to the model.
        source: Where it came from (a file path, or the Wikipedia article).
    """

    id: str
    title: str
    text: str
    source: str


@dataclass(frozen=True, slots=True)
class SampleQuestion:
    """A question the bundled corpus answers.

    Attributes:
        question: The question text.
        answers: Gold answers (HotpotQA spans).
        supporting: Titles of the paragraphs the answer needs.
    """

    question: str
    answers: tuple[str, ...]
    supporting: tuple[str, ...]


def _data_text(name: str) -> str:
    return resources.files("samkv_chroma_demo").joinpath("data", name).read_text("utf-8")


def bundled_passages() -> list[Passage]:
    """The bundled Wikipedia paragraphs (CC BY-SA 4.0, see ``data/ATTRIBUTION.md``)."""
    rows = [json.loads(line) for line in _data_text(_CORPUS_FILE).splitlines() if line.strip()]
    return [Passage(**row) for row in rows]


def sample_questions() -> list[SampleQuestion]:
    """The three questions the demo answers from the bundled corpus."""
    rows = json.loads(_data_text(_QUESTIONS_FILE))
    return [
        SampleQuestion(row["question"], tuple(row["answers"]), tuple(row["supporting"]))
        for row in rows
    ]


def folder_passages(
    folder: str | Path,
    *,
    chunk_tokens: int = 256,
    chunk_overlap: int = 32,
    tokenizer: Callable[[str], Sequence[object]] | None = None,
) -> list[Passage]:
    """Chunk every ``.txt``/``.md`` file under ``folder`` with LlamaIndex's ``SentenceSplitter``.

    Args:
        folder: A directory, searched recursively; hidden files and folders are skipped.
        chunk_tokens: Chunk size in tokens of ``tokenizer``.
        chunk_overlap: Tokens shared by consecutive chunks of one file.
        tokenizer: Text to tokens; pass the answering model's tokenizer so that chunk
            sizes are in the tokens that are cached (default: LlamaIndex's).

    Raises:
        ValueError: ``folder`` is not a directory or holds no non-empty text file.
    """
    from llama_index.core.node_parser import SentenceSplitter

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"corpus: {str(folder)!r} is not a directory")
    files = sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix.lower() in FOLDER_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    splitter = SentenceSplitter(
        chunk_size=chunk_tokens, chunk_overlap=chunk_overlap, tokenizer=tokenizer
    )
    passages = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(root).as_posix()
        for n, chunk in enumerate(c for c in splitter.split_text(text) if c.strip()):
            passages.append(
                Passage(id=f"{rel}#{n}", title=f"{rel} #{n + 1}", text=chunk, source=rel)
            )
    if not passages:
        raise ValueError(
            f"corpus: no non-empty {'/'.join(FOLDER_SUFFIXES)} files under {str(folder)!r}"
        )
    return passages


def corpus_digest(passages: Iterable[Passage]) -> str:
    """sha256 hex over every passage: equal digests mean an ingested collection is current."""
    digest = hashlib.sha256()
    for passage in passages:
        for part in (passage.id, passage.title, passage.text, passage.source):
            digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()


def build_bundled(
    hotpot_rows: Sequence[dict[str, Any]],
    max_passages: int,
    sample_ids: Sequence[str],
    *,
    max_words: int | None = None,
) -> tuple[list[Passage], list[SampleQuestion]]:
    """Build the bundled corpus from IRCoT-format HotpotQA rows (how ``data/`` was made).

    Questions are taken in file order, each with all of its paragraphs, while the
    title-deduplicated total stays within ``max_passages``. A question with a paragraph
    longer than ``max_words`` is passed over, which keeps the first ingestion quick.

    Raises:
        ValueError: a sample id is not among the taken questions.
    """
    by_title: dict[str, Passage] = {}
    taken: dict[str, dict[str, Any]] = {}
    for row in hotpot_rows:
        contexts = row["contexts"]
        if not isinstance(contexts, list):
            raise ValueError(f"contexts: expected a list in question {row.get('question_id')}")
        if max_words is not None and any(
            len(str(c["paragraph_text"]).split()) > max_words for c in contexts
        ):
            continue
        fresh = [c for c in contexts if c["title"] not in by_title]
        if len(by_title) + len({c["title"] for c in fresh}) > max_passages:
            break
        for ctx in fresh:
            title = str(ctx["title"])
            by_title.setdefault(
                title,
                Passage(
                    id=f"wiki-{len(by_title):04d}",
                    title=title,
                    text=f"{title}\n{str(ctx['paragraph_text']).strip()}",
                    source=f"Wikipedia: {title}",
                ),
            )
        taken[str(row["question_id"])] = row
    questions = []
    for qid in sample_ids:
        if qid not in taken:
            raise ValueError(
                f"sample_ids: question {qid!r} is not in the first {max_passages} paragraphs"
            )
        row = taken[qid]
        answers = row["answers_objects"][0]["spans"]
        supporting = [c["title"] for c in row["contexts"] if c["is_supporting"]]
        questions.append(
            SampleQuestion(str(row["question_text"]).strip(), tuple(answers), tuple(supporting))
        )
    return list(by_title.values()), questions


def _write_bundled(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the demo's bundled corpus files.")
    parser.add_argument("hotpot", help="IRCoT-format HotpotQA jsonl")
    parser.add_argument("--max-passages", type=int, default=220)
    parser.add_argument(
        "--max-words", type=int, default=None, help="skip questions with longer paragraphs"
    )
    parser.add_argument("--sample", action="append", default=[], help="question_id (repeatable)")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.hotpot).read_text("utf-8").splitlines() if line]
    passages, questions = build_bundled(
        rows, args.max_passages, args.sample, max_words=args.max_words
    )
    data = Path(__file__).with_name("data")
    with open(data / _CORPUS_FILE, "w", encoding="utf-8") as out:
        for passage in passages:
            out.write(json.dumps(asdict(passage), ensure_ascii=False) + "\n")
    (data / _QUESTIONS_FILE).write_text(
        json.dumps([asdict(q) for q in questions], indent=2, ensure_ascii=False) + "\n", "utf-8"
    )


if __name__ == "__main__":
    _write_bundled()
