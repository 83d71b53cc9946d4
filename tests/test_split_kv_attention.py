"""Split-KV decode attention (``split_kv_attention``) against float64 softmax attention.

The kernels need Triton and CUDA; on a CPU machine only the fallback's contract is checked.
"""

from __future__ import annotations

import copy

import pytest
import torch

from samkv_integrations import split_kv_attention as split_kv
from samkv_integrations.decode import Decoder
from samkv_integrations.grouped_decode import grouped_decode_attention
from samkv_integrations.models.shapes import random_model
from samkv_integrations.static_decode import StaticDecoder

needs_triton = pytest.mark.skipif(not split_kv.available(), reason="needs Triton and CUDA")


def _reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``[batch, kv_heads, group, dim]`` softmax attention in float64."""
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()[:, None, None, :]
    return scores.softmax(-1) @ value.double()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def test_cpu_tensors_are_not_taken() -> None:
    query = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    key = torch.randn(1, 2, 100, 64, dtype=torch.bfloat16)
    assert not split_kv.supports(query, key, key)


@needs_triton
def test_only_the_sizes_and_dtypes_the_kernels_handle_are_taken() -> None:
    def tensor(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.zeros(*shape, device="cuda", dtype=dtype)

    query, key = tensor(1, 2, 4, 64), tensor(1, 2, 100, 64)
    assert split_kv.supports(query, key, key)
    assert not split_kv.supports(query, key, tensor(1, 2, 100, 64, dtype=torch.float16))
    assert not split_kv.supports(query, key, tensor(1, 2, 99, 64))  # values unlike keys
    assert not split_kv.supports(query, key.cpu(), key)
    assert not split_kv.supports(tensor(1, 2, 17, 64), key, key)  # group above 16
    assert not split_kv.supports(tensor(1, 2, 4, 256), tensor(1, 2, 9, 256), tensor(1, 2, 9, 256))
    assert not split_kv.supports(tensor(1, 2, 4, 96), tensor(1, 2, 9, 96), tensor(1, 2, 9, 96))


@needs_triton
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "slots", "dim"),
    [
        (1, 8, 4, 2600, 128),  # Llama-3.1-8B, batch 1, a compact cache
        (1, 8, 4, 1, 128),  # one slot
        (1, 8, 4, 64, 128),  # exactly one block
        (3, 2, 7, 1000, 64),  # a group that is not a power of two, several rows
        (2, 1, 16, 300, 64),  # the largest group taken
        (16, 8, 4, 2731, 128),  # a batched step
        (1, 2, 1, 20000, 64),  # a long cache, one query per KV head
        (1, 1, 4, 5000, 64),  # 79 splits: the merge reads them in three blocks
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_float64_attention_with_hidden_slots(
    batch: int, kv_heads: int, group: int, slots: int, dim: int, dtype: torch.dtype
) -> None:
    generator = torch.Generator(device="cuda").manual_seed(slots + group)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=generator).to(dtype)

    query = draw(batch, kv_heads, group, dim) * 2
    key, value = draw(batch, kv_heads, slots, dim), draw(batch, kv_heads, slots, dim)
    # Rows hide scattered slots and a tail, as the static and stacked caches do.
    hidden = torch.rand(batch, slots, device="cuda", generator=generator) < 0.3
    hidden[:, slots - slots // 4 :] = True
    hidden[:, 0] = False
    mask = torch.zeros(batch, slots, device="cuda", dtype=dtype)
    mask = mask.masked_fill(hidden, torch.finfo(dtype).min)
    scale = dim**-0.5
    for rows in (mask, None):
        got = split_kv.split_kv_attention(query, key, value, rows, scale)
        assert got.shape == query.shape and got.dtype == dtype
        assert torch.isfinite(got).all()
        assert _relative_error(got, _reference(query, key, value, rows, scale)) < 1e-2


def _compiled_variants() -> list[int]:
    """How many specializations Triton holds compiled of each kernel (``partial``, ``merge``)."""
    kernels = (split_kv.split_kv_kernels.partial, split_kv.split_kv_kernels.merge)
    caches = [getattr(kernel, "device_caches", None) for kernel in kernels]
    if any(cache is None for cache in caches):
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    return [sum(len(entry[0]) for entry in cache.values()) for cache in caches]  # type: ignore[union-attr]


@needs_triton
def test_new_batch_sizes_and_cache_lengths_compile_nothing() -> None:
    """A compile stalls the step that meets it: a serving batch changes size and length often."""
    generator = torch.Generator(device="cuda").manual_seed(4)

    def attend(batch: int, slots: int) -> None:
        query = torch.randn(batch, 8, 4, 128, device="cuda", generator=generator).bfloat16()
        key = torch.randn(batch, 8, slots, 128, device="cuda", generator=generator).bfloat16()
        mask = torch.zeros(batch, slots, device="cuda", dtype=torch.bfloat16)
        split_kv.split_kv_attention(query, key, key, mask, 128**-0.5)

    attend(1, 2600)
    compiled = _compiled_variants()
    # Batch sizes give 32, 8, 2 and 1 splits; lengths odd, even and divisible by 16.
    for batch, slots in [(1, 2704), (4, 2701), (16, 2731), (32, 2048), (3, 1)]:
        attend(batch, slots)
    assert _compiled_variants() == compiled


@needs_triton
def test_keys_with_strides_of_a_preallocated_buffer() -> None:
    """The static cache hands attention views of larger buffers; any head/slot stride works."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    buffer = torch.randn(1, 8, 3000, 128, device="cuda", generator=generator).bfloat16()
    key, value = buffer[:, :, :2500], buffer.flip(2)[:, :, :2500]
    query = torch.randn(1, 8, 4, 128, device="cuda", generator=generator).bfloat16()
    got = split_kv.split_kv_attention(query, key, value, None, 0.1)
    assert _relative_error(got, _reference(query, key, value, None, 0.1)) < 1e-2


