"""Batched decoding of concurrent answers: the same tokens as one at a time, per request.

Every check compares the batched engine with an engine that decodes each answer alone
(``batch_decoding=False``) on the same model and store, so any drift in the stacked cache,
its padding mask or the per-row positions shows up as a different token.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.batch_decoders import BatchedDecoder, runs_plain_step
from samkv_integrations.batching import DecodeBatcher
from samkv_integrations.decode import Decoder, GenerationOptions
from samkv_integrations.encode import layer_tensors
from samkv_integrations.fair_lock import FairLock
from samkv_integrations.methods import DecodeState
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.shapes import random_model
from samkv_integrations.records import CacheRef
from samkv_integrations.stacked_cache import Member, StackedCache
from samkv_integrations.static_decode import StaticDecoder
from tests.threaded import count_rows, in_threads

DOCS = [
    "Alpha is the first letter.",
    "Omega is the last letter of the Greek alphabet, after psi.",
    "Lyon sits where the Rhone meets the Saone; it was founded in 43 BC.",
    "A short one.",
]

#: (question, documents by index, method, generation options): lengths, methods and
#: options differ, so rows are padded differently and leave at different steps.
REQUESTS: list[tuple[str, list[int], str, dict[str, Any]]] = [
    ("Which letter is last?", [0, 1], "samkv", {"max_new_tokens": 14}),
    ("Where is Lyon?", [2], "full", {"max_new_tokens": 5}),
    ("Which?", [3, 0, 2], "reuse", {"max_new_tokens": 20}),
    ("Name a city.", [1, 2, 3], "samkv", {"max_new_tokens": 9}),
    ("And now?", [0], "reuse", {"max_new_tokens": 11, "temperature": 0.8, "seed": 5}),
    ("Top p?", [2, 1], "full", {"max_new_tokens": 8, "temperature": 1.2, "top_p": 0.7, "seed": 1}),
]


@pytest.fixture(scope="module")
def store() -> KVCacheStore:
    return KVCacheStore("memory://samkv-test-batching")


@pytest.fixture(scope="module")
def engines(talkative_llama: LoadedModel, store: KVCacheStore) -> tuple[SamKVEngine, SamKVEngine]:
    """(one answer at a time, batched), on one model and one store."""
    alone = SamKVEngine(talkative_llama, store, batch_decoding=False)
    batched = SamKVEngine(talkative_llama, store, batch_decoding=True)
    return alone, batched


@pytest.fixture(scope="module")
def refs(engines: tuple[SamKVEngine, SamKVEngine]) -> list[CacheRef]:
    return engines[0].index(DOCS, progress=False)


def _ask(engine: SamKVEngine, refs: list[CacheRef], request: tuple[Any, ...]) -> Any:
    question, docs, method, options = request
    return engine.answer(question, [refs[i] for i in docs], method=method, **options)


def _decode_states(
    engine: SamKVEngine, refs: list[CacheRef], requests: list[tuple[Any, ...]]
) -> list[DecodeState]:
    """Each request's decode state once its question is prefilled (what decoding starts from)."""
    states = []
    for question, docs, method, _ in requests:
        seen: list[DecodeState] = []
        ask = [refs[i] for i in docs]
        engine.answer(question, ask, method=method, max_new_tokens=1, observe=seen.append)
        states.append(seen[0])
    return states


