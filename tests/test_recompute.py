"""The shared recompute path, against plain forward passes of the model."""

from __future__ import annotations

import pytest
import torch

from samkv_integrations.encode import encode_documents, encode_prefix
from samkv_integrations.methods import FullMethod, MethodInput
from samkv_integrations.methods.aligned import DeferredLayer, aligned_cache, gather_aligned
from samkv_integrations.methods.recompute import (
    RecomputeCache,
    assemble_cache,
    check_model,
    embed,
    recompute,
    recompute_behind_prefix,
    split_by_document,
)
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.models.shapes import random_model


def _inputs(model: LoadedModel) -> MethodInput:
    prefix = encode_prefix(model.model, list(range(30, 42)))
    docs = encode_documents(
        model.model, prefix, [list(range(50, 90)), list(range(100, 125))], "test", progress=False
    )
    return MethodInput(model.model, prefix, docs, list(range(140, 150)))


def test_scatter_overwrites_or_blends_then_appends_again() -> None:
    keys = [torch.zeros(1, 2, 5, 4)]
    cache = RecomputeCache(keys, [torch.zeros(1, 2, 5, 4)])
    index = torch.tensor([1, 3])
    with cache.scatter(index, theta=0.25):
        k, _ = cache.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), 0)
    assert k.shape == (1, 2, 5, 4)
    assert k[0, 0, :, 0].tolist() == [0.0, 0.25, 0.0, 0.25, 0.0]
    with cache.scatter(index):
        cache.update(torch.full((1, 2, 2, 4), 2.0), torch.full((1, 2, 2, 4), 2.0), 0)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0.0, 2.0, 0.0, 2.0, 0.0]
    with pytest.raises(RuntimeError), cache.scatter(index):
        raise RuntimeError("boom")
    k, _ = cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)
    assert k.shape == (1, 2, 6, 4)
    assert cache.get_seq_length() == 6


def test_blend_appended_blends_the_last_entries_once() -> None:
    empty = torch.zeros(1, 2, 0, 4)
    cache = RecomputeCache([empty], [empty])
    reused = (torch.full((1, 2, 2, 4), 4.0), torch.full((1, 2, 2, 4), 8.0))
    with cache.blend_appended(reused, theta=torch.tensor([0.25, 1.0])):
        k, v = cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    assert k[0, 0, :, 0].tolist() == [0.0, 3.0, 0.0]
    assert v[0, 1, :, 3].tolist() == [0.0, 6.0, 0.0]
    k, _ = cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)
    assert k[0, 0, :, 0].tolist() == [0.0, 3.0, 0.0, 1.0]


