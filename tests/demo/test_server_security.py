"""Issue 14, item 9: the demo server answers only its own host, bounds bodies, rejects non-text.

Before this change any ``Host`` was answered (a DNS-rebinding page could read the
retrieved chunks of ``serve --corpus ~/notes``), a body of any size was read whole, and a
lone surrogate in the question streamed an "internal error".
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from samkv_chroma_demo import server
from samkv_chroma_demo.cli import DemoSession
from samkv_chroma_demo.pipeline import DemoIndex
from samkv_chroma_demo.server import LOOPBACK_HOSTS, add_arguments, create_app

GOOD = {"question": "Tell me about the glacier.", "method": "full"}


@pytest.fixture
def app(demo_index: DemoIndex) -> FastAPI:
    return create_app(demo_index, max_new_tokens=2, port=8000, max_body_bytes=4096)


def test_a_rebinding_page_cannot_read_the_corpus(app: FastAPI) -> None:
    client = TestClient(app, base_url="http://evil.example:8000")
    answered = client.post("/api/ask", json=GOOD)
    assert answered.status_code == 421
    assert "evil.example:8000" in answered.json()["error"]
    assert "glacier" not in answered.text.replace(GOOD["question"], "")
    assert client.get("/api/info").status_code == 421
    assert client.get("/").status_code == 421


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"]
)
def test_loopback_names_on_the_served_port_are_answered(app: FastAPI, origin: str) -> None:
    client = TestClient(app, base_url=origin)
    assert client.get("/api/info").status_code == 200
    response = client.post("/api/ask", json=GOOD)
    assert response.status_code == 200 and "event: done" in response.text


def test_another_port_is_refused_and_any_port_passes_without_one(demo_index: DemoIndex) -> None:
    pinned = TestClient(create_app(demo_index, port=8000), base_url="http://localhost:8001")
    assert pinned.get("/api/info").status_code == 421
    free = TestClient(create_app(demo_index), base_url="http://localhost:8001")
    assert free.get("/api/info").status_code == 200


def test_serve_answers_its_bind_host_and_allowed_names(
    demo_index: DemoIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[Any] = []
    monkeypatch.setattr(
        "samkv_chroma_demo.cli.open_demo", lambda args: DemoSession(demo_index, [], "test")
    )
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.append((app, kwargs)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--host", "192.0.2.7", "--port", "8123", "--allow-host", "demo.lan"]
    assert server.run(parser.parse_args(argv)) == 0
    ((app, kwargs),) = served
    assert kwargs["host"] == "192.0.2.7" and kwargs["port"] == 8123
    for host, status in [
        ("192.0.2.7:8123", 200), ("demo.lan:8123", 200), ("127.0.0.1:8123", 200),
        ("evil.example:8123", 421), ("demo.lan:8000", 421), ("localhost", 421),
    ]:  # fmt: skip
        got = TestClient(app).get("/api/info", headers={"host": host}).status_code
        assert got == status, host
    assert set(LOOPBACK_HOSTS) == {"127.0.0.1", "localhost", "::1"}


async def _call(app: FastAPI, headers: dict[str, str], chunks: int) -> tuple[int, int, str]:
    """Send a body of ``chunks`` pieces of 1 KiB; return status, pieces read, error."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/ask", "raw_path": b"/api/ask", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        "headers": [(k.encode(), v.encode()) for k, v in
                    {"host": "127.0.0.1:8000", "content-type": "application/json", **headers}.items()],
    }  # fmt: skip
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": read < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], read, json.loads(body)["error"]


async def test_a_declared_oversized_body_is_refused_unread(app: FastAPI) -> None:
    status, read, error = await _call(app, {"content-length": str(50 * 2**20)}, 50 * 1024)
    assert (status, read) == (413, 0)
    assert error == "request body: over the limit of 4096 bytes"


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(app: FastAPI) -> None:
    status, read, error = await _call(app, {"transfer-encoding": "chunked"}, 50 * 1024)
    assert status == 413 and read == 5  # 5 KiB read of 50 MiB: the first piece past 4096
    assert "over the limit" in error


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"question": "glacier \\ud800"}', "question: not valid text"),
        (b'{"question": "\\udfff"}', "question: not valid text"),
        (b'{"question": "gl\\u00e4cier", "method": "\\ud83d"}', "method: unknown method"),
        (b'{"question": "gl\xe4cier"}', "request body: not UTF-8 text"),
    ],
)
def test_text_that_is_not_text_is_a_422_naming_it(app: FastAPI, body: bytes, message: str) -> None:
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    response = client.post("/api/ask", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]
    assert "internal error" not in response.text
