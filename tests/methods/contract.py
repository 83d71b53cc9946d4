"""The contract every method honours, as a base class its test file subclasses.

A method's test class sets ``__test__ = True`` and provides fixtures:

- ``method``: the method with the settings under test;
- ``full_equivalent``: ``(method, n_documents)`` settings whose answer must equal full
  recompute on the first ``n_documents`` documents;
- ``max_kept_fraction`` (optional): an upper bound on the kept fraction, or ``None``;
- ``question_in_build`` (optional): whether ``build`` runs the question itself when
  ``MethodInput.prefill_question`` allows it (default ``False``).

The inherited tests run on tiny random Llama and Qwen2 models (``tiny_model``), with three
documents of different lengths, through the real engine and through ``MethodInput``. What
they check of the decode cache, they check on the state the engine decodes from (observed
after the method's after-question stage), so that a method acting after the question or at
each decode step is held to the same contract as one that only builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.engine import Answer
from samkv_integrations.methods import BaseMethod, ContextCache, DecodeState, MethodInput
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.compat import with_cache
from samkv_integrations.records import CacheRef

#: Three documents: about 250, 135 and 60 byte tokens once framed, so that blocks exist.
DOCUMENTS = [
    "The Eiffel Tower was completed in 1889 as the entrance arch to the World's Fair in "
    "Paris. Gustave Eiffel's company designed and built it; at 330 metres it was the "
    "tallest structure in the world until 1930, and it now draws millions of visitors.",
    "Gustave Eiffel also engineered the internal frame of the Statue of Liberty, which "
    "was dedicated in New York Harbor in 1886.",
    "Paris is the capital city of France, on the Seine.",
]
QUESTION = "Which two structures did Eiffel's company work on?"


@dataclass
class Case:
    """An engine with the documents indexed, and the method input they assemble into."""

    engine: SamKVEngine
    refs: list[CacheRef]
    inputs: MethodInput

    def answer(self, method: BaseMethod | str, n_documents: int = 3) -> Answer:
        return self.engine.answer(QUESTION, self.refs[:n_documents], method, max_new_tokens=8)

    def decode_state(self, method: BaseMethod) -> tuple[Answer, DecodeState]:
        """Answer with one new token (no decode forward) and the state decoding started from."""
        seen: list[DecodeState] = []
        answer = self.engine.answer(
            QUESTION, self.refs, method, max_new_tokens=1, observe=seen.append
        )
        (state,) = seen
        return answer, state

    @property
    def context_tokens(self) -> int:
        return sum(doc.n_tokens for doc in self.inputs.documents)


class MethodContract:
    """Properties every method must have; subclasses provide the ``method`` fixtures."""

    __test__ = False

    @pytest.fixture
    def max_kept_fraction(self) -> float | None:
        return None

    @pytest.fixture
    def question_in_build(self) -> bool:
        return False

    @pytest.fixture
    def case(self, tiny_model: LoadedModel, memory_store: KVCacheStore) -> Case:
        engine = SamKVEngine(tiny_model, memory_store)
        refs = engine.index(DOCUMENTS, progress=False)
        docs = [engine.store.get(ref.key, fingerprint=engine.fingerprint) for ref in refs]
        question_ids = engine.framer.question_ids(QUESTION)
        return Case(engine, refs, MethodInput(tiny_model.model, engine.prefix, docs, question_ids))

    def test_reported_kept_fraction_is_the_cache_length(
        self, method: BaseMethod, case: Case
    ) -> None:
        answer, state = case.decode_state(method)
        in_documents = (state.positions >= case.inputs.prefix.length) & (
            state.positions < case.inputs.context_end
        )
        assert answer.stats.context_tokens == case.context_tokens
        assert answer.stats.kept_tokens == [len(k) for k in state.kept_indices]
        assert answer.stats.kept_fraction == int(in_documents.sum()) / case.context_tokens
        assert answer.kept_indices == [k.tolist() for k in state.kept_indices]

    def test_decode_state_describes_its_cache(self, method: BaseMethod, case: Case) -> None:
        _, state = case.decode_state(method)
        inputs = case.inputs
        n_question = len(inputs.question_ids)
        assert state.next_position == inputs.context_end + n_question
        assert state.context_end == inputs.context_end
        assert state.doc_starts == inputs.doc_starts
        assert len(state.positions) == state.cache.get_seq_length()
        assert bool((state.positions.diff() > 0).all()), "positions must be in global order"
        kept_positions = torch.cat(
            [
                start + kept.cpu()
                for start, kept in zip(inputs.doc_starts, state.kept_indices, strict=True)
            ]
        )
        positions = state.positions.cpu()
        in_documents = (positions >= inputs.prefix.length) & (positions < inputs.context_end)
        assert torch.equal(positions[in_documents], kept_positions)
        assert state.first_logits.shape == (inputs.model.config.vocab_size,)
        shapes = {
            (tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in state.cache.layers
        }
        assert len(shapes) == 1, "every layer must hold the same entries"
        ((keys_shape, _),) = shapes
        assert keys_shape[0] == 1 and keys_shape[2] == len(positions)

    def test_kept_indices_describe_the_cache(self, method: BaseMethod, case: Case) -> None:
        context = method(case.inputs)
        inputs = case.inputs
        for kept, doc in zip(context.kept_indices, inputs.documents, strict=True):
            assert kept.dtype == torch.long
            assert bool((kept.diff() > 0).all()), "kept indices must be sorted and unique"
            assert kept.numel() == 0 or 0 <= int(kept.min()) <= int(kept.max()) < doc.n_tokens
        expected = torch.cat(
            [
                torch.arange(inputs.prefix.length),
                *(
                    start + kept.cpu()
                    for start, kept in zip(inputs.doc_starts, context.kept_indices, strict=True)
                ),
            ]
        )
        assert torch.equal(context.positions.cpu(), expected)
        assert context.cache.get_seq_length() == len(expected)
        assert context.next_position == inputs.context_end

    def test_every_layer_holds_the_same_entries(self, method: BaseMethod, case: Case) -> None:
        context = method(case.inputs)
        layers = context.cache.layers
        assert len(layers) == len(case.inputs.prefix.keys)
        shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in layers}
        assert len(shapes) == 1
        keys_shape, _ = shapes.pop()
        assert keys_shape[0] == 1
        assert keys_shape[2] == context.cache.get_seq_length()
        assert all(bool(torch.isfinite(layer.keys).all()) for layer in layers)

    def test_kept_fraction_within_bound(
        self, method: BaseMethod, case: Case, max_kept_fraction: float | None
    ) -> None:
        kept = case.answer(method).stats.kept_fraction
        assert 0.0 < kept <= (1.0 if max_kept_fraction is None else max_kept_fraction)

    def test_recomputed_fraction_is_consistent(self, method: BaseMethod, case: Case) -> None:
        answer, state = case.decode_state(method)
        stats = answer.stats
        assert stats.recomputed_tokens == state.recomputed_tokens
        assert 0.0 <= stats.recomputed_fraction <= 1.0
        assert stats.recomputed_fraction == stats.recomputed_tokens / case.context_tokens

    def test_full_equivalent_settings_answer_as_full(
        self, full_equivalent: tuple[BaseMethod, int], case: Case
    ) -> None:
        method, n_documents = full_equivalent
        full = case.answer("full", n_documents)
        got = case.answer(method, n_documents)
        assert full.first_token_logprobs is not None and got.first_token_logprobs is not None
        torch.testing.assert_close(
            got.first_token_logprobs, full.first_token_logprobs, atol=1e-4, rtol=0
        )
        assert got.token_ids == full.token_ids
        assert got.text == full.text
        assert got.stats.kept_fraction == 1.0

    def test_no_documents_leave_the_prefix(
        self, method: BaseMethod, case: Case, question_in_build: bool
    ) -> None:
        inputs = case.inputs
        context = method(MethodInput(inputs.model, inputs.prefix, [], inputs.question_ids))
        assert context.cache.get_seq_length() == inputs.prefix.length
        assert context.kept_indices == []
        assert context.next_position == inputs.prefix.length
        assert context.recomputed_tokens == 0
        # With the question run in the build, the cache holds the prefix and the question.
        question = inputs.question_ids
        fused = method(
            MethodInput(inputs.model, inputs.prefix, [], question, prefill_question=True)
        )
        expected = inputs.prefix.length + len(inputs.question_ids) * question_in_build
        assert fused.cache.get_seq_length() == expected
        assert (fused.question_logits is not None) == question_in_build
        answer = case.engine.answer(QUESTION, [], method, max_new_tokens=2)
        assert answer.stats.context_tokens == 0 and len(answer.token_ids) <= 2

    def test_question_prefilled_in_build_equals_the_engines_prefill(
        self, method: BaseMethod, case: Case, question_in_build: bool
    ) -> None:
        # A build that runs the question in its own forward must leave what the engine's
        # later prefill (under the method's question scope) would have: logits and cache.
        inputs = case.inputs
        separate = method(inputs)
        fused = method(dataclasses.replace(inputs, prefill_question=True))
        assert separate.question_logits is None
        assert (fused.question_logits is not None) == question_in_build
        if fused.question_logits is None:
            assert fused.cache.get_seq_length() == separate.cache.get_seq_length()
            return
        with method.question_scope(inputs, separate):
            logits = prefill(inputs, separate.cache, separate.next_position)
        torch.testing.assert_close(fused.question_logits, logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(fused.positions, separate.positions)
        assert fused.next_position == separate.next_position
        for got, want in zip(cache_tensors(fused), cache_tensors(separate), strict=True):
            for got_part, want_part in zip(got, want, strict=True):
                torch.testing.assert_close(got_part, want_part, atol=1e-4, rtol=1e-4)

    def test_repeated_runs_are_deterministic(self, method: BaseMethod, case: Case) -> None:
        first, second = case.answer(method), case.answer(method)
        assert first.first_token_logprobs is not None and second.first_token_logprobs is not None
        assert torch.equal(first.first_token_logprobs, second.first_token_logprobs)
        assert first.token_ids == second.token_ids
        assert first.kept_indices == second.kept_indices


def prefill(inputs: MethodInput, cache: DynamicCache, start: int) -> torch.Tensor:
    """Prefill the question into ``cache`` at positions ``start ..``; the next logits."""
    n = len(inputs.question_ids)
    with torch.inference_mode():
        out = inputs.model(
            input_ids=torch.tensor([inputs.question_ids]),
            position_ids=(torch.arange(n) + start)[None],
            **with_cache(inputs.model, cache),
            use_cache=True,
        )
    return out.logits[0, -1]


def cache_tensors(context: ContextCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``[n_kv_heads, n, head_dim]`` keys and values of a context cache."""
    return [(layer.keys[0], layer.values[0]) for layer in context.cache.layers]
