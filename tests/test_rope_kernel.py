"""The fused RoPE rotation (``rope_kernels``) gives the eager path's bits; CPU stays eager."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from samkv_integrations import rope
from samkv_integrations.rope import rotate, rotate_half

needs_triton = pytest.mark.skipif(
    not (rope.TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA"
)
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def eager(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """The rotation written out, independent of ``rope.rotate``'s dispatch."""
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns: unlike ``torch.equal``, tells -0 from +0."""
    return a.dtype == b.dtype and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def angles(n: int, head_dim: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    theta = torch.rand(n, head_dim // 2, device=device, generator=generator) * 100
    theta[0] = 0  # a zero shift (cos 1, sin +0): where signed zeros show
    theta = torch.cat([theta, theta], dim=-1)  # RoPE's layout: both halves share the angles
    return theta.cos(), theta.sin()


def random_keys(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal keys with some +0 and -0 entries."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(*shape, device="cuda", generator=generator)
    zeros = torch.rand(*shape, device="cuda", generator=generator) < 0.05
    signs = torch.where(torch.rand(*shape, device="cuda", generator=generator) < 0.5, -1.0, 1.0)
    return torch.where(zeros, 0.0 * signs, keys).to(dtype)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the launches of the fused path."""
    calls: list[int] = []
    launch: Callable[..., torch.Tensor] = rope._rotate_fused

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return launch(*args)

    monkeypatch.setattr(rope, "_rotate_fused", counted)
    return calls


def test_cpu_keys_take_the_eager_path(fused_calls: list[int]) -> None:
    """Off CUDA the kernel is never launched, even where Triton is importable."""
    keys = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0))
    cos, sin = angles(7, 8, "cpu", seed=1)
    assert same_bits(rotate(keys, cos, sin), eager(keys, cos, sin, keys.dtype))
    wide = rotate(keys.bfloat16(), cos, sin, dtype=torch.float32)
    assert same_bits(wide, eager(keys.bfloat16(), cos, sin, torch.float32))
    assert fused_calls == []


@needs_triton
@pytest.mark.parametrize(
    ("shape", "dtype", "out_dtype"),
    [
        ((1, 8, 16_411, 128), torch.bfloat16, torch.bfloat16),  # a question cache's layer
        ((8, 3, 128), torch.bfloat16, torch.float32),  # scoring's float32 keys
        ((32, 8, 77, 128), torch.float16, torch.float16),  # every layer at once (shift_keys)
        ((2, 5, 64), torch.float32, torch.float32),
        ((3, 6, 64), torch.float32, torch.bfloat16),  # narrowing
        ((3, 6, 64), torch.float16, torch.bfloat16),
        ((4, 33, 80), torch.bfloat16, torch.bfloat16),  # a head size that is no power of two
    ],
)
def test_cuda_rotation_matches_the_eager_bits(
    shape: tuple[int, ...], dtype: torch.dtype, out_dtype: torch.dtype, fused_calls: list[int]
) -> None:
    keys = random_keys(shape, dtype, seed=sum(shape))
    cos, sin = angles(shape[-2], shape[-1], "cuda", seed=len(shape))
    assert same_bits(rotate(keys, cos, sin, out_dtype), eager(keys, cos, sin, out_dtype))
    assert fused_calls == [1]


@needs_triton
def test_cuda_rotation_of_a_slice_in_place(fused_calls: list[int]) -> None:
    """``aligned_cache`` rotates the documents' part of a cache behind its prefix."""
    cache = random_keys((1, 4, 300, 64), torch.bfloat16, seed=5)
    expected = cache.clone()
    cos, sin = angles(290, 64, "cuda", seed=6)
    expected[:, :, 10:] = eager(expected[:, :, 10:], cos, sin, torch.bfloat16)
    cache[:, :, 10:] = rotate(cache[:, :, 10:], cos, sin)
    assert same_bits(cache, expected)
    assert fused_calls == [1]


@needs_triton
def test_cuda_rotation_of_strided_keys(fused_calls: list[int]) -> None:
    """Tokens further apart than a head (a transposed layout), and a last dim not contiguous."""
    cos, sin = angles(50, 64, "cuda", seed=7)
    by_token = random_keys((50, 6, 64), torch.bfloat16, seed=8).transpose(0, 1)  # [6, 50, 64]
    assert by_token.stride(-2) != 64
    assert same_bits(rotate(by_token, cos, sin), eager(by_token, cos, sin, torch.bfloat16))
    columns = random_keys((6, 64, 50), torch.bfloat16, seed=9).transpose(-1, -2)
    assert columns.stride(-1) != 1
    assert same_bits(rotate(columns, cos, sin), eager(columns, cos, sin, torch.bfloat16))
    assert fused_calls == [1, 1]


@needs_triton
def test_cuda_inputs_the_kernel_does_not_take_stay_eager(fused_calls: list[int]) -> None:
    """Broadcast angles, float64 keys and no keys: the eager path, with its results."""
    keys = random_keys((2, 9, 64), torch.bfloat16, seed=10)
    cos, sin = angles(1, 64, "cuda", seed=11)  # [1, head_dim]: broadcast over the tokens
    assert same_bits(rotate(keys, cos, sin), eager(keys, cos, sin, torch.bfloat16))
    cos, sin = angles(9, 64, "cuda", seed=12)
    double = keys.double()
    assert torch.equal(rotate(double, cos, sin), eager(double, cos, sin, torch.float64))
    empty = keys[:, :0]
    assert rotate(empty, cos[:0], sin[:0]).shape == empty.shape
    assert fused_calls == []


@needs_triton
def test_cuda_rotation_past_int32_offsets(fused_calls: list[int]) -> None:
    """Rows whose offsets pass 2**31 elements (every layer of a long context at once)."""
    n, head_dim = 8, 64
    storage = torch.zeros(2**31 + n * head_dim, dtype=torch.bfloat16, device="cuda")
    keys = storage.as_strided((3, n, head_dim), (2**30, head_dim, 1))
    keys.copy_(random_keys((3, n, head_dim), torch.bfloat16, seed=13))
    cos, sin = angles(n, head_dim, "cuda", seed=14)
    assert same_bits(rotate(keys, cos, sin), eager(keys, cos, sin, torch.bfloat16))
    assert fused_calls == [1]
