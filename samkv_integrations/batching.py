"""Decode steps of concurrent answers, run together: one forward per step for all of them.

A step costs about the same for one answer as for sixteen (issue 16). Each answer arrives,
once prefilled, with its own compact cache (its length, positions with gaps); its
``generate_deltas`` runs in its own thread with a ``BatchedDecoder``, and one worker thread
runs the waiting steps as one forward on the answers' stacked KV (``StackedCache``):

- A greedy answer hands the worker its run (``Decoder.run_ahead``): after each step the
  worker picks every greedy answer's next token at once (one argmax, one copy to the host)
  and launches the next step before waking their threads, which read, detokenize and stop
  while it runs; the GPU no longer waits for each answer's Python between steps.
- A sampled answer hands over ``(token, position)`` and waits for its logits.

Answers join and leave between steps; one slow to ask (after ``gather_s``) sits a step out
in its row, hidden from itself, so a stack is rebuilt only as ``StackedCache.step`` says.

Prefills are not batched: each is long and of its own shape, serialized under the engine's
model lock, which the worker holds for each step too; a waiting prefill goes first.

transformers' continuous batching (``generate_batch``, paged caches) is not used: it
prefills token ids into its own cache with positions that follow it, and has no entry point
for caches the methods built (kept tokens only, positions with gaps).

Which answers join and how: ``batch_decoders``. A new stack waits for every answer in flight
or announced (``announce``), so that none joins it right after it is built.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from samkv_integrations.batch_decoders import BatchedDecoder, LoneDecoder
from samkv_integrations.decode import Decoder, GenerationOptions, GreedyRun, generate_deltas
from samkv_integrations.fair_lock import FairLock
from samkv_integrations.greedy_picks import hand_over, pick_greedy
from samkv_integrations.model_lock import ModelLock
from samkv_integrations.stacked_cache import Member, StackedCache, take_kv
from samkv_integrations.static_decode import static_unsupported

__all__ = ["DecodeBatcher"]

logger = logging.getLogger(__name__)

#: How long a step waits for the answers of the previous step to ask for their next token.
GATHER_S = 0.01
#: How long a new stack waits for an announced answer (``announce``) to ask for its first step,
#: rather than be rebuilt when it joins: a step launched meanwhile would follow its prefill anyway.
ARRIVING_S = 1.0
#: How long the worker thread waits, with no answer in flight, before it ends.
IDLE_S = 1.0


class DecodeBatcher:
    """Runs the decode steps of concurrent answers as one forward each (see the module doc).

    Args:
        model: The model (all of its cache layers full attention, ``sdpa`` or ``eager``).
        lock: The engine's model lock, held for each step (and for each prefill elsewhere);
            a ``FairLock`` (reentrant), so that a waiting prefill goes before the next step.
        max_batch: Most answers in one step; more wait for a free row.
        gather_s: How long a step waits for the previous step's answers to ask again.
        graphs: Replay each stack's step as a CUDA graph once it has lived a few steps, or
            at once when every answer in flight is in it and no prefill waits.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lock: ModelLock | FairLock,
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
        self.model_lock = lock
        # Two conditions on one lock: the worker waits on ``_cond`` (a step asked for, an answer
        # left), the answers on ``_answered`` (their logits). With one, every request would
        # wake every answer still waiting: O(answers²) wake-ups per step, each taking the GIL.
        mutex = threading.RLock()
        self._cond = threading.Condition(mutex)
        self._answered = threading.Condition(mutex)
        self._pending: list[Member] = []
        self._open = 0
        self._in_flight = 0  # answers decoding, batched or alone
        self._arriving = 0  # answers announced, not yet decoding
        self._finished = 0  # of those, greedy runs the worker ended, their threads still reading
        self._worker: threading.Thread | None = None
        self._unwoken = False  # greedy picks handed out, their threads woken after the next launch
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
        *,
        announced: bool = False,
    ) -> Iterator[str]:
        """``generate_deltas`` (same arguments) in the batch, or with ``alone`` until others come.

        An answer that starts while no other decodes or comes steps with ``alone``
        (``LoneDecoder``); it counts as in flight, so later ones batch, and it joins them once
        they do. ``announced``: ``announce`` was called for it.
        """
        with self._cond:
            self._arriving -= announced
            solo = alone is not None and self._in_flight == self._arriving == 0
            self._in_flight += 1
            self._cond.notify_all()  # a worker waiting for it now waits as for any other
        decoder: BatchedDecoder | LoneDecoder = (  # plain constructors: nothing to undo
            LoneDecoder(self, alone, options.max_new_tokens)
            if solo and alone is not None
            else BatchedDecoder(self, options.max_new_tokens)
        )
        try:
            yield from generate_deltas(
                self.model, tokenizer, cache, logits, position, options, ids, decoder
            )
        finally:
            try:
                decoder.close()
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

    def announce(self) -> None:
        """Count an answer whose prefill just ended (lock held) as coming (``ARRIVING_S``)."""
        with self._cond:
            self._arriving += 1

    def withdraw(self) -> None:
        """An announced answer failed before decoding: it is not coming."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def step(self, member: Member, cache: DynamicCache, token: int, position: int) -> torch.Tensor:
        """Queue ``member``'s step and wait for its ``[vocab]`` logits (called by its thread)."""
        self._join(member, cache)
        with self._cond:
            self._ask(member, token, position)
            while member.logits is None and member.error is None:
                self._answered.wait()
            logits, error = member.logits, member.error
            member.logits = None
        if error is not None:
            raise error
        if logits is None:  # the loop above ends only with one of them set
            raise RuntimeError("batched decoding: no logits")
        return logits

    def run_ahead(
        self, member: Member, cache: DynamicCache, token: int, position: int, run: GreedyRun
    ) -> Iterator[int]:
        """``member``'s greedy tokens, picked by the worker (``Decoder.run_ahead``)."""
        self._join(member, cache)
        with self._cond:
            if run.tokens > member.max_steps - member.steps_done:
                raise ValueError(f"max_new_tokens: the decoder was sized for {member.max_steps}")
            self._ask(member, token, position)  # the worker sees the run once _cond is free
            member.run, member.finished, member.run_start = run, False, member.steps_done
            member.run_until = member.steps_done + run.tokens
        while True:
            with self._cond:
                while not member.picked and member.error is None and not member.finished:
                    self._answered.wait()
                if not member.picked:  # tokens picked before an error still count
                    if member.finished:
                        return
                    raise cast(BaseException, member.error)
                picked = member.picked.popleft()
            yield picked

    def _join(self, member: Member, cache: DynamicCache) -> None:
        """Move the answer's KV out of ``cache`` at its first step (its thread, no lock held)."""
        if not member._joined:
            member.kv = take_kv(self.model, cache)
            member._joined = True
            with self._cond:
                self._open += 1

    def _ask(self, member: Member, token: int, position: int) -> None:
        """Queue ``member``'s step on ``token`` at ``position`` (under ``_cond``)."""
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

    def batching(self) -> bool:
        """Whether answers decode in the batch now (or have asked for a step)."""
        with self._cond:
            return self._open > 0 or bool(self._pending)

    def leave(self, member: Member) -> None:
        """End ``member``'s decoding; its rows are dropped at the next rebuild."""
        with self._cond:
            if member.open and member._joined:
                self._open -= 1
            if member.finished and not member.closed:
                self._finished -= 1
            member.closed = True
            queued = member in self._pending  # a greedy run's next step, queued by the worker
            if queued:  # a new list: a worker iterating the old one (even via GC) is unharmed
                self._pending = [m for m in self._pending if m is not member]
            # A step the worker took already moves its KV into the stack; else none reads it.
            member.open, member.kv = False, None if queued or member.row >= 0 else member.kv
            self._cond.notify_all()

    def _loop(self) -> None:
        """The worker: gather a step's answers, run it, hand out logits or tokens, until idle."""
        while True:
            batch = self._gather()
            if batch is None:
                return
            stacked = list(self._stack.rows)
            try:
                logits = self._locked_step(batch)
                if logits is None:  # every answer taken had left meanwhile
                    continue
                self._wake()  # the tokens of the last step, now that this one runs
                greedy = [m for m in batch if m.run is not None]
                picks = pick_greedy(greedy, logits) if greedy else []
            except Exception as e:  # a failed step fails the answers it held, never the worker
                logger.warning("batched decode step of %d answers failed: %s", len(batch), e)
                lost = {*batch, *(m for m in stacked if m.kv is None)}
                self._stack.drop()
                with self._cond:
                    for member in lost - {m for m in lost if m.finished or m.closed}:
                        self._open -= member.open
                        member.open, member.error, member.kv, member.row = False, e, None, -1
                    self._pending = [m for m in self._pending if m not in lost]
                    self._unwoken = False
                    self._answered.notify_all()
                continue
            with self._cond:
                for member in batch:
                    member.steps_done += 1
                    if member.run is None:
                        member.logits = logits[member.row]
                for member, token in zip(greedy, picks, strict=True):
                    was_open = member.open
                    if hand_over(member, token):
                        self._pending.append(member)
                    elif was_open:  # its run ended: it asks no more, its thread reads on
                        self._open, self._finished = self._open - 1, self._finished + 1
                if len(greedy) < len(batch):  # an answer that picks its own tokens waits
                    self._answered.notify_all()
                else:
                    self._unwoken = True

    def _locked_step(self, batch: list[Member]) -> torch.Tensor | None:
        """Under the model lock, top ``batch`` up in place and launch its step: logits, or ``None``.

        If a prefill holds the lock, the last picks go out before the worker waits for it. The
        stack is captured at once only if no one else waits for it (a prefill brings a joiner).
        """
        if not self.model_lock.acquire(blocking=False):
            self._wake()
            self.model_lock.acquire()
        try:
            with self._cond:  # a new stack waits for every answer in flight or coming
                self._wait_while(
                    lambda: (
                        not self._stack.rows and len(batch) + len(self._pending) < self._asking()
                    ),
                    while_arriving=True,
                )
                settled = self._take(batch)  # whoever asked meanwhile: the caller sees them too
            settled = settled and not self.model_lock.waiting()
            with torch.inference_mode():
                return self._stack.step(batch, settled) if batch else None
        finally:
            self.model_lock.release()

    def _wake(self) -> None:
        """Wake the greedy answers handed tokens at the last step (no-op if none were)."""
        with self._cond:
            if self._unwoken:
                self._unwoken = False
                self._answered.notify_all()

    @property
    def steps(self) -> int:
        """Forwards run so far (for tests and logs)."""
        return self._stack.steps

    def counts(self) -> dict[str, int]:
        """Forwards run, stack rebuilds and CUDA graph captures so far (for load tests)."""
        return {name: getattr(self._stack, name) for name in ("steps", "rebuilds", "captures")}

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
                self._wake()  # no step to launch first: hand the picks out now
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
            # Wait briefly for the rows of the last step, so the batch (and cache) stays put;
            # a new stack waits as briefly for every answer in flight. Picks go out first.
            if self._expecting():
                self._wake()
            self._wait_while(lambda: len(self._pending) < self.max_batch and self._expecting())
            batch: list[Member] = []
            self._take(batch)
            return batch

    def _wait_while(self, waiting: Callable[[], bool], while_arriving: bool = False) -> None:
        """Wait while ``waiting()``: ``gather_s``, or ``ARRIVING_S`` while answers are arriving."""
        start = time.monotonic()
        deadline, arriving = start + self.gather_s, False
        while waiting():
            now = time.monotonic()
            if while_arriving and self._arriving > 0:
                deadline, arriving = start + max(ARRIVING_S, self.gather_s), True
            elif arriving:  # the last one came: from now on it is waited for as any other
                deadline, arriving = min(deadline, now + self.gather_s), False
            if deadline <= now:
                return
            self._cond.wait(deadline - now)

    def _expecting(self) -> bool:
        """Whether an open row of the last step (new stack: an answer in flight) has yet to ask."""
        if self._stack.rows:
            return any(m.open and m not in self._pending for m in self._stack.rows)
        return len(self._pending) < self._asking()

    def _asking(self) -> int:
        """Answers in flight or coming that may still ask for a step (under ``_cond``)."""
        return self._in_flight - self._finished + self._arriving

    def _take(self, batch: list[Member]) -> bool:
        """Top ``batch`` up in place (last step's rows first); whether it holds all in flight."""
        with self._cond:
            order = {id(m): i for i, m in enumerate(self._stack.rows)}
            live = [m for m in self._pending if not m.closed]  # closed even by GC, meanwhile
            ranked = sorted(live, key=lambda m: order.get(id(m), len(order)))
            batch.extend(ranked[: self.max_batch - len(batch)])
            self._pending = [m for m in self._pending if m not in batch and not m.closed]
            return len(batch) == self._asking()


_BATCHERS: weakref.WeakSet[DecodeBatcher] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for batcher in list(_BATCHERS):
        batcher.stop()
