"""The static decode path answers token for token as the eager ``DynamicCache`` path.

CUDA graphs cannot run here; the graph path captures the very ``_forward`` the eager static
path runs, so these tests hold it to the eager ``Decoder`` on CPU, on caches whose
positions have gaps (samkv, sagekv), with EOS, stop strings and a full static capacity.
"""

from __future__ import annotations

import copy
import threading
import uuid
from dataclasses import dataclass

import pytest
import torch
from methods.contract import DOCUMENTS, QUESTION
from methods.test_decoder_step import RecordingDecoderMethod
from transformers import DynamicCache

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.decode import Decoder, GenerationOptions, generate_deltas
from samkv_integrations.encode import layer_tensors
from samkv_integrations.methods import DecodeState, get_method
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.models.shapes import random_model
from samkv_integrations.records import CacheRef
from samkv_integrations.static_decode import (
    CAPACITY_STEP,
    StaticDecoder,
    decode_graphs_for,
    static_unsupported,
    with_graphs,
)

#: Methods whose decode caches differ in kind: every token, compacted with gaps at build
#: time (samkv), and evicted after the question (sagekv, gaps as well).
METHODS = ("full", "reuse", "samkv", "sagekv+budget=0.3")


@dataclass
class Decoded:
    token_ids: list[int]
    text: str


def _copy(state: DecodeState) -> DynamicCache:
    return DynamicCache(
        ddp_cache_data=[(k.clone(), v.clone()) for k, v in layer_tensors(state.cache)],
        config=state.model.config,
    )


def _decode(
    loaded: LoadedModel, state: DecodeState, decoder: Decoder, **options: object
) -> Decoded:
    ids: list[int] = []
    text = "".join(
        generate_deltas(
            loaded.model,
            loaded.tokenizer,
            _copy(state),
            state.first_logits,
            state.next_position,
            GenerationOptions(**options),  # type: ignore[arg-type]
            ids,
            decoder,
        )
    )
    return Decoded(ids, text)


@dataclass
class Indexed:
    engine: SamKVEngine
    refs: list[CacheRef]

    def state(self, method: str) -> DecodeState:
        """The state decoding starts from (observed with one new token: no decode step)."""
        seen: list[DecodeState] = []
        self.engine.answer(
            QUESTION, self.refs, get_method(method), max_new_tokens=1, observe=seen.append
        )
        return seen[0]


@pytest.fixture(scope="module")
def indexed(talkative_llama: LoadedModel, talkative_qwen2: LoadedModel) -> dict[str, Indexed]:
    """The documents indexed once per model for this module (models that never pick EOS)."""
    out = {}
    for name, loaded in (("llama", talkative_llama), ("qwen2", talkative_qwen2)):
        store = KVCacheStore(f"memory://static-decode-{uuid.uuid4().hex}")
        engine = SamKVEngine(loaded, store, batch_decoding=False)  # the one-at-a-time path
        out[name] = Indexed(engine, engine.index(DOCUMENTS, progress=False))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", ["llama", "qwen2"])
def test_static_answers_equal_the_eager_ones(
    shape: str, method: str, indexed: dict[str, Indexed]
) -> None:
    state = indexed[shape].state(method)
    loaded = indexed[shape].engine.model
    if method != "full":
        # The cache the static path must honour has the gaps (or, for reuse, none) expected.
        gaps = bool((state.positions.diff() > 1).any())
        assert gaps == (method != "reuse")
    eager = _decode(loaded, state, Decoder(), max_new_tokens=24)
    static = _decode(loaded, state, StaticDecoder(24), max_new_tokens=24)
    assert len(eager.token_ids) == 24
    assert static.token_ids == eager.token_ids
    assert static.text == eager.text


