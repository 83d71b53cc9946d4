"""Greedy answers in the decode batch: the worker picks their tokens and runs ahead."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from transformers import DynamicCache

from samkv_integrations import KVCacheStore, SamKVEngine, batching, decode
from samkv_integrations.batch_decoders import BatchedDecoder
from samkv_integrations.batching import GATHER_S, DecodeBatcher
from samkv_integrations.decode import GenerationOptions, generate_deltas
from samkv_integrations.encode import layer_tensors
from samkv_integrations.fair_lock import FairLock
from samkv_integrations.model_lock import ModelLock
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import CacheRef
from samkv_integrations.stacked_cache import Member, StackedCache
from tests.threaded import count_rows, in_threads

DOCS = ["Alpha is the first letter.", "Lyon sits where the Rhone meets the Saone."]
QUESTIONS = ["Which letter is first?", "Where is Lyon?", "Name a river."]


@pytest.fixture(scope="module")
def engines(talkative_llama: LoadedModel) -> tuple[SamKVEngine, SamKVEngine]:
    """(one answer at a time, batched), on one model and one store."""
    store = KVCacheStore("memory://samkv-test-run-ahead")
    return SamKVEngine(talkative_llama, store, batch_decoding=False), SamKVEngine(
        talkative_llama, store
    )


@pytest.fixture(scope="module")
def refs(engines: tuple[SamKVEngine, SamKVEngine]) -> list[CacheRef]:
    return engines[0].index(DOCS, progress=False)


def _together(engine: SamKVEngine, refs: list[CacheRef], **options: Any) -> list[Any]:
    """Every question's tokens, all asked at once (the engine's lock held until all wait)."""
    calls = [lambda q=q: engine.answer(q, refs, **options).token_ids for q in QUESTIONS]
    return in_threads(calls, engine._lock.lock)


def _spy_picks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many answers each of the worker's greedy picks served."""
    served: list[int] = []
    pick = batching.pick_greedy

    def spy(greedy: list[Member], logits: torch.Tensor) -> list[int]:
        served.append(len(greedy))
        return pick(greedy, logits)

    monkeypatch.setattr(batching, "pick_greedy", spy)
    return served


def test_the_worker_picks_greedy_tokens_as_the_answers_alone_would(
    engines: tuple[SamKVEngine, SamKVEngine],
    refs: list[CacheRef],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alone, batched = engines
    assert batched.batcher is not None
    served = _spy_picks(monkeypatch)
    thread_steps: list[int] = []
    plain_step = BatchedDecoder.step

    def counted(self: BatchedDecoder, *args: Any) -> torch.Tensor:
        thread_steps.append(1)
        return plain_step(self, *args)

    monkeypatch.setattr(BatchedDecoder, "step", counted)
    expected = [alone.answer(q, refs, max_new_tokens=12).token_ids for q in QUESTIONS]
    assert _together(batched, refs, max_new_tokens=12) == expected
    assert max(served) == len(QUESTIONS)  # one pick for all three at a step
    # No greedy answer steps from its own thread, but for the first one's step that was
    # waiting for the lock, alone, when the others began to batch (it joins with that step).
    assert len(thread_steps) <= 1


def test_eos_is_held_back_in_the_batch_as_alone(
    engines: tuple[SamKVEngine, SamKVEngine],
    refs: list[CacheRef],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Make a token that the first answer picks first at a later step an EOS: alone it then
    # ends there, and with min_new_tokens it must pick the runner-up, in the batch as alone.
    alone, batched = engines
    assert batched.batcher is not None
    free = alone.answer(QUESTIONS[0], refs, max_new_tokens=8).token_ids
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    config = alone.model.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", free[cut])
    served = _spy_picks(monkeypatch)
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 8, "min_new_tokens": 8}):
        expected = [alone.answer(q, refs, **options).token_ids for q in QUESTIONS]
        assert _together(batched, refs, **options) == expected
    assert len(expected[0]) == 8 and free[cut] not in expected[0]
    assert alone.answer(QUESTIONS[0], refs, max_new_tokens=8).token_ids == free[:cut]
    assert served


