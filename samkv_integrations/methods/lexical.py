"""Score blocks of documents by the question's words they contain, weighted by rarity.

``SamKVMethod(lexical_weight=w)`` mixes this score into the attention scoring's block mass:
``(1 - w) · mass + w · lexical``, each normalized to sum to 1 over the blocks. The question's
attention over independently cached documents is a small model's guess from keys that never
saw the question; the question's own rare words are a signal that does not depend on where a
document sits in the prompt or on how well the model reads it, as hybrid retrieval mixes
BM25 into dense scores. Per block ``b`` (a token segment, anchors included as segments):
``lexical_b = Σ_{t ∈ Q ∩ b} max(0, log(n_segments / (1 + df_t)))``, over the distinct token
ids ``t`` of the question suffix ``Q`` (the chat template's tokens too: they occur in every
document's framing or nowhere, so their weight is about 0), where ``df_t`` counts the
segments that hold ``t``. Token ids, not words: no tokenizer-specific normalization.

Cost: a few vector operations over the ``N`` context token ids, on the device, per request.
"""

from __future__ import annotations

import torch

from samkv_integrations.records import DocumentKV


def lexical_block_scores(
    documents: list[DocumentKV], question_ids: list[int], slot: torch.Tensor, n_slots: int
) -> torch.Tensor:
    """``[n_slots]`` float32: each segment's rarity-weighted overlap with the question's ids.

    Args:
        documents: The documents, laid end to end (their ``token_ids``).
        question_ids: The question suffix's token ids.
        slot: ``[N]`` the segment of each document token.
        n_slots: Number of segments.
    """
    device = slot.device
    ids = torch.tensor([t for d in documents for t in d.token_ids], device=device)
    scores = torch.zeros(n_slots, device=device)
    asked = torch.isin(ids, torch.tensor(sorted(set(question_ids)), device=device))
    if not asked.any():
        return scores
    vocab = int(ids.max()) + 1
    pairs = torch.unique(slot[asked] * vocab + ids[asked])  # each (segment, id) once
    pair_slot, pair_id = pairs // vocab, pairs % vocab
    n_segments = (torch.bincount(slot, minlength=n_slots) > 0).sum().float()
    df = torch.bincount(pair_id, minlength=vocab).float()
    idf = (n_segments / (1 + df[pair_id])).log().clamp(min=0)
    return scores.index_add_(0, pair_slot, idf)
