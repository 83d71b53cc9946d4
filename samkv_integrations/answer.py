"""What the engine returns: an answer, or an answer being streamed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from samkv_integrations.methods.base import DecodeState
from samkv_integrations.records import MethodStats


@dataclass(slots=True)
class Answer:
    """A generated answer and how it was produced.

    Attributes:
        text: The answer text.
        stats: What the method kept and recomputed, and the time per phase.
        token_ids: The generated token ids.
        first_token_logprobs: ``[vocab]`` log-probabilities of the first answer token.
        kept_indices: Per document, the local indices of the tokens kept for decoding.
        details: Method-specific facts (e.g. SamKV's anchors), for display.
    """

    text: str
    stats: MethodStats
    token_ids: list[int] = field(default_factory=list)
    first_token_logprobs: torch.Tensor | None = None
    kept_indices: list[list[int]] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)

    def describe(
        self,
        method: str,
        state: DecodeState,
        *,
        context_tokens: int,
        recomputed_documents: int,
    ) -> None:
        """Fill in stats, kept indices, details and first-token log-probs from ``state``.

        Args:
            method: The method's name.
            state: The state decoding starts from (after the method's after-question stage).
            context_tokens: Document tokens in the assembled layout.
            recomputed_documents: Documents encoded on the spot.
        """
        self.stats = MethodStats(
            method=method,
            context_tokens=context_tokens,
            kept_tokens=[len(k) for k in state.kept_indices],
            recomputed_tokens=state.recomputed_tokens,
            seconds=dict(state.seconds),  # the engine's phases, ``load`` first
            recomputed_documents=recomputed_documents,
        )
        self.first_token_logprobs = torch.log_softmax(state.first_logits.float(), -1).cpu()
        self.kept_indices = [k.tolist() for k in state.kept_indices]
        self.details = state.details


class AnswerStream:
    """An answer being generated: iterate for text deltas.

    ``stats``, ``kept_indices`` and ``first_token_logprobs`` are set once the first delta is
    produced; ``text`` holds the whole answer once iteration ends.
    """

    def __init__(self, deltas: Iterator[str], answer: Answer) -> None:
        self._deltas = deltas
        self.answer = answer

    def __iter__(self) -> Iterator[str]:
        for delta in self._deltas:
            self.answer.text += delta
            yield delta

    @property
    def text(self) -> str:
        """Text generated so far."""
        return self.answer.text

    @property
    def stats(self) -> MethodStats:
        """The method's stats (complete once the first delta has been produced)."""
        return self.answer.stats
