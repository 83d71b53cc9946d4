"""Prompt framing: the one place that decides which token ids a prompt is made of.

The assembled prompt is ``[prefix | doc_1 | ... | doc_D | question suffix]``. Each part is
tokenized on its own, so a document's token ids are the same wherever it is placed: that
is what lets a document's KV cache be computed once and reused behind any other documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the documents. "
    "Give a short, direct answer."
)
_DOCS_MARK = "\u2063SAMKV-DOCS\u2063"
_QUESTION_MARK = "\u2063SAMKV-QUESTION\u2063"


@dataclass(slots=True, frozen=True)
class PromptFramer:
    """Frames the shared prefix, each document and the question for one tokenizer.

    With a chat template, the prefix is the system turn plus the start of the user turn,
    and the question suffix closes the user turn and opens the assistant's; a base model
    without a template gets plain text framing.

    Examples:
        >>> framer = PromptFramer.for_tokenizer(tokenizer)  # doctest: +SKIP
        >>> ids = framer.prefix_ids() + framer.document_ids("A doc.") + framer.question_ids("Q?")
    """

    tokenizer: PreTrainedTokenizerBase
    prefix_text: str
    question_template: str

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, system_prompt: str = SYSTEM_PROMPT
    ) -> PromptFramer:
        """Derive the framing from the tokenizer's chat template, or plain text without one."""
        user_turn = f"Read the documents, then answer.\n\n{_DOCS_MARK}{_QUESTION_MARK}"
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [
                    {"role": "system", "content": system_prompt},
                    {"role": "user", "content": user_turn},
                ],
                tokenize=False,
                add_generation_prompt=True,
            )
            if not isinstance(rendered, str):
                raise ValueError("the tokenizer's chat template did not render to a string")
            prefix_text, rest = rendered.split(_DOCS_MARK)
            _, after_question = rest.split(_QUESTION_MARK)
            question_template = "Question: {question}" + after_question
        else:
            prefix_text = f"{system_prompt}\n\n" + user_turn.split(_DOCS_MARK)[0]
            question_template = "Question: {question}\nAnswer:"
        return cls(tokenizer, prefix_text, question_template)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_ids(self) -> list[int]:
        """Token ids of the shared prefix, starting with BOS where the tokenizer uses one."""
        ids = self._encode(self.prefix_text)
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and self.tokenizer("x")["input_ids"][:1] == [bos]
        if adds_bos and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def document_ids(self, text: str) -> list[int]:
        """Token ids of one framed document; identical wherever the document is placed."""
        return self._encode(f"Document: {checked_text(text, 'document text').strip()}\n\n")

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the question suffix, ending with the generation prompt."""
        return self._encode(
            self.question_template.format(question=checked_text(question, "question").strip())
        )


def checked_text(value: object, field: str) -> str:
    """``value``, once it is a non-blank ``str`` a tokenizer can take.

    A lone surrogate (U+DC80 is what Python makes of an undecodable byte in ``argv``) is
    not text any tokenizer can take.

    Raises:
        TypeError: Not a ``str`` (an int, ``bytes``, ``None``...); the message names ``field``.
        ValueError: Empty, or holding a lone surrogate (not text: no tokenizer encodes it).
    """
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{field} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{field} is not valid text: {e.reason} ({value[e.start]!a} at character {e.start})"
        ) from None
    return value


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a plain chat (``role``/``content`` dicts), ending with the generation prompt.

    Rendered by the tokenizer's chat template; a tokenizer without one gets ``role: content``
    paragraphs and an ``assistant:`` cue.
    """
    if not messages or isinstance(messages, str):
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, Mapping) and all(isinstance(m.get(k), str) for k in ("role", "content"))
        ):
            raise ValueError(f"messages[{i}] must be a dict of 'role' and 'content' strings: {m!r}")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
    return list(tokenizer(text)["input_ids"])
