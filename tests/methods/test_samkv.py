from __future__ import annotations

import math

import pytest
import torch

from samkv_integrations.methods import SamKVMethod
from samkv_integrations.methods.aligned import gather_aligned
from samkv_integrations.methods.block_scores import (
    adaptive_ratio,
    personalize,
    selection_layer_indices,
)

from .contract import Case, MethodContract, cache_tensors


class TestSamKVMethod(MethodContract):
    __test__ = True

    @pytest.fixture(
        params=[SamKVMethod(), SamKVMethod(ranking="per_document", update="overwrite")],
        ids=["default", "per_document-overwrite"],
    )
    def method(self, request: pytest.FixtureRequest) -> SamKVMethod:
        return request.param

    @pytest.fixture
    def question_in_build(self) -> bool:
        return True

    @pytest.fixture
    def full_equivalent(self) -> tuple[SamKVMethod, int]:
        return SamKVMethod(ranking="global", budget=1.0, update="overwrite"), 3

    @pytest.fixture
    def max_kept_fraction(self, method: SamKVMethod) -> float | None:
        return method.budget if method.ranking == "global" else None

    def test_anchors_are_always_kept(self, case: Case) -> None:
        # block_size=64 makes the third document (~62 tokens) shorter than anchors + a block.
        method = SamKVMethod(block_size=64, ranking="global", budget=0.01)
        context = method(case.inputs)
        lengths = [doc.n_tokens for doc in case.inputs.documents]
        assert lengths[2] < 8 + 8 + 64 <= lengths[1]
        expected = [[*range(8), *range(n - 8, n)] for n in lengths[:2]] + [list(range(lengths[2]))]
        assert context.details["anchor_indices"] == expected
        # The budget is below the anchors: exactly the anchors remain.
        assert [k.tolist() for k in context.kept_indices] == expected
        default = SamKVMethod()(case.inputs)
        for kept, anchors in zip(
            default.kept_indices, default.details["anchor_indices"], strict=True
        ):
            assert set(anchors) <= set(kept.tolist())

    def test_documents_too_short_for_a_block_answer_as_full(self, case: Case) -> None:
        # Short nodes (a sentence or two) are common in RAG: kept whole, they must give full
        # recompute's answer under the default update, with no stale KV blended in.
        method = SamKVMethod(block_size=1024)
        full, got = case.answer("full"), case.answer(method)
        assert got.stats.kept_fraction == 1.0
        assert full.first_token_logprobs is not None and got.first_token_logprobs is not None
        torch.testing.assert_close(
            got.first_token_logprobs, full.first_token_logprobs, atol=1e-4, rtol=0
        )
        assert got.token_ids == full.token_ids

    @pytest.mark.parametrize("budget", [0.3, 0.6])
    def test_global_ranking_fills_the_budget_with_whole_blocks(
        self, case: Case, budget: float
    ) -> None:
        method = SamKVMethod(ranking="global", budget=budget)
        context = method(case.inputs)
        limit = math.floor(budget * case.context_tokens)
        kept = sum(len(k) for k in context.kept_indices)
        assert limit - method.block_size < kept <= limit
        for indices, doc in zip(context.kept_indices, case.inputs.documents, strict=True):
            middle_end = doc.n_tokens - method.n_local
            kept_set = set(indices.tolist())
            for t in kept_set:
                if method.n_init <= t < middle_end:
                    start = (
                        method.n_init + (t - method.n_init) // method.block_size * method.block_size
                    )
                    block = range(start, min(start + method.block_size, middle_end))
                    assert set(block) <= kept_set, f"block at {start} is only partly kept"

    def test_per_document_and_global_ranking_differ(self, case: Case) -> None:
        per_doc = SamKVMethod(ranking="per_document")(case.inputs)
        global_ = SamKVMethod(ranking="global")(case.inputs)
        assert [k.tolist() for k in per_doc.kept_indices] != [
            k.tolist() for k in global_.kept_indices
        ]
        ratios = per_doc.details["adaptive_ratio"]
        assert len(ratios) == 3 and all(0.0 <= r < 1.0 for r in ratios)

    def test_fusion_with_theta_one_equals_overwrite(self, case: Case) -> None:
        overwrite = SamKVMethod(update="overwrite")(case.inputs)
        fusion = SamKVMethod(update="fusion", fusion_theta=1.0)(case.inputs)
        assert [k.tolist() for k in fusion.kept_indices] == [
            k.tolist() for k in overwrite.kept_indices
        ]
        for (k_o, v_o), (k_f, v_f) in zip(
            cache_tensors(overwrite), cache_tensors(fusion), strict=True
        ):
            torch.testing.assert_close(k_f, k_o, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_f, v_o, atol=1e-5, rtol=1e-5)

    def test_fusion_blends_reused_and_fresh_kv(self, case: Case) -> None:
        # Layer 0's K/V depend only on each token and its position, so the fused layer 0
        # must be exactly the blend of the reused KV and overwrite's fresh KV.
        theta = 0.25
        overwrite = SamKVMethod(update="overwrite")(case.inputs)
        fusion = SamKVMethod(update="fusion", fusion_theta=theta)(case.inputs)
        inputs = case.inputs
        reused_k, reused_v = gather_aligned(
            inputs.model, inputs.documents, inputs.doc_starts, overwrite.kept_indices
        )
        start = inputs.prefix.length
        (fresh_k, fresh_v), (fused_k, fused_v) = (
            cache_tensors(overwrite)[0],
            cache_tensors(fusion)[0],
        )
        torch.testing.assert_close(
            fused_k[:, start:], (1 - theta) * reused_k[0] + theta * fresh_k[:, start:]
        )
        torch.testing.assert_close(
            fused_v[:, start:], (1 - theta) * reused_v[0] + theta * fresh_v[:, start:]
        )
        last_fused, last_fresh = cache_tensors(fusion)[-1][0], cache_tensors(overwrite)[-1][0]
        assert not torch.allclose(last_fused, last_fresh, atol=1e-4)

    def test_fusion_blends_only_tokens_after_a_drop(self, case: Case) -> None:
        # With theta near 0 a blended entry is its reused KV; an entry left fresh differs
        # from its reused KV once earlier documents are in view.
        inputs = case.inputs
        fusion = SamKVMethod(update="fusion", fusion_theta=1e-6)(inputs)
        reused_k, _ = gather_aligned(
            inputs.model, inputs.documents, inputs.doc_starts, fusion.kept_indices
        )
        after_drop = torch.tensor(
            [
                bool(set(range(t)) - set(kept.tolist()))
                for kept in fusion.kept_indices
                for t in kept.tolist()
            ]
        )
        assert after_drop.any() and not after_drop.all()
        fused = cache_tensors(fusion)[-1][0][:, inputs.prefix.length :]
        torch.testing.assert_close(
            fused[:, after_drop], reused_k[-1][:, after_drop], atol=1e-4, rtol=1e-4
        )
        second_doc_start = len(fusion.kept_indices[0])
        assert not after_drop[second_doc_start]
        assert not torch.allclose(
            fused[:, second_doc_start], reused_k[-1][:, second_doc_start], atol=1e-3
        )

    def test_negative_selection_layers_count_from_the_end(self, case: Case) -> None:
        n_layers = len(case.inputs.prefix.keys)
        by_negative = SamKVMethod(selection_layers=(-1, -2))(case.inputs)
        by_index = SamKVMethod(selection_layers=(n_layers - 2, n_layers - 1))(case.inputs)
        assert [k.tolist() for k in by_negative.kept_indices] == [
            k.tolist() for k in by_index.kept_indices
        ]
        with pytest.raises(ValueError, match="selection_layers"):
            SamKVMethod(selection_layers=(n_layers,))(case.inputs)


