"""SamKVEngine: index documents into a KV cache store, answer questions from their caches."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from samkv_integrations.answer import Answer, AnswerStream
from samkv_integrations.argument_checks import (
    check_method_options,
    check_refs,
    check_sequence,
    check_token_ids,
)
from samkv_integrations.batch_decoders import decode_batchable, runs_plain_step, withdrawn_on_error
from samkv_integrations.batching import DecodeBatcher
from samkv_integrations.decode import Decoder, GenerationOptions, generate_deltas
from samkv_integrations.device_tier import DeviceTier
from samkv_integrations.encode import PrefixKV, encode_prefix, prefill
from samkv_integrations.fair_lock import FairLock
from samkv_integrations.framing import SYSTEM_PROMPT, PromptFramer, chat_ids
from samkv_integrations.indexing import Indexer
from samkv_integrations.methods import (
    DEFAULT_METHOD,
    BaseMethod,
    DecodeState,
    MethodInput,
    get_method,
)
from samkv_integrations.model_lock import LockedDecoder, ModelLock
from samkv_integrations.models import LoadedModel, load_model, samkv_home
from samkv_integrations.records import CacheRef, MethodStats
from samkv_integrations.resolve import KnownIds, OnForeignCache, RefLoader
from samkv_integrations.static_decode import DecodeGraphs, decode_graphs_for, with_graphs
from samkv_integrations.store import KVCacheStore, cache_key
from samkv_integrations.timing import Stopwatch

#: Called with the state decoding starts from (after the method's after-question stage).
Observer = Callable[[DecodeState], None]

#: Documents indexed from token ids whose ids the engine remembers (an LRU, by key).
KNOWN_IDS = 4096


class SamKVEngine:
    """Computes each document's KV cache once and answers questions from the caches.

    Examples:
        >>> from samkv_integrations import SamKVEngine
        >>> engine = SamKVEngine.from_pretrained()  # doctest: +SKIP
        >>> refs = engine.index(["Paris is the capital of France."])  # doctest: +SKIP
        >>> engine.answer("What is the capital of France?", refs, method="full").text  # doctest: +SKIP
        'Paris'
    """

    def __init__(
        self,
        model: LoadedModel,
        store: KVCacheStore,
        *,
        system_prompt: str = SYSTEM_PROMPT,
        batch_tokens: int = 8192,
        decode_graphs: DecodeGraphs = "auto",
        batch_decoding: bool = True,
        max_batch: int = 64,
        device_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        # Documents' KV kept on the device between answers, LRU (``device_tier``); 0: off.
        self.device_tier = DeviceTier(device_cache_bytes) if device_cache_bytes else None
        # Whether the plain decoder replays CUDA graphs on a static cache (``static_decode``):
        # "auto" on CUDA where supported (True off CUDA: an error); "compiled" compiles lone steps.
        self.decode_graphs = decode_graphs_for(model.model, decode_graphs)
        self.store = store
        self.framer = PromptFramer.for_tokenizer(model.tokenizer, system_prompt)
        self.batch_tokens = batch_tokens
        self._prefix: PrefixKV | None = None
        self._fingerprint: str | None = None
        self._known_ids = KnownIds(KNOWN_IDS)
        # Prefills run one at a time; answers in flight decode together (``batcher``; ``None``
        # when off), taking turns with prefills on a FIFO lock that keeps cuDNN attention off.
        self._lock = ModelLock(
            FairLock() if batch_decoding else threading.RLock(),
            skip_cudnn_attention=model.device.type == "cuda",
        )
        self.batcher: DecodeBatcher | None = None  # public for its ``counts()``
        if batch_decoding and decode_batchable(model.model):
            self.batcher = DecodeBatcher(
                model.model, self._lock, max_batch=max_batch, graphs=bool(self.decode_graphs)
            )

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] | LoadedModel | None = None,
        store: str | os.PathLike[str] | KVCacheStore | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> SamKVEngine:
        """Load a model (default: the embedded SmolLM2) and open a store (default: ``$SAMKV_HOME/kvcache``)."""
        if not isinstance(model, LoadedModel):
            model = load_model(model, device=device, dtype=dtype)
        if not isinstance(store, KVCacheStore):
            store = KVCacheStore(store if store is not None else samkv_home() / "kvcache")
        return cls(model, store, **kwargs)

    @property
    def fingerprint(self) -> str:
        """What every cache this engine writes is bound to: the model and the shared prefix.

        A document's KV depends on the prefix it was computed behind, so a change of system
        prompt or chat template must miss the store rather than reuse caches that no longer fit.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(self.model.fingerprint.encode())
            digest.update(json.dumps(self.framer.prefix_ids()).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def prefix(self) -> PrefixKV:
        """The shared prefix cache, computed on first use."""
        if self._prefix is None:
            self._prefix = encode_prefix(self.model.model, self.framer.prefix_ids())
        return self._prefix

    def document_ids(self, text: str, *, index: str | int = 0) -> list[int]:
        """Frame and tokenize one document, rejecting empty or over-long ones.

        ``index`` names the document in error messages.
        """
        try:
            ids = self.framer.document_ids(text)
        except ValueError as e:
            raise ValueError(f"document {index}: {e}") from e
        limit = self.model.max_context - len(self.framer.prefix_ids())
        if len(ids) >= limit:
            raise ValueError(
                f"document {index} is {len(ids)} tokens; the model's context "
                f"({self.model.max_context}) leaves {limit - 1} after the prompt prefix"
            )
        return ids

    def cache_ref(self, text: str, *, label: str | int = 0) -> CacheRef:
        """The reference under which this engine stores (or would store) the cache of ``text``.

        Nothing is encoded: this is how an adapter addresses a document's cache, and a ref
        whose cache is missing is encoded on first use (and counted in the answer's stats).

        Raises:
            ValueError: The text is empty or too long for the model; the message names ``label``.
        """
        ids = self.document_ids(text, index=label)
        return CacheRef(cache_key(self.fingerprint, ids), len(ids), self.fingerprint, text=text)

    def prompt_tokens(self, question: str, documents: Sequence[str | CacheRef] = ()) -> int:
        """Tokens of the prompt ``question`` over ``documents`` would prefill under ``full``."""
        n_docs = sum(
            doc.n_tokens if isinstance(doc, CacheRef) else len(self.document_ids(doc, index=i))
            for i, doc in enumerate(documents)
        )
        return len(self.framer.prefix_ids()) + n_docs + len(self.framer.question_ids(question))

    def has_cache(self, ref: CacheRef | str) -> bool:
        """Whether the store holds an entry under ``ref``'s key (not verified: ``answer`` checks)."""
        return self.store.contains(ref.key if isinstance(ref, CacheRef) else ref)

    def delete_caches(self, refs: Iterable[CacheRef | str]) -> int:
        """Delete the stored caches of ``refs`` (keys or refs); returns how many were there."""
        keys = [r.key if isinstance(r, CacheRef) else r for r in refs]
        if self.device_tier is not None:
            for key in keys:
                self.device_tier.discard(key)
        return sum(self.store.delete(key) for key in keys)

    def index(self, texts: Sequence[str], *, progress: bool = True) -> list[CacheRef]:
        """Compute and store each text's KV cache, a batch at a time (see ``indexing``).

        Texts whose stored cache verifies are not recomputed; a broken one is replaced.
        """
        check_sequence(texts, "texts", "strings")
        ids = [self.document_ids(text, index=i) for i, text in enumerate(texts)]
        return self._index_ids(ids, list(texts), progress)

    def index_token_ids(
        self, documents: Sequence[Sequence[int]], *, progress: bool = True
    ) -> list[CacheRef]:
        """Like ``index``, for documents given as framed token ids (as ``document_ids`` makes).

        The refs carry no text, so a missing cache cannot be re-encoded from them. The engine
        remembers the ids of the last ``KNOWN_IDS`` such documents, so that a method that
        reads no stored KV (``full``) prefills them without loading their caches.
        """
        check_sequence(documents, "documents", "token-id sequences")
        vocab = self._vocab_size
        ids = [
            check_token_ids(doc, vocab, what=f"documents[{i}]") for i, doc in enumerate(documents)
        ]
        refs = self._index_ids(ids, [None] * len(ids), progress)
        self._known_ids.remember({ref.key: doc for ref, doc in zip(refs, ids, strict=True)})
        return refs

    def _index_ids(
        self, ids: list[list[int]], texts: Sequence[str | None], progress: bool
    ) -> list[CacheRef]:
        indexer = Indexer(
            self.model,
            self.store,
            self.fingerprint,
            prefix_len=len(self.framer.prefix_ids()),
            prefix=lambda: self.prefix,
            batch_tokens=self.batch_tokens,
            lock=self._lock,
        )
        return indexer.index(ids, texts, progress=progress)

    def answer(
        self,
        question: str,
        refs: Sequence[CacheRef],
        method: str | BaseMethod = DEFAULT_METHOD,
        **kwargs: Any,
    ) -> Answer:
        """Answer ``question`` from the documents behind ``refs``.

        Keyword arguments are ``GenerationOptions`` fields (``max_new_tokens``,
        ``min_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``),
        ``on_foreign_cache`` ("error" or "recompute": what to do with a cache another model
        wrote), ``method_options`` (hyperparameters for a method given by name) and
        ``observe`` (see ``stream``).
        """
        stream = self.stream(question, refs, method, **kwargs)
        for _ in stream:
            pass
        return stream.answer

    def stream(
        self,
        question: str,
        refs: Sequence[CacheRef],
        method: str | BaseMethod = DEFAULT_METHOD,
        *,
        on_foreign_cache: OnForeignCache = "error",
        method_options: dict[str, Any] | None = None,
        observe: Observer | None = None,
        **generation: Any,
    ) -> AnswerStream:
        """Like ``answer``, but returns an ``AnswerStream`` of text deltas.

        ``observe``, if given, is called once with the ``DecodeState`` decoding starts from:
        the method's cache with the question prefilled (``[1, n_kv_heads, cache_len,
        head_dim]`` per layer), its positions and kept indices. With ``max_new_tokens=1`` it
        is the decode cache once the answer is done; longer answers may decode on a copy
        (the static cache of CUDA-graph decoding), so read it inside ``observe``.
        """
        chosen = get_method(method, **check_method_options(method_options))
        refs = check_refs(refs)
        options = GenerationOptions(**generation)
        question_ids = self.framer.question_ids(question)
        if on_foreign_cache not in ("error", "recompute"):
            raise ValueError(
                f"on_foreign_cache must be 'error' or 'recompute', got {on_foreign_cache!r}"
            )
        answer = Answer(text="", stats=MethodStats(chosen.name, 0, []))
        run = self._run(question_ids, refs, chosen, options, on_foreign_cache, answer, observe)
        return AnswerStream(run, answer)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a plain chat (``role``/``content`` dicts), ending with the generation prompt."""
        return chat_ids(self.model.tokenizer, messages)

    def stream_prompt(self, prompt_ids: Sequence[int], **generation: Any) -> AnswerStream:
        """Generate from a plain prompt (no documents): a full prefill of ``prompt_ids``, then decoding.

        This is what chat models answer plain messages with; keyword arguments are
        ``GenerationOptions`` fields.
        """
        options = GenerationOptions(**generation)
        prompt_ids = check_token_ids(prompt_ids, self._vocab_size, what="prompt_ids")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        self._check_fits(len(prompt_ids), options.max_new_tokens)
        answer = Answer(text="", stats=MethodStats("prompt", 0, []))
        return AnswerStream(self._run_prompt(prompt_ids, options, answer), answer)

    def _run_prompt(
        self, prompt_ids: list[int], options: GenerationOptions, answer: Answer
    ) -> Iterator[str]:
        model = self.model.model
        with self._lock, torch.inference_mode():
            watch = Stopwatch(model.device)
            cache = DynamicCache(config=model.config)
            with watch.phase("question"):
                logits = prefill(model, prompt_ids, cache, 0)
            answer.stats = MethodStats("prompt", 0, [], seconds=dict(watch.seconds))
            answer.first_token_logprobs = torch.log_softmax(logits.float(), -1).cpu()
            batcher = self._announce(decoder := Decoder())
        with withdrawn_on_error(batcher):
            deltas = self._decode(cache, logits, len(prompt_ids), options, answer, decoder, batcher)
        yield from deltas

    def _run(
        self,
        question_ids: list[int],
        refs: list[CacheRef],
        method: BaseMethod,
        options: GenerationOptions,
        on_foreign_cache: OnForeignCache,
        answer: Answer,
        observe: Observer | None,
    ) -> Iterator[str]:
        model = self.model.model
        with self._lock, torch.inference_mode():
            watch = Stopwatch(model.device)
            with watch.phase("load"):
                loader = RefLoader(self.model, self.store, self.fingerprint, self.prefix,
                                   self.document_ids, self._known_ids, self.device_tier)  # fmt: skip
                docs, arrival, recomputed = loader.load(refs, method.reads_cache, on_foreign_cache)
            inputs = MethodInput(
                model, self.prefix, docs, question_ids, arrival, prefill_question=True
            )
            try:
                self._check_fits(inputs.context_end + len(question_ids), options.max_new_tokens)
                context = method(inputs, watch)
            finally:  # the copies may still write into the documents' tensors until then
                arrival.wait()
            first_logits = context.question_logits  # set if the method's forward ran it
            if first_logits is None:
                with watch.phase("question"), method.question_scope(inputs, context):
                    first_logits = prefill(
                        model, question_ids, context.cache, context.next_position
                    )
            state = method.run_after_question(
                DecodeState.after_prefill(inputs, context, first_logits, {})
            )
            n_context = sum(doc.n_tokens for doc in docs)
            del inputs, context, docs  # decoding needs the documents' KV no more
            decoder = method.decoder(state)
            batcher = self._announce(decoder)
        # Off the lock: these wait for the device, while the next prefill's host work runs.
        with withdrawn_on_error(batcher):
            state.seconds = watch.seconds_with(state.seconds)  # after-question phases add up
            answer.describe(
                method.name, state, context_tokens=n_context, recomputed_documents=recomputed
            )
            if observe is not None:
                observe(state)
            cache, logits, position = state.cache, state.first_logits, state.next_position
            deltas = self._decode(cache, logits, position, options, answer, decoder, batcher)
        yield from deltas

    def _decode(
        self,
        cache: DynamicCache,
        logits: torch.Tensor,
        position: int,
        options: GenerationOptions,
        answer: Answer,
        decoder: Decoder,
        announced: DecodeBatcher | None,
    ) -> Iterator[str]:
        """Decode from ``cache``: in the batch (``announced`` to it, see ``_announce``) or alone."""
        model, tokenizer, ids = self.model.model, self.model.tokenizer, answer.token_ids

        # Only the steps take the lock (never held across a yield: a stream may be advanced
        # from another thread each time, as Starlette's thread pool does).
        one = with_graphs(decoder, self.decode_graphs, options.max_new_tokens)
        alone = LockedDecoder(one, self._lock)
        if announced is not None:
            return announced.deltas(
                tokenizer, cache, logits, position, options, ids, alone, announced=True
            )
        return generate_deltas(model, tokenizer, cache, logits, position, options, ids, alone)

    def _announce(self, decoder: Decoder) -> DecodeBatcher | None:
        """Under the lock, as a prefill ends: the batcher, told the answer comes, if it takes it."""
        batcher = self.batcher if self.batcher and runs_plain_step(decoder) else None
        if batcher is not None:
            batcher.announce()
        return batcher

    @property
    def _vocab_size(self) -> int:
        """The token ids the model accepts: rows of its input embedding."""
        return int(self.model.model.config.get_text_config(decoder=True).vocab_size)

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.model.max_context:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} "
                f"exceeds the model's context of {self.model.max_context} tokens"
            )
