"""A decoding policy named in an eval spec (``+decode=...``) is the one the answers use."""

from __future__ import annotations

from pathlib import Path

import pytest

from samkv_integrations.eval.harness import EvalConfig, run_eval
from samkv_integrations.methods import MethodInput, RetroMethod
from samkv_integrations.methods.base import ContextCache
from samkv_integrations.timing import Stopwatch


def test_decoding_policy_specs_reach_the_engine(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, str]] = []
    original = RetroMethod.build

    def spy(self: RetroMethod, inputs: MethodInput, watch: Stopwatch) -> ContextCache:
        built.append((self.name, self.retro_question))
        return original(self, inputs, watch)

    monkeypatch.setattr(RetroMethod, "build", spy)
    config = EvalConfig(
        data=data,
        methods="full,samkv+budget=0.3+decode=quest+retro_question=compact",
        model="random:tiny-llama",
        device="cpu",
        out=tmp_path / "run",
        store=str(tmp_path / "kvcache"),
        max_new_tokens=4,
        progress=False,
    )
    run_eval(config)
    # One build per question, with the policy and its option as the spec named them.
    assert built == [("samkv+decode=quest", "compact")] * 2
