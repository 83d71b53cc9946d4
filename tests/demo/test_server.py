from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from samkv_chroma_demo.pipeline import DemoIndex, token_pieces
from samkv_chroma_demo.server import MAX_QUESTION_CHARS, create_app

from tests.demo.conftest import PASSAGES

APP = Path(__file__).resolve().parents[2] / "examples" / "chroma_demo"

QUESTION = "What is special about the glacier?"


@pytest.fixture
def client(demo_index: DemoIndex) -> TestClient:
    return TestClient(
        create_app(demo_index, samples=[QUESTION], corpus_label="test corpus", max_new_tokens=6),
        base_url="http://127.0.0.1:8000",  # the app answers loopback names only
    )


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_ingest_reuses_the_collection_and_recomputes_only_missing_caches(
    demo_index: DemoIndex,
) -> None:
    again = demo_index.ingest(PASSAGES, progress=False)
    assert again.reused_collection and (again.caches_reused, again.caches_computed) == (4, 0)

    key = demo_index.collection.get(ids=["p2"], include=["metadatas"])["metadatas"][0][
        "samkv_cache_key"
    ]
    assert demo_index.engine.store.delete(key)
    refreshed = demo_index.ingest(PASSAGES, progress=False)
    assert (refreshed.caches_reused, refreshed.caches_computed) == (3, 1)
    assert demo_index.engine.store.contains(key)

    changed = demo_index.ingest(PASSAGES[:3], progress=False)
    assert not changed.reused_collection and changed.chunks == 3
    assert demo_index.count() == 3
    assert changed.caches_reused == 3  # same texts: the store already holds their caches


def test_retrieve_carries_cache_refs_from_chroma_metadata(demo_index: DemoIndex) -> None:
    chunks = demo_index.retrieve(QUESTION, top_k=2)
    assert chunks[0].title == "Glacier article"
    stored = demo_index.collection.get(ids=[chunks[0].id], include=["metadatas"])["metadatas"][0]
    assert chunks[0].ref.key == stored["samkv_cache_key"]
    assert demo_index.engine.store.contains(chunks[0].ref.key)


def test_token_pieces_rebuild_the_framed_document(demo_index: DemoIndex) -> None:
    engine = demo_index.engine
    text = "Caf\u00e9 na\u00efve \u2014 ok"  # multi-byte characters span several byte tokens
    pieces = token_pieces(engine, text)
    ids = engine.document_ids(text)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == engine.model.tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces)


def test_info_lists_methods_and_samples(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["model"] == "random:tiny-llama" and info["chunks"] == 4
    assert {"samkv", "full"} <= set(info["methods"]) and info["default_method"] == "samkv"
    assert info["samples"] == [QUESTION]
    page = client.get("/")
    assert page.status_code == 200 and "/api/ask" in page.text


def test_ask_streams_chunks_then_both_methods(client: TestClient, demo_index: DemoIndex) -> None:
    response = client.post("/api/ask", json={"question": QUESTION, "compare": True, "top_k": 2})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = events(response.text)
    names = [name for name, _ in stream]
    assert names[0] == "chunks" and names[-1] == "end" and "error" not in names
    assert [d["lane"] for n, d in stream if n == "start"] == ["samkv", "full"]

    chunks = stream[0][1]["chunks"]
    assert chunks[0]["title"] == "Glacier article"
    for lane in ("samkv", "full"):
        stats = next(d for n, d in stream if n == "stats" and d["lane"] == lane)
        done = next(d for n, d in stream if n == "done" and d["lane"] == lane)
        deltas = "".join(d["text"] for n, d in stream if n == "delta" and d["lane"] == lane)
        assert deltas and deltas == done["text"]
        assert len(stats["kept"]) == len(chunks)
        for kept, chunk in zip(stats["kept"], chunks, strict=True):
            assert len(chunk["pieces"]) == chunk["n_tokens"]
            assert all(0 <= i < chunk["n_tokens"] for i in kept)
        kept_total = sum(len(k) for k in stats["kept"])
        assert stats["kept_fraction"] == pytest.approx(
            kept_total / sum(c["n_tokens"] for c in chunks)
        )
        memory = done["memory"]
        config = demo_index.engine.model.model.config
        per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
        assert memory["kv_bytes"] == memory["kv_tokens"] * per_token
        assert "KV cache" in memory["kv_measure"]

    samkv = next(d for n, d in stream if n == "stats" and d["lane"] == "samkv")
    full = next(d for n, d in stream if n == "stats" and d["lane"] == "full")
    assert full["kept_fraction"] == 1.0 and full["anchors"] is None
    assert samkv["kept_fraction"] < 1.0
    for kept, anchors in zip(samkv["kept"], samkv["anchors"], strict=True):
        assert anchors and set(anchors) <= set(kept)
    samkv_kv = next(d for n, d in stream if n == "done" and d["lane"] == "samkv")["memory"][
        "kv_bytes"
    ]
    full_kv = next(d for n, d in stream if n == "done" and d["lane"] == "full")["memory"][
        "kv_bytes"
    ]
    assert samkv_kv < full_kv


def test_budget_bounds_the_kept_fraction(client: TestClient) -> None:
    fractions = {}
    for budget in (0.2, 0.6):
        response = client.post(
            "/api/ask", json={"question": QUESTION, "budget": budget, "top_k": 3}
        )
        stats = next(d for n, d in events(response.text) if n == "stats")
        fractions[budget] = stats["kept_fraction"]
        assert stats["kept_fraction"] <= budget + 1e-9
    assert fractions[0.2] < fractions[0.6]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"question": "   "}, "question", "type a question"),
        ({"question": "x" * (MAX_QUESTION_CHARS + 1)}, "question", "limit is 2000"),
        ({"question": "q?", "method": "magic"}, "method", "unknown method 'magic'"),
        ({"question": "q?", "method": "full", "budget": 0.2}, "budget", "takes no budget"),
        ({"question": "q?", "budget": 1.5}, "budget", r"\(0, 1\]"),
        ({"question": "q?", "top_k": 0}, "top_k", "greater than or equal to 1"),
        ({}, "question", "Field required"),
    ],
)
def test_bad_input_gets_a_clear_json_error(
    client: TestClient, body: dict[str, Any], field: str, message: str
) -> None:
    response = client.post("/api/ask", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error.startswith(f"{field}: ")
    assert re.search(message, error)
    assert "Traceback" not in response.text


def test_malformed_json_is_a_clear_error(client: TestClient) -> None:
    response = client.post(
        "/api/ask", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"] == "request body: not valid JSON"


def test_failure_while_streaming_is_an_error_event_without_trace(
    client: TestClient, demo_index: DemoIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(question: str, top_k: int) -> list[Any]:
        raise RuntimeError("disk on fire at /secret/path")

    monkeypatch.setattr(demo_index, "retrieve", broken)
    response = client.post("/api/ask", json={"question": QUESTION})
    stream = events(response.text)
    assert [n for n, _ in stream] == ["error", "end"]
    assert stream[0][1]["error"] == "internal error (RuntimeError); see the server log"
    assert "/secret/path" not in response.text and "Traceback" not in response.text


def test_the_app_calls_the_engine_facade_only() -> None:
    # STYLE.md habit 15: no store or decode module, prompt framer or private engine attribute.
    internals = re.compile(r"samkv_integrations\.(store|decode)\b|\.framer\b|engine\._|\._lock\b")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(APP.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if internals.search(line)
    ]
    assert offenders == []
