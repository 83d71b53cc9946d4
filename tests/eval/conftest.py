"""Shared eval fixtures: a tiny question file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rows = [
        {
            "id": "q1",
            "question": "Where was Ada born?",
            "contexts": [
                {"title": "Ada", "text": "Ada was born in London in 1815."},
                {"title": "London", "text": "London is on the Thames."},
                {"title": "Paris", "text": "Paris is on the Seine."},
            ],
            "answers": ["London"],
        },
        {
            "id": "q2",
            "question": "Which river runs through Paris?",
            "contexts": [
                {"title": "Seine", "text": "The Seine flows to the sea."},
                {"title": "Paris", "text": "Paris is on the Seine."},
            ],
            "answers": ["the Seine", "Seine"],
        },
    ]
    path = tmp_path / "tiny-qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
