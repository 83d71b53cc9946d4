from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.methods import DecodeState, FullMethod, SageKVMethod
from samkv_integrations.methods.eviction import clustered, top_per_head, window_attention
from samkv_integrations.models import LoadedModel
from samkv_integrations.timing import Stopwatch

from .contract import DOCUMENTS, QUESTION, Case, MethodContract
from .neighbourhood import neighbourhood_mean


class TestSageKVMethod(MethodContract):
    __test__ = True

    @pytest.fixture(
        params=[SageKVMethod(), SageKVMethod(per_head=False, window=1, kernel=1)],
        ids=["per_head", "shared-last_token-unclustered"],
    )
    def method(self, request: pytest.FixtureRequest) -> SageKVMethod:
        return request.param

    @pytest.fixture
    def question_in_build(self) -> bool:
        return True

    @pytest.fixture
    def full_equivalent(self) -> tuple[SageKVMethod, int]:
        return SageKVMethod(budget=1.0), 3

    @pytest.fixture
    def max_kept_fraction(self, method: SageKVMethod) -> float:
        return method.budget

    def test_each_head_keeps_budget_tokens(self, case: Case) -> None:
        method = SageKVMethod(budget=0.2)
        _, full = case.decode_state(FullMethod())
        answer, state = case.decode_state(method)
        k = math.floor(0.2 * case.context_tokens)
        assert state.details["kept_per_head"] == k
        assert answer.stats.kept_fraction == k / case.context_tokens
        assert state.cache.get_seq_length() == full.cache.get_seq_length() - case.context_tokens + k
        assert k / case.context_tokens <= state.details["union_fraction"] <= 1.0  # type: ignore[operator]
        assert 0.0 <= state.details["head_agreement"] <= 1.0  # type: ignore[operator]
        # The prefix and the whole question are kept as they were.
        n_prefix, n_question = case.inputs.prefix.length, len(case.inputs.question_ids)
        for old, new in zip(full.cache.layers, state.cache.layers, strict=True):
            assert torch.equal(new.keys[:, :, :n_prefix], old.keys[:, :, :n_prefix])
            assert torch.equal(new.values[:, :, -n_question:], old.values[:, :, -n_question:])

    def test_heads_keep_their_own_tokens(self, case: Case) -> None:
        # Per head, each kept key is the original key of one context token; the heads'
        # sets differ, and the shared setting keeps the reported positions at every head.
        _, full = case.decode_state(FullMethod())
        start, end = case.inputs.prefix.length, case.inputs.context_end
        for per_head in (True, False):
            _, state = case.decode_state(SageKVMethod(per_head=per_head))
            k = int(state.details["kept_per_head"])  # type: ignore[call-overload]
            sets = set()
            for old, new in zip(full.cache.layers, state.cache.layers, strict=True):
                for head in range(old.keys.shape[1]):
                    original = old.keys[0, head, start:end]
                    kept = new.keys[0, head, start : start + k]
                    match = (kept[:, None] == original[None]).all(-1).int().argmax(-1) + start
                    assert torch.equal(original[match - start], kept)
                    assert bool((match.diff() > 0).all())
                    sets.add(tuple(match.tolist()))
            reported = tuple(state.positions[start : start + k].tolist())
            if per_head:
                assert len(sets) > 1 and state.details["head_agreement"] < 1.0  # type: ignore[operator]
            else:
                assert sets == {reported} and state.details["head_agreement"] == 1.0

    def test_scores_are_the_models_own_attention(self, case: Case) -> None:
        # Reference: eager attention weights of one forward over the whole prompt.
        _, state = case.decode_state(FullMethod())
        inputs, window = case.inputs, 5
        ids = inputs.prefix.token_ids + [t for d in inputs.documents for t in d.token_ids]
        ids += inputs.question_ids
        eager = copy.deepcopy(inputs.model)
        eager.set_attn_implementation("eager")
        with torch.inference_mode():
            out = eager(input_ids=torch.tensor([ids]), output_attentions=True)
            got = window_attention(
                inputs.model, state.cache, state.positions, inputs.question_ids[-window:]
            )
        n_kv = state.cache.layers[0].keys.shape[1]
        for layer, attention in enumerate(out.attentions):
            expected = attention[0, :, -window:].unflatten(0, (n_kv, -1)).sum(dim=(1, 2))
            torch.testing.assert_close(got[layer], expected, atol=1e-5, rtol=1e-4)

    def test_selection_keeps_the_tokens_the_question_attends_to_most(self, case: Case) -> None:
        # Plant keys that the question's last-layer queries favour: the last layer's
        # queries do not depend on its own keys, so the plant leaves them unchanged. The
        # planted tokens stand alone, so clustering would share their score with neighbours.
        inputs, window = case.inputs, 4
        method = SageKVMethod(budget=0.02, window=window, kernel=1)
        planted = [inputs.doc_starts[1] + 20, inputs.doc_starts[1] + 40, inputs.doc_starts[2] + 5]
        assert math.floor(0.02 * case.context_tokens) >= len(planted)
        _, state = case.decode_state(FullMethod())
        model = inputs.model
        ids = inputs.prefix.token_ids + [t for d in inputs.documents for t in d.token_ids]
        ids += inputs.question_ids
        layer = model.get_decoder().layers[-1]
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            query_in = layer.input_layernorm(hidden[-2][:, -window:])
            head_dim = layer.self_attn.head_dim
            query = layer.self_attn.q_proj(query_in).view(1, window, -1, head_dim).transpose(1, 2)
            positions = state.positions[-window:][None]
            cos, sin = model.get_decoder().rotary_emb(query_in, position_ids=positions)
            query, _ = apply_rotary_pos_emb(query, query, cos, sin)
            keys = state.cache.layers[-1].keys
            n_kv = keys.shape[1]
            group = query.shape[1] // n_kv
            direction = query[0].unflatten(0, (n_kv, -1)).sum(dim=(1, 2))  # [n_kv, head_dim]
            # Scaled so that the mean query's logit on a planted key is 20.
            scale = 20 * group * window / direction.norm(dim=-1, keepdim=True) * head_dim**0.5
            untouched = _kept_keys(method, state, keys[0, :, planted].clone())
            keys[0, :, planted] = (direction * scale)[:, None]
            found = _kept_keys(method, state, keys[0, :, planted].clone())
        assert found.all(), "every head of the last layer must keep the planted tokens"
        assert not untouched.all(), "the planted tokens must not be kept by chance"

    def test_each_head_keeps_the_best_of_its_clustered_scores(self, case: Case) -> None:
        # The clustered selection is the top k of each score averaged with its neighbours;
        # on these inputs it differs from the unclustered one, so the average is applied.
        _, full = case.decode_state(FullMethod())
        inputs, window = case.inputs, 16
        start, end = inputs.prefix.length, inputs.context_end
        question = inputs.question_ids[-min(window, len(inputs.question_ids)) :]
        scores = window_attention(inputs.model, full.cache, full.positions, question)
        scores = scores[..., start:end]
        k = math.floor(0.15 * case.context_tokens)
        chosen = {}
        for kernel in (1, 5):
            _, state = case.decode_state(SageKVMethod(budget=0.15, kernel=kernel))
            ranked = neighbourhood_mean(scores, kernel)
            best = ranked.argsort(dim=-1, descending=True, stable=True)[..., :k].sort().values
            pairs = zip(full.cache.layers, state.cache.layers, best, strict=True)
            for old, new, index in pairs:
                span = old.keys[0, :, start:end]
                expected = span.gather(1, index[:, :, None].expand(-1, -1, span.shape[-1]))
                assert torch.equal(new.keys[0, :, start : start + k], expected)
            # The representative set (what ``positions`` names) is clustered the same way.
            shared = ranked.sum(dim=(0, 1)).argsort(descending=True, stable=True)[:k].sort()
            assert torch.equal(state.positions[start : start + k], shared.values + start)
            chosen[kernel] = best
        assert not torch.equal(chosen[1], chosen[5])

    def test_window_longer_than_the_question_is_capped(self, case: Case) -> None:
        capped = case.answer(SageKVMethod(window=10_000))
        whole = case.answer(SageKVMethod(window=len(case.inputs.question_ids)))
        assert capped.kept_indices == whole.kept_indices
        assert capped.token_ids == whole.token_ids

    def test_no_documents_answers(self, case: Case) -> None:
        answer = case.engine.answer(QUESTION, [], SageKVMethod(), max_new_tokens=2)
        assert answer.stats.kept_tokens == [] and answer.kept_indices == []


