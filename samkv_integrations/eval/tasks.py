"""Eval tasks: what is asked of the model about each question of a data file.

``qa`` (the default) asks the question as written and expects a short span, cut at the
first newline. ``summarize`` turns the same question into a long-answer prompt over the
same documents, so that a method's errors can pile up over a long generation (issue 15's
long-answer measurement); the reference for such answers is full recompute's own answer,
not the gold span, so the runs are scored with ``metrics.token_agreement_full`` and
``metrics.rouge_l_full`` against full's answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from samkv_integrations.eval.data import Question

__all__ = ["DEFAULT_TASK", "SUMMARIZE_TEMPLATE", "TASKS", "Task", "get_task"]

#: The long-answer prompt; ``{question}`` is the data file's question text.
SUMMARIZE_TEMPLATE = "Summarize what the documents say about: {question}"


@dataclass(slots=True, frozen=True)
class Task:
    """One way of turning a data file's questions into prompts.

    Attributes:
        name: The task's name (``--task``).
        template: The prompt, with ``{question}`` standing for the question text.
        max_new_tokens: The answer length cap when the caller gives none.
        stop: Strings that end an answer (the answer is cut before the first one).
    """

    name: str
    template: str
    max_new_tokens: int
    stop: tuple[str, ...]

    def prompt(self, question: str) -> str:
        """The prompt asked for ``question``."""
        return self.template.format(question=question)

    def rewrite(self, questions: Sequence[Question]) -> list[Question]:
        """The questions with their text replaced by this task's prompt.

        Ids, documents and gold answers are unchanged, so gold-answer metrics are still
        computed.
        """
        return [dataclasses.replace(q, question=self.prompt(q.question)) for q in questions]


TASKS: dict[str, Task] = {
    # HotpotQA answers are short spans; what a small model adds after a newline is
    # commentary that would only dilute F1.
    "qa": Task("qa", "{question}", max_new_tokens=32, stop=("\n",)),
    # No stop string: a summary spans lines, and the measurement wants the whole
    # max_new_tokens (or up to end of sequence) from every method.
    "summarize": Task("summarize", SUMMARIZE_TEMPLATE, max_new_tokens=256, stop=()),
}
DEFAULT_TASK = "qa"


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: No such task; the message lists the known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None