def test_each_steps_logits_match_the_eager_step_and_hand_back_keeps_their_kv(
    indexed: dict[str, Indexed],
) -> None:
    """Once handed back (an answer moving to the decode batch), the cache holds what the
    plain path's does, and the plain step goes on from it."""
    talkative, state = indexed["qwen2"].engine.model, indexed["qwen2"].state("samkv")
    eager_cache, static_cache = _copy(state), _copy(state)
    static = StaticDecoder(8)
    token, position = int(state.first_logits.argmax()), state.next_position
    with torch.inference_mode():
        for step in range(8):
            expected = Decoder().step(talkative.model, eager_cache, token, position + step)
            got = static.step(talkative.model, static_cache, token, position + step)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = int(expected.argmax())
        static.hand_back(static_cache)
        for got_kv, want_kv in zip(
            layer_tensors(static_cache), layer_tensors(eager_cache), strict=True
        ):
            torch.testing.assert_close(got_kv, want_kv, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="handed its cache back"):
            static.step(talkative.model, static_cache, token, position + 8)
        got = Decoder().step(talkative.model, static_cache, token, position + 8)
        expected = Decoder().step(talkative.model, eager_cache, token, position + 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eos_and_stop_strings_end_both_paths_alike(
    indexed: dict[str, Indexed], monkeypatch: pytest.MonkeyPatch
) -> None:
    talkative, state = indexed["qwen2"].engine.model, indexed["qwen2"].state("samkv")
    plain = _decode(talkative, state, Decoder(), max_new_tokens=20)
    stop = plain.text[len(plain.text) // 2 :][:3]
    eager_cut = _decode(talkative, state, Decoder(), max_new_tokens=20, stop=stop)
    static_cut = _decode(talkative, state, StaticDecoder(20), max_new_tokens=20, stop=stop)
    assert static_cut == eager_cut and len(static_cut.text) < len(plain.text)
    # Make the eighth answer token the EOS: both paths stop before it.
    eos = plain.token_ids[7]
    monkeypatch.setattr(talkative.model.generation_config, "eos_token_id", eos)
    eager_eos = _decode(talkative, state, Decoder(), max_new_tokens=20)
    static_eos = _decode(talkative, state, StaticDecoder(20), max_new_tokens=20)
    assert static_eos == eager_eos
    assert eos not in eager_eos.token_ids and len(eager_eos.token_ids) < 20
    # min_new_tokens keeps EOS out of the first tokens: both paths run to the end.
    eager_min = _decode(talkative, state, Decoder(), max_new_tokens=20, min_new_tokens=20)
    static_min = _decode(talkative, state, StaticDecoder(20), max_new_tokens=20, min_new_tokens=20)
    assert static_min == eager_min and len(eager_min.token_ids) == 20
    n_before = len(eager_eos.token_ids)
    assert eager_min.token_ids[:n_before] == eager_eos.token_ids
    assert eos not in eager_min.token_ids


def test_the_static_capacity_holds_exactly_max_new_tokens(
    indexed: dict[str, Indexed],
) -> None:
    talkative, state = indexed["qwen2"].engine.model, indexed["qwen2"].state("samkv")
    # An answer of n tokens feeds n - 1 of them: StaticDecoder(5) serves six new tokens.
    eager = _decode(talkative, state, Decoder(), max_new_tokens=6)
    assert _decode(talkative, state, StaticDecoder(5), max_new_tokens=6) == eager
    with pytest.raises(ValueError, match="max_new_tokens"):
        _decode(talkative, state, StaticDecoder(5), max_new_tokens=7)


def test_a_compiled_step_traces_whole_and_answers_as_the_eager_path(
    indexed: dict[str, Indexed], compiled_graphs: list[torch.fx.GraphModule]
) -> None:
    """``decode_graphs="compiled"``'s step: dynamo traces it into one graph (a graph break
    would leave small kernels unfused) and, run by a backend that keeps the arithmetic,
    it answers token for token as the plain decoder on a capacity of whole CAPACITY_STEPs."""
    loaded = indexed["llama"].engine.model
    # Two answers whose caches differ in length but round up to one capacity: one graph.
    states = [indexed["llama"].state(method) for method in ("samkv", "sagekv+budget=0.3")]
    assert states[0].cache.get_seq_length() != states[1].cache.get_seq_length()
    for state in states:
        eager = _decode(loaded, state, Decoder(), max_new_tokens=12)
        decoder = StaticDecoder(12, compiled=True)
        assert _decode(loaded, state, decoder, max_new_tokens=12) == eager
        assert decoder._kv_index.numel() == CAPACITY_STEP
    assert len(compiled_graphs) == 1


def test_the_decode_cache_keeps_its_values_once_copied(
    indexed: dict[str, Indexed],
) -> None:
    talkative, state = indexed["llama"].engine.model, indexed["llama"].state("sagekv")
    cache, before = _copy(state), [k.clone() for k, _ in layer_tensors(state.cache)]
    decoder = StaticDecoder(4)
    decoder.step(talkative.model, cache, 7, state.next_position)
    decoder.step(talkative.model, cache, 8, state.next_position + 1)
    # Its layers view the static buffers' first n slots: same values, not extended.
    for (keys, _), old in zip(layer_tensors(cache), before, strict=True):
        assert torch.equal(keys, old)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_capture_survives_another_thread_picking_tokens(
    talkative_cuda_llama: LoadedModel,
) -> None:
    """Answers pick tokens outside the model lock, so one may read logits back while
    another captures its step: the capture must not fail, nor the other thread."""
    model = talkative_cuda_llama.model
    ids = torch.arange(3, 40, device="cuda")[None]
    with torch.inference_mode():
        prefill = model(input_ids=ids, use_cache=True)
        logits = prefill.logits[0, -1]
        caches = [copy.deepcopy(prefill.past_key_values) for _ in range(2)]
    stop, errors = threading.Event(), []

    def pick() -> None:
        try:
            while not stop.is_set():
                int(logits.argmax())
        except RuntimeError as e:
            errors.append(e)

    picker = threading.Thread(target=pick)
    picker.start()
    try:
        with torch.inference_mode():
            token, position = int(logits.argmax()), ids.shape[1]
            got = StaticDecoder(4, graphs=True).step(model, caches[0], token, position)
            expected = Decoder().step(model, caches[1], token, position)
    finally:
        stop.set()
        picker.join(timeout=30)
    assert errors == []
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_graphs_off_cuda_are_an_error_and_auto_decodes_eagerly(
    tiny_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    with pytest.raises(ValueError, match="decode_graphs=True: CUDA graphs need a CUDA device"):
        SamKVEngine(tiny_llama, memory_store, decode_graphs=True)
    with pytest.raises(ValueError, match="decode_graphs='compiled': CUDA graphs need a CUDA"):
        SamKVEngine(tiny_llama, memory_store, decode_graphs="compiled")
    with pytest.raises(ValueError, match="decode_graphs must be"):
        SamKVEngine(tiny_llama, memory_store, decode_graphs="on")  # type: ignore[arg-type]
    assert decode_graphs_for(tiny_llama.model, "auto") is False
    assert SamKVEngine(tiny_llama, memory_store).decode_graphs is False
    cache = DynamicCache(config=tiny_llama.model.config)
    with torch.inference_mode():
        tiny_llama.model(input_ids=torch.tensor([[1, 2]]), **with_cache(tiny_llama.model, cache))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StaticDecoder(2, graphs=True).step(tiny_llama.model, cache, 1, 2)


def test_only_the_plain_decoder_is_replaced(indexed: dict[str, Indexed]) -> None:
    assert type(with_graphs(Decoder(), True, 4)) is StaticDecoder
    compiled = with_graphs(Decoder(), "compiled", 4)
    assert isinstance(compiled, StaticDecoder) and compiled.graphs and compiled.compiled
    assert type(with_graphs(Decoder(), False, 4)) is Decoder
    engine, refs = indexed["qwen2"].engine, indexed["qwen2"].refs
    # Pretend the engine had resolved graphs on: the plain path now reaches the graph
    # decoder (which, on CPU, refuses), while a method's own decoder is kept.
    engine.decode_graphs = True
    try:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            engine.answer(QUESTION, refs, "reuse", max_new_tokens=3)
        method = RecordingDecoderMethod()
        assert len(engine.answer(QUESTION, refs, method, max_new_tokens=3).token_ids) == 3
        assert len(method.made) == 1
    finally:
        engine.decode_graphs = False


def test_sliding_window_models_are_named_unsupported() -> None:
    sliding = random_model(
        "tiny-qwen2", device="cpu", use_sliding_window=True, sliding_window=16, max_window_layers=0
    )
    reason = static_unsupported(sliding.model)
    assert reason is not None and "full attention" in reason
