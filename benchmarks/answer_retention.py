"""Does a method's selection keep the gold answer? Answer retention per method, no decoding.

A compact cache can answer only from what it kept. For each question of a data file the
documents are packed and indexed as ``samkv eval`` packs them (``--chunk-tokens``), each
method builds its cache and prefills the question (one token is generated, no decoding),
and the kept tokens of every document, decoded run by run (a dropped token ends a run), are
searched for a gold answer, case-insensitive. ``answer_kept`` is 1 when one is found.
``sagekv``, whose KV heads keep different tokens, reports a representative set
(its docstring); ``sagekv+per_head=false`` keeps exactly the tokens it names.

This is a diagnostic of selection, not an accuracy figure: a kept answer string is neither
needed (the model may know it) nor enough (the context around it may be gone). It is cheap
(no full prefill, no decode), so it compares selection options on many questions where an
eval cannot, e.g. on the CPU. The gold document (first packed document holding an answer)
is recorded per question, so retention can be read by where the answer sits.

Rows go to ``--out`` (JSON Lines, one per question and method) as they are computed, each
with the settings its method ran with (``MethodSpec.settings``); a rerun with the same
``--out`` skips the pairs already there, and refuses rows of a label whose settings have
changed since. The summary (per method: n, mean kept fraction, retention with its 95%
bootstrap interval, and the paired difference from the first method) is printed and written
to ``--summary``.

Run: python benchmarks/answer_retention.py --data nq_dev_300_30doc.jsonl --model
qwen2.5-coder-0.5b-instruct --methods samkv,samkv+score_positions=adjacent --limit 100
--out retention.jsonl --summary retention.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.eval.data import Question, pack_paragraphs, read_questions
from samkv_integrations.eval.metrics import mean_interval, paired_bootstrap
from samkv_integrations.methods.specs import parse_spec
from samkv_integrations.models import samkv_home

logger = logging.getLogger(__name__)


def kept_text(tokenizer: Any, ids: Sequence[int], kept: Sequence[int]) -> list[str]:
    """The kept tokens of one document, decoded one run of consecutive indices at a time."""
    runs: list[list[int]] = []
    for index in sorted(kept):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return [tokenizer.decode([ids[i] for i in run]) for run in runs]


def retention_rows(
    engine: SamKVEngine, question: Question, methods: Sequence[str], chunk_tokens: int | None
) -> list[dict[str, Any]]:
    """One row per method: whether its kept tokens hold a gold answer, and what it kept."""
    texts = [p.document_text for p in question.contexts]
    documents = pack_paragraphs(texts, chunk_tokens, lambda t: len(engine.document_ids(t)))
    refs = engine.index(documents, progress=False)
    ids = [engine.document_ids(d, index=i) for i, d in enumerate(documents)]
    answers = [a.lower() for a in question.answers]
    gold = next((i for i, d in enumerate(documents) if any(a in d.lower() for a in answers)), None)
    tokenizer = engine.model.tokenizer
    rows = []
    for method in methods:
        answer = engine.answer(question.question, refs, method=method, max_new_tokens=1)
        runs = [
            run
            for doc_ids, kept in zip(ids, answer.kept_indices, strict=True)
            for run in kept_text(tokenizer, doc_ids, kept)
        ]
        joined = "\n".join(runs).lower()
        rows.append(
            {
                "id": question.id,
                "method": method,
                "answer_kept": float(any(a in joined for a in answers)),
                "kept_fraction": answer.stats.kept_fraction,
                "gold_document": gold,
                "documents": len(documents),
            }
        )
    return rows


def by_gold_document(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Retention by the gold document's index in the prompt (``"none"``: no document holds it)."""
    groups: dict[int | None, list[float]] = {}
    for row in rows:
        groups.setdefault(row["gold_document"], []).append(row["answer_kept"])
    order = sorted(groups, key=lambda gold: (gold is None, gold or 0))
    return {
        "none" if gold is None else str(gold): {
            "n": len(groups[gold]),
            "answer_kept": sum(groups[gold]) / len(groups[gold]),
        }
        for gold in order
    }


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: n, mean kept fraction, retention [95% CI], paired difference from the first,
    and retention by gold document."""
    by_method = {m: {r["id"]: r for r in rows if r["method"] == m} for m in methods}
    reference = by_method[methods[0]]
    summary: dict[str, Any] = {}
    for method, found in by_method.items():
        kept = [r["answer_kept"] for r in found.values()]
        shared = [i for i in found if i in reference]
        summary[method] = {
            "n": len(found),
            "kept_fraction": sum(r["kept_fraction"] for r in found.values()) / max(len(found), 1),
            "answer_kept": mean_interval(kept),
            "vs_first": paired_bootstrap(
                [found[i]["answer_kept"] - reference[i]["answer_kept"] for i in shared]
            )
            if method != methods[0]
            else None,
            "by_gold_document": by_gold_document(list(found.values())),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="questions (JSON Lines)")
    parser.add_argument("--model", default=None, help="registry name, path or hub id")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the model's)")
    parser.add_argument("--methods", default="samkv", help="comma-separated method specs")
    parser.add_argument(
        "--chunk-tokens", type=int, default=512, help="tokens per document (0: a paragraph each)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N questions")
    parser.add_argument("--store", default=None, help="KV cache store (default: SAMKV_HOME's)")
    parser.add_argument("--out", type=Path, required=True, help="rows, JSON Lines (resumed)")
    parser.add_argument("--summary", type=Path, default=None, help="summary JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        parser.error("--methods names no method")
    try:
        settings = {m: parse_spec(m).settings for m in methods}
    except ValueError as error:
        parser.error(str(error))
    done: list[dict[str, Any]] = []
    if args.out.exists():
        done = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines()]
    for row in done:  # a default that changed must not mix two meanings under one label
        ran, now = row.get("method_settings"), settings.get(row["method"])
        if now is not None and ran != now:
            parser.error(
                f"--out {args.out} holds rows of {row['method']} run as {ran}, now {now}; "
                "choose another --out"
            )
    seen = {(r["id"], r["method"]) for r in done}
    questions = read_questions(args.data, args.limit)
    store = KVCacheStore(args.store or str(samkv_home() / "kvcache"))
    engine = SamKVEngine.from_pretrained(args.model, store, device=args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as out:
        for question in tqdm(questions, desc="questions", unit="q"):
            todo = [m for m in methods if (question.id, m) not in seen]
            if not todo:
                continue
            for row in retention_rows(engine, question, todo, args.chunk_tokens or None):
                row["method_settings"] = settings[row["method"]]
                out.write(json.dumps(row) + "\n")
                out.flush()
                done.append(row)
    asked = {q.id for q in questions}
    summary = summarize([r for r in done if r["id"] in asked], methods)
    for method, facts in summary.items():
        kept, vs = facts["answer_kept"], facts["vs_first"]
        line = f"{method:<60} n={facts['n']:<4} kept {facts['kept_fraction']:.3f}  answer kept "
        line += f"{kept['mean']:.3f} [{kept['low']:.3f}, {kept['high']:.3f}]" if kept else "-"
        if vs:
            line += f"  vs first {vs['diff']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]"
        print(line)
    if args.summary:
        record = {"command": " ".join(sys.argv), "data": str(args.data), "methods": summary}
        args.summary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