def test_a_stream_dropped_mid_answer_leaves_the_batch_clean(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    alone, batched = engines
    batcher = batched.batcher
    assert batcher is not None
    expected = alone.answer(QUESTIONS[1], refs, max_new_tokens=30).token_ids
    other: list[Any] = []
    stream = batched.stream(QUESTIONS[0], refs, max_new_tokens=30, min_new_tokens=30)
    deltas = iter(stream)
    next(deltas)
    helper = threading.Thread(
        target=lambda: other.append(batched.answer(QUESTIONS[1], refs, max_new_tokens=30)),
        daemon=True,  # a hung answer fails the test, not the whole run
    )
    helper.start()
    deadline = time.monotonic() + 30
    while not batcher.batching() and time.monotonic() < deadline:
        time.sleep(0.001)
    next(deltas)
    deltas.close()  # the client went away: its generator is closed and dropped
    del deltas, stream
    gc.collect()
    helper.join(timeout=120)
    assert other[0].token_ids == expected
    with batcher._cond:
        assert batcher._open == batcher._in_flight == batcher._finished == 0
        assert not batcher._pending


def _ride_along(model: Any, graphs: bool) -> tuple[list[torch.Tensor], StackedCache]:
    """Three answers step together, settled from the first step; two end after the second."""
    prompts = [[5, 9, 13, 2], [7, 7, 1], [11, 3, 8, 20, 4]]
    members = []
    with torch.inference_mode():
        for ids in prompts:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([ids], device=model.device), **with_cache(model, cache))
            members.append(Member(max_steps=6, kv=layer_tensors(cache)))
        stack = StackedCache(model, graphs=graphs)
        last: list[torch.Tensor] = []
        for step in range(5):
            if step == 2:
                members[0].open = members[1].open = False
            live = [m for m in members if m.open]
            for member, ids in zip(members, prompts, strict=True):
                member.request = (30 + step, len(ids) + step)
            logits = stack.step(live, settled=True)
            last.append(logits[members[2].row].float().cpu())
            for member in live:
                member.steps_done += 1
    return last, stack


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_settled_stack_is_captured_at_once_and_keeps_its_ended_rows(
    talkative_cuda_llama: LoadedModel,
) -> None:
    model = talkative_cuda_llama.model
    eager, eager_stack = _ride_along(model, graphs=False)
    replayed, stack = _ride_along(model, graphs=True)
    assert (stack.captures, stack.rebuilds) == (1, 1)  # captured at the first step, kept
    assert eager_stack.rebuilds == 2  # the eager stack drops the ended rows
    for want, got in zip(eager, replayed, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _batcher(model: Any, gather_s: float = GATHER_S) -> DecodeBatcher:
    return DecodeBatcher(
        model, ModelLock(FairLock(), skip_cudnn_attention=False), gather_s=gather_s
    )


def _prefilled(model: Any, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), **with_cache(model, cache), use_cache=True)
    return cache, out.logits[0, -1]


def _decoding(
    batcher: DecodeBatcher | None,
    loaded: LoadedModel,
    ids: list[int],
    announced: bool = False,
    **options: Any,
) -> Callable[[], list[int] | BaseException]:
    """One answer, prefilled now, to decode when called: its ids (or its error).

    In ``batcher`` (``announced``: as ``DecodeBatcher.announce`` said it would come), or one
    at a time without one. Prefilled up front, so that answers started together reach the
    batch together.
    """
    cache, logits = _prefilled(loaded.model, ids)

    def run() -> list[int] | BaseException:
        got: list[int] = []
        opts = GenerationOptions(**options)
        args = (loaded.tokenizer, cache, logits, len(ids), opts, got)
        try:
            deltas = (
                generate_deltas(loaded.model, *args)
                if batcher is None
                else batcher.deltas(*args, announced=announced)
            )
            list(deltas)
        except RuntimeError as e:
            return e
        return got

    return run


def test_a_failed_step_spares_an_answer_that_had_finished(talkative_llama: LoadedModel) -> None:
    # The long answer's first step alone after stepping with the short one (whose run has
    # ended, its row still stacked) fails: only the long answer gets the error.
    batcher = _batcher(talkative_llama.model, gather_s=1.0)
    plain = batcher._stack.step
    sizes: list[int] = []

    def failing(batch: list[Member], settled: bool = False) -> torch.Tensor:
        sizes.append(len(batch))
        if sizes[-2:] == [2, 1]:
            raise RuntimeError("a step failed")
        return plain(batch, settled)

    batcher._stack.step = failing  # type: ignore[method-assign]
    expected = _decoding(None, talkative_llama, [5, 9, 13], max_new_tokens=3, min_new_tokens=3)()
    for _ in range(2):  # both step together from the first step, however late a thread starts
        batcher.announce()
    short, long = in_threads([
        _decoding(batcher, talkative_llama, [5, 9, 13], True, max_new_tokens=3, min_new_tokens=3),
        _decoding(batcher, talkative_llama, [7, 7, 1, 4], True, max_new_tokens=10),
    ])  # fmt: skip
    assert short == expected
    assert isinstance(long, RuntimeError) and "a step failed" in str(long)
    assert batcher._open == batcher._finished == batcher._in_flight == 0


