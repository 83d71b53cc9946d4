"""Answer metrics (SQuAD F1 and exact match, agreement with full), divergence, and summaries.

The text metrics follow the SQuAD v1.1 evaluation: both strings are normalised (lower
case, punctuation and the articles a/an/the removed, whitespace collapsed), and a
prediction is scored against each gold answer, keeping the best.

Long answers (the ``summarize`` task, ``eval.tasks``) have no gold text to match; they
are scored against full recompute's answer to the same prompt: position-wise token
agreement, common-prefix agreement (``token_agreement``, ``prefix_agreement``) and
ROUGE-L F1 (``rouge_l_f1``). Full scores 1.0 on all three by construction; the others'
means come with a bootstrap interval over questions (``mean_interval``).

A method is compared with the reference (full recompute) question by question: the mean
of the paired differences in F1 and in contains, with a percentile bootstrap interval
over questions (``paired_bootstrap``): a difference whose interval holds 0 is not one
the sample can tell from none.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from samkv_integrations.engine import Answer
    from samkv_integrations.eval.data import Question

__all__ = [
    "best_em",
    "best_f1",
    "contains_gold",
    "exact_match",
    "first_token_kl",
    "lcs_length",
    "mean_interval",
    "normalize_answer",
    "paired_bootstrap",
    "percentile",
    "prefix_agreement",
    "rouge_l_f1",
    "score_answer",
    "summarize",
    "token_agreement",
    "token_f1",
]

#: Paired bootstrap (``paired_bootstrap``): resamples of the questions, the generator's
#: seed and the interval's level, as recorded in ``metrics.json``.
BOOTSTRAP: dict[str, Any] = {"resamples": 2000, "seed": 0, "level": 0.95}
#: The scores compared with the reference, question by question.
PAIRED_SCORES = ("f1", "contains_gold")
#: Scores computed against full's answer: means with a bootstrap interval in the summary.
FULL_ANSWER_SCORES = ("rouge_l_full", "token_agreement_full", "prefix_agreement_full")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, and collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token F1 over the gold answers."""
    return max(token_f1(prediction, gold) for gold in golds)


def best_em(prediction: str, golds: Sequence[str]) -> float:
    """The best exact match over the gold answers."""
    return max(exact_match(prediction, gold) for gold in golds)


