"""Bad requests to the demo server: a JSON error naming the cause, never a 500 or a traceback.

A request naming another host is refused (421) before it reaches a route, a body over the
limit is refused (413) before it is read whole, and bad text or fields are a 422.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import chromadb
import pytest
from fastapi.testclient import TestClient
from samkv_chroma_demo.pipeline import DemoIndex
from samkv_chroma_demo.server import MAX_BODY_BYTES, MAX_QUESTION_CHARS, create_app

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel
from tests.demo.conftest import PASSAGES, KeywordEmbedding
from tests.fuzz.common import Case

ORIGIN = "http://127.0.0.1:8000"
GOOD = {"question": "Tell me about the glacier.", "method": "full"}


def request(
    id: str, status: int, keyword: str, method: str = "POST", path: str = "/api/ask", **kw: Any
) -> Case:
    return Case(id, keyword, {"method": method, "url": path, **kw}, extra={"status": status})


def ask(id: str, keyword: str, status: int = 422, **fields: Any) -> Case:
    body = {k: v for k, v in {**GOOD, **fields}.items() if v is not ...}
    return request(id, status, keyword, content=json.dumps(body).encode(), headers=JSON)


def raw(id: str, keyword: str, content: bytes, status: int = 422) -> Case:
    return request(id, status, keyword, content=content, headers=JSON)


JSON = {"content-type": "application/json"}
HOSTS = [
    "evil.com", "evil.com:8000", "localhost:8001", "127.0.0.1:80", "127.0.0.2:8000",
    "[::2]:8000", "", "localhost:abc", "[::1", "[::1]x", "localhost.evil.com:8000",
    "127.0.0.1.nip.io:8000", "0.0.0.0:8000", "10.0.0.1:8000", "user@localhost:8000",
    "localhost:8000:8000", "localhost.:8000",
]  # fmt: skip

HOST_CASES = [
    request(f"host-{i}-{method.lower()}", 421, "host", method, path, headers={"host": host},
            **({"json": GOOD} if method == "POST" else {}))
    for i, host in enumerate(HOSTS)
    for method, path in (("GET", "/api/info"), ("POST", "/api/ask"))
] + [
    request(f"host-page-{i}", 421, "host", "GET", "/", headers={"host": host})
    for i, host in enumerate(["evil.com:8000", "attacker.example", "[::2]:8000"])
]  # fmt: skip

BODY_CASES = [
    raw("body-over-limit", "over the limit", b"x" * (MAX_BODY_BYTES + 1), status=413),
    raw("body-long-question-over-limit", "over the limit",
        json.dumps({"question": "q" * (MAX_BODY_BYTES * 2)}).encode(), status=413),
    request("body-bad-length", 400, "content-length", content=b"{}",
            headers={**JSON, "content-length": "abc"}),
    raw("body-latin1", "not UTF-8", json.dumps(GOOD).encode().replace(b"glacier", b"gl\xe4cier")),
    raw("body-utf16", "not UTF-8", json.dumps(GOOD).encode("utf-16")),
    raw("body-lone-continuation", "not UTF-8", b'{"question": "\x80"}'),
    raw("body-not-json", "not valid JSON", b"hello"),
    raw("body-truncated-json", "not valid JSON", b'{"question": "glac'),
    raw("body-empty", "body", b""),
    raw("body-array", "body", b"[]"),
    raw("body-string", "body", b'"glacier"'),
    raw("body-deep", "parsing", b"[" * 50_000, status=400),
    request("ask-get", 405, "method not allowed", "GET", "/api/ask"),
    request("unknown-path", 404, "not found", "GET", "/api/nope"),
]  # fmt: skip

FIELD_CASES = [
    ask("question-empty", "type a question", question=""),
    ask("question-blank", "type a question", question=" \n "),
    ask("question-surrogate", "not valid text", question="\ud800"),
    ask("question-low-surrogate", "not valid text", question="why \udfff"),
    ask("question-half-emoji", "not valid text", question="glacier \ud83d"),
    ask("question-int", "question", question=5),
    ask("question-null", "question", question=None),
    ask("question-list", "question", question=["glacier"]),
    ask("question-missing", "question", question=...),
    ask("question-too-long", f"limit is {MAX_QUESTION_CHARS}", question="q" * 2001),
    ask("method-unknown", "unknown method", method="nope"),
    ask("method-option", "budgt", method="samkv+budgt=1"),
    ask("method-value", "budget", method="samkv+budget=2"),
    ask("method-empty", "unknown method", method=""),
    ask("method-int", "method", method=5),
    ask("method-null", "method", method=None),
    ask("method-surrogate", "unknown method", method="\ud800"),
    *[ask(f"budget-{name}", "budget", budget=v)
      for name, v in [("zero", 0), ("two", 2), ("negative", -1), ("text", "x"), ("list", [0.5])]],
    *[raw(f"budget-{name}", "budget", f'{{"question": "glacier", "budget": {v}}}'.encode())
      for name, v in [("nan", "NaN"), ("inf", "Infinity"), ("minus-inf", "-Infinity")]],
    ask("budget-method-without-one", "takes no budget", method="full", budget=0.5),
    *[ask(f"top-k-{name}", "top_k", top_k=v)
      for name, v in [("zero", 0), ("nine", 9), ("text", "x"), ("float", 1.5), ("null", None)]],
    ask("compare-text", "compare", compare="maybe"),
    ask("compare-list", "compare", compare=[True]),
]  # fmt: skip

SERVER_CASES = HOST_CASES + BODY_CASES + FIELD_CASES


@pytest.fixture(scope="module")
def client(tiny_llama: LoadedModel) -> TestClient:
    engine = SamKVEngine(tiny_llama, KVCacheStore(f"memory://fuzz-server-{uuid.uuid4().hex}"))
    index = DemoIndex(
        engine, chromadb.EphemeralClient(), f"fuzz-{uuid.uuid4().hex[:12]}", KeywordEmbedding()
    )
    index.ingest(PASSAGES, progress=False)
    app = create_app(index, max_new_tokens=2, port=8000)
    return TestClient(app, base_url=ORIGIN, raise_server_exceptions=False)


@pytest.mark.parametrize("case", [c.param() for c in SERVER_CASES])
def test_bad_request_is_a_named_json_error(case: Case, client: TestClient) -> None:
    response = client.request(**case.args)
    assert response.status_code == case.extra["status"], response.text
    assert "Traceback" not in response.text and "internal error" not in response.text
    error = response.json()["error"]
    assert case.keyword.lower() in error.lower(), error
    assert "lighthouse" not in response.text  # no corpus text in a refusal


def test_good_request_is_answered(client: TestClient) -> None:
    # The baseline of every case: the same app answers a good request from this origin.
    response = client.post("/api/ask", json=GOOD)
    assert response.status_code == 200 and "event: done" in response.text
    assert client.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/api/info", headers={"host": "[::1]:8000"}).status_code == 200