@needs_triton
def test_grouped_decode_attention_takes_the_split_path_and_agrees_with_sdpa() -> None:
    generator = torch.Generator(device="cuda").manual_seed(2)
    query = torch.randn(2, 32, 1, 128, device="cuda", generator=generator).bfloat16()
    key = torch.randn(2, 8, 777, 128, device="cuda", generator=generator).bfloat16()
    value = torch.randn(2, 8, 777, 128, device="cuda", generator=generator).bfloat16()
    mask = torch.zeros(2, 1, 1, 777, device="cuda", dtype=torch.bfloat16)
    mask[1, ..., 500:] = torch.finfo(torch.bfloat16).min
    grouped = query.reshape(2, 8, 4, 128)
    # A mask per row, and one row's mask broadcast over both rows.
    for rows in (mask, mask[1:]):
        got = grouped_decode_attention(0, query, key, value, rows, 128**-0.5)
        want = _reference(grouped, key, value, rows[:, 0, 0].expand(2, 777), 128**-0.5)
        assert got.shape == (2, 1, 32, 128)
        assert _relative_error(got, want.reshape(2, 1, 32, 128)) < 1e-2


@needs_triton
@pytest.mark.parametrize("compiled", [False, True])
def test_static_graph_decoding_follows_the_plain_decoder_on_cuda(compiled: bool) -> None:
    """A bf16 tiny Llama on CUDA: the graph-replayed steps (split-KV attention inside),
    compiled by inductor or not, give the plain decoder's logits within bf16 tolerance, step
    after step on the same tokens."""
    model = random_model("tiny-llama", device="cuda", dtype=torch.bfloat16, seed=3).model
    with torch.inference_mode():
        ids = torch.randint(3, 200, (1, 300), device="cuda")
        cache = model(input_ids=ids, use_cache=True).past_key_values
        plain_cache, static_cache = copy.deepcopy(cache), copy.deepcopy(cache)
        plain, static = Decoder(), StaticDecoder(8, graphs=True, compiled=compiled)
        for step, token in enumerate((11, 42, 7, 99, 5, 17, 3, 64)):
            want = plain.step(model, plain_cache, token, 300 + step).float()
            got = static.step(model, static_cache, token, 300 + step).float()
            assert (got - want).norm() / want.norm() < 2e-2, step


@needs_triton
def test_a_compiled_cuda_step_is_one_graph(compiled_graphs: list[torch.fx.GraphModule]) -> None:
    """On CUDA the step reaches the split-KV kernels; dynamo still traces it whole."""
    model = random_model("tiny-llama", device="cuda", dtype=torch.bfloat16, seed=5).model
    with torch.inference_mode():
        cache = model(input_ids=torch.randint(3, 200, (1, 100), device="cuda")).past_key_values
        decoder = StaticDecoder(4, compiled=True)
        for step in range(4):
            decoder.step(model, cache, 7 + step, 100 + step)
    assert len(compiled_graphs) == 1
