"""RoPE re-alignment: move post-RoPE keys from their cached positions to new ones.

Rotary embeddings rotate each key by an angle linear in its position, so a key cached at
position ``p`` is moved to ``p + delta`` by one more rotation of angle ``delta``. This holds
for plain RoPE and for the Llama-3, linear and YaRN scalings, whose per-dimension
frequencies do not depend on position. The angles always come from the model's own
rotary module: no base or scaling is hard-coded here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


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


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys`` ``[..., n, head_dim]`` rotated by ``rotation``'s ``[n, head_dim]`` cos and sin.

    Computed in float32 and returned in the keys' dtype; callers that rotate many layers by
    the same shifts compute ``rotation`` once and call this per layer.
    """
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)