def test_adaptive_ratio_formula() -> None:
    blocks = torch.tensor([[1.0, 3.0, 5.0, 2.0, 100.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    ratio = adaptive_ratio
    # (max - s_anc) / (max - min) = (5 - 2) / (5 - 1); block 100 does not exist.
    assert ratio(blocks, torch.tensor([2.0]), valid).tolist() == [0.75]
    assert ratio(blocks, torch.tensor([4.0]), valid).tolist() == [0.25]
    # Outside (min, max]: nothing beyond the anchors is worth keeping, or all blocks tie.
    for anchor in (0.5, 1.0, 6.0):
        assert ratio(blocks, torch.tensor([anchor]), valid).tolist() == [0.0]
    assert ratio(blocks, torch.tensor([5.0]), valid).tolist() == [0.0]
    none_valid = torch.zeros_like(valid)
    assert ratio(blocks, torch.tensor([2.0]), none_valid).tolist() == [0.0]


def test_personalized_query_formula() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # One layer, two query heads sharing one KV head; head 1 mirrors head 0 times 3.
    generic = torch.stack([e1, 3 * e1])[None]
    own = torch.stack([torch.stack([q, 3 * q])[None] for q in (e1, e2, -2 * e1)])
    personal = personalize(generic, own, n_kv_heads=1)
    # |cos| with Qq: 1, 0, 1. Qi = Qq + (sum over j != i of |cos| Qj) / 2.
    expected = [e1 + (-2 * e1) / 2, e1 + (e1 - 2 * e1) / 2, e1 + e1 / 2]
    for i, q in enumerate(expected):
        torch.testing.assert_close(personal[i, 0, 0], (q + 3 * q) / 2)
    single = personalize(generic, own[:1], n_kv_heads=2)
    torch.testing.assert_close(single[0], generic)


@pytest.mark.parametrize(
    ("n_layers", "expected"), [(24, [8, 12, 16, 20]), (30, [10, 15, 20, 25]), (2, [1])]
)
def test_default_selection_layers_sit_at_fixed_depths(n_layers: int, expected: list[int]) -> None:
    assert selection_layer_indices(n_layers, None) == expected
    assert selection_layer_indices(n_layers, (-1, 0, -1)) == [0, n_layers - 1]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"n_init": -1}, "n_init"),
        ({"n_local": 1.5}, "n_local"),
        ({"block_size": 0}, "block_size"),
        ({"selection_layers": ()}, "selection_layers"),
        ({"selection_layers": (1.0,)}, "selection_layers"),
        ({"update": "replace"}, "update"),
        ({"fusion_theta": 0.0}, "fusion_theta"),
        ({"ranking": "best"}, "ranking"),
        ({"budget": 1.5}, "budget"),
    ],
)
def test_invalid_settings_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamKVMethod(**options)  # type: ignore[arg-type]
