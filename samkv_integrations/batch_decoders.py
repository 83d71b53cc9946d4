"""The decoders an answer steps with while the decode batcher serves it (``batching``).

``BatchedDecoder`` hands every step to the batch; ``LoneDecoder`` steps alone until others
batch, then joins them. Both leave stop strings and detokenizing to
``decode.generate_deltas``, and token picking too for sampled answers; the batch's worker
picks greedy answers' tokens (``Decoder.run_ahead``).

Only decoders that run the plain step join (``runs_plain_step``); a method's own decoder
(``+decode=retro``) keeps the one-at-a-time path. An answer with nobody to batch with takes
the engine's one-at-a-time path (CUDA graphs where on) until others start batching, and
then joins them (``LoneDecoder``), so a single user loses nothing to batching.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.decode import Decoder, GreedyRun
from samkv_integrations.stacked_cache import Member
from samkv_integrations.static_decode import static_unsupported

if TYPE_CHECKING:
    from samkv_integrations.batching import DecodeBatcher

__all__ = [
    "BatchedDecoder",
    "LoneDecoder",
    "decode_batchable",
    "runs_plain_step",
    "withdrawn_on_error",
]

logger = logging.getLogger(__name__)


def decode_batchable(model: PreTrainedModel) -> bool:
    """Whether the answers of ``model`` can decode in a batch (its cache layers stack)."""
    reason = static_unsupported(model)
    if reason is not None:
        logger.info("decoding answers one at a time: %s", reason)
    return reason is None


@contextlib.contextmanager
def withdrawn_on_error(batcher: DecodeBatcher | None) -> Iterator[None]:
    """Withdraw the answer ``announce``d to ``batcher`` if the block fails before it decodes."""
    try:
        yield
    except BaseException:
        if batcher is not None:
            batcher.withdraw()
        raise


def runs_plain_step(decoder: Decoder) -> bool:
    """Whether ``decoder`` runs the plain forward (``Decoder.step`` not overridden)."""
    return type(decoder).step is Decoder.step


class BatchedDecoder(Decoder):
    """The plain decode step, run by a ``DecodeBatcher`` together with other answers' steps.

    One instance serves one answer; ``close`` it when the answer ends (``DecodeBatcher.deltas``
    does). Its first ``step`` or ``run_ahead`` moves the answer's KV out of ``cache`` into the
    batch and leaves ``cache`` empty: later steps do not extend it (as with the static decoder).
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

    def run_ahead(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int, run: GreedyRun
    ) -> Iterator[int]:
        """The greedy tokens after ``token`` (fed at ``position``), picked by the batch's worker."""
        if model is not self._batcher.model:
            raise ValueError("batched decoding: the decoder's batcher serves another model")
        return self._batcher.run_ahead(self._member, cache, token, position, run)

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
        while True:
            batched = self._joined(cache)
            if batched is not None:
                return batched.step(model, cache, token, position)
            # Asked again under the model lock: others may have started batching while this
            # step waited behind prefills for it, and a lone step would then hold them up.
            with self._batcher.model_lock:
                if not self._batcher.batching():
                    self._steps_left -= 1
                    return self._alone.step(model, cache, token, position)

    def run_ahead(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int, run: GreedyRun
    ) -> Iterator[int] | None:
        """The batch's stream of greedy tokens once others decode in it; ``None`` until then."""
        batched = self._joined(cache)
        return None if batched is None else batched.run_ahead(model, cache, token, position, run)

    def _joined(self, cache: DynamicCache) -> BatchedDecoder | None:
        """The batch's decoder, joined now if answers decode in the batch; else ``None``."""
        if self._batched is None and self._batcher.batching():
            self._alone.hand_back(cache)
            self._batched = BatchedDecoder(self._batcher, self._steps_left)
        return self._batched

    def close(self) -> None:
        """Leave the batch if it joined one (idempotent)."""
        if self._batched is not None:
            self._batched.close()
