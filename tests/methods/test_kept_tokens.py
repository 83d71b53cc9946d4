"""The kept tokens of a selection, split by document in one read (``kept_tokens``)."""

from __future__ import annotations

import pytest
import torch

from samkv_integrations.methods.kept_tokens import kept_tokens
from samkv_integrations.methods.recompute import split_by_document


def _doc_of_token(lengths: list[int]) -> torch.Tensor:
    return torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))


@pytest.mark.parametrize("seed", range(6))
def test_kept_tokens_match_a_per_document_reference(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (4,), generator=generator).tolist()
    keep = torch.rand(sum(lengths), generator=generator) < 0.5
    kept = kept_tokens(keep, _doc_of_token(lengths), lengths, {})
    want = keep.nonzero().squeeze(1)
    assert torch.equal(kept.indices, want)
    local = split_by_document(want, lengths)
    assert [t.tolist() for t in kept.local] == [t.tolist() for t in local]
    # A kept token follows a drop when a token before it in its document was dropped.
    after_drop = torch.cat([k > torch.arange(len(k)) for k in local])
    if after_drop.any():
        assert kept.after_drop is not None and torch.equal(kept.after_drop, after_drop)
    else:
        assert kept.after_drop is None


def test_documents_kept_from_their_start_follow_no_drop() -> None:
    lengths = [3, 2, 4]
    keep = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    kept = kept_tokens(keep, _doc_of_token(lengths), lengths, {})
    assert [t.tolist() for t in kept.local] == [[0, 1], [0, 1], [0, 1]]
    assert kept.after_drop is None


def test_only_the_tokens_after_a_drop_are_marked() -> None:
    lengths = [4, 3]
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    kept = kept_tokens(keep, _doc_of_token(lengths), lengths, {})
    assert kept.indices.tolist() == [0, 2, 3, 5]
    assert kept.after_drop is not None
    assert kept.after_drop.tolist() == [False, True, True, True]


def test_tensor_facts_come_back_as_floats_and_others_as_they_are() -> None:
    lengths = [2]
    ratios = torch.tensor([0.5, 0.75])
    facts: dict[str, object] = {"share": torch.tensor(0.25), "listed": [0.5], "ratios": ratios}
    kept = kept_tokens(torch.tensor([True, False]), _doc_of_token(lengths), lengths, facts)
    assert kept.facts == {"share": 0.25, "listed": [0.5], "ratios": ratios}
    assert isinstance(kept.facts["share"], float)


def test_nothing_kept() -> None:
    lengths = [2, 0, 3]
    kept = kept_tokens(torch.zeros(5, dtype=torch.bool), _doc_of_token(lengths), lengths, {})
    assert kept.indices.numel() == 0 and [t.numel() for t in kept.local] == [0, 0, 0]
    assert kept.after_drop is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="stream syncs happen on CUDA")
def test_one_read_on_cuda() -> None:
    lengths = [40, 3, 70]
    keep = torch.rand(sum(lengths), device="cuda") < 0.3
    doc = _doc_of_token(lengths).cuda()
    facts: dict[str, object] = {"share": torch.tensor(0.5, device="cuda")}
    reads = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            kept = kept_tokens(keep, doc, lengths, facts)
        reads = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(reads) == 1
    want = kept_tokens(keep.cpu(), doc.cpu(), lengths, {"share": torch.tensor(0.5)})
    assert torch.equal(kept.indices.cpu(), want.indices)
    assert kept.facts == want.facts
