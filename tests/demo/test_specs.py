"""``samkv serve`` takes method specs (``name[+option=value...]``) on its flags and its API."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from samkv_chroma_demo.pipeline import DemoIndex
from samkv_chroma_demo.server import add_arguments, create_app, method_options

QUESTION = "What is special about the glacier?"
SPEC = "samkv+ranking=global+budget=0.3"


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.fixture
def client(demo_index: DemoIndex) -> TestClient:
    return TestClient(
        create_app(demo_index, max_new_tokens=4, default_method=SPEC), base_url="http://localhost"
    )


def test_page_offers_the_default_spec_beside_the_methods(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["default_method"] == SPEC
    assert info["methods"][-1] == SPEC and {"samkv", "full"} <= set(info["methods"])
    assert {"samkv", "cacheblend", SPEC} <= set(info["budget_methods"])
    assert "full" not in info["budget_methods"]


def kept_fraction(client: TestClient, body: dict[str, Any]) -> float:
    response = client.post("/api/ask", json={"question": QUESTION, "top_k": 3, **body})
    assert response.status_code == 200
    stream = events(response.text)
    assert "error" not in [name for name, _ in stream]
    stats = next(d for n, d in stream if n == "stats")
    assert stats["lane"] == body["method"]
    return float(stats["kept_fraction"])


def test_asked_spec_reaches_the_method_and_a_budget_overrides_it(client: TestClient) -> None:
    assert 0.2 <= kept_fraction(client, {"method": SPEC}) <= 0.3 + 1e-9
    assert 0.5 <= kept_fraction(client, {"method": SPEC, "budget": 0.6}) <= 0.6 + 1e-9
    assert method_options(SPEC, 0.6) == {"ranking": "global", "budget": 0.6}


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("samkv+budgt=0.2", "method: unknown option 'budgt' of 'samkv'"),
        ("samkv+budget=2", "method: 'samkv+budget=2': budget must be in (0, 1]"),
        ("reuse+x", "method: option 'x' of 'reuse+x' is not key=value"),
    ],
)
def test_bad_spec_in_the_api_is_a_422_naming_the_field(
    client: TestClient, method: str, message: str
) -> None:
    response = client.post("/api/ask", json={"question": "q?", "method": method})
    assert response.status_code == 422
    assert response.json()["error"].startswith(message)


def test_bad_default_spec_is_refused_at_startup(demo_index: DemoIndex) -> None:
    with pytest.raises(ValueError, match=r"^default_method: unknown option 'budgt'"):
        create_app(demo_index, default_method="samkv+budgt=1")


def test_serve_flag_takes_a_spec_and_refuses_a_bad_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="samkv serve")
    add_arguments(parser)
    assert parser.parse_args(["--method", SPEC]).method == SPEC
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--method", "samkv+budgt=0.2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "samkv serve: error: argument --method: unknown option 'budgt'" in err
