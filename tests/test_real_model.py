"""End to end on the embedded default model (SmolLM2-135M-Instruct): the few slow tests."""

from __future__ import annotations

import pytest

from samkv_integrations import SamKVEngine
from samkv_integrations.cli import main

pytestmark = pytest.mark.real_model

# The fact is invented, so the model can only answer it from the document.
DOCS = [
    "The Amazon is a river in South America.",
    "The capital city of the island nation of Veloria is Marendo.",
    "Bananas are a yellow fruit rich in potassium.",
]
QUESTION = "What is the capital city of Veloria?"


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1)])
def test_full_answers_from_the_right_document(
    default_engine: SamKVEngine, order: tuple[int, ...]
) -> None:
    refs = default_engine.index([DOCS[i] for i in order], progress=False)
    answer = default_engine.answer(QUESTION, refs, method="full", max_new_tokens=24)
    assert "Marendo" in answer.text
    assert answer.stats.kept_fraction == 1.0


def test_cli_index_then_ask_answers_from_files(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for i, text in enumerate(DOCS):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(text)
        files.append(str(path))
    store = str(tmp_path / "store")
    assert main(["index", "--store", store, "--device", "cpu", *files]) == 0
    keys = capsys.readouterr().out.split()
    assert sum(len(k) == 64 for k in keys) == 3
    assert (
        main(["ask", "--store", store, "--device", "cpu", "--method", "full", QUESTION, *files])
        == 0
    )
    out = capsys.readouterr().out
    assert "Marendo" in out
    assert "[full] TTFT" in out
