"""The tokens a selection keeps, per document, with their sizes read from the device at once.

SamKV's selection ends in a ``[n_context]`` mask on the device, and the recompute needs its
sizes on the host: the number of kept tokens shapes every tensor of its forward. A read
from the device waits for every kernel already queued (the question pass among them) and
leaves the device idle until the host queues more, so the sizes, the fusion flag and the
selection's scalar facts come back in one read rather than one each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samkv_integrations.host_values import on_device

__all__ = ["KeptTokens", "kept_tokens"]


@dataclass
class KeptTokens:
    """What a ``[n_context]`` keep mask over documents laid end to end selects.

    Attributes:
        indices: ``[k]`` increasing indices of the kept tokens into the documents laid end
            to end.
        local: Per document, ``[k_i]`` local indices of its kept tokens.
        after_drop: ``[k]`` whether each kept token comes after a dropped token of its own
            document (its reused KV saw context the recompute will not); ``None`` when none
            does.
        facts: The selection's facts, with each 0-d tensor among them read as a float.
    """

    indices: torch.Tensor
    local: list[torch.Tensor]
    after_drop: torch.Tensor | None
    facts: dict[str, object]


def kept_tokens(
    keep: torch.Tensor, doc: torch.Tensor, lengths: list[int], facts: dict[str, object]
) -> KeptTokens:
    """Split ``[n_context]`` bool ``keep`` by document.

    ``doc`` ``[n_context]`` gives each token's document and must agree with ``lengths``
    (both come from ``block_scores.block_layout``). ``facts`` may hold 0-d tensors
    (computed on the device during selection); they come back as floats in the same read
    as the sizes. Other facts, tensors of more elements among them, are left as they are.
    """
    device = keep.device
    kept_mask = keep.long()
    counts = kept_mask.new_zeros(len(lengths)).index_add_(0, doc, kept_mask)
    starts = on_device([0, *lengths[:-1]], device, torch.long).cumsum(0)
    local = torch.arange(len(keep), device=device) - starts[doc]
    # A kept token follows a drop exactly when its local index exceeds its rank among the
    # kept tokens of its document.
    rank = kept_mask.cumsum(0) - 1 - (counts.cumsum(0) - counts)[doc]
    follows_drop = keep & (local > rank)
    scalars = {
        name: value.to(device, torch.float64).reshape(1)
        for name, value in facts.items()
        if isinstance(value, torch.Tensor) and value.dim() == 0
    }
    packed = torch.cat([counts.double(), follows_drop.any().double()[None], *scalars.values()])
    read_back = packed.tolist()  # the one read that waits for the selection
    sizes = [int(n) for n in read_back[: len(lengths)]]
    read = dict(zip(scalars, read_back[len(lengths) + 1 :], strict=True))
    # A stable sort puts the kept tokens first, in index order, with no second read.
    indices = torch.argsort((~keep).to(torch.uint8), stable=True)[: sum(sizes)]
    return KeptTokens(
        indices=indices,
        local=list(local[indices].split(sizes)),
        after_drop=follows_drop[indices] if read_back[len(lengths)] else None,
        facts={**facts, **read},
    )