def test_min_new_tokens_without_eos_ids_holds_nothing_back(
    talkative_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode, "eos_token_ids", lambda model, tokenizer: set())
    batcher = _batcher(talkative_llama.model, gather_s=1.0)
    asks = [
        ([5, 9, 13], {"max_new_tokens": 6, "min_new_tokens": 4}),
        ([7, 7, 1, 4], {"max_new_tokens": 6}),
    ]
    expected = [_decoding(None, talkative_llama, ids, **options)() for ids, options in asks]
    calls = [_decoding(batcher, talkative_llama, ids, **options) for ids, options in asks]
    assert in_threads(calls) == expected


def test_an_answer_leaving_while_others_are_late_runs_no_empty_step(
    talkative_llama: LoadedModel,
) -> None:
    # A sampled answer stops reading, so the worker waits for it (gather_s) with only the
    # greedy one's next step queued; the greedy one leaves then: nobody is left to step.
    batcher = _batcher(talkative_llama.model, gather_s=0.5)
    sizes: list[int] = []
    count_rows(batcher, sizes)
    waits, worker_waits = batcher._wait_while, threading.Event()

    def watched(waiting: Callable[[], bool], while_arriving: bool = False) -> None:
        if blocked.is_set() and len(batcher._pending) == 1 and len(batcher._stack.rows) == 2:
            worker_waits.set()  # for the blocked sampled row, with the greedy one's step queued
        waits(waiting, while_arriving)

    batcher._wait_while = watched  # type: ignore[method-assign]
    model, tokenizer = talkative_llama.model, talkative_llama.tokenizer
    sampled_cache, sampled_logits = _prefilled(model, [5, 9, 13, 2])
    greedy_cache, greedy_logits = _prefilled(model, [7, 7, 1])
    go_on, left, blocked = threading.Event(), threading.Event(), threading.Event()

    def late_sampled() -> list[int]:
        ids: list[int] = []
        options = GenerationOptions(max_new_tokens=8, temperature=1.0, seed=3)
        for _ in batcher.deltas(tokenizer, sampled_cache, sampled_logits, 4, options, ids):
            if len(ids) >= 3 and not go_on.is_set():
                blocked.set()
                go_on.wait(timeout=20)
        return ids

    def leaving_greedy() -> None:
        ids: list[int] = []
        options = GenerationOptions(max_new_tokens=40, min_new_tokens=40)
        deltas = batcher.deltas(tokenizer, greedy_cache, greedy_logits, 3, options, ids)
        while len(ids) < 3:
            next(deltas)
        worker_waits.clear()
        assert worker_waits.wait(timeout=20)
        deltas.close()
        left.set()

    def release_sampled() -> None:
        left.wait(timeout=20)
        time.sleep(1.0)  # past the worker's wait
        go_on.set()

    sampled, *_ = in_threads([late_sampled, leaving_greedy, release_sampled])
    assert len(sampled) == 8
    assert sizes and min(sizes) >= 1
    assert batcher._open == batcher._in_flight == 0 and not batcher._pending


def test_picked_tokens_go_out_while_a_prefill_holds_the_lock(talkative_llama: LoadedModel) -> None:
    # The worker wakes greedy answers only after launching the next step, unless it finds
    # the model lock taken: then the tokens already picked go out while it waits.
    batcher = _batcher(talkative_llama.model)
    model, tokenizer = talkative_llama.model, talkative_llama.tokenizer
    cache, logits = _prefilled(model, [5, 9, 13])
    ids: list[int] = []
    options = GenerationOptions(max_new_tokens=60, min_new_tokens=60)
    deltas = batcher.deltas(tokenizer, cache, logits, 3, options, ids)
    next(deltas), next(deltas)
    held, delivered, outcome = threading.Event(), threading.Event(), []

    def prefill_holding_the_lock() -> None:
        with batcher.model_lock:
            held.set()
            outcome.append(delivered.wait(timeout=20))

    holder = threading.Thread(target=prefill_holding_the_lock, daemon=True)
    holder.start()
    assert held.wait(timeout=20)
    assert batcher.steps < 59  # the run is not over: the worker will want the lock
    while len(ids) < 1 + batcher.steps:  # every token the worker picked before it waited
        next(deltas)
    delivered.set()
    holder.join(timeout=30)
    list(deltas)
    assert outcome == [True] and len(ids) == 60


