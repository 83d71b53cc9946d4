"""Decode steps of concurrent answers, run together: one forward per step for all of them.

Batch-1 decoding is launch-bound (issue 16): a step costs about the same for one answer as
for sixteen. Each answer arrives, once prefilled, with its own compact cache (its length,
global positions with gaps). Its ``generate_deltas`` runs in its own thread, unchanged
(token picking, stop strings and detokenizing stay in ``decode``), with a ``BatchedDecoder``
that hands each ``(token, position)`` to one worker thread and waits for the logits. The
worker runs the waiting steps as one forward on the answers' stacked KV
(``stacked_cache.StackedCache``). Answers join and leave between steps; an answer slow to
ask for its next step (after ``gather_s``) sits that step out in its row, hidden from
itself, so only a join, running out of slots or most rows having ended rebuilds the stack
(every row copied). H200 measurements: ``benchmarks/results/issue16-load/`` and the README.

Prefills are not batched: they stay serialized under the engine's model lock, which the
worker holds for each step too. Each is long and of its own shape (load, method, question),
and a waiting prefill gets the lock before the next step (``FairLock``).

transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``, paged
caches) is not used: it takes prompts as token ids and prefills them into its own paged
cache, with positions that follow the cache. Our answers bring caches the methods built
(kept tokens only, positions with gaps), for which its scheduler has no entry point.

Only decoders that run the plain step join (``runs_plain_step``); a method's own decoder
(``+decode=retro``) keeps the one-at-a-time path. With the engine's ``decode_graphs``, a
stack that outlives its first few steps replays its step as a CUDA graph (``StackedCache``);
an answer with nobody to batch with takes the engine's one-at-a-time path until others
start batching, and then joins them (``LoneDecoder``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from samkv_integrations.decode import Decoder, GenerationOptions, generate_deltas
from samkv_integrations.encode import layer_tensors
from samkv_integrations.stacked_cache import Member, StackedCache
from samkv_integrations.static_decode import static_unsupported

__all__ = ["BatchedDecoder", "DecodeBatcher", "LoneDecoder", "batcher_for", "runs_plain_step"]

logger = logging.getLogger(__name__)

#: How long a step waits for the answers of the previous step to ask for their next token.
GATHER_S = 0.01
#: How long the worker thread waits, with no answer in flight, before it ends.
IDLE_S = 1.0


def runs_plain_step(decoder: Decoder) -> bool:
    """Whether ``decoder`` runs the plain forward (``Decoder.step`` not overridden)."""
    return type(decoder).step is Decoder.step


class BatchedDecoder(Decoder):
    """The plain decode step, run by a ``DecodeBatcher`` together with other answers' steps.

    One instance serves one answer; ``close`` it when the answer ends (``DecodeBatcher.deltas``
    does). Its first ``step`` moves the answer's KV out of ``cache`` into the batch and leaves
    ``cache`` empty: later steps do not extend it (as with the static decoder).
    """

    def __init__(self, batcher: DecodeBatcher, max_new_tokens: int) -> None:
        self._batcher = batcher
        self._member = Member(max_steps=max_new_tokens)

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """Feed ``token`` at global ``position`` in the next batched step; ``[vocab]`` logits."""
        if model is not self._batcher.model:
            raise ValueError("batched decoding: the decoder's batcher serves another model")
        return self._batcher.step(self._member, cache, token, position)

    def close(self) -> None:
        """Leave the batch (idempotent)."""
        self._batcher.leave(self._member)


class LoneDecoder(Decoder):
    """An answer's steps on its own decoder until others decode in the batch; then in it.

    At the first step after answers start batching, ``alone`` hands the KV it holds back to
    the answer's cache and a ``BatchedDecoder`` takes over the steps left; the tokens are
    those of either decoder alone. ``close`` it when the answer ends.
    """

    def __init__(self, batcher: DecodeBatcher, alone: Decoder, max_new_tokens: int) -> None:
        self._batcher = batcher
        self._alone = alone
        self._steps_left = max_new_tokens
        self._batched: BatchedDecoder | None = None

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """Feed ``token`` at global ``position``, alone or in the batch; ``[vocab]`` logits."""
        if self._batched is None and self._batcher.batching():
            self._alone.hand_back(cache)
            self._batched = BatchedDecoder(self._batcher, self._steps_left)
        if self._batched is not None:
            return self._batched.step(model, cache, token, position)
        self._steps_left -= 1
        return self._alone.step(model, cache, token, position)

    def close(self) -> None:
        """Leave the batch if it joined one (idempotent)."""
        if self._batched is not None:
            self._batched.close()


class DecodeBatcher:
    """Runs the decode steps of concurrent answers as one forward each (see the module doc).

    Args:
        model: The model (all of its cache layers full attention, ``sdpa`` or ``eager``).
        lock: The engine's model lock, held for each step (and for each prefill elsewhere);
            a ``FairLock``, so that a waiting prefill goes before the next step.
        max_batch: Most answers in one step; more wait for a free row.
        gather_s: How long a step waits for the previous step's answers to ask again.
        graphs: Replay each stack's step as a CUDA graph once it has lived a few steps.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lock: AbstractContextManager[Any],
        *,
        max_batch: int = 64,
        gather_s: float = GATHER_S,
        graphs: bool = False,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        reason = static_unsupported(model)
        if reason is not None:
            raise ValueError(f"batched decoding: {reason}")
        device = next(model.parameters()).device
        if graphs and device.type != "cuda":
            raise ValueError(f"batched decoding: CUDA graphs need CUDA; the model is on {device}")
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._lock = lock
        # Two conditions on one lock: the worker waits on ``_cond`` (a step asked for, an answer
        # left), the answers on ``_answered`` (their logits). With one, every request would
        # wake every answer still waiting: O(answers²) wake-ups per step, each taking the GIL.
        mutex = threading.RLock()
        self._cond = threading.Condition(mutex)
        self._answered = threading.Condition(mutex)
        self._pending: list[Member] = []
        self._open = 0
        self._in_flight = 0  # answers decoding, batched or alone
        self._worker: threading.Thread | None = None
        self._stack = StackedCache(model, graphs=graphs)  # touched only by the worker thread
        self._stopping = False
        _BATCHERS.add(self)

    def deltas(
        self,
        tokenizer: PreTrainedTokenizerBase,
        cache: DynamicCache,
        logits: torch.Tensor,
        position: int,
        options: GenerationOptions,
        ids: list[int],
        alone: Decoder | None = None,
    ) -> Iterator[str]:
        """``generate_deltas`` (same arguments) in the batch, or with ``alone`` until others come.

        Given ``alone`` (the engine's one-at-a-time decoder: CUDA graphs where on), an answer
        that starts while no other decodes steps with it, so a single user loses nothing to
        batching. It counts as in flight, so the answers that start meanwhile batch, and
        once they do it hands its KV back (``Decoder.hand_back``) and joins them: two
        streams of steps would take turns on the model instead of sharing one forward.
        """
        with self._cond:
            solo = alone is not None and self._in_flight == 0
            self._in_flight += 1
        try:
            decoder: BatchedDecoder | LoneDecoder = (
                LoneDecoder(self, alone, options.max_new_tokens)
                if solo and alone is not None
                else BatchedDecoder(self, options.max_new_tokens)
            )
            try:
                yield from generate_deltas(
                    self.model, tokenizer, cache, logits, position, options, ids, decoder
                )
            finally:
                decoder.close()
        finally:
            with self._cond:
                self._in_flight -= 1

    def step(self, member: Member, cache: DynamicCache, token: int, position: int) -> torch.Tensor:
        """Queue ``member``'s step and wait for its ``[vocab]`` logits (called by its thread)."""
        if not member._joined:
            member.kv = self._take_kv(cache)
            member._joined = True
            with self._cond:
                self._open += 1
        with self._cond:
            if not member.open:
                raise member.error or ValueError("batched decoding: this answer left the batch")
            if member.steps_done >= member.max_steps:
                raise ValueError(f"max_new_tokens: the decoder was sized for {member.max_steps}")
            member.request, member.logits, member.error = (token, position), None, None
            self._pending.append(member)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="samkv-decode", daemon=True)
                self._worker.start()
            self._cond.notify_all()
            while member.logits is None and member.error is None:
                self._answered.wait()
            logits, error = member.logits, member.error
            member.logits = None
        if error is not None:
            raise error
        if logits is None:  # the loop above ends only with one of them set
            raise RuntimeError("batched decoding: no logits")
        return logits

    def batching(self) -> bool:
        """Whether answers decode in the batch now (or have asked for a step)."""
        with self._cond:
            return self._open > 0 or bool(self._pending)

    def leave(self, member: Member) -> None:
        """End ``member``'s decoding; its rows are dropped at the next rebuild."""
        with self._cond:
            if member.open and member._joined:
                self._open -= 1
            member.open, member.kv = False, None
            self._cond.notify_all()

    def _take_kv(self, cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Check ``cache`` fits the model, take its tensors and leave it empty."""
        tensors = layer_tensors(cache)
        device = next(self.model.parameters()).device
        expected = len(DynamicCache(config=self.model.config).layers)
        if len(tensors) != expected:
            raise ValueError(f"batched decoding: cache has {len(tensors)} layers, model {expected}")
        for i, (keys, values) in enumerate(tensors):
            if keys.shape[0] != 1 or keys.shape[:3] != values.shape[:3] or keys.shape[2] < 1:
                raise ValueError(
                    f"batched decoding: cache layer {i} holds keys {tuple(keys.shape)} and "
                    f"values {tuple(values.shape)}; expected [1, heads, n >= 1, dim] each"
                )
            if keys.device != device or keys.dtype != self.model.dtype:
                raise ValueError(
                    f"batched decoding: cache layer {i} is {keys.dtype} on {keys.device}; "
                    f"the model is {self.model.dtype} on {device}"
                )
        # The batch holds the only copy from here: free the request's tensors as rows move.
        for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
            emptied = cast(DynamicLayer, layer)  # layer_tensors checked it holds tensors
            emptied.keys, emptied.values = keys[:, :, :0].clone(), values[:, :, :0].clone()
        return tensors

    def _loop(self) -> None:
        """The worker: gather a step's answers, run it, hand out the logits, until idle."""
        while True:
            batch = self._gather()
            if batch is None:
                return
            stacked = list(self._stack.rows)
            try:
                with self._lock, torch.inference_mode():
                    batch = self._take(batch)  # and whoever asked while it waited for the lock
                    logits = self._stack.step(batch)
            except Exception as e:  # a failed step fails the answers it held, never the worker
                logger.warning("batched decode step of %d answers failed: %s", len(batch), e)
                lost = {*batch, *(m for m in stacked if m.kv is None)}
                self._stack.drop()
                with self._cond:
                    for member in lost:
                        self._open -= member.open
                        member.open, member.error, member.kv, member.row = False, e, None, -1
                    self._answered.notify_all()
                continue
            with self._cond:
                for member in batch:
                    member.logits = logits[member.row]
                    member.steps_done += 1
                self._answered.notify_all()

    @property
    def steps(self) -> int:
        """Forwards run so far (for tests and logs)."""
        return self._stack.steps

    def counts(self) -> dict[str, int]:
        """Forwards run, stack rebuilds and CUDA graph captures so far (for load tests)."""
        stack = self._stack
        return {"steps": stack.steps, "rebuilds": stack.rebuilds, "captures": stack.captures}

    def stop(self) -> None:
        """End the worker (at exit: a daemon worker left waiting can abort the process)."""
        with self._cond:
            self._stopping = True
            worker = self._worker
            self._cond.notify_all()
        if worker is not None:
            worker.join(timeout=10)

    def _gather(self) -> list[Member] | None:
        """The answers of the next step, or ``None`` once nothing is in flight for ``IDLE_S``."""
        with self._cond:
            while not self._pending or self._stopping:
                if self._stopping:
                    for member in self._pending:
                        member.error = RuntimeError("batched decoding: the interpreter is exiting")
                    self._pending, self._worker = [], None
                    self._answered.notify_all()
                    return None
                if not any(m.open for m in self._stack.rows):
                    self._stack.drop()  # nobody decodes on it any more: free it now
                idle = self._open == 0
                if not self._cond.wait(IDLE_S) and idle and self._open == 0 and not self._pending:
                    self._worker = None
                    return None
            # Wait briefly for the rows of the last step, so the batch (and cache) stays put.
            deadline = time.monotonic() + self.gather_s
            while len(self._pending) < self.max_batch:
                missing = [m for m in self._stack.rows if m.open and m not in self._pending]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    break
                self._cond.wait(left)
            return self._take([])

    def _take(self, batch: list[Member]) -> list[Member]:
        """``batch`` topped up from the waiting steps: rows of the last step first, to ``max_batch``."""
        with self._cond:
            order = {id(m): i for i, m in enumerate(self._stack.rows)}
            ranked = sorted(self._pending, key=lambda m: order.get(id(m), len(order)))
            batch = batch + ranked[: self.max_batch - len(batch)]
            self._pending = [m for m in self._pending if m not in batch]
            return batch


_BATCHERS: weakref.WeakSet[DecodeBatcher] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for batcher in list(_BATCHERS):
        batcher.stop()


def batcher_for(
    model: PreTrainedModel,
    lock: AbstractContextManager[Any],
    enabled: bool,
    max_batch: int,
    *,
    graphs: bool = False,
) -> DecodeBatcher | None:
    """The engine's batcher: ``None`` when off, or when the model's cache cannot be stacked.

    ``graphs``: the engine's resolved ``decode_graphs`` (on only for a CUDA model).
    """
    if not enabled:
        return None
    reason = static_unsupported(model)
    if reason is not None:
        logger.info("decoding answers one at a time: %s", reason)
        return None
    return DecodeBatcher(model, lock, max_batch=max_batch, graphs=graphs)
