"""Split-KV decode attention on CUDA (flash-decoding), as two Triton kernels.

One decode step has one query per head. With the KV group's heads standing as its queries
(``grouped_decode``), SDPA's fused kernels (cuDNN, FlashAttention, memory-efficient) give
each ``(batch, KV head)`` pair one block of threads: on the Llama-3.1-8B shape at batch 1
that is 8 blocks on an H100's 132 multiprocessors, and the attention over a 2.6k-slot
compact cache took 58 µs per layer (1.9 ms of a 9.5 ms step, profiled in CUDA-graph
replays), where reading its 10.6 MB of keys and values takes about 4 µs. Splitting the keys
across blocks, each block computing a partial softmax attention with its log-sum-exp,
then merging the partials exactly (Dao et al., "Flash-Decoding for long-context inference",
2023; what FlashAttention's ``splitkv`` kernels and vLLM's paged attention v2 do) fills the
GPU.

Shapes: queries ``[batch, n_kv_heads, group, head_dim]`` (group ≤ 16, head_dim a power of two
from 16 to 128), keys and values ``[batch, n_kv_heads, slots, head_dim]`` (any strides; a
last dimension that is not contiguous is copied), an optional additive mask ``[batch,
slots]`` (finite: a hidden slot holds the dtype's minimum, not ``-inf``, which the kernels
do not guard against); returns ``[batch, n_kv_heads, group, head_dim]`` in the
queries' dtype. Scores, the running softmax and the merge are float32; the probabilities are
rounded to the values' dtype for their product with the values, as FlashAttention does.

Triton ships with PyTorch's CUDA wheels only; ``available`` says whether this path can run.
"""

from __future__ import annotations

import math

import torch

from samkv_integrations.triton_kernels import import_kernels

__all__ = ["available", "split_kv_attention", "supports"]

#: Keys each block reads per iteration.
BLOCK_KEYS = 64
#: Blocks to aim for across the whole call: about two per multiprocessor on an H100 (132);
#: a fixed count rather than the device's, so that ``torch.compile`` sees a constant.
TARGET_BLOCKS = 256
#: Splits the merge reads at a time (any split count takes the same compiled kernel).
MERGE_BLOCK = 32

split_kv_kernels = import_kernels("samkv_integrations.split_kv_kernels")
#: Whether the kernels imported (else SDPA serves); read once at import so that a compiled
#: decode step finds a constant, not a lookup to trace.
TRITON = split_kv_kernels is not None


def available() -> bool:
    """Whether Triton is installed and a CUDA device is present."""
    return TRITON and torch.cuda.is_available()


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``split_kv_attention`` takes these tensors (else the caller uses SDPA).

    One dtype (bf16 or fp16) and one CUDA device for all three, the current one; keys and
    values of one shape; the sizes the kernels were written and tested for: at most 16
    queries per KV head, a head size that is a power of two from 16 to 128.
    """
    head_dim = query.shape[-1]
    return (
        available()
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.dtype == value.dtype == query.dtype
        and key.device == value.device == query.device
        and key.shape == value.shape
        and key.shape[-1] == head_dim
        # Triton launches on the current device, whatever device the tensors are on.
        and query.device.index == torch.cuda.current_device()
        and 16 <= head_dim <= 128
        and head_dim & (head_dim - 1) == 0
        and query.shape[2] <= 16
    )


def split_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of few queries over many keys, the keys split across blocks.

    Args:
        query: ``[batch, n_kv_heads, group, head_dim]``.
        key: ``[batch, n_kv_heads, slots, head_dim]``.
        value: Same shape as ``key``.
        mask: Additive ``[batch, slots]`` (0 or a large finite negative) on the queries'
            device, or ``None``.
        scale: Multiplies the scores (``1 / sqrt(head_dim)`` for most models).

    Returns:
        ``[batch, n_kv_heads, group, head_dim]``, the dtype of ``query``.
    """
    if not available():
        raise RuntimeError("split-KV attention needs Triton and a CUDA device")
    batch, n_kv_heads, group, head_dim = query.shape
    slots = key.shape[2]
    query = query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    pairs = batch * n_kv_heads
    splits = max(1, min(math.ceil(TARGET_BLOCKS / pairs), math.ceil(slots / BLOCK_KEYS)))
    keys_per_split = math.ceil(math.ceil(slots / splits) / BLOCK_KEYS) * BLOCK_KEYS
    splits = math.ceil(slots / keys_per_split)
    partial = torch.empty(
        (batch, n_kv_heads, splits, group, head_dim), dtype=torch.float32, device=query.device
    )
    lse = torch.empty((batch, n_kv_heads, splits, group), dtype=torch.float32, device=query.device)
    has_mask = mask is not None
    mask_arg = mask if mask is not None else query  # any tensor: never read without a mask
    mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    out = torch.empty_like(query)
    split_kv_kernels.partial[(pairs, splits)](
        query, key, value, mask_arg, partial, lse, scale,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *mask_strides,
        n_kv_heads, slots, keys_per_split,
        GROUP=group, BLOCK_GROUP=16, BLOCK_KEYS=BLOCK_KEYS, HEAD_DIM=head_dim,
        HAS_MASK=has_mask,
    )  # fmt: skip
    split_kv_kernels.merge[(pairs, group)](
        partial, lse, out, splits, group, head_dim,
        BLOCK_SPLITS=MERGE_BLOCK, HEAD_DIM=head_dim,
    )  # fmt: skip
    return out
