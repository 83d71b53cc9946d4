"""The lexical block score (SamKV's ``lexical_weight``; its effect on a selection: test_samkv_attention)."""

from __future__ import annotations

import math

import pytest
import torch

from samkv_integrations.methods import SamKVMethod
from samkv_integrations.methods.lexical import lexical_block_scores
from samkv_integrations.records import DocumentKV


def _doc(ids: list[int]) -> DocumentKV:
    empty = torch.empty(0)
    return DocumentKV(ids, empty, empty, "fingerprint", 0)


def test_rare_question_ids_weigh_by_the_segments_that_hold_them() -> None:
    # Four segments; id 7 is in one of them, id 5 in two, id 9 in all four, id 3 nowhere.
    documents = [_doc([7, 5, 1, 9, 2, 2]), _doc([5, 9, 9, 4, 9, 8])]
    slot = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    scores = lexical_block_scores(documents, [7, 5, 9, 3, 7], slot, n_slots=5)
    rare, common = math.log(4 / 2), math.log(4 / 3)  # df 1 and df 2; df 4 clamps to 0
    expected = torch.tensor([rare + common, 0.0, common, 0.0, 0.0])
    torch.testing.assert_close(scores, expected)


def test_no_shared_ids_score_nothing() -> None:
    scores = lexical_block_scores([_doc([1, 2, 3])], [4, 5], torch.tensor([0, 1, 1]), 2)
    assert scores.tolist() == [0.0, 0.0]


def test_lexical_weight_is_checked() -> None:
    with pytest.raises(ValueError, match=r"lexical_weight must be in \[0, 1\]"):
        SamKVMethod(lexical_weight=1.5)
    with pytest.raises(ValueError, match="lexical_weight applies to scoring='attention'"):
        SamKVMethod(scoring="paper", ranking="per_document", lexical_weight=0.5)
