"""The decode-step attention that does not repeat KV heads (``grouped_decode``)."""

from __future__ import annotations

import copy

import pytest
import torch

from samkv_integrations import grouped_decode
from samkv_integrations.decode import Decoder
from samkv_integrations.grouped_decode import grouped_decode_attention, grouped_decode_scope
from samkv_integrations.models import LoadedModel
from samkv_integrations.static_decode import StaticDecoder


def _reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain softmax attention with every KV head repeated: ``[batch, q_len, heads, dim]``."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    weights = (query @ key.transpose(-1, -2) * scale + mask).softmax(-1)
    return (weights @ value).transpose(1, 2)


@pytest.mark.parametrize(("q_len", "kv_heads"), [(1, 2), (3, 2), (1, 8)])
def test_grouped_heads_attend_as_repeated_heads(q_len: int, kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, heads, slots, dim = 3, 8, 11, 16
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    value = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    # Each row hides other slots, as the stacked cache's rows do.
    hidden = torch.rand(batch, 1, 1, slots, generator=generator) < 0.4
    hidden[..., 0] = False
    mask = torch.zeros(batch, 1, q_len, slots).masked_fill(hidden, torch.finfo(torch.float32).min)
    got = grouped_decode_attention(0, query, key, value, mask, 0.25)
    assert got.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(got, _reference(query, key, value, mask, 0.25))


def test_a_static_step_runs_the_grouped_attention_and_restores_the_models(
    talkative_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = talkative_llama.model
    assert model.config._attn_implementation == "sdpa"
    calls: list[int] = []

    def spy(layer: int, *args: object) -> torch.Tensor:
        calls.append(layer)
        return grouped_decode_attention(layer, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(grouped_decode, "grouped_decode_attention", spy)
    with torch.inference_mode():
        ids = torch.tensor([[5, 9, 13, 2, 7]])
        cache = model(input_ids=ids, use_cache=True).past_key_values
        plain = Decoder().step(model, copy.deepcopy(cache), 11, 5)
        static = StaticDecoder(2).step(model, copy.deepcopy(cache), 11, 5)
    assert calls == list(range(model.config.num_hidden_layers))
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(static, plain, rtol=0, atol=1e-5)


def test_an_eager_model_keeps_its_own_attention(talkative_llama: LoadedModel) -> None:
    model = copy.deepcopy(talkative_llama.model)
    model.config._attn_implementation = "eager"
    with grouped_decode_scope(model):
        assert model.config._attn_implementation == "eager"
