"""``samkv serve``: the demo's web page, over the same Chroma collection as ``samkv demo``.

One HTML page (``static/index.html``, no build step) and a JSON/SSE API:

* ``GET /api/info``: model, corpus, methods, sample questions.
* ``POST /api/ask``: ``{"question", "method", "budget", "compare", "top_k"}``, where
  ``method`` is a spec, ``name[+option=value...]``; answers as a ``text/event-stream`` of
  ``chunks`` (the retrieved chunks' token pieces), then per method ``start``, ``stats``
  (TTFT, kept fraction, kept and anchor token indices), ``delta`` (answer text) and
  ``done`` (memory), and finally ``end``. Bad input is a 422 JSON
  ``{"error": ...}`` before any streaming; a failure while streaming is an ``error`` event.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from samkv_chroma_demo.memory import MemoryProbe
from samkv_chroma_demo.pipeline import DemoIndex, RetrievedChunk, token_pieces

from samkv_integrations.bridge import aiter_in_thread
from samkv_integrations.cli import method_spec
from samkv_integrations.engine import Answer, SamKVEngine
from samkv_integrations.methods import METHODS, parse_spec

__all__ = [
    "MAX_QUESTION_CHARS",
    "AskRequest",
    "add_arguments",
    "create_app",
    "method_options",
    "run",
]

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 2000
_REFERENCE = "full"
# How a "budget" (a kept or recomputed fraction of the context) maps onto each method.
_BUDGETS: dict[str, Callable[[float], dict[str, Any]]] = {
    "samkv": lambda b: {"ranking": "global", "budget": b},
    "cacheblend": lambda b: {"recompute_ratio": b},
}


class AskRequest(BaseModel):
    """A question from the page."""

    question: str
    method: str = "samkv"
    budget: float | None = Field(
        default=None, description="kept (samkv) or recomputed (cacheblend) fraction"
    )
    compare: bool = False
    top_k: int = Field(default=4, ge=1, le=8)

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("type a question")
        if len(value) > MAX_QUESTION_CHARS:
            raise ValueError(f"{len(value)} characters; the limit is {MAX_QUESTION_CHARS}")
        return value.strip()

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return _spec_label(value)

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value


def _spec_label(spec: str) -> str:
    """``spec`` (``name[+option=value...]``) once valid; the error names what is wrong."""
    try:
        return parse_spec(spec.strip()).label
    except ValueError as e:
        raise ValueError(str(e).removeprefix("methods: ")) from None


def method_options(method: str, budget: float | None) -> dict[str, Any]:
    """The hyperparameters a budget means for the method spec ``method`` (none without one).

    They override the spec's own options of the same name.

    Raises:
        ValueError: ``method`` has no budget to set.
    """
    if budget is None:
        return {}
    name = parse_spec(method).name
    if name not in _BUDGETS:
        raise ValueError(
            f"budget: method {method!r} takes no budget (only {', '.join(sorted(_BUDGETS))})"
        )
    return _BUDGETS[name](budget)


def _chunk_payload(engine: SamKVEngine, chunk: RetrievedChunk) -> dict[str, Any]:
    return {
        "id": chunk.id,
        "title": chunk.title,
        "score": round(chunk.score, 4),
        "n_tokens": chunk.ref.n_tokens,
        "pieces": token_pieces(engine, chunk.text),
    }


def _stats_payload(lane: str, answer: Answer) -> dict[str, Any]:
    anchors = answer.details.get("anchor_indices")
    return {
        "lane": lane,
        **answer.stats.as_dict(),
        "kept": answer.kept_indices,
        "anchors": anchors if isinstance(anchors, list) else None,
    }


def answer_events(
    index: DemoIndex, ask: AskRequest, max_new_tokens: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events of one question, in order (blocking: the app runs it in a worker thread)."""
    options = method_options(ask.method, ask.budget)
    chunks = index.retrieve(ask.question, ask.top_k)
    engine = index.engine
    yield "chunks", {"chunks": [_chunk_payload(engine, c) for c in chunks]}
    lanes = [ask.method] + ([_REFERENCE] if ask.compare and ask.method != _REFERENCE else [])
    for lane in lanes:
        yield "start", {"lane": lane}
        probe = MemoryProbe(engine)
        opts = options if lane == ask.method else {}
        stream = index.stream(
            ask.question, chunks, lane, method_options=opts, max_new_tokens=max_new_tokens
        )
        sent_stats = False
        for delta in stream:
            if not sent_stats:
                yield "stats", _stats_payload(lane, stream.answer)
                sent_stats = True
            yield "delta", {"lane": lane, "text": delta}
        if not sent_stats:
            yield "stats", _stats_payload(lane, stream.answer)
        yield (
            "done",
            {
                "lane": lane,
                "text": stream.text,
                "memory": probe.report(stream.answer, ask.question),
            },
        )


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _field_errors(exc: RequestValidationError) -> list[str]:
    messages = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            messages.append("request body: not valid JSON")
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "request body"
        messages.append(
            f"{where}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}"
        )
    return messages


