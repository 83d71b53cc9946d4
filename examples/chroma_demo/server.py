"""``samkv serve``: the demo's web page, over the same Chroma collection as ``samkv demo``.

One HTML page (``static/index.html``, no build step) and a JSON/SSE API:

* ``GET /api/info``: model, corpus, methods, sample questions.
* ``POST /api/ask``: ``{"question", "method", "budget", "compare", "top_k"}``, where
  ``method`` is a spec, ``name[+option=value...]``; answers as a ``text/event-stream`` of
  ``chunks`` (the retrieved chunks' token pieces), then per method ``start``, ``stats``
  (TTFT, kept fraction, kept and anchor token indices), ``delta`` (answer text) and
  ``done`` (memory), and finally ``end``. Bad input is a 422 JSON
  ``{"error": ...}`` before any streaming; a failure while streaming is an ``error`` event.

The answers carry the corpus's text, so every request must name this server in its
``Host`` header (a loopback name, the ``--host`` it binds, or an ``--allow-host``), else
421: a page on another site that rebinds its DNS name to 127.0.0.1 cannot read them. A
request body over ``max_body_bytes`` is refused (413) before it is read whole.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from samkv_chroma_demo.memory import MemoryProbe
from samkv_chroma_demo.pipeline import DemoIndex, RetrievedChunk, token_pieces
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from samkv_integrations.bridge import aiter_in_thread
from samkv_integrations.cli import int_at_least, method_spec, not_empty, port_number
from samkv_integrations.engine import Answer, SamKVEngine
from samkv_integrations.errors import CacheError
from samkv_integrations.methods import METHODS, parse_spec

__all__ = [
    "LOOPBACK_HOSTS",
    "MAX_BODY_BYTES",
    "MAX_QUESTION_CHARS",
    "AskRequest",
    "add_arguments",
    "create_app",
    "method_options",
    "run",
]

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 2000
#: Largest request body accepted (a question of MAX_QUESTION_CHARS is far below it).
MAX_BODY_BYTES = 64 * 1024
#: Host names every app answers to: the loopback interface's.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
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
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON)
            raise ValueError(f"not valid text: {e.reason} at character {e.start}") from None
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


def _error(status: int, message: str) -> JSONResponse:
    """``{"error", "errors"}`` with ``status``; a lone surrogate in ``message`` is escaped."""
    message = message.encode("utf-8", "backslashreplace").decode()
    return JSONResponse({"error": message, "errors": [message]}, status_code=status)


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (lowercase name, port or None); ``None`` when malformed."""
    name, port = value.strip().lower(), ""
    if name.startswith("["):  # [::1]:8000
        name, bracket, port = name[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    elif name.count(":") == 1:
        name, port = name.split(":")
    if not name or (port and not port.isdigit()):
        return None
    return name, int(port) if port else None


class RequestGuard:
    """ASGI middleware: 421 for a ``Host`` this server is not, 413 for an oversized body.

    A DNS-rebinding page reaches 127.0.0.1 under its own name, which its requests carry in
    ``Host``: only the names in ``hosts`` (and, when ``port`` is set, that port) pass. The
    body is read here, in pieces, up to ``max_body_bytes`` (a ``Content-Length`` over it is
    refused unread), checked to be UTF-8 (422), then handed to the app.
    """

    def __init__(
        self, app: ASGIApp, *, hosts: Sequence[str], port: int | None, max_body_bytes: int
    ) -> None:
        self.app = app
        self.hosts = frozenset(h.strip("[]").lower() for h in hosts)
        self.port = port
        self.max_body_bytes = max_body_bytes

    def _host_problem(self, value: str) -> str | None:
        parsed = _split_host(value)
        name, port = parsed if parsed is not None else (None, None)
        if name in self.hosts and self.port in (None, port if port is not None else 80):
            return None
        shown = ", ".join(sorted(self.hosts)) + (f" on port {self.port}" if self.port else "")
        return (
            f"host: {value!r} is not this server (it answers to {shown}); "
            "serve with --allow-host NAME to add a name"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self._host_problem(headers.get("host", ""))
        length = headers.get("content-length")
        if problem is None and length is not None and not length.isdigit():
            problem = "request body: bad Content-Length"
        if problem is not None:
            status = 421 if problem.startswith("host") else 400
            await _error(status, problem)(scope, receive, send)
            return
        if length is None and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        body = bytearray()
        more = int(length or 0) <= self.max_body_bytes
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= self.max_body_bytes
        if len(body) > self.max_body_bytes or int(length or 0) > self.max_body_bytes:
            too_big = f"request body: over the limit of {self.max_body_bytes} bytes"
            await _error(413, too_big)(scope, receive, send)
            return
        try:
            body.decode("utf-8")  # JSON is UTF-8 (RFC 8259)
        except UnicodeDecodeError as e:
            not_text = f"request body: not UTF-8 text (byte {body[e.start]:#04x} at {e.start})"
            await _error(422, not_text)(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then waits on the client (for its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


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
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    port: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The web app over ``index`` (any engine, any Chroma client, any embedding model).

    ``default_method`` is a method spec (``name[+option=value...]``); the page offers it
    beside the registered methods. Requests must name one of ``allowed_hosts`` (and
    ``port``, when given) in their ``Host`` header, else 421; a body over
    ``max_body_bytes`` is refused with 413.

    Raises:
        ValueError: ``default_method`` is not a valid spec, ``max_new_tokens`` below 1,
            no allowed host, or ``max_body_bytes`` below 1.
    """
    try:
        default_method = _spec_label(default_method)
    except ValueError as e:
        raise ValueError(f"default_method: {e}") from None
    methods = sorted(METHODS) + ([] if default_method in METHODS else [default_method])
    budget_methods = [m for m in methods if parse_spec(m).name in _BUDGETS]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if not allowed_hosts:
        raise ValueError("allowed_hosts: give at least one host name")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: must be at least 1, got {max_body_bytes}")
    app = FastAPI(title="samkv demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, hosts=allowed_hosts, port=port, max_body_bytes=max_body_bytes)
    page = resources.files("samkv_chroma_demo").joinpath("static", "index.html").read_text("utf-8")
    engine = index.engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [e.encode("utf-8", "backslashreplace").decode() for e in _field_errors(exc)]
        return JSONResponse({"error": "; ".join(errors), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"request: {exc.detail}")

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
            return _error(422, str(e))

        async def events() -> AsyncIterator[str]:
            try:
                async for event, data in aiter_in_thread(
                    lambda: answer_events(index, ask, max_new_tokens)
                ):
                    yield _sse(event, data)
            except (ValueError, CacheError) as e:  # bad input, or a store it cannot use
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
        type=not_empty,
        default=None,
        help="interface to bind (default 127.0.0.1; anything else exposes the demo)",
    )
    parser.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--allow-host",
        action="append",
        type=not_empty,
        default=[],
        metavar="NAME",
        help="also answer requests that name this host (repeatable); by default only "
        "127.0.0.1, localhost, ::1 and --host are answered",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int_at_least(1024),
        default=MAX_BODY_BYTES,
        help=f"largest request body accepted (default {MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--method",
        type=method_spec,
        default="samkv",
        metavar="SPEC",
        help="method spec name[+option=value...] preselected on the page, e.g. samkv+budget=0.2 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=64,
        help="answer length limit (default 64)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Prepare the index (as ``samkv demo`` does) and serve the page until interrupted.

    Raises:
        ValueError: A bad option or corpus (``samkv`` prints it).
    """
    import uvicorn
    from samkv_chroma_demo.cli import open_demo

    host = args.host or "127.0.0.1"
    if not _is_loopback(host):
        logger.warning("binding to %s exposes the demo (and the model) to the network", host)
        print(
            f"warning: --host {host} exposes the demo beyond this machine; it has no authentication"
        )
    session = open_demo(args)
    app = create_app(
        session.index,
        samples=[s.question for s in session.samples],
        corpus_label=session.corpus_label,
        max_new_tokens=args.max_new_tokens,
        default_method=args.method,
        allowed_hosts=[*LOOPBACK_HOSTS, host, *args.allow_host],
        port=args.port,
        max_body_bytes=args.max_body_bytes,
    )
    print(f"serving on http://{host}:{args.port}/  (Ctrl-C stops it)")
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0
