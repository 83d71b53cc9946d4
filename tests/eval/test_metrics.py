from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from samkv_integrations.eval.metrics import (
    best_em,
    best_f1,
    contains_gold,
    exact_match,
    first_token_kl,
    normalize_answer,
    percentile,
    summarize,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  an apple,  a  pear. ", "apple pear"),
        ("Theatre at the end", "theatre at end"),
        ("U.S.A.", "usa"),
        ("A", ""),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_squad_f1_and_em() -> None:
    # SQuAD v1.1 style: articles and punctuation do not count, tokens are a bag.
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    assert token_f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    # Precision 2/2, recall 2/4.
    assert token_f1("the cat sat", "a cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("Broncos Denver", "Denver Broncos") == 1.0
    assert token_f1("", "Denver") == 0.0
    assert token_f1("the", "Denver") == 0.0
    # Repeated tokens count at most as often as in the gold answer: precision 1/3.
    assert token_f1("paris paris paris", "paris") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def test_best_over_gold_answers() -> None:
    golds = ["Carolina Panthers", "the Panthers"]
    assert best_em("Panthers", golds) == 1.0
    assert best_f1("Carolina", golds) == pytest.approx(2 / 3)
    assert best_f1("Seattle", golds) == 0.0


def test_contains_gold() -> None:
    assert contains_gold("She was the Chief of Protocol of the US.", ["chief of protocol"]) == 1.0
    assert contains_gold("Ambassador", ["Chief of Protocol", "ambassador"]) == 1.0
    assert contains_gold("Ambassador to Ghana", ["Chief of Protocol"]) == 0.0
    assert contains_gold("anything", ["the"]) == 0.0


def test_kl_zero_for_identical_positive_otherwise() -> None:
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(50), -1)
    q = torch.log_softmax(torch.randn(50), -1)
    assert first_token_kl(p, p.clone()) == 0.0
    assert first_token_kl(p, q) > 0
    assert first_token_kl(p, q) != pytest.approx(first_token_kl(q, p))  # not symmetric


def test_kl_matches_the_definition() -> None:
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert first_token_kl(p, q) == pytest.approx(expected)
    # A token the reference rules out contributes nothing, even where the other rules it out too.
    p0 = torch.tensor([1.0, 0.0, 0.0]).log()
    q0 = torch.tensor([0.5, 0.5, 0.0]).log()
    assert first_token_kl(p0, q0) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="first_token_logprobs"):
        first_token_kl(p, p0)


def test_percentile() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def record(method: str, **values: Any) -> dict[str, Any]:
    base = {
        "method": method,
        "f1": 1.0,
        "em": 1.0,
        "contains_gold": True,
        "agree_full": True,
        "first_token_kl": 0.0,
        "kept_fraction": 1.0,
        "recomputed_fraction": 1.0,
        "ttft_s": 1.0,
        "context_tokens": 100,
    }
    return {**base, **values}


def test_summarize_means_agreement_and_ttft() -> None:
    records = [
        record("full", ttft_s=1.0),
        record(
            "reuse",
            f1=0.5,
            em=0.0,
            agree_full=False,
            first_token_kl=0.2,
            recomputed_fraction=0.0,
            ttft_s=0.1,
        ),
        record("full", ttft_s=3.0),
        record(
            "reuse",
            f1=0.0,
            em=0.0,
            contains_gold=False,
            first_token_kl=None,
            recomputed_fraction=0.0,
            ttft_s=0.3,
        ),
        record("full", ttft_s=2.0),
        record("reuse", agree_full=True, first_token_kl=0.4, recomputed_fraction=0.0, ttft_s=0.2),
    ]
    summary = summarize(records, ["full", "reuse", "samkv"])
    assert list(summary) == ["full", "reuse", "samkv"]
    full, reuse = summary["full"], summary["reuse"]
    assert full["n"] == 3 and full["agree_full"] == 1.0 and full["first_token_kl"] == 0.0
    assert full["ttft_s_median"] == pytest.approx(2.0)
    assert full["ttft_s_p90"] == pytest.approx(2.8)
    assert reuse["f1"] == pytest.approx(0.5)
    assert reuse["em"] == pytest.approx(1 / 3)
    assert reuse["agree_full"] == pytest.approx(2 / 3)
    assert reuse["contains_gold"] == pytest.approx(2 / 3)
    assert reuse["first_token_kl"] == pytest.approx(0.3)  # the unknown one is left out
    assert reuse["recomputed_fraction"] == 0.0
    assert summary["samkv"]["n"] == 0 and summary["samkv"]["f1"] is None
