"""Answering eval questions: one question with every method, by a model loaded in this process.

An :class:`AnswerJob` holds everything a process needs to answer questions (model,
store, device, methods, questions, generation settings) and nothing about the run
directory, so that it can be pickled to a worker process (``eval.workers``) as well as
run here (:class:`InProcess`). Both answerers have the same two steps: ``ready`` loads
the model and says what it is (:class:`EngineInfo`, for ``config.json`` and the
fingerprint check), then ``answer`` yields each question's rows as it completes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from samkv_integrations.eval.data import Question, pack_paragraphs
from samkv_integrations.eval.metrics import score_answer
from samkv_integrations.eval.tasks import TASKS
from samkv_integrations.methods.specs import MethodSpec

if TYPE_CHECKING:
    from samkv_integrations.engine import Answer, SamKVEngine

__all__ = ["STOP", "AnswerJob", "EngineInfo", "InProcess", "answer_question"]

logger = logging.getLogger(__name__)

#: The ``qa`` task's stop strings (``eval.tasks``): answers are cut at the first newline.
STOP = TASKS["qa"].stop

#: One question's scored rows, one per method in spec order; ``None``: too long, skipped.
Rows = list[dict[str, Any]] | None


@dataclass(slots=True, frozen=True)
class AnswerJob:
    """What a process needs to answer a run's questions (picklable).

    Attributes:
        model: Registry name, local path, hub id, or ``random:<shape>``.
        store: KV cache store directory or URL; ``None``: ``$SAMKV_HOME/kvcache``.
        device: The resolved device (``cpu``, ``cuda``, ``cuda:1``).
        specs: The methods, ``full`` first (the reference of ``agree_full`` and KL).
        questions: The run's questions; answerers take indices into this list.
        chunk_tokens: Pack paragraphs into documents of at most this many tokens.
        max_new_tokens: Greedy decoding stops after this many tokens or at ``stop``.
        stop: Strings that end an answer (the task's, ``eval.tasks``).
        discard_kv: Delete each question's document caches from the store once every
            method has answered it (``EvalConfig.discard_kv``).
    """

    model: str
    store: str | None
    device: str
    specs: Sequence[MethodSpec]
    questions: Sequence[Question]
    chunk_tokens: int | None
    max_new_tokens: int
    stop: tuple[str, ...] = STOP
    discard_kv: bool = False

    def engine(self) -> SamKVEngine:
        """Load the model and open the store."""
        from samkv_integrations.engine import SamKVEngine

        return SamKVEngine.from_pretrained(self.model, self.store, device=self.device)


@dataclass(slots=True, frozen=True)
class EngineInfo:
    """What a loaded engine is: recorded in ``config.json`` and checked on resume.

    Attributes:
        fingerprint: The engine's fingerprint (model and shared prefix).
        model_fingerprint: The model's own fingerprint.
        dtype: The weights' dtype, e.g. ``bfloat16``.
    """

    fingerprint: str
    model_fingerprint: str
    dtype: str

    @classmethod
    def of(cls, engine: SamKVEngine) -> EngineInfo:
        """The info of a loaded engine."""
        dtype = str(engine.model.dtype).removeprefix("torch.")
        return cls(engine.fingerprint, engine.model.fingerprint, dtype)


def answer_question(engine: SamKVEngine, question: Question, job: AnswerJob) -> Rows:
    """Every method's scored answer, or ``None`` when the prompt does not fit the model.

    Raises:
        ValueError: A method failed on this question; the message names both.
    """
    texts = [p.document_text for p in question.contexts]
    limit = engine.model.max_context
    try:
        documents = pack_paragraphs(texts, job.chunk_tokens, lambda t: len(engine.document_ids(t)))
        framer = engine.framer
        prompt = len(framer.prefix_ids()) + len(framer.question_ids(question.question))
        prompt += sum(len(engine.document_ids(d)) for d in documents)
        too_long = prompt + job.max_new_tokens > limit
        reason = f"{prompt} prompt tokens + max_new_tokens exceed the context of {limit}"
    except ValueError as e:  # a single document longer than the context
        too_long, reason = True, str(e)
    if too_long:
        # One long question should not sink a long run; every method skips it alike.
        logger.warning("skipping question %r: %s", question.id, reason)
        return None
    refs = engine.index(documents, progress=False)
    rows: list[dict[str, Any]] = []
    reference: Answer | None = None
    for spec in job.specs:
        try:
            answer = engine.answer(
                question.question,
                refs,
                method=spec.name,
                method_options=spec.all_options,
                max_new_tokens=job.max_new_tokens,
                stop=job.stop,
            )
        except ValueError as e:
            raise ValueError(f"question {question.id!r}, method {spec.label!r}: {e}") from e
        # parse_methods puts full first, so the reference exists before any other method.
        reference = reference or answer
        rows.append(score_answer(question, spec.label, answer, reference, len(documents)))
    if job.discard_kv:
        engine.delete_caches(refs)
    return rows


class InProcess:
    """Answer the questions one after another with a model loaded in this process."""

    def __init__(self, job: AnswerJob) -> None:
        self.job = job
        self._engine: SamKVEngine | None = None

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        # Drop the model with the run: a caller running several evals gets its memory back.
        self._engine = None

    def ready(self) -> EngineInfo:
        """Load the model; say what it is."""
        self._engine = self._engine or self.job.engine()
        return EngineInfo.of(self._engine)

    def answer(self, indices: Sequence[int]) -> Iterator[tuple[int, Rows]]:
        """``(index, rows)`` for each question index, in the order given."""
        if self._engine is None:
            raise RuntimeError("answer() before ready()")
        for index in indices:
            yield index, answer_question(self._engine, self.job.questions[index], self.job)