def contains_gold(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when a normalised gold answer is a substring of the normalised prediction, else 0.0.

    A plain substring test, as the "contains the gold answer" figure is usually computed:
    gold "1" is found in "1945". Gold answers that normalise to nothing never match.
    """
    pred = normalize_answer(prediction)
    return float(any(gold and gold in pred for gold in map(normalize_answer, golds)))


def token_agreement(token_ids: Sequence[int], reference: Sequence[int]) -> float:
    """The fraction of the reference's positions where ``token_ids`` has the same token.

    ``|{i < len(reference) : i < len(token_ids) and token_ids[i] == reference[i]}| /
    len(reference)``: positions past the end of the shorter answer count as disagreement,
    tokens the method adds past the reference's end are ignored. Once the answers part,
    later positions agree only where the two happen to realign, so this counts tokens
    reproduced in place, not text reproduced somewhere. An empty reference (full stopped
    at once) gives 1.0 if ``token_ids`` is empty too, else 0.0.

    Args:
        token_ids: The method's answer token ids.
        reference: Full recompute's answer token ids.
    """
    if not reference:
        return float(not token_ids)
    same = sum(a == b for a, b in zip(token_ids, reference, strict=False))
    return same / len(reference)


def prefix_agreement(token_ids: Sequence[int], reference: Sequence[int]) -> float:
    """The length of the common prefix of ``token_ids`` and ``reference``, over ``len(reference)``.

    The fraction of full's answer that greedy decoding reproduced before it first chose a
    different token; the empty-reference convention of ``token_agreement`` applies.
    """
    if not reference:
        return float(not token_ids)
    common = 0
    for a, b in zip(token_ids, reference, strict=False):
        if a != b:
            break
        common += 1
    return common / len(reference)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common subsequence of ``a`` and ``b`` (``O(len(a) len(b))``)."""
    # One row of the dynamic programme at a time: row[j] = LCS(a[:i], b[:j]).
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # LCS(a[:i-1], b[:j-1]), before row[j-1] was overwritten
        for j, y in enumerate(b, start=1):
            above = row[j]  # LCS(a[:i-1], b[:j])
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``, on normalised word tokens.

    ROUGE-L (Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section
    3.1): with ``X`` the reference's words, ``Y`` the prediction's and ``LCS`` the length
    of their longest common subsequence, ``R = LCS / |X|``, ``P = LCS / |Y|`` and ``F =
    (1 + β²) R P / (R + β² P)``; here ``β = 1`` (F1). Words are ``normalize_answer``'s
    tokens (lower case, no punctuation or articles). Two empty texts score 1.0, one empty
    text 0.0.
    """
    ref_words = normalize_answer(reference).split()
    pred_words = normalize_answer(prediction).split()
    if not ref_words or not pred_words:
        return float(ref_words == pred_words)
    common = lcs_length(pred_words, ref_words)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_words), common / len(ref_words)
    return 2 * precision * recall / (precision + recall)


def first_token_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference ‖ other) in nats between two ``[vocab]`` log-probability vectors.

    Tokens the reference gives zero probability contribute nothing (``0 · log 0 = 0``);
    tiny negative results of float rounding are reported as 0.
    """
    if reference.shape != other.shape:
        raise ValueError(f"first_token_logprobs: shapes differ, {reference.shape} vs {other.shape}")
    ref, oth = reference.detach().double(), other.detach().double()
    probs = ref.exp()
    terms = (probs * (ref - oth)).masked_fill(probs == 0, 0.0)
    return max(float(terms.sum()), 0.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def paired_bootstrap(
    differences: Sequence[float],
    *,
    resamples: int = BOOTSTRAP["resamples"],
    seed: int = BOOTSTRAP["seed"],
    level: float = BOOTSTRAP["level"],
) -> dict[str, float] | None:
    """The mean of paired differences and its percentile bootstrap interval.

    The questions are resampled with replacement ``resamples`` times (numpy's PCG64 seeded
    with ``seed``, so the interval is reproducible); the interval holds the central
    ``level`` of the resampled means.

    Args:
        differences: One difference per question (method minus reference).
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.
        level: Confidence level of the interval, in (0, 1).

    Returns:
        ``{"diff", "low", "high"}``, or ``None`` when there are no differences.
    """
    import numpy as np

    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // values.size)  # bounds the index matrix in memory
    means = []
    for done in range(0, resamples, chunk):
        index = rng.integers(0, values.size, size=(min(chunk, resamples - done), values.size))
        means.append(values[index].mean(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(values.mean()), "low": float(low), "high": float(high)}


def mean_interval(values: Sequence[float]) -> dict[str, float] | None:
    """The mean of per-question scores and its percentile bootstrap interval.

    The same resampling as ``paired_bootstrap`` (``BOOTSTRAP`` settings), for scores that
    are already comparisons with the reference (``FULL_ANSWER_SCORES``).

    Returns:
        ``{"mean", "low", "high"}``, or ``None`` when there are no values.
    """
    interval = paired_bootstrap(values)
    if interval is None:
        return None
    return {"mean": interval["diff"], "low": interval["low"], "high": interval["high"]}


def compare_with_reference(
    rows: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Paired differences from the reference on the questions both answered, by ``id``.

    Returns:
        ``{"n": pairs, "f1": {"diff", "low", "high"}, "contains_gold": {...}}``, the
        intervals under the ``BOOTSTRAP`` settings (``None`` without pairs).
    """
    by_id = {r["id"]: r for r in reference}
    pairs = [(r, by_id[r["id"]]) for r in rows if r["id"] in by_id]
    return {
        "n": len(pairs),
        **{
            key: paired_bootstrap([float(r[key]) - float(ref[key]) for r, ref in pairs])
            for key in PAIRED_SCORES
        },
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    records: Sequence[Mapping[str, Any]], labels: Sequence[str], reference: str | None = None
) -> dict[str, dict[str, Any]]:
    """Aggregate per-question prediction records into one summary per method label.

    Args:
        records: Prediction records with ``id``, ``method``, ``f1``, ``em``,
            ``contains_gold``, ``agree_full``, ``first_token_kl`` (``None`` when unknown),
            ``kept_fraction``, ``recomputed_fraction``, ``ttft_s`` and ``context_tokens``,
            and optionally the ``FULL_ANSWER_SCORES`` (rows written before they existed
            lack them).
        labels: Method labels, in the order the summary should list them.
        reference: The label the others are compared with, question by question.

    Returns:
        ``{label: {"n", "f1", "em", "contains_gold", "agree_full", "first_token_kl",
        "rouge_l_full", "token_agreement_full", "prefix_agreement_full", "kept_fraction",
        "recomputed_fraction", "ttft_s_median", "ttft_s_p90", "ttft_s_mean",
        "context_tokens_mean", "vs_full", "intervals"}}``; means are ``None`` for a label
        with no records; ``vs_full`` (``compare_with_reference``) is ``None`` for the
        reference itself and when no reference is given; ``intervals`` maps each of
        ``FULL_ANSWER_SCORES`` to ``mean_interval`` of its values, ``None`` for the
        reference (which scores 1.0 against itself).
    """
    summary: dict[str, dict[str, Any]] = {}
    reference_rows = [r for r in records if r["method"] == reference]
    for label in labels:
        rows = [r for r in records if r["method"] == label]

        def column(key: str, rows: list[Mapping[str, Any]] = rows) -> list[float]:
            return [float(r[key]) for r in rows if r.get(key) is not None]

        ttft = column("ttft_s")
        summary[label] = {
            "n": len(rows),
            **{
                key: _mean(column(key))
                for key in (
                    "f1",
                    "em",
                    "contains_gold",
                    "agree_full",
                    "first_token_kl",
                    *FULL_ANSWER_SCORES,
                    "kept_fraction",
                    "recomputed_fraction",
                )
            },
            "ttft_s_median": percentile(ttft, 50) if ttft else None,
            "ttft_s_p90": percentile(ttft, 90) if ttft else None,
            "ttft_s_mean": _mean(ttft),
            "context_tokens_mean": _mean(column("context_tokens")),
            "vs_full": (
                compare_with_reference(rows, reference_rows)
                if reference is not None and label != reference
                else None
            ),
            "intervals": (
                {key: mean_interval(column(key)) for key in FULL_ANSWER_SCORES}
                if label != reference
                else None
            ),
        }
    return summary


def score_answer(
    question: Question, label: str, answer: Answer, reference: Answer, n_documents: int
) -> dict[str, Any]:
    """One ``predictions.jsonl`` record: the answer, its scores and the method's stats.

    Args:
        question: The question, with its gold answers.
        label: The method's label.
        answer: The method's answer.
        reference: Full recompute's answer to the same question (``agree_full``, KL and
            the ``FULL_ANSWER_SCORES``).
        n_documents: Documents the context was packed into.
    """
    stats = answer.stats
    kl = None
    if answer.first_token_logprobs is not None and reference.first_token_logprobs is not None:
        kl = first_token_kl(reference.first_token_logprobs, answer.first_token_logprobs)
    return {
        "id": question.id,
        "method": label,
        "prediction": answer.text,
        "gold": list(question.answers),
        "f1": best_f1(answer.text, question.answers),
        "em": best_em(answer.text, question.answers),
        "contains_gold": bool(contains_gold(answer.text, question.answers)),
        "agree_full": normalize_answer(answer.text) == normalize_answer(reference.text),
        "first_token_kl": kl,
        "rouge_l_full": rouge_l_f1(answer.text, reference.text),
        "token_agreement_full": token_agreement(answer.token_ids, reference.token_ids),
        "prefix_agreement_full": prefix_agreement(answer.token_ids, reference.token_ids),
        "kept_fraction": stats.kept_fraction,
        "recomputed_fraction": stats.recomputed_fraction,
        "ttft_s": stats.ttft_s,
        "context_tokens": stats.context_tokens,
        "n_documents": n_documents,
        "recomputed_documents": stats.recomputed_documents,
        "new_tokens": len(answer.token_ids),
        "seconds": stats.seconds,
    }