def create_app(
    index: DemoIndex,
    *,
    samples: Sequence[str] = (),
    corpus_label: str = "",
    max_new_tokens: int = 64,
    default_method: str = "samkv",
) -> FastAPI:
    """The web app over ``index`` (any engine, any Chroma client, any embedding model).

    ``default_method`` is a method spec (``name[+option=value...]``); the page offers it
    beside the registered methods.

    Raises:
        ValueError: ``default_method`` is not a valid spec or ``max_new_tokens`` below 1.
    """
    try:
        default_method = _spec_label(default_method)
    except ValueError as e:
        raise ValueError(f"default_method: {e}") from None
    methods = sorted(METHODS) + ([] if default_method in METHODS else [default_method])
    budget_methods = [m for m in methods if parse_spec(m).name in _BUDGETS]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    app = FastAPI(title="samkv demo", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("samkv_chroma_demo").joinpath("static", "index.html").read_text("utf-8")
    engine = index.engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        return JSONResponse({"error": "; ".join(errors), "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed", request.url.path)
        return JSONResponse(
            {"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500
        )

    @app.get("/", response_class=HTMLResponse)
    async def _page() -> str:
        return page

    @app.get("/api/info")
    async def _info() -> dict[str, Any]:
        return {
            "model": engine.model.name,
            "device": str(engine.model.device),
            "corpus": corpus_label,
            "collection": index.name,
            "chunks": index.count(),
            "methods": methods,
            "default_method": default_method,
            "budget_methods": budget_methods,
            "samples": list(samples),
            "max_question_chars": MAX_QUESTION_CHARS,
        }

    @app.post("/api/ask", response_model=None)
    async def _ask(ask: AskRequest) -> StreamingResponse | JSONResponse:
        try:
            method_options(ask.method, ask.budget)
        except ValueError as e:
            return JSONResponse({"error": str(e), "errors": [str(e)]}, status_code=422)

        async def events() -> AsyncIterator[str]:
            try:
                async for event, data in aiter_in_thread(
                    lambda: answer_events(index, ask, max_new_tokens)
                ):
                    yield _sse(event, data)
            except ValueError as e:
                yield _sse("error", {"error": str(e)})
            except Exception as e:
                logger.exception("answering %r failed", ask.question)
                yield _sse(
                    "error", {"error": f"internal error ({type(e).__name__}); see the server log"}
                )
            yield _sse("end", {})

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``samkv serve``."""
    from samkv_chroma_demo.cli import add_setup_arguments

    add_setup_arguments(parser)
    parser.add_argument(
        "--host",
        default=None,
        help="interface to bind (default 127.0.0.1; anything else exposes the demo)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--method",
        type=method_spec,
        default="samkv",
        metavar="SPEC",
        help="method spec name[+option=value...] preselected on the page, e.g. samkv+budget=0.2 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="answer length limit (default 64)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Prepare the index (as ``samkv demo`` does) and serve the page until interrupted."""
    import uvicorn
    from samkv_chroma_demo.cli import open_demo

    host = args.host or "127.0.0.1"
    if not _is_loopback(host):
        logger.warning("binding to %s exposes the demo (and the model) to the network", host)
        print(
            f"warning: --host {host} exposes the demo beyond this machine; it has no authentication"
        )
    try:
        session = open_demo(args)
        app = create_app(
            session.index,
            samples=[s.question for s in session.samples],
            corpus_label=session.corpus_label,
            max_new_tokens=args.max_new_tokens,
            default_method=args.method,
        )
    except (ValueError, RuntimeError) as e:
        print(f"samkv serve: error: {e}", file=sys.stderr)
        return 2
    print(f"serving on http://{host}:{args.port}/  (Ctrl-C stops it)")
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0
