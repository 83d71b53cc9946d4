"""The engine's model lock: one thread runs the model at a time, and SDPA skips cuDNN meanwhile.

Every use of the model takes it: prefills, indexing batches, decode steps (a lone answer's,
through ``LockedDecoder``, and the decode batcher's). It wraps a ``FairLock`` (with batched
decoding) or an ``RLock``.

**Why cuDNN attention is off while it is held (CUDA models).** PyTorch prefers cuDNN's
fused attention on Hopper GPUs. cuDNN builds an execution graph for each new combination of
batch, heads, query and key lengths and mask, and PyTorch keeps those graphs in a
*thread-local* cache. A RAG engine meets new shapes at nearly every request (question
lengths, kept tokens, document counts), and servers call it from pooled or fresh threads,
so it would build graphs on most prefills. Measured on one H200 (8B shape, random weights,
samkv at 15% kept, 8×2048, prefill phases summed;
``benchmarks/results/issue16-cudnn/cudnn-on-off-h200.txt``): 190 ms for a repeated shape,
312–1,255 ms for a question of a new length, 371–410 ms for the first prefill in a new
thread; with cuDNN attention off, 178–214 ms in each of those cases. The flash and
memory-efficient kernels need no per-shape setup.

Only cuDNN's flag is touched, and only while some engine holds its lock: backends a caller
narrowed (``torch.nn.attention.sdpa_kernel``) stay narrowed, and the flag is restored when
the last holder leaves. PyTorch keeps the flag process-wide, so another thread that runs
SDPA outside the engine meanwhile skips cuDNN as well: it falls back to another kernel, or
finds none if it allowed cuDNN alone; and its own ``sdpa_kernel`` block, if it overlaps a
holder, restores the flag as it found it (off) when it ends.
"""

from __future__ import annotations

import threading

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.decode import Decoder
from samkv_integrations.fair_lock import FairLock

__all__ = ["LockedDecoder", "ModelLock"]


class _CudnnAttentionOff:
    """Counts the engines holding their lock; cuDNN attention is off while any does."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._holders = 0
        self._was_enabled = True

    def enter(self) -> None:
        with self._guard:
            if self._holders == 0:
                self._was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
                torch.backends.cuda.enable_cudnn_sdp(False)
            self._holders += 1

    def leave(self) -> None:
        with self._guard:
            self._holders -= 1
            if self._holders == 0:
                torch.backends.cuda.enable_cudnn_sdp(self._was_enabled)


_CUDNN_ATTENTION_OFF = _CudnnAttentionOff()


class ModelLock:
    """A reentrant lock around model work that keeps cuDNN attention off while held.

    Args:
        lock: The reentrant lock that orders the holders (``FairLock`` or ``RLock``).
        skip_cudnn_attention: Turn SDPA's cuDNN backend off while held (for CUDA models;
            see the module doc).
    """

    def __init__(self, lock: FairLock | threading.RLock, *, skip_cudnn_attention: bool) -> None:
        self.lock = lock
        self.skip_cudnn_attention = skip_cudnn_attention
        # Changed only by the thread holding ``lock``. ``_switched`` remembers whether the
        # outermost entry counted itself a holder (the option may change while held).
        self._depth = 0
        self._switched = False

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; ``False`` if ``blocking`` is off and it is taken.

        A ``FairLock`` counts as taken while other threads wait for it, too.
        """
        if not self.lock.acquire(blocking):
            return False
        try:
            if self._depth == 0 and self.skip_cudnn_attention:
                _CUDNN_ATTENTION_OFF.enter()
                self._switched = True
        except BaseException:
            self.lock.release()
            raise
        self._depth += 1
        return True

    def release(self) -> None:
        """Release one level (cuDNN attention comes back with the outermost)."""
        try:
            if self._depth == 1 and self._switched:
                self._switched = False
                _CUDNN_ATTENTION_OFF.leave()
        finally:
            self._depth -= 1
            self.lock.release()

    def waiting(self) -> int:
        """Threads waiting for the lock now (an ``RLock`` does not say: 0)."""
        return self.lock.waiting() if isinstance(self.lock, FairLock) else 0

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockedDecoder(Decoder):
    """Runs another decoder's steps under the model lock, and nothing else.

    Token picking, detokenizing and the first token's delta (``generate_deltas``) happen
    outside it, so an answer's first text does not wait behind the prefills queued for
    the lock, and a stream may still be advanced from a different thread each time: the
    lock is never held across a ``yield``.
    """

    def __init__(self, inner: Decoder, lock: ModelLock) -> None:
        self.inner = inner
        self._lock = lock

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """``inner.step`` under the lock; ``[vocab]`` logits."""
        with self._lock:
            return self.inner.step(model, cache, token, position)

    def hand_back(self, cache: DynamicCache) -> None:
        """``inner.hand_back`` (it moves no data: no lock needed)."""
        self.inner.hand_back(cache)
