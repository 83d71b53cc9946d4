from __future__ import annotations

import pytest
import torch

from samkv_integrations.methods import ReuseMethod

from .contract import Case, MethodContract


class TestReuseMethod(MethodContract):
    __test__ = True

    @pytest.fixture
    def method(self) -> ReuseMethod:
        return ReuseMethod()

    @pytest.fixture
    def full_equivalent(self) -> tuple[ReuseMethod, int]:
        # Only a single document has no cross-document attention to lose.
        return ReuseMethod(), 1

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 1.0

    def test_several_documents_lose_cross_attention(self, case: Case) -> None:
        full, reuse = case.answer("full"), case.answer(ReuseMethod())
        assert full.first_token_logprobs is not None and reuse.first_token_logprobs is not None
        assert not torch.allclose(full.first_token_logprobs, reuse.first_token_logprobs, atol=1e-3)
        assert reuse.stats.recomputed_tokens == 0