def _spy_steps(batcher: DecodeBatcher) -> list[tuple[int, bool]]:
    """Record each batched step's answers and whether it was settled (captured at once on CUDA)."""
    steps: list[tuple[int, bool]] = []
    plain = batcher._stack.step

    def spy(batch: list[Member], settled: bool = False) -> torch.Tensor:
        steps.append((len(batch), settled))
        return plain(batch, settled)

    batcher._stack.step = spy  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize("queued_behind", [False, True])
def test_a_stack_formed_after_waiting_for_the_lock_is_captured_at_once_unless_a_prefill_waits(
    talkative_llama: LoadedModel, queued_behind: bool
) -> None:
    # Two answers ask while a prefill holds the lock. Once the worker holds it, its stack
    # holds every answer in flight, so its first step is settled (captured at once on CUDA),
    # unless another thread waits for the lock behind the worker: that prefill brings a joiner.
    batcher = _batcher(talkative_llama.model, gather_s=0.5)  # both answers ask in time
    steps = _spy_steps(batcher)
    answers = [
        _decoding(batcher, talkative_llama, ids, max_new_tokens=3)
        for ids in ([5, 9, 13], [7, 7, 1, 4])
    ]
    fair = cast(FairLock, batcher.model_lock.lock)

    def prefill_behind() -> None:
        with batcher.model_lock:
            pass

    results: list[Any] = [None, None]
    threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, r()), daemon=True)
               for i, r in enumerate(answers)]  # fmt: skip
    deadline = time.monotonic() + 20
    with batcher.model_lock:
        for thread in threads:
            thread.start()
        while not (batcher._in_flight == 2 and fair._queue) and time.monotonic() < deadline:
            time.sleep(0.001)  # both answers in flight, the worker waiting for the lock
        if queued_behind:
            threading.Thread(target=prefill_behind, daemon=True).start()
            while len(fair._queue) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
    for thread in threads:
        thread.join(timeout=30)
    assert all(isinstance(r, list) and len(r) == 3 for r in results)
    assert steps[0] == (2, not queued_behind)


