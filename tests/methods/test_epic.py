from __future__ import annotations

import pytest
import torch

from samkv_integrations.methods import EpicMethod, ReuseMethod

from .contract import Case, MethodContract, cache_tensors


class TestEpicMethod(MethodContract):
    __test__ = True

    @pytest.fixture
    def method(self) -> EpicMethod:
        return EpicMethod()

    @pytest.fixture
    def full_equivalent(self) -> tuple[EpicMethod, int]:
        return EpicMethod(k=10_000), 3

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 1.0

    def test_recomputes_exactly_the_first_k_of_each_document(self, case: Case) -> None:
        k = 12
        inputs = case.inputs
        epic = EpicMethod(k=k)(inputs)
        reuse = ReuseMethod()(inputs)
        assert epic.recomputed_tokens == k * len(inputs.documents)
        assert epic.details["recomputed_indices"] == [list(range(k))] * len(inputs.documents)
        heads = {start + i for start in inputs.doc_starts for i in range(k)}
        untouched = [i for i in range(inputs.context_end) if i not in heads]
        first_doc = list(range(inputs.doc_starts[0], inputs.doc_starts[0] + k))
        later = sorted(heads - set(first_doc))
        for (k_e, v_e), (k_r, v_r) in zip(cache_tensors(epic), cache_tensors(reuse), strict=True):
            assert torch.equal(k_e[:, untouched], k_r[:, untouched])
            assert torch.equal(v_e[:, untouched], v_r[:, untouched])
            # The first document sits right behind the prefix, as when it was cached.
            torch.testing.assert_close(k_e[:, first_doc], k_r[:, first_doc], atol=1e-5, rtol=1e-5)
        last_epic, last_reuse = cache_tensors(epic)[-1][1], cache_tensors(reuse)[-1][1]
        assert not torch.allclose(last_epic[:, later], last_reuse[:, later], atol=1e-4)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_invalid_k_is_named(k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        EpicMethod(k=k)  # type: ignore[arg-type]