def test_concurrent_answers_equal_the_answers_alone(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    alone, batched = engines
    expected = [_ask(alone, refs, r) for r in REQUESTS]
    assert batched.batcher is not None and isinstance(batched._lock.lock, FairLock)
    steps_before = batched.batcher.steps
    counts_before = batched.batcher.counts()
    got = in_threads([lambda r=r: _ask(batched, refs, r) for r in REQUESTS], batched._lock.lock)
    for request, want, answer in zip(REQUESTS, expected, got, strict=True):
        assert not isinstance(answer, Exception), f"{request}: {answer!r}"
        assert answer.token_ids == want.token_ids, request
        assert answer.text == want.text
        assert answer.stats.kept_tokens == want.stats.kept_tokens
        assert len(answer.token_ids) == request[3]["max_new_tokens"]  # talkative: no EOS
    # Decoding really was shared: fewer forwards than the answers' steps one by one.
    alone_steps = sum(r[3]["max_new_tokens"] - 1 for r in REQUESTS)
    assert batched.batcher.steps - steps_before < alone_steps
    counts = batched.batcher.counts()
    assert counts["steps"] - counts_before["steps"] == batched.batcher.steps - steps_before
    assert counts["rebuilds"] > counts_before["rebuilds"] and counts["captures"] == 0
    assert alone.batcher is None  # batch_decoding=False


def test_joining_and_leaving_mid_answer_disturbs_no_one(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    alone, batched = engines
    long, short, late = REQUESTS[2], REQUESTS[1], REQUESTS[3]
    expected = [_ask(alone, refs, r).token_ids for r in (long, short, late)]
    question, docs, method, options = long
    stream = batched.stream(question, [refs[i] for i in docs], method=method, **options)
    deltas = iter(stream)
    for _ in range(3):  # the long answer decodes alone for a few steps
        next(deltas)
    others: list[Any] = []
    joiner = threading.Thread(
        target=lambda: others.extend(
            in_threads([lambda r=r: _ask(batched, refs, r) for r in (short, late)])
        )
    )
    joiner.start()
    for _ in deltas:  # ... then with them, then alone again once they are done
        pass
    joiner.join(timeout=60)
    assert stream.answer.token_ids == expected[0]
    assert [a.token_ids for a in others] == expected[1:]


def _lone_answer_joins(alone: SamKVEngine, batched: SamKVEngine, refs: list[CacheRef]) -> None:
    """A lone answer starts on the one-at-a-time path, then shares the others' steps."""
    assert batched.batcher is not None
    lone = ("Which letter is last?", [0, 1], "samkv", {"max_new_tokens": 40})
    others = [("Where is Lyon?", [2], "full", {"max_new_tokens": 40}), REQUESTS[2]]
    expected = [_ask(alone, refs, r).token_ids for r in (lone, *others)]
    sizes: list[int] = []
    count_rows(batched.batcher, sizes)
    try:
        question, docs, method, options = lone
        stream = batched.stream(question, [refs[i] for i in docs], method=method, **options)
        deltas = iter(stream)
        for _ in range(3):  # alone: nobody decodes in the batch yet
            next(deltas)
        assert sizes == []
        got: list[Any] = []
        joiner = threading.Thread(
            target=lambda: got.extend(
                in_threads([lambda r=r: _ask(batched, refs, r) for r in others])
            )
        )
        joiner.start()
        deadline = time.monotonic() + 30
        while not batched.batcher.batching() and time.monotonic() < deadline:
            time.sleep(0.001)
        for _ in deltas:
            pass
        joiner.join(timeout=60)
    finally:
        del batched.batcher._stack.step
    assert stream.answer.token_ids == expected[0]
    assert [a.token_ids for a in got] == expected[1:]
    assert max(sizes) == 3  # the lone answer's rows stepped with both others'


def test_a_lone_answer_joins_the_batch_once_others_decode(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    _lone_answer_joins(*engines, refs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_lone_answer_leaves_its_cuda_graph_to_join_the_batch(
    talkative_cuda_llama: LoadedModel,
) -> None:
    """On the GPU the lone answer replays its own graph (``StaticDecoder``) until it hands
    its cache back; its tokens are those of the one-at-a-time engine's graphs."""
    loaded = talkative_cuda_llama
    store = KVCacheStore(f"memory://samkv-test-join-{time.time_ns()}")
    alone = SamKVEngine(loaded, store, batch_decoding=False)
    batched = SamKVEngine(loaded, store)
    assert alone.decode_graphs and batched.decode_graphs
    _lone_answer_joins(alone, batched, alone.index(DOCS, progress=False))


def test_stop_strings_and_lengths_apply_per_answer(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    alone, batched = engines
    free = _ask(alone, refs, REQUESTS[0]).text
    stop = free[4:6]
    cut = (REQUESTS[0][0], REQUESTS[0][1], "samkv", {"max_new_tokens": 14, "stop": [stop]})
    shorter = (*REQUESTS[0][:3], {"max_new_tokens": 3})
    longer = (*REQUESTS[0][:3], {"max_new_tokens": 24})
    got = in_threads(
        [lambda r=r: _ask(batched, refs, r) for r in (cut, shorter, longer)], batched._lock.lock
    )
    assert got[0].text == free[: free.index(stop)]
    assert len(got[1].token_ids) == 3 and len(got[2].token_ids) == 24
    assert got[2].token_ids[:14] == _ask(alone, refs, REQUESTS[0]).token_ids
    assert got[1].token_ids == got[2].token_ids[:3]


def test_a_bad_request_fails_alone(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    alone, batched = engines
    good = REQUESTS[:2]
    expected = [_ask(alone, refs, r).token_ids for r in good]
    too_long = ("Which?", [0], "samkv", {"max_new_tokens": 10**6})

    def foreign_cache() -> Any:
        """A cache of another dtype, straight into the batcher: refused when it joins."""
        batcher = batched.batcher
        assert batcher is not None
        model = batched.model.model
        cache = DynamicCache(config=model.config)
        for layer in range(len(cache.layers)):
            kv = torch.zeros(1, 2, 5, 16, dtype=torch.float64)
            cache.update(kv, kv, layer)
        logits = torch.zeros(model.config.vocab_size)
        options = GenerationOptions(max_new_tokens=4)
        return list(batcher.deltas(batched.model.tokenizer, cache, logits, 7, options, []))

    calls = [lambda r=r: _ask(batched, refs, r) for r in (*good, too_long)] + [foreign_cache]
    got = in_threads(calls, batched._lock.lock, waiters=3)
    assert [a.token_ids for a in got[:2]] == expected
    assert isinstance(got[2], ValueError) and "max_new_tokens" in str(got[2])
    assert isinstance(got[3], ValueError) and "float64" in str(got[3])
    # The batcher still serves answers afterwards.
    assert _ask(batched, refs, good[0]).token_ids == expected[0]


def test_only_plain_decoders_are_batched() -> None:
    class Correcting(Decoder):
        def step(self, model: Any, cache: DynamicCache, token: int, position: int) -> torch.Tensor:
            return super().step(model, cache, token, position)

    assert runs_plain_step(Decoder())
    assert not runs_plain_step(Correcting())
    assert not runs_plain_step(StaticDecoder(4))


def test_batching_off_is_the_serial_engine(
    talkative_llama: LoadedModel, store: KVCacheStore
) -> None:
    engine = SamKVEngine(talkative_llama, store, batch_decoding=False)
    assert engine.batcher is None
    assert not isinstance(engine._lock.lock, FairLock)
    with pytest.raises(ValueError, match="max_batch"):
        DecodeBatcher(talkative_llama.model, FairLock(), max_batch=0)


def test_max_batch_caps_each_step(
    talkative_llama: LoadedModel, store: KVCacheStore, refs: list[CacheRef]
) -> None:
    alone = SamKVEngine(talkative_llama, store, batch_decoding=False)
    capped = SamKVEngine(talkative_llama, store, max_batch=2)
    assert capped.batcher is not None
    sizes: list[int] = []
    count_rows(capped.batcher, sizes)
    requests = REQUESTS[:4]
    got = in_threads([lambda r=r: _ask(capped, refs, r) for r in requests], capped._lock.lock)
    assert [a.token_ids for a in got] == [_ask(alone, refs, r).token_ids for r in requests]
    assert max(sizes) == 2


def test_the_fair_lock_serves_waiters_in_order() -> None:
    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    with lock:  # reentrant
        pass

    def wait(i: int) -> None:
        with lock:
            order.append(i)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        while len(lock._queue) < i + 1:
            time.sleep(0.001)
    timed_out: list[bool] = []
    other = threading.Thread(target=lambda: timed_out.append(not lock.acquire(timeout=0.01)))
    other.start()
    other.join(timeout=10)
    assert timed_out == [True]
    lock.release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


def test_each_batched_step_gives_the_logits_of_the_step_alone(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    """Logits, not just tokens: a random tiny model's argmax hides small RoPE or mask errors."""
    alone, batched = engines
    batcher = batched.batcher
    assert batcher is not None
    model = alone.model.model
    states = _decode_states(alone, refs, REQUESTS[:3])
    tokens = [[7, 40, 99, 3, 250], [12, 12, 80], [5, 61, 200, 9]]

    def decode(state: DecodeState, ids: list[int], decoder: Decoder) -> list[torch.Tensor]:
        cache = copy.deepcopy(state.cache)
        logits = []
        for i, token in enumerate(ids):
            logits.append(decoder.step(model, cache, token, state.next_position + i))
        if isinstance(decoder, BatchedDecoder):
            decoder.close()
        return logits

    with torch.inference_mode():
        expected = [decode(s, ids, Decoder()) for s, ids in zip(states, tokens, strict=True)]
    calls = [
        lambda s=s, ids=ids: decode(s, ids, BatchedDecoder(batcher, len(ids)))
        for s, ids in zip(states, tokens, strict=True)
    ]
    steps_before = batcher.steps
    got = in_threads(calls)
    for want, have in zip(expected, got, strict=True):
        assert not isinstance(have, Exception), have
        for a, b in zip(want, have, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert batcher.steps - steps_before <= sum(map(len, tokens))


def _alone_logits(
    model: Any, states: list[DecodeState], tokens: list[list[int]]
) -> list[list[torch.Tensor]]:
    """Each answer's logits from the plain decoder, one answer at a time."""
    expected = []
    for state, ids in zip(states, tokens, strict=True):
        cache, decoder = copy.deepcopy(state.cache), Decoder()
        expected.append(
            [decoder.step(model, cache, t, state.next_position + i) for i, t in enumerate(ids)]
        )
    return expected


def _assert_same_logits(
    expected: list[list[torch.Tensor]], got: list[list[torch.Tensor]], atol: float = 1e-5
) -> None:
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want, have, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=atol)


def test_a_row_that_sits_out_steps_keeps_its_place_and_its_logits(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    """A late answer rides along with a hidden placeholder: no rebuild, the same logits."""
    alone, _ = engines
    model = alone.model.model
    states = _decode_states(alone, refs, REQUESTS[:2])
    tokens = [[7, 40, 99, 3], [12, 80]]
    with torch.inference_mode():
        expected = _alone_logits(model, states, tokens)
        stack = StackedCache(model)
        members = [Member(max_steps=4, kv=layer_tensors(copy.deepcopy(s.cache))) for s in states]
        # Row 1 asks at steps 0 and 3 only: it sits out steps 1 and 2.
        schedule = [[0, 1], [0], [0], [0, 1]]
        got: list[list[torch.Tensor]] = [[], []]
        for rows in schedule:
            batch = []
            for r in rows:
                position = states[r].next_position + len(got[r])
                members[r].request = (tokens[r][len(got[r])], position)
                batch.append(members[r])
            logits = stack.step(batch)
            for r in rows:
                got[r].append(logits[members[r].row])
                members[r].steps_done += 1
    assert stack.rebuilds == 1
    _assert_same_logits(expected, got)


def test_a_lone_answer_decodes_alone_and_later_ones_batch(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    """Nobody to batch with: the one-at-a-time path (CUDA graphs on a GPU); meanwhile: batch."""
    alone, batched = engines
    batcher = batched.batcher
    assert batcher is not None
    first, second = REQUESTS[0], REQUESTS[3]
    expected = [_ask(alone, refs, r).token_ids for r in (first, second)]
    before = batcher.steps
    assert _ask(batched, refs, first).token_ids == expected[0]
    assert batcher.steps == before  # decoded alone
    question, docs, method, options = first
    stream = batched.stream(question, [refs[i] for i in docs], method=method, **options)
    deltas = iter(stream)
    next(deltas)  # the first answer is decoding (alone) ...
    assert _ask(batched, refs, second).token_ids == expected[1]  # ... so this one batches
    assert batcher.steps > before
    list(deltas)
    assert stream.answer.token_ids == expected[0]


def test_graphs_off_cuda_are_an_error(talkative_llama: LoadedModel) -> None:
    with pytest.raises(ValueError, match="CUDA graphs need CUDA"):
        DecodeBatcher(talkative_llama.model, FairLock(), graphs=True)


def _stacked_logits(
    model: Any, states: list[DecodeState], tokens: list[list[int]], graphs: bool
) -> tuple[list[list[torch.Tensor]], StackedCache]:
    """Every row asks at every step, so the stack lives long enough to be captured."""
    stack = StackedCache(model, graphs=graphs)
    members = [
        Member(max_steps=len(ids), kv=layer_tensors(copy.deepcopy(s.cache)))
        for s, ids in zip(states, tokens, strict=True)
    ]
    got: list[list[torch.Tensor]] = [[] for _ in states]
    for step in range(len(tokens[0])):
        for r, member in enumerate(members):
            member.request = (tokens[r][step], states[r].next_position + step)
        logits = stack.step(members)
        for r, member in enumerate(members):
            got[r].append(logits[member.row].float().cpu())
            member.steps_done += 1
    return got, stack


#: Ten steps for three answers: past ``CAPTURE_AFTER``, where a CUDA stack is captured.
LONG_TOKENS = [[7, 40, 99, 3, 250, 8, 1, 77, 5, 6], [12, 12, 80, 4, 4, 4, 9, 10, 11, 2]]
LONG_TOKENS.append(list(reversed(LONG_TOKENS[0])))


def test_a_long_lived_stack_gives_each_answers_logits(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    """The step a CUDA stack captures, run eagerly: each row's logits as the plain decoder's."""
    alone, _ = engines
    model = alone.model.model
    states = _decode_states(alone, refs, REQUESTS[:3])
    with torch.inference_mode():
        expected = _alone_logits(model, states, LONG_TOKENS)
        got, stack = _stacked_logits(model, states, LONG_TOKENS, graphs=False)
    assert (stack.rebuilds, stack.captures, stack.steps) == (1, 0, len(LONG_TOKENS[0]))
    _assert_same_logits(expected, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_captured_stack_step_gives_the_eager_logits(store: KVCacheStore) -> None:
    """On the GPU: the replayed graph of a long-lived stack equals its eager steps."""
    model = random_model("tiny-llama", device="cuda", seed=0)
    engine = SamKVEngine(model, store, batch_decoding=False, decode_graphs=False)
    refs = engine.index(DOCS, progress=False)
    states = _decode_states(engine, refs, REQUESTS[:3])
    with torch.inference_mode():
        eager, _ = _stacked_logits(model.model, states, LONG_TOKENS, graphs=False)
        replayed, stack = _stacked_logits(model.model, states, LONG_TOKENS, graphs=True)
    assert stack.captures == 1
    _assert_same_logits(eager, replayed, atol=1e-4)
