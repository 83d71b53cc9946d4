from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from samkv_integrations.eval.metrics import (
    best_em,
    best_f1,
    contains_gold,
    exact_match,
    first_token_kl,
    normalize_answer,
    paired_bootstrap,
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


def test_paired_bootstrap_of_identical_predictions_is_zero() -> None:
    assert paired_bootstrap([0.0] * 50) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    assert paired_bootstrap([]) is None


def test_paired_bootstrap_of_a_constant_shift_is_the_shift() -> None:
    interval = paired_bootstrap([-0.3] * 40)
    assert interval is not None
    assert interval == pytest.approx({"diff": -0.3, "low": -0.3, "high": -0.3})


def test_paired_bootstrap_matches_the_normal_interval_on_many_questions() -> None:
    # With n large the mean is close to normal: the percentile bootstrap interval must
    # agree with mean ± 1.96 s / sqrt(n) to within a tenth of its half-width.
    rng = np.random.default_rng(1)
    differences = rng.normal(0.1, 1.0, size=5000)
    interval = paired_bootstrap(differences.tolist())
    assert interval is not None
    mean, sd = differences.mean(), differences.std(ddof=1)
    half = 1.959964 * sd / math.sqrt(len(differences))
    assert interval["diff"] == pytest.approx(mean)
    assert interval["low"] == pytest.approx(mean - half, abs=0.1 * half)
    assert interval["high"] == pytest.approx(mean + half, abs=0.1 * half)
    # Binary scores (contains) too: differences in {-1, 0, 1}.
    flips = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.75, 0.15], size=4000)
    binary = paired_bootstrap(flips.tolist())
    assert binary is not None
    half = 1.959964 * flips.std(ddof=1) / math.sqrt(len(flips))
    assert binary["low"] == pytest.approx(flips.mean() - half, abs=0.1 * half)
    assert binary["high"] == pytest.approx(flips.mean() + half, abs=0.1 * half)


def test_paired_bootstrap_is_reproducible_and_validated() -> None:
    values = [0.0, 1.0, 0.5, -0.5, 1.0, 0.0, 0.25]
    assert paired_bootstrap(values) == paired_bootstrap(values)
    assert paired_bootstrap(values, seed=1) != paired_bootstrap(values, seed=2)
    narrow = paired_bootstrap(values, level=0.5)
    wide = paired_bootstrap(values, level=0.99)
    assert narrow is not None and wide is not None
    assert wide["low"] <= narrow["low"] <= narrow["high"] <= wide["high"]
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(values, level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(values, resamples=0)


def test_summarize_pairs_each_method_with_the_reference_by_question() -> None:
    records = [
        record("full", id="a", f1=1.0, contains_gold=True),
        record("full", id="b", f1=0.5, contains_gold=False),
        # Listed out of order, and "c" has no reference row: it is left out of the pairs.
        record("reuse", id="b", f1=0.0, contains_gold=False),
        record("reuse", id="a", f1=0.5, contains_gold=True),
        record("reuse", id="c", f1=1.0, contains_gold=True),
    ]
    summary = summarize(records, ["full", "reuse"], reference="full")
    assert summary["full"]["vs_full"] is None
    paired = summary["reuse"]["vs_full"]
    assert paired["n"] == 2
    # Differences: a -0.5, b -0.5 in F1; 0, 0 in contains.
    assert paired["f1"] == pytest.approx({"diff": -0.5, "low": -0.5, "high": -0.5})
    assert paired["contains_gold"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    assert summarize(records, ["reuse"])["reuse"]["vs_full"] is None
