"""SamKV with a head-level stage after the question (``resident``): SAGE-KV's eviction."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from samkv_integrations.methods import (
    BaseMethod,
    DecodeState,
    MethodInput,
    SageKVMethod,
    SamKVMethod,
    eviction,
)
from samkv_integrations.methods.eviction import recorded_window_attention, window_attention
from samkv_integrations.methods.specs import parse_spec
from samkv_integrations.timing import Stopwatch

from .contract import Case, MethodContract
from .neighbourhood import neighbourhood_mean


class TestSamKVResident(MethodContract):
    __test__ = True

    @pytest.fixture(
        params=[
            SamKVMethod(budget=0.4, resident=0.2),
            SamKVMethod(budget=0.3, resident=0.3),
        ],
        ids=["half-of-the-kept", "all-of-the-kept"],
    )
    def method(self, request: pytest.FixtureRequest) -> SamKVMethod:
        return request.param

    @pytest.fixture
    def question_in_build(self) -> bool:
        return True

    @pytest.fixture
    def full_equivalent(self) -> tuple[SamKVMethod, int]:
        return SamKVMethod(budget=1.0, update="overwrite", resident=1.0), 3

    @pytest.fixture
    def max_kept_fraction(self, method: SamKVMethod) -> float:
        return method.resident or method.budget

    def test_resident_at_the_kept_share_changes_nothing(self, case: Case) -> None:
        # Every head keeps every recomputed token, in order: the cache is samkv's own.
        plain_answer, plain = case.decode_state(SamKVMethod(budget=0.3))
        answer, state = case.decode_state(SamKVMethod(budget=0.3, resident=0.3))
        assert torch.equal(state.positions, plain.positions)
        for old, new in zip(plain.cache.layers, state.cache.layers, strict=True):
            assert torch.equal(new.keys, old.keys) and torch.equal(new.values, old.values)
        assert answer.stats.kept_fraction == plain_answer.stats.kept_fraction

    @pytest.mark.parametrize("kernel", [1, 5])
    def test_each_head_keeps_its_best_share_of_the_recomputed_tokens(
        self, case: Case, kernel: int
    ) -> None:
        _, recomputed = case.decode_state(SamKVMethod(budget=0.4))
        method = SamKVMethod(budget=0.4, resident=0.2, resident_kernel=kernel)
        answer, state = case.decode_state(method)
        k = math.floor(0.2 * case.context_tokens)
        n_documents = sum(len(kept) for kept in recomputed.kept_indices)
        assert 0 < k < n_documents
        assert state.details["kept_per_head"] == k
        assert answer.stats.kept_fraction == k / case.context_tokens
        assert state.recomputed_tokens == recomputed.recomputed_tokens == n_documents
        # Scores: the last question tokens' attention over the recomputed cache.
        question = case.inputs.question_ids
        window = question[-min(16, len(question)) :]
        scores = window_attention(case.inputs.model, recomputed.cache, recomputed.positions, window)
        first = case.inputs.prefix.length
        # resident_kernel: each score averaged with its neighbours in cache order first.
        scores = neighbourhood_mean(scores[..., first : first + n_documents], kernel)
        for i, (old, new) in enumerate(
            zip(recomputed.cache.layers, state.cache.layers, strict=True)
        ):
            assert new.keys.shape[2] == old.keys.shape[2] - n_documents + k
            # Heads differ; each keeps, in global order, the entries it scores highest.
            best = scores[i].argsort(dim=-1, descending=True, stable=True)[:, :k].sort().values
            for head, index in enumerate(best):
                span = old.keys[0, head, first : first + n_documents]
                assert torch.equal(new.keys[0, head, first : first + k], span[index])
            assert torch.equal(new.keys[:, :, :first], old.keys[:, :, :first])
            assert torch.equal(
                new.values[:, :, first + k :], old.values[:, :, first + n_documents :]
            )

    def test_min_kept_stays_a_floor_after_the_question(self, case: Case) -> None:
        floor = case.context_tokens // 4
        assert math.floor(0.1 * case.context_tokens) < floor
        answer, state = case.decode_state(SamKVMethod(budget=0.5, min_kept=floor, resident=0.1))
        assert state.details["kept_per_head"] == floor
        assert answer.stats.kept_fraction == floor / case.context_tokens

    def test_a_model_with_sliding_window_layers_is_refused(
        self, case: Case, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The recorded path runs no layer, so the check must not ride on the second forward.
        method = SamKVMethod(budget=0.4, resident=0.2)
        state = _question_prefilled(method, case.inputs)
        config = case.inputs.model.config
        sliding = ["sliding_attention"] * config.num_hidden_layers
        monkeypatch.setattr(config, "layer_types", sliding, raising=False)
        with pytest.raises(ValueError, match="layer_types"):
            method.after_question(state, Stopwatch(state.model.device))

    def test_an_eviction_that_keeps_everything_copies_nothing(self, case: Case) -> None:
        method = SamKVMethod(budget=0.3, resident=0.3)
        state = _question_prefilled(method, case.inputs)
        after = method.after_question(state, Stopwatch(state.model.device))
        assert after.cache is state.cache and after.positions is state.positions
        assert after.question_queries is None
        kept = sum(len(k) for k in state.kept_indices)
        assert after.details["kept_per_head"] == kept
        assert after.details["union_fraction"] == kept / case.context_tokens

    @pytest.mark.parametrize("stage", [SamKVMethod(budget=0.4, resident=0.2), SageKVMethod()])
    def test_the_recorded_window_scores_as_the_rerun_does(
        self, case: Case, stage: BaseMethod
    ) -> None:
        state = _question_prefilled(stage, case.inputs)
        question = case.inputs.question_ids
        window = min(16, len(question))
        queries = state.question_queries
        assert queries is not None
        assert queries.shape[:2] == (state.model.config.num_hidden_layers, window)
        recorded = recorded_window_attention(state.model, state.cache, state.positions, queries)
        rerun = window_attention(state.model, state.cache, state.positions, question[-window:])
        torch.testing.assert_close(recorded, rerun, atol=1e-5, rtol=1e-4)

    def test_the_engine_path_runs_no_second_forward(
        self, case: Case, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def rerun(*args: object) -> None:
            raise AssertionError("the window's queries were recorded in the build's forward")

        monkeypatch.setattr(eviction, "window_attention", rerun)
        for method in (SamKVMethod(budget=0.4, resident=0.2), SageKVMethod()):
            _, state = case.decode_state(method)
            assert state.details["kept_per_head"] > 0
            assert state.question_queries is None  # dropped once scored


def test_the_spec_string_reaches_the_option() -> None:
    method = parse_spec("samkv+budget=0.3+resident=0.15").build()
    assert isinstance(method, SamKVMethod)
    assert (method.budget, method.resident) == (0.3, 0.15)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"resident": 0.0}, "resident must be in"),
        ({"resident": 1.5}, "resident must be in"),
        ({"resident": "half"}, "resident must be in"),
        ({"budget": 0.15, "resident": 0.3}, r"resident \(0.3\) must be at most budget \(0.15\)"),
        ({"ranking": "per_document", "resident": 0.1}, "ranking must be 'global' with resident"),
        ({"resident_kernel": 5}, "resident_kernel applies with resident only"),
        ({"resident": 0.1, "resident_kernel": 4}, "resident_kernel must be an odd int"),
        ({"resident": 0.1, "resident_kernel": 0}, "resident_kernel must be an odd int"),
    ],
)
def test_bad_resident_names_the_field(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamKVMethod(**options)  # type: ignore[arg-type]


def _question_prefilled(method: BaseMethod, inputs: MethodInput) -> DecodeState:
    """The state after ``method``'s build ran the question too, as the engine has it run."""
    inputs = dataclasses.replace(inputs, prefill_question=True)
    context = method.build(inputs, Stopwatch(inputs.model.device))
    assert context.question_logits is not None and context.question_queries is not None
    return DecodeState.after_prefill(inputs, context, context.question_logits, {})
