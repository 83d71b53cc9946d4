"""RoPE re-alignment: move post-RoPE keys from their cached positions to new ones.

Rotary embeddings rotate each key by an angle linear in its position, so a key cached at
position ``p`` is moved to ``p + delta`` by one more rotation of angle ``delta``. This holds
for plain RoPE and for the Llama-3, linear and YaRN scalings, whose per-dimension
frequencies do not depend on position. The angles always come from the model's own
rotary module: no base or scaling is hard-coded here. On CUDA with Triton installed the
rotation runs as one kernel (``rope_kernels``) with the same float32 arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from samkv_integrations.triton_kernels import import_kernels

rope_kernels = import_kernels("samkv_integrations.rope_kernels")
#: Whether the kernel imported (else the eager path serves).
TRITON = rope_kernels is not None

#: Tokens each program of the fused rotation reads.
_BLOCK_TOKENS = 32
#: CUDA's limit on the grid's second axis (blocks of tokens).
_MAX_TOKEN_BLOCKS = 65_535
#: Key and output dtypes the kernel reads and writes.
_ROTATED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rotary_module(model: PreTrainedModel) -> nn.Module:
    """Return the model's rotary embedding module (``model.model.rotary_emb`` for Llama/Qwen2)."""
    decoder = model.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(
            f"{type(model).__name__} has no shared rotary embedding (decoder.rotary_emb); "
            "only rotary-position models (Llama, Qwen2, Mistral, ...) can reuse shifted caches"
        )
    return rotary


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing of the last dimension: ``(x1, x2) -> (-x2, x1)``, for ``x·cos + rot·sin``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotation(model: PreTrainedModel, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin that rotate keys by ``delta`` positions.

    Args:
        model: The model whose rotary module defines the angles.
        delta: ``[n]`` integer position shifts (may be negative).

    Returns:
        ``(cos, sin)``, each ``[n, head_dim]`` in float32.
    """
    rotary = rotary_module(model)
    probe = torch.empty(0, device=delta.device, dtype=torch.float32)
    cos, sin = rotary(probe, position_ids=delta.to(torch.long)[None, :])
    # The module folds the attention scaling (YaRN's mscale) into cos/sin; the cached key
    # already carries it, so a second rotation must not apply it again.
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return cos[0].float() / scaling, sin[0].float() / scaling


def shift_keys(
    model: PreTrainedModel, keys: torch.Tensor, delta: int | torch.Tensor
) -> torch.Tensor:
    """Rotate post-RoPE keys by ``delta`` positions.

    Args:
        model: The model that computed the keys.
        keys: ``[..., n_tokens, head_dim]`` post-RoPE keys.
        delta: One shift for all tokens, or ``[n_tokens]`` shifts.

    Returns:
        Keys of the same shape and dtype, as if computed at their positions plus ``delta``.
    """
    if isinstance(delta, int):
        if delta == 0:
            return keys
        delta = torch.full((keys.shape[-2],), delta, device=keys.device)
    return rotate(keys, *rotation(model, delta.to(keys.device)))


def rotate(
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``keys`` ``[..., n, head_dim]`` rotated by ``rotation``'s ``[n, head_dim]`` cos and sin.

    Computed in float32 and returned in ``dtype`` (default: the keys' dtype); callers that
    rotate many layers by the same shifts compute ``rotation`` once and call this per layer.
    On a CUDA device with Triton, one fused kernel gives the same bits as the eager path.
    """
    dtype = dtype or keys.dtype
    if _fusable(keys, cos, sin, dtype):
        return _rotate_fused(keys, cos, sin, dtype)
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(dtype)


def _fusable(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``rope_kernels.rotate`` takes these tensors (else the eager path serves).

    Triton and CUDA, the keys on the current device with ``cos`` and ``sin``; float16,
    bfloat16 or float32 keys and output; float32 ``cos`` and ``sin`` of exactly ``[n,
    head_dim]`` (no broadcasting), with one stride and contiguous rows; an even head size;
    some keys; at most ``65,535 × 32`` tokens (the grid's limit).
    """
    n_tokens, head_dim = keys.shape[-2:] if keys.dim() >= 2 else (0, 0)
    return (
        TRITON
        and keys.is_cuda
        # Triton launches on the current device, whatever device the tensors are on.
        and keys.device.index == torch.cuda.current_device()
        and cos.device == sin.device == keys.device
        and keys.dtype in _ROTATED_DTYPES
        and dtype in _ROTATED_DTYPES
        and cos.dtype == sin.dtype == torch.float32
        and cos.shape == sin.shape == (n_tokens, head_dim)
        and cos.stride() == sin.stride()
        and cos.stride(-1) == 1
        and head_dim % 2 == 0
        and keys.numel() > 0
        and _token_blocks(n_tokens) <= _MAX_TOKEN_BLOCKS
    )


def _token_blocks(n_tokens: int) -> int:
    """Programs along the tokens: the fused rotation's grid, second axis."""
    return -(-n_tokens // _BLOCK_TOKENS)


def _rotate_fused(
    keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    n_tokens, head_dim = keys.shape[-2:]
    rows = keys.reshape(-1, n_tokens, head_dim)  # a view where the strides allow one
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(keys.shape, dtype=dtype, device=keys.device)
    out_rows = out.view(-1, n_tokens, head_dim)
    half = head_dim // 2
    grid = (rows.shape[0], _token_blocks(n_tokens))
    rope_kernels.rotate[grid](
        rows, cos, sin, out_rows,
        rows.stride(0), rows.stride(1), out_rows.stride(0), out_rows.stride(1), cos.stride(0),
        n_tokens,
        HALF=half, BLOCK_HALF=1 << (half - 1).bit_length(), BLOCK_TOKENS=_BLOCK_TOKENS,
        enable_fp_fusion=False,  # round each product and the sum, as the eager path does
    )  # fmt: skip
    return out
