"""How ``ChatSamKV`` reads a conversation: chat turns, or a question over document blocks.

Retrieved documents travel as ``text-plain`` content blocks in human messages (their
``extras`` hold the ``samkv_*`` tags). With any such block in the conversation, the last
human message's text is the question, earlier turns follow it as a transcript, and each
block becomes a cache reference derived from its current text.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage, ChatMessage

from langchain_samkv._tags import DTYPE_KEY
from samkv_integrations import CacheMismatchError, SamKVEngine
from samkv_integrations.lazy_engine import dtype_mismatch
from samkv_integrations.records import CacheRef, ref_from_metadata

#: The content block type that carries a retrieved document (LangChain v1 standard block).
DOCUMENT_BLOCK_TYPE = "text-plain"

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}
_SPEAKERS = {"user": "User", "assistant": "Assistant", "system": "System"}


class StaleCacheKeyWarning(UserWarning):
    """A document's ``samkv_cache_key`` does not match its text.

    The text was edited after its cache was computed, or the cache builder ran before a text
    splitter (every chunk then inherits its parent's key). ``ChatSamKV`` answers from the
    cache of the document's current text instead, encoding it on the spot when the store
    lacks it (counted in ``recomputed_documents``).
    """


@dataclass(slots=True)
class Request:
    """A parsed chat request: chat turns, and the question over documents if it has any.

    ``question`` is the last human message's text, followed by a transcript of the earlier
    turns when there are any (``_with_history``).
    """

    turns: list[dict[str, str]]
    question: str | None
    documents: list[dict[str, Any]]


def _text_of(message: BaseMessage) -> str:
    """The message's text, rejecting content this text-only model cannot read."""
    if isinstance(message.content, list):
        for block in message.content:
            kind = block.get("type") if isinstance(block, dict) else "text"
            if kind not in ("text", DOCUMENT_BLOCK_TYPE):
                raise ValueError(
                    f"ChatSamKV reads text only: a {message.type} message holds a {kind!r} "
                    "content block (images, audio and files are not supported)"
                )
            if kind == DOCUMENT_BLOCK_TYPE and message.type != "human":
                raise ValueError(
                    f"messages: a {message.type} message holds a {DOCUMENT_BLOCK_TYPE!r} "
                    "document block; documents go in human messages"
                )
    return message.text


def _with_history(question: str, history: list[dict[str, str]]) -> str:
    """The question, followed by a transcript of the earlier turns it may refer to (if any)."""
    if not history:
        return question
    transcript = "\n".join(
        f"{_SPEAKERS.get(t['role'], t['role'].title())}: {t['content'].strip()}" for t in history
    )
    return f"{question}\n\nThe conversation so far, for context:\n{transcript}"


def parse_messages(messages: Sequence[BaseMessage]) -> Request:
    """Split messages into chat turns, and the question over document blocks if any."""
    if not messages:
        raise ValueError("messages: ChatSamKV needs at least one message")
    turns: list[dict[str, str]] = []
    documents: list[dict[str, Any]] = []
    for message in messages:
        if message.type in ("tool", "function") or getattr(message, "tool_calls", None):
            raise NotImplementedError(
                "ChatSamKV does not support tool calling yet: tool calls and tool messages "
                "cannot be sent to it"
            )
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
        if role is None:
            raise ValueError(f"messages: unsupported message type {message.type!r}")
        text = _text_of(message)
        if isinstance(message.content, list):
            documents += [
                b
                for b in message.content
                if isinstance(b, dict) and b.get("type") == DOCUMENT_BLOCK_TYPE
            ]
        turns.append({"role": role, "content": text})
    if not documents:
        return Request(turns, None, [])
    if messages[-1].type != "human":
        raise ValueError(
            "messages: over document blocks, the last message is the question and must be a "
            f"human message; got {messages[-1].type!r} last"
        )
    question = turns[-1]["content"].strip()
    if not question:
        raise ValueError(
            "messages: the last human message has no question text (over document blocks, "
            "its text is the question)"
        )
    history = [t for t in turns[:-1] if t["content"].strip()]
    return Request(turns, _with_history(question, history), documents)


def document_refs(
    engine: SamKVEngine, blocks: list[dict[str, Any]], on_foreign_cache: str
) -> list[CacheRef]:
    """The cache refs of document blocks, each derived from the block's current text.

    A block tagged by another model keeps its tag, so that the engine refuses it (or
    re-encodes it, when asked); when the tags say it was written in another dtype, the
    error names the ``dtype`` that serves it. Any other block is answered from the cache of its text: a
    block without a tag, or whose tag no longer matches its text (``StaleCacheKeyWarning``,
    once per request), gets the key its text has under this engine, which the engine
    encodes on the spot if the store lacks it (and counts in ``recomputed_documents``).
    """
    refs, stale = [], 0
    for index, block in enumerate(blocks):
        text = block.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"document block {index}: a {DOCUMENT_BLOCK_TYPE!r} block needs its 'text'"
            )
        extras = block.get("extras") or {}
        tagged = ref_from_metadata(extras, text)
        if tagged is not None and tagged.model != engine.fingerprint:
            why = dtype_mismatch(engine, extras.get(DTYPE_KEY), on_foreign_cache=on_foreign_cache)
            if why is not None:
                raise CacheMismatchError(f"document block {index}: cache {tagged.key}: {why}")
            refs.append(tagged)
            continue
        ref = engine.cache_ref(text, label=index)
        stale += tagged is not None and tagged.key != ref.key
        refs.append(ref)
    if stale:
        warnings.warn(
            f"{stale} of {len(blocks)} documents carry a samkv_cache_key that does not match "
            "their text (edited after indexing, or tagged before a text splitter: run "
            "SamKVCacheBuilder after splitting); each is answered from the cache of its "
            "current text, encoded now if missing and counted in recomputed_documents",
            StaleCacheKeyWarning,
            stacklevel=2,
        )
    return refs