def _kept_keys(method: SageKVMethod, state: DecodeState, keys: torch.Tensor) -> torch.Tensor:
    """``[n_kv_heads, n]``: whether each of ``keys`` (per head) stays in the last layer."""
    reduced = method.after_question(state, Stopwatch(state.model.device)).cache.layers[-1].keys[0]
    return (reduced[:, :, None] == keys[:, None]).all(-1).any(1)


def test_budget_one_decodes_as_full(
    talkative_llama: LoadedModel, memory_store: KVCacheStore
) -> None:
    # The whole answer, not only the first token, comes from the gathered (complete) cache.
    engine = SamKVEngine(talkative_llama, memory_store)
    refs = engine.index(DOCUMENTS, progress=False)
    full = engine.answer(QUESTION, refs, "full", max_new_tokens=16)
    got = engine.answer(QUESTION, refs, SageKVMethod(budget=1.0), max_new_tokens=16)
    assert len(full.token_ids) == 16 and got.token_ids == full.token_ids
    assert got.first_token_logprobs is not None and full.first_token_logprobs is not None
    torch.testing.assert_close(
        got.first_token_logprobs, full.first_token_logprobs, atol=1e-5, rtol=0
    )
    assert got.stats.kept_fraction == 1.0 and got.details["union_fraction"] == 1.0


def test_clustering_prefers_a_cluster_to_a_lone_peak() -> None:
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, 2] = 1.0  # a lone peak
    scores[0, 0, 6:11] = 0.6  # five neighbours that matter together
    none = torch.zeros(12, dtype=torch.bool)
    assert top_per_head(clustered(scores, 1), 1, none).item() == 2
    assert top_per_head(clustered(scores, 5), 1, none).item() == 8
    torch.testing.assert_close(clustered(scores, 5), neighbourhood_mean(scores, 5))
    assert clustered(scores[..., :0], 5).shape == (1, 1, 0)


def test_top_per_head_keeps_forced_then_best_and_breaks_ties_early() -> None:
    scores = torch.tensor([[0.0, 5.0, 1.0, 5.0, 3.0], [9.0, 0.0, 0.0, 0.0, 0.0]])
    forced = torch.tensor([False, False, True, False, False])
    assert top_per_head(scores, 3, forced).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert top_per_head(scores, 2, torch.zeros(5, dtype=torch.bool)).tolist() == [[1, 3], [0, 1]]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"n_sink": -1}, "n_sink"),
        ({"per_head": "yes"}, "per_head"),
        ({"kernel": 0}, "kernel"),
        ({"kernel": 4}, "kernel"),
        ({"kernel": 2.5}, "kernel"),
        ({"kernel": True}, "kernel"),
    ],
)
def test_invalid_settings_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SageKVMethod(**options)  # type: ignore[arg-type]