def test_a_new_stack_waits_for_an_announced_answer(
    talkative_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second answer's prefill has ended (announced under the model lock), but it asks
    # for its first step only after the first answer, and long after ``gather_s``: the new
    # stack waits for it, so both step together from a settled first step, rather than the
    # stack being rebuilt (and captured again, on CUDA) when it joins.
    monkeypatch.setattr(batching, "ARRIVING_S", 60.0)
    batcher = _batcher(talkative_llama.model, gather_s=0.5)
    steps = _spy_steps(batcher)
    first = _decoding(batcher, talkative_llama, [5, 9, 13], max_new_tokens=4)
    second = _decoding(batcher, talkative_llama, [7, 7, 1, 4], announced=True, max_new_tokens=4)
    batcher.announce()

    def late_second() -> list[int] | BaseException:
        time.sleep(4 * batcher.gather_s)
        return second()

    results = in_threads([first, late_second])
    assert all(isinstance(r, list) and len(r) == 4 for r in results)
    assert steps[0] == (2, True)
    assert batcher._arriving == 0


def test_an_announced_answer_that_paused_after_arriving_is_waited_for_as_any_other(
    talkative_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker starts a new stack's wait while the second answer is announced; that answer
    # then reaches ``deltas`` but its reader pauses before its first step. From then on it is
    # waited for as any answer in flight (``gather_s``): the worker steps without it rather
    # than hold the model lock, and the prefills behind it, for ``ARRIVING_S``.
    monkeypatch.setattr(batching, "ARRIVING_S", 60.0)
    batcher = _batcher(talkative_llama.model)
    steps = _spy_steps(batcher)
    waits, arriving_wait = batcher._wait_while, threading.Event()

    def watched(waiting: Callable[[], bool], while_arriving: bool = False) -> None:
        if while_arriving and batcher._arriving:
            arriving_wait.set()
        waits(waiting, while_arriving)

    batcher._wait_while = watched  # type: ignore[method-assign]
    first = _decoding(batcher, talkative_llama, [5, 9, 13], max_new_tokens=4)
    cache, logits = _prefilled(talkative_llama.model, [7, 7, 1, 4])
    options = GenerationOptions(max_new_tokens=4)
    batcher.announce()
    stepped_without_it: list[bool] = []

    def paused_second() -> list[int]:
        assert arriving_wait.wait(timeout=20)
        ids: list[int] = []
        deltas = batcher.deltas(
            talkative_llama.tokenizer, cache, logits, 4, options, ids, announced=True
        )
        next(deltas)  # its first token: it asks for its first step at the next read
        deadline = time.monotonic() + 20
        while not steps and time.monotonic() < deadline:
            time.sleep(0.001)
        stepped_without_it.append(bool(steps))
        list(deltas)
        return ids

    results = in_threads([first, paused_second])
    assert all(isinstance(r, list) and len(r) == 4 for r in results)
    assert stepped_without_it == [True] and steps[0][0] == 1


def test_a_withdrawn_answer_is_not_waited_for(talkative_llama: LoadedModel) -> None:
    batcher = _batcher(talkative_llama.model)
    steps = _spy_steps(batcher)
    batcher.announce()
    batcher.withdraw()  # its request failed after its prefill
    ids = _decoding(batcher, talkative_llama, [5, 9, 13], max_new_tokens=3)()
    assert isinstance(ids, list) and len(ids) == 3
    assert steps[0] == (1, True)  # no answer is still counted as coming


def test_a_failing_observer_withdraws_its_answer_from_the_batch(
    engines: tuple[SamKVEngine, SamKVEngine], refs: list[CacheRef]
) -> None:
    batched = engines[1]
    assert batched.batcher is not None

    def failing(_state: Any) -> None:
        raise RuntimeError("observer failed")

    with pytest.raises(RuntimeError, match="observer failed"):
        batched.answer(QUESTIONS[0], refs, max_new_tokens=3, observe=failing)
    assert batched.batcher._arriving == 0
    assert batched.answer(QUESTIONS[1], refs, max_new_tokens=3).token_ids
    assert batched.batcher._arriving == batched.batcher._in_flight == 0


def test_a_plain_prompts_answer_is_announced_to_the_batch(
    engines: tuple[SamKVEngine, SamKVEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    batched = engines[1]
    batcher = batched.batcher
    assert batcher is not None
    announced: list[int] = []
    plain = batcher.announce

    def counted() -> None:
        announced.append(batcher._arriving)
        plain()

    monkeypatch.setattr(batcher, "announce", counted)
    stream = batched.stream_prompt([5, 9, 13, 2], max_new_tokens=3)
    assert "".join(stream) == stream.answer.text and len(stream.answer.token_ids) == 3
    assert announced == [0]
    assert batcher._arriving == batcher._in_flight == 0


def test_an_answer_that_asked_while_the_worker_waited_for_the_lock_gets_a_failed_steps_error(
    talkative_llama: LoadedModel,
) -> None:
    # The worker holds the first answer's step while a prefill holds the lock; the second
    # answer asks meanwhile and is taken into that step, which fails: both hear of it.
    batcher = _batcher(talkative_llama.model)

    def failing(batch: list[Member], settled: bool = False) -> torch.Tensor:
        raise RuntimeError("a step failed")

    batcher._stack.step = failing  # type: ignore[method-assign]
    first = _decoding(batcher, talkative_llama, [5, 9, 13], max_new_tokens=5)
    second = _decoding(batcher, talkative_llama, [7, 7, 1, 4], max_new_tokens=5)
    fair = cast(FairLock, batcher.model_lock.lock)
    results: list[Any] = [None, None]
    threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, r()), daemon=True)
               for i, r in enumerate((first, second))]  # fmt: skip
    with batcher.model_lock:
        threads[0].start()
        deadline = time.monotonic() + 20
        while not fair._queue and time.monotonic() < deadline:  # the worker waits for the lock
            time.sleep(0.001)
        threads[1].start()
        while not batcher._pending and time.monotonic() < deadline:
            time.sleep(0.001)
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert all(isinstance(r, RuntimeError) and "a step failed" in str(r) for r in results)
    assert batcher._open == batcher._in_flight == 0 and not batcher._pending
