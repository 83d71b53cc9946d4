"""The Triton kernel behind ``rope.rotate`` on CUDA (imported only where Triton is installed).

``rotate``: one program per ``(row, block of tokens)`` reads each key once, rotates it in
float32 as PyTorch's elementwise path does (each product and the sum rounded on their own:
the launch turns fused multiply-adds off) and writes it once in the output's dtype. The
eager path makes seven passes over a float32 copy of the keys instead; at 16k reused tokens
per layer that is most of the GPU time of building SamKV's question cache.
"""

# mypy: ignore-errors
# ruff: noqa: N803
# Triton's kernels are typed by its JIT, not by Python annotations, and its convention
# names pointers and compile-time constants in capitals.

from __future__ import annotations

import triton
import triton.language as tl


# The token count changes with every context: leaving it unspecialized keeps one compiled
# kernel for all of them (a compile stalls the forward that meets it).
@triton.jit(do_not_specialize=["n_tokens"])
def rotate(
    K, Cos, Sin, Out,
    stride_kr, stride_kt, stride_or, stride_ot, stride_ct,
    n_tokens,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
):  # fmt: skip
    """``out = k · cos + rotate_half(k) · sin`` for one row's block of tokens.

    ``rotate_half(k) = (-k2, k1)`` for the halves ``k1, k2`` of the last dimension, so the
    first half is ``k1 · cos1 - k2 · sin1`` and the second ``k2 · cos2 + k1 · sin2``.
    """
    # int64 offsets: every layer's keys rotated at once can span more than 2**31 elements.
    row = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    dims = tl.arange(0, BLOCK_HALF)
    ok = (tokens < n_tokens)[:, None] & (dims < HALF)[None, :]
    key = K + row * stride_kr + tokens[:, None] * stride_kt + dims[None, :]
    first = tl.load(key, mask=ok, other=0.0).to(tl.float32)
    second = tl.load(key + HALF, mask=ok, other=0.0).to(tl.float32)
    angle = tokens[:, None] * stride_ct + dims[None, :]
    cos1 = tl.load(Cos + angle, mask=ok, other=0.0)
    cos2 = tl.load(Cos + angle + HALF, mask=ok, other=0.0)
    sin1 = tl.load(Sin + angle, mask=ok, other=0.0)
    sin2 = tl.load(Sin + angle + HALF, mask=ok, other=0.0)
    out = Out + row * stride_or + tokens[:, None] * stride_ot + dims[None, :]
    dtype = Out.dtype.element_ty
    # A subtraction, not the sum of a negation: Triton negates as ``0 - x``, which turns -0
    # into +0, where the eager path's ``neg`` keeps the sign (IEEE ``a - b`` is ``a + (-b)``).
    tl.store(out, (first * cos1 - second * sin1).to(dtype), mask=ok)
    tl.store(out + HALF, (second * cos2 + first * sin2).to(dtype), mask=ok)
