"""The invariants DESIGN.md promises, each checked against an independent reference."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from samkv_integrations import CacheMismatchError, KVCacheStore, SamKVEngine
from samkv_integrations.decode import eos_token_ids
from samkv_integrations.encode import encode_documents
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.models.shapes import random_model
from samkv_integrations.rope import shift_keys

DOCS = [
    "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair.",
    "Mount Fuji is the highest mountain in Japan, at 3,776 metres.",
    "The Amazon river flows through Brazil, Peru and Colombia into the Atlantic.",
]


def _prefill_keys(model: LoadedModel, ids: list[int], start: int) -> list[torch.Tensor]:
    """Per-layer keys of ``ids`` prefilled at positions ``start ..`` (a reference computation)."""
    cache = DynamicCache(config=model.model.config)
    positions = torch.arange(start, start + len(ids))[None]
    with torch.inference_mode():
        model.model(
            input_ids=torch.tensor([ids]), position_ids=positions, **with_cache(model.model, cache)
        )
    return [layer.keys[0] for layer in cache.layers]


def test_full_equals_plain_generate(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    question = "Where is the Eiffel Tower?"
    answer = tiny_engine.answer(question, refs, method="full", max_new_tokens=12)

    ids = tiny_engine.framer.prefix_ids()
    for text in DOCS:
        ids += tiny_engine.framer.document_ids(text)
    ids += tiny_engine.framer.question_ids(question)
    model = tiny_engine.model.model
    eos = eos_token_ids(model, tiny_engine.model.tokenizer)
    generated = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=tiny_engine.model.tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    expected = generated[: next((i for i, t in enumerate(generated) if t in eos), len(generated))]
    assert answer.token_ids == expected
    assert len(expected) > 0


def test_plain_prompt_equals_plain_generate(talkative_llama: LoadedModel) -> None:
    # The plain decoder (``decode.Decoder``) that every method gets by default, on a model
    # that never picks EOS, so that all twelve decode steps run.
    engine = SamKVEngine(talkative_llama, KVCacheStore("memory://plain-prompt"))
    ids = engine.chat_ids([{"role": "user", "content": "Where is the Eiffel Tower?"}])
    stream = engine.stream_prompt(ids, max_new_tokens=12)
    text = "".join(stream)
    model = talkative_llama.model
    expected = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=talkative_llama.tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    assert stream.answer.token_ids == expected and len(expected) == 12
    assert text == talkative_llama.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-llama3-rope"])
@pytest.mark.parametrize("delta", [1, 37, 1500])
def test_realigned_keys_equal_keys_computed_at_offset(shape: str, delta: int) -> None:
    model = random_model(shape, device="cpu", seed=1)
    ids = list(range(10, 40))
    at_start = _prefill_keys(model, ids, start=0)
    at_offset = _prefill_keys(model, ids, start=delta)
    for layer in (0,):  # Only layer 0's keys are position-independent before RoPE.
        moved = shift_keys(model.model, at_start[layer], delta)
        torch.testing.assert_close(moved, at_offset[layer], atol=2e-5, rtol=1e-4)
        assert not torch.allclose(at_start[layer], at_offset[layer], atol=1e-3)


def test_shift_keys_round_trip_and_per_token_deltas(tiny_llama: LoadedModel) -> None:
    keys = torch.randn(2, 6, 16)
    deltas = torch.tensor([0, 3, 7, 100, 5000, 1])
    moved = shift_keys(tiny_llama.model, keys, deltas)
    back = shift_keys(tiny_llama.model, moved, -deltas)
    torch.testing.assert_close(back, keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moved[:, 0], keys[:, 0])


def test_reuse_of_one_document_equals_full(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS[:1], progress=False)
    full = tiny_engine.answer("What was finished in 1889?", refs, method="full", max_new_tokens=10)
    reuse = tiny_engine.answer(
        "What was finished in 1889?", refs, method="reuse", max_new_tokens=10
    )
    assert reuse.token_ids == full.token_ids
    torch.testing.assert_close(
        reuse.first_token_logprobs, full.first_token_logprobs, atol=1e-4, rtol=1e-4
    )
    assert reuse.stats.recomputed_tokens == 0
    assert full.stats.recomputed_fraction == 1.0


def test_reuse_of_several_documents_differs_from_full(tiny_engine: SamKVEngine) -> None:
    """Without cross-document attention, reuse must not coincide with full: the floor is real."""
    refs = tiny_engine.index(DOCS, progress=False)
    full = tiny_engine.answer("Which river?", refs, method="full", max_new_tokens=1)
    reuse = tiny_engine.answer("Which river?", refs, method="reuse", max_new_tokens=1)
    assert not torch.allclose(full.first_token_logprobs, reuse.first_token_logprobs, atol=1e-4)


def test_batched_encoding_equals_one_at_a_time(tiny_engine: SamKVEngine) -> None:
    model, prefix = tiny_engine.model.model, tiny_engine.prefix
    ids = [tiny_engine.framer.document_ids(text) for text in DOCS]
    batched = encode_documents(model, prefix, ids, "fp", progress=False)
    for doc_ids, doc in zip(ids, batched, strict=True):
        (alone,) = encode_documents(model, prefix, [doc_ids], "fp", progress=False)
        torch.testing.assert_close(doc.keys, alone.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(doc.values, alone.values, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(doc.query_means, alone.query_means, atol=1e-5, rtol=1e-4)


def test_cache_from_another_model_is_an_error_or_a_reported_recompute(
    tiny_llama: LoadedModel, memory_store
) -> None:
    writer = SamKVEngine(tiny_llama, memory_store)
    refs = writer.index(DOCS[:2], progress=False)
    other = SamKVEngine(random_model("tiny-llama", device="cpu", seed=7), memory_store)
    assert other.fingerprint != writer.fingerprint
    with pytest.raises(CacheMismatchError, match="written by model"):
        other.answer("Where?", refs, method="reuse", max_new_tokens=2)
    answer = other.answer(
        "Where?", refs, method="reuse", max_new_tokens=2, on_foreign_cache="recompute"
    )
    assert answer.stats.recomputed_documents == 2
