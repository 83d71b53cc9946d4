"""Attention of tokens appended to a cache, causal from its end (``tail_attention``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache

from samkv_integrations import tail_attention as tail
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.models.shapes import random_model
from samkv_integrations.tail_attention import tail_causal_attention


def _reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention in float64, KV heads repeated, query ``i`` seeing keys ``..n-q+i``."""
    q_len, n_keys = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    key, value = (
        key.double().repeat_interleave(group, 1),
        value.double().repeat_interleave(group, 1),
    )
    seen = torch.ones(q_len, n_keys, dtype=torch.bool).tril(n_keys - q_len).to(query.device)
    logits = (query.double() @ key.transpose(-1, -2) * scale).masked_fill(~seen, -torch.inf)
    return (logits.softmax(-1) @ value).transpose(1, 2)


def _inputs(q_len: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch, heads, dim = 2, 8, 16
    shapes = [
        (batch, heads, q_len, dim),
        (batch, kv_heads, 13, dim),
        (batch, kv_heads, 13, dim),
    ]
    query, key, value = (torch.randn(s, generator=generator) for s in shapes)
    return query, key, value


@pytest.mark.parametrize(("q_len", "kv_heads"), [(1, 2), (4, 2), (13, 8), (5, 8)])
def test_each_query_sees_the_cache_and_the_queries_before_it(q_len: int, kv_heads: int) -> None:
    query, key, value = _inputs(q_len, kv_heads)
    got = tail_causal_attention(0, query, key, value, None, 0.3)
    assert got.shape == (2, q_len, 8, 16)
    torch.testing.assert_close(got, _reference(query, key, value, 0.3).float())


def test_a_mask_passed_in_is_used_as_it_is() -> None:
    query, key, value = _inputs(3, 2)
    only_first = torch.zeros(3, 13, dtype=torch.bool)
    only_first[:, 0] = True
    got = tail_causal_attention(0, query, key, value, only_first, 0.3)
    # Every query reads key 0 alone: its value, in each query head of the group.
    torch.testing.assert_close(
        got, value[:, :, :1].repeat_interleave(4, 1).transpose(1, 2).expand_as(got)
    )


def test_more_queries_than_keys_is_an_error() -> None:
    query, key, value = _inputs(14, 2)
    with pytest.raises(ValueError, match="layer 5: 14 queries over 13 keys"):
        tail_causal_attention(5, query, key, value, None, 0.3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("_attn_implementation", "eager"),
        ("sliding_window", 4),
        ("layer_types", ["full_attention", "sliding_attention"]),
    ],
)
def test_a_model_that_is_not_all_full_sdpa_attention_keeps_its_own(
    tiny_llama: LoadedModel, field: str, value: object
) -> None:
    config = tiny_llama.model.config
    with tail.tail_attention(tiny_llama.model):
        assert config._attn_implementation.startswith(tail.ATTENTION_KEY)
    assert config._attn_implementation == "sdpa"
    before = getattr(config, field, None)
    setattr(config, field, value)
    try:
        with tail.tail_attention(tiny_llama.model):
            assert not config._attn_implementation.startswith(tail.ATTENTION_KEY)
    finally:
        setattr(config, field, before)


def test_a_torch_that_cannot_say_it_has_flash_attention_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch 2.4 has no is_flash_attention_available: the masked SDPA runs, nothing raises.
    monkeypatch.delattr(torch.backends.cuda, "is_flash_attention_available")
    tail._flash_device.cache_clear()
    try:
        assert tail._flash_device(0) is False
    finally:
        tail._flash_device.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs a CUDA device")
@pytest.mark.parametrize(("q_len", "head_dim"), [(1, 16), (7, 16), (64, 128), (101, 128)])
def test_flash_attention_is_causal_from_the_end_on_cuda(
    q_len: int, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(0)
    # As a layer forms them: queries [batch, q, heads, dim] seen transposed, 32 heads over 8.
    query = torch.randn(2, q_len, 32, head_dim, generator=generator).transpose(1, 2)
    key, value = (torch.randn(2, 8, 300, head_dim, generator=generator) for _ in range(2))
    query, key, value = (t.to("cuda", torch.bfloat16) for t in (query, key, value))
    ran: list[bool] = []
    flash_runs = tail._flash_runs
    monkeypatch.setattr(tail, "_flash_runs", lambda *a: ran.append(flash_runs(*a)) or ran[-1])
    got = tail_causal_attention(0, query, key, value, None, head_dim**-0.5)
    assert ran == [True]
    torch.testing.assert_close(
        got.float(), _reference(query, key, value, head_dim**-0.5).float(), atol=2e-2, rtol=2e-2
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs a CUDA device")
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_a_question_over_a_cache_runs_as_under_the_models_own_mask_on_cuda(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[bool] = []
    flash_runs = tail._flash_runs
    monkeypatch.setattr(tail, "_flash_runs", lambda *a: ran.append(flash_runs(*a)) or ran[-1])
    loaded = random_model(shape, device="cuda", dtype=torch.bfloat16, seed=0)
    decoder = loaded.model.get_decoder()
    context = torch.randint(0, 100, (1, 300), device="cuda")
    question = torch.randint(0, 100, (1, 20), device="cuda")

    def question_states(scope: contextlib.AbstractContextManager[None]) -> torch.Tensor:
        cache = DynamicCache()
        decoder(input_ids=context, **with_cache(decoder, cache), use_cache=True)
        with scope:
            out = decoder(input_ids=question, **with_cache(decoder, cache), use_cache=True)
        return out.last_hidden_state.float()

    with torch.inference_mode():
        own = question_states(contextlib.nullcontext())
        tail_run = question_states(tail.tail_attention(loaded.model))
    assert ran and all(ran)  # FlashAttention ran at every layer
    torch.testing.assert_close(tail_run, own, atol=5e-2, rtol=5e-2)
