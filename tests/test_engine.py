"""Engine behaviour users rely on: store reuse, streaming, stopping, and clear errors on bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from samkv_integrations import (
    CacheCorruptedError,
    CacheMismatchError,
    CacheMissError,
    CacheRef,
    KVCacheStore,
    SamKVEngine,
)
from samkv_integrations.methods import DecodeState
from samkv_integrations.models import LoadedModel

DOCS = ["Alpha is the first letter.", "Omega is the last letter of the Greek alphabet."]


def test_second_index_call_hits_the_store(tiny_engine: SamKVEngine) -> None:
    first = tiny_engine.index(DOCS, progress=False)
    written = tiny_engine.store.stats().bytes_written
    second = tiny_engine.index(DOCS, progress=False)
    assert [r.key for r in first] == [r.key for r in second]
    assert tiny_engine.store.stats().bytes_written == written


def test_document_ids_do_not_depend_on_position(tiny_engine: SamKVEngine) -> None:
    refs_a = tiny_engine.index(DOCS, progress=False)
    refs_b = tiny_engine.index(list(reversed(DOCS)), progress=False)
    assert refs_a[0].key == refs_b[1].key


def test_stream_deltas_join_to_the_answer(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    stream = tiny_engine.stream("Which letter is last?", refs, method="reuse", max_new_tokens=16)
    deltas = list(stream)
    answer = tiny_engine.answer("Which letter is last?", refs, method="reuse", max_new_tokens=16)
    assert "".join(deltas) == answer.text == stream.text
    assert len(deltas) > 1


def test_stop_string_cuts_the_answer(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    free = tiny_engine.answer("Which?", refs, method="full", max_new_tokens=16).text
    assert len(free) > 3
    stop = free[2:4]
    cut = tiny_engine.answer("Which?", refs, method="full", max_new_tokens=16, stop=[stop])
    assert cut.text == free[: free.index(stop)]


def test_sampling_is_reproducible_with_a_seed(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    kwargs = dict(method="reuse", max_new_tokens=12, temperature=1.5, seed=3)
    first = tiny_engine.answer("Which?", refs, **kwargs)
    again = tiny_engine.answer("Which?", refs, **kwargs)
    greedy = tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=12)
    assert first.token_ids == again.token_ids
    assert first.token_ids != greedy.token_ids


def test_max_new_tokens_bounds_generation(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    assert len(tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=3).token_ids) <= 3


def test_stats_describe_the_context(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    stats = tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=2).stats
    assert stats.context_tokens == sum(r.n_tokens for r in refs)
    assert stats.kept_tokens == [r.n_tokens for r in refs]
    assert stats.kept_fraction == 1.0
    assert set(stats.seconds) >= {"load", "question"}
    assert stats.ttft_s == pytest.approx(sum(stats.seconds.values()))


def test_missing_cache_is_recomputed_from_text_and_reported(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    expected = tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=4)
    tiny_engine.store.delete(refs[0].key)
    answer = tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=4)
    assert answer.stats.recomputed_documents == 1
    assert answer.token_ids == expected.token_ids
    assert tiny_engine.store.contains(refs[0].key)


def test_missing_cache_without_text_names_the_key(tiny_engine: SamKVEngine) -> None:
    ref = tiny_engine.index(DOCS[:1], progress=False)[0]
    tiny_engine.store.delete(ref.key)
    bare = CacheRef(key=ref.key, n_tokens=ref.n_tokens, model=ref.model)
    with pytest.raises(CacheMissError, match=ref.key):
        tiny_engine.answer("Which?", [bare], method="reuse", max_new_tokens=2)


def test_refs_from_another_store_are_a_named_miss(tiny_model: LoadedModel, tmp_path) -> None:
    engine_a = SamKVEngine(tiny_model, KVCacheStore(tmp_path / "a"))
    engine_b = SamKVEngine(tiny_model, KVCacheStore(tmp_path / "b"))
    ref = engine_a.index(DOCS[:1], progress=False)[0]
    bare = CacheRef(key=ref.key, n_tokens=ref.n_tokens, model=ref.model)
    with pytest.raises(CacheMissError, match=str(tmp_path / "b")):
        engine_b.answer("Which?", [bare], method="reuse", max_new_tokens=2)


def test_corrupted_cache_file_is_detected(tiny_model: LoadedModel, tmp_path) -> None:
    engine = SamKVEngine(tiny_model, KVCacheStore(tmp_path))
    ref = engine.index(DOCS[:1], progress=False)[0]
    (tensors,) = tmp_path.rglob(f"{ref.key}.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    bare = CacheRef(key=ref.key, n_tokens=ref.n_tokens, model=ref.model)
    with pytest.raises(CacheCorruptedError, match=ref.key):
        engine.answer("Which?", [bare], method="reuse", max_new_tokens=2)
    answer = engine.answer("Which?", [ref], method="reuse", max_new_tokens=2)
    assert answer.stats.recomputed_documents == 1


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_document_is_rejected_by_index(tiny_engine: SamKVEngine, text: str) -> None:
    with pytest.raises(ValueError, match=r"document 1.*empty"):
        tiny_engine.index(["fine", text], progress=False)


def test_document_longer_than_the_context_is_rejected(tiny_engine: SamKVEngine) -> None:
    too_long = "x" * (tiny_engine.model.max_context + 10)
    with pytest.raises(ValueError, match=r"document 0 is .* tokens"):
        tiny_engine.index([too_long], progress=False)


def test_prompt_beyond_the_context_is_rejected(tiny_engine: SamKVEngine) -> None:
    half = "y" * (tiny_engine.model.max_context // 2)
    refs = tiny_engine.index([half, half], progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=8)


def test_unknown_method_is_rejected(tiny_engine: SamKVEngine) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'magic'.*full"):
        tiny_engine.answer("Which?", [], method="magic")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_generation_options_name_the_field(
    tiny_engine: SamKVEngine, kwargs: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_engine.answer("Which?", [], method="full", **kwargs)


def test_empty_question_is_rejected(tiny_engine: SamKVEngine) -> None:
    with pytest.raises(ValueError, match="question is empty"):
        tiny_engine.answer("  ", [], method="full")


def test_store_path_that_cannot_be_created(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="file"):
        KVCacheStore(blocker / "store")


def test_plain_prompt_generation_streams_like_it_answers(tiny_engine: SamKVEngine) -> None:
    ids = tiny_engine.chat_ids([{"role": "user", "content": "Say something."}])
    streamed = "".join(tiny_engine.stream_prompt(ids, max_new_tokens=8))
    whole = tiny_engine.stream_prompt(ids, max_new_tokens=8)
    for _ in whole:
        pass
    assert streamed == whole.text
    assert whole.answer.first_token_logprobs is not None
    assert torch.isclose(
        whole.answer.first_token_logprobs.exp().sum(), torch.tensor(1.0), atol=1e-4
    )


def test_another_prompt_prefix_never_reuses_caches(
    tiny_model: LoadedModel, memory_store: KVCacheStore
) -> None:
    default = SamKVEngine(tiny_model, memory_store)
    other = SamKVEngine(tiny_model, memory_store, system_prompt="Answer in French.")
    assert default.fingerprint != other.fingerprint
    ref = default.index(DOCS[:1], progress=False)[0]
    assert other.index(DOCS[:1], progress=False)[0].key != ref.key
    with pytest.raises(CacheMismatchError, match="prompt prefix"):
        other.answer("Which?", [ref], method="reuse", max_new_tokens=2)


def test_random_model_names_load_without_files() -> None:
    from samkv_integrations import load_model

    model = load_model("random:tiny-qwen2", device="cpu")
    assert model.name == "random:tiny-qwen2"
    assert type(model.model).__name__ == "Qwen2ForCausalLM"


def test_answering_builds_no_autograd_graph(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    answer = tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=2)
    assert answer.first_token_logprobs is not None
    assert not answer.first_token_logprobs.requires_grad


def test_a_stream_can_be_advanced_from_a_new_thread_each_step(tiny_engine: SamKVEngine) -> None:
    """Web servers iterate sync generators from a thread pool, a different thread each time."""
    refs = tiny_engine.index(DOCS, progress=False)
    expected = tiny_engine.answer("Which?", refs, method="reuse", max_new_tokens=6).text
    stream = iter(tiny_engine.stream("Which?", refs, method="reuse", max_new_tokens=6))
    pieces: list[str] = []
    done = False
    while not done:
        worker = threading.Thread(target=lambda: pieces.append(next(stream, "")))
        worker.start()
        worker.join()
        done = pieces[-1] == ""
    assert "".join(pieces) == expected
    assert not torch.is_inference_mode_enabled()
    acquired = tiny_engine._lock.lock.acquire(timeout=1)
    assert acquired
    tiny_engine._lock.lock.release()


def test_observe_sees_the_state_decoding_starts_from(tiny_engine: SamKVEngine) -> None:
    refs = tiny_engine.index(DOCS, progress=False)
    seen: list[DecodeState] = []
    answer = tiny_engine.answer(
        "Which?", refs, method="reuse", max_new_tokens=1, observe=seen.append
    )
    (state,) = seen  # called once, before decoding
    question = tiny_engine.framer.question_ids("Which?")
    context = sum(ref.n_tokens for ref in refs)
    length = tiny_engine.prefix.length + context + len(question)
    assert state.cache.get_seq_length() == len(state.positions) == length
    assert state.next_position == length
    assert state.question_ids == question
    assert answer.first_token_logprobs is not None
    assert torch.equal(answer.first_token_logprobs, torch.log_softmax(state.first_logits, -1))
    assert answer.kept_indices == [k.tolist() for k in state.kept_indices]


def test_token_id_refs_answer_as_text_refs_and_full_reads_no_cache(
    tiny_engine: SamKVEngine,
) -> None:
    text_refs = tiny_engine.index(DOCS, progress=False)
    id_refs = tiny_engine.index_token_ids(
        [tiny_engine.document_ids(text) for text in DOCS], progress=False
    )
    assert [r.key for r in id_refs] == [r.key for r in text_refs]
    assert all(r.text is None for r in id_refs)
    for method in ("full", "reuse"):
        by_text = tiny_engine.answer("Which?", text_refs, method=method, max_new_tokens=4)
        by_ids = tiny_engine.answer("Which?", id_refs, method=method, max_new_tokens=4)
        assert by_ids.token_ids == by_text.token_ids
    hits = tiny_engine.store.stats().hits
    tiny_engine.answer("Which?", id_refs, method="full", max_new_tokens=2)
    assert tiny_engine.store.stats().hits == hits  # full prefills the remembered ids
