"""An independent reference for SnapKV's clustering of eviction scores."""

from __future__ import annotations

import torch


def neighbourhood_mean(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each entry of the last axis averaged with the entries within ``kernel // 2`` of it."""
    half, n = kernel // 2, scores.shape[-1]
    columns = [scores[..., max(0, j - half) : min(n, j + half + 1)].mean(-1) for j in range(n)]
    return torch.stack(columns, dim=-1)
