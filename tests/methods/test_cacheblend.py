from __future__ import annotations

import dataclasses

import pytest
import torch

from samkv_integrations.methods import CacheBlendMethod, FullMethod, MethodInput

from .contract import Case, MethodContract, cache_tensors


def _with_planted_values(
    inputs: MethodInput, layer: int, doc: int, tokens: list[int]
) -> MethodInput:
    """``inputs`` with the stored values of ``tokens`` of ``doc`` at ``layer`` corrupted."""
    docs = []
    for i, d in enumerate(inputs.documents):
        values = d.values.clone()
        if i == doc:
            values[layer, :, tokens] += 50.0
        docs.append(dataclasses.replace(d, values=values))
    return MethodInput(inputs.model, inputs.prefix, docs, inputs.question_ids)


class TestCacheBlendMethod(MethodContract):
    __test__ = True

    @pytest.fixture
    def method(self) -> CacheBlendMethod:
        return CacheBlendMethod()

    @pytest.fixture
    def full_equivalent(self) -> tuple[CacheBlendMethod, int]:
        return CacheBlendMethod(recompute_ratio=1.0), 3

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 1.0

    def test_recomputes_the_most_deviating_tokens(self, case: Case) -> None:
        planted = [3, 20, 41, 77]
        inputs = _with_planted_values(case.inputs, layer=1, doc=1, tokens=planted)
        context = CacheBlendMethod(recompute_ratio=0.05, check_layer=1)(inputs)
        assert context.recomputed_tokens == round(0.05 * case.context_tokens)
        selected = context.details["recomputed_indices"]
        assert set(planted) <= set(selected[1])
        # Recomputed from the check layer on: the corrupted values are gone.
        start = inputs.doc_starts[1]
        _, values = cache_tensors(context)[1]
        stale = inputs.documents[1].values[1][:, planted]
        assert (values[:, [start + t for t in planted]] - stale).abs().min() > 1.0

    def test_layers_before_the_check_layer_are_fresh(self, case: Case) -> None:
        full = FullMethod()(case.inputs)
        blend = CacheBlendMethod(recompute_ratio=0.1, check_layer=2)(case.inputs)
        for layer in (0, 1):
            for got, want in zip(
                cache_tensors(blend)[layer], cache_tensors(full)[layer], strict=True
            ):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cache_tensors(blend)[3][1], cache_tensors(full)[3][1], atol=1e-4)

    def test_check_layer_must_exist(self, case: Case) -> None:
        with pytest.raises(ValueError, match="check_layer"):
            CacheBlendMethod(check_layer=len(case.inputs.prefix.keys))(case.inputs)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"recompute_ratio": 0.0}, "recompute_ratio"),
        ({"recompute_ratio": 1.2}, "recompute_ratio"),
        ({"check_layer": -1}, "check_layer"),
        ({"check_layer": 1.0}, "check_layer"),
    ],
)
def test_invalid_settings_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CacheBlendMethod(**options)  # type: ignore[arg-type]