def test_split_by_document() -> None:
    parts = split_by_document(torch.tensor([0, 2, 5, 6, 9]), [3, 4, 0, 3])
    assert [p.tolist() for p in parts] == [[0, 2], [2, 3], [], [2]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_recomputing_every_context_token_equals_full(attention: str) -> None:
    model = random_model("tiny-qwen2", device="cpu", seed=3)
    model.model.config._attn_implementation = attention
    inputs = _inputs(model)
    full = FullMethod()(inputs)
    segments = [(inputs.aligned_keys(i), d.values) for i, d in enumerate(inputs.documents)]
    cache = assemble_cache(inputs.prefix, segments)
    positions = torch.arange(inputs.context_end)
    ids = torch.tensor([t for d in inputs.documents for t in d.token_ids])
    context = torch.arange(inputs.prefix.length, inputs.context_end)
    with torch.inference_mode():
        hidden = recompute(
            model.model, cache, positions, embed(model.model, ids), context, stop_layer=2
        )
        recompute(model.model, cache, positions, hidden, context, start_layer=2)
    for got, want in zip(cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)


def test_recompute_behind_prefix_keeps_gapped_positions(tiny_llama: LoadedModel) -> None:
    # Reference: the same tokens at the same gapped positions, prefilled behind the cached
    # prefix. Read as packed sequences, the gaps would restart attention and differ.
    model = tiny_llama.model
    prefix = encode_prefix(model, list(range(30, 40)))
    ids, positions = torch.tensor([50, 51, 52, 60, 61]), torch.tensor([10, 11, 12, 20, 21])
    reference = prefix.cache(model)
    with torch.inference_mode():
        model(input_ids=ids[None], position_ids=positions[None], **with_cache(model, reference))
        plain, no_logits = recompute_behind_prefix(model, prefix, ids, positions)
        reused = (torch.zeros(4, 2, 5, 16), torch.zeros(4, 2, 5, 16))
        theta = torch.full((5,), 0.999999)
        blended, _ = recompute_behind_prefix(model, prefix, ids, positions, reused, theta)
    assert no_logits is None
    for want, got, blend in zip(reference.layers, plain.layers, blended.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(blend.keys, got.keys, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="reused"):
        recompute_behind_prefix(model, prefix, ids, positions, theta=theta)
    with pytest.raises(ValueError, match="theta"):
        recompute_behind_prefix(model, prefix, ids, positions, reused)


@pytest.mark.parametrize("n_kept", [5, 0])
def test_question_in_the_recompute_forward_equals_a_later_prefill(
    tiny_llama: LoadedModel, n_kept: int
) -> None:
    # The question run after the recomputed (and blended) tokens in one forward must give
    # the cache and logits of recomputing first and prefilling the question over the result;
    # with a blend, a slice off by the question's length would blend the question instead.
    model = tiny_llama.model
    prefix = encode_prefix(model, list(range(30, 40)))
    ids = torch.tensor([50, 51, 52, 60, 61])[:n_kept]
    positions = torch.tensor([10, 11, 12, 20, 21])[:n_kept]
    generator = torch.Generator().manual_seed(0)
    reused = (
        torch.randn(4, 2, n_kept, 16, generator=generator),
        torch.randn(4, 2, n_kept, 16, generator=generator),
    )
    theta = torch.tensor([1.0, 0.5, 0.9, 0.7, 1.0])[:n_kept]
    question = [70, 71, 72]
    with torch.inference_mode():
        cache, none = recompute_behind_prefix(model, prefix, ids, positions, reused, theta)
        later = model(
            input_ids=torch.tensor([question]),
            position_ids=torch.arange(30, 33)[None],
            **with_cache(model, cache),
            logits_to_keep=1,
        ).logits[0, -1]
        fused, logits = recompute_behind_prefix(
            model, prefix, ids, positions, reused, theta, question_ids=question, question_start=30
        )
    assert none is None and logits is not None
    torch.testing.assert_close(logits, later, atol=1e-5, rtol=1e-5)
    assert fused.get_seq_length() == 10 + n_kept + 3
    for got, want in zip(fused.layers, cache.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)


def test_check_model_refuses_attention_without_4d_masks() -> None:
    model = random_model("tiny-llama", device="cpu", seed=0)
    model.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        check_model(model.model)


@pytest.mark.parametrize("chosen", ["all", "some"])
def test_aligned_cache_is_the_assembled_gather_for_its_layers(chosen: str) -> None:
    model = random_model("tiny-llama", device="cpu", seed=5)
    inputs = _inputs(model)
    docs, starts = inputs.documents, inputs.doc_starts
    local = None if chosen == "all" else [torch.tensor([0, 3, 7]), torch.tensor([2, 24])]
    indices = local or [torch.arange(d.n_tokens) for d in docs]
    expected = assemble_cache(inputs.prefix, [gather_aligned(model.model, docs, starts, indices)])
    n_layers = len(inputs.prefix.keys) - 1  # a pass that stops early builds fewer
    cache = aligned_cache(model.model, inputs.prefix, docs, starts, local, n_layers)
    assert len(cache.layers) == n_layers
    assert cache.get_seq_length() == expected.get_seq_length()  # the mask is sized by layer 0
    deferred = cache.layers[1:]
    assert all(isinstance(layer, DeferredLayer) and not layer.is_initialized for layer in deferred)
    for layer, want in zip(cache.layers, expected.layers, strict=False):
        if isinstance(layer, DeferredLayer):
            layer.materialize()
        torch.testing.assert_close(layer.keys, want.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.values, want.values, atol=0, rtol=0)
