"""Drives the real page in headless Chromium against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from samkv_chroma_demo.pipeline import DemoIndex
from samkv_chroma_demo.server import create_app

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.enable_socket,
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None,
        reason=f"Chromium is not installed at {CHROMIUM} (`make browser` installs Debian's chromium)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def base_url(demo_index: DemoIndex) -> Iterator[str]:
    app = create_app(demo_index, samples=["Tell me about the glacier."], max_new_tokens=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_page_streams_answer_highlights_chunks_and_compares(base_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(base_url)
            expect(page.locator("#info")).to_contain_text("random:tiny-llama")
            expect(page.locator("#method")).to_have_value("samkv")

            # Bad input is shown in the page, not thrown: an empty question.
            page.click("#submit")
            expect(page.locator("#error")).to_contain_text("question: type a question")

            page.click(".samples button")
            expect(page.locator("#question")).to_have_value("Tell me about the glacier.")
            page.select_option("#budget", "0.25")
            page.click("#submit")

            samkv = page.locator('.lane[data-lane="samkv"]')
            full = page.locator('.lane[data-lane="full"]')
            expect(full).to_have_attribute("data-done", "1", timeout=120_000)
            expect(samkv).to_have_attribute("data-done", "1")
            expect(page.locator("#error")).to_be_hidden()
            for lane in (samkv, full):
                assert lane.locator(".text").inner_text().strip()
                expect(lane.locator(".stats")).to_contain_text("TTFT")
                expect(lane.locator(".stats")).to_contain_text("decode KV")
            expect(full.locator(".stats")).to_contain_text("kept 100%")

            chunks = page.locator(".chunk")
            expect(chunks.first).to_contain_text("Glacier article")
            expect(chunks.first.locator(".meta")).to_contain_text("samkv kept")
            assert page.locator(".chunk .tok.anchor").count() > 0
            assert page.locator(".chunk .tok.block").count() > 0
            dropped = page.locator(".chunk .tok:not(.anchor):not(.block):not(.kept)").count()
            assert dropped > 0

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-browser.png"), full_page=True)
        finally:
            browser.close()
