from __future__ import annotations

import pytest

from samkv_integrations.methods import FullMethod

from .contract import Case, MethodContract


class TestFullMethod(MethodContract):
    __test__ = True

    @pytest.fixture
    def method(self) -> FullMethod:
        return FullMethod()

    @pytest.fixture
    def question_in_build(self) -> bool:
        return True

    @pytest.fixture
    def full_equivalent(self) -> tuple[FullMethod, int]:
        return FullMethod(), 3

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 1.0

    def test_full_recomputes_every_context_token(self, case: Case) -> None:
        stats = case.answer(FullMethod()).stats
        assert stats.kept_fraction == 1.0
        assert stats.recomputed_tokens == case.context_tokens
