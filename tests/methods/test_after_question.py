"""A method that only acts after the question prefill passes the contract, engine unchanged.

``DropAfterQuestionMethod`` is a test-only stand-in for a one-shot eviction such as SAGE-KV:
it builds as ``reuse`` does, then drops document tokens from the decode cache once the
question is prefilled, keeping positions and kept indices true to the reduced cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from samkv_integrations.decode import eos_token_ids
from samkv_integrations.methods import DecodeState, ReuseMethod
from samkv_integrations.methods.base import cache_from_layers
from samkv_integrations.models.compat import with_cache
from samkv_integrations.timing import Stopwatch

from .contract import Case, MethodContract


@dataclass
class DropAfterQuestionMethod(ReuseMethod):
    """Reuse, then keep only document tokens whose local index is a multiple of ``keep_every``."""

    name = "drop-after-question"
    keep_every: int = 2

    def after_question(self, state: DecodeState, watch: Stopwatch) -> DecodeState:
        """Drop document entries from every layer's ``[1, n_kv_heads, cache_len, head_dim]``."""
        with watch.phase("evict"):
            keep = torch.ones_like(state.positions, dtype=torch.bool)
            kept_indices = []
            for start, kept in zip(state.doc_starts, state.kept_indices, strict=True):
                stays = kept % self.keep_every == 0
                keep[torch.searchsorted(state.positions, start + kept[~stays])] = False
                kept_indices.append(kept[stays])
            index = keep.nonzero().squeeze(1)
            layers = state.cache.layers
            cache = cache_from_layers(
                state.model,
                [layer.keys[0][:, index] for layer in layers],
                [layer.values[0][:, index] for layer in layers],
            )
        return dataclasses.replace(
            state, cache=cache, positions=state.positions[index], kept_indices=kept_indices
        )


class TestDropAfterQuestionMethod(MethodContract):
    __test__ = True

    @pytest.fixture
    def method(self) -> DropAfterQuestionMethod:
        return DropAfterQuestionMethod()

    @pytest.fixture
    def full_equivalent(self) -> tuple[DropAfterQuestionMethod, int]:
        # Keeping every token of one document drops nothing: reuse of one document is full.
        return DropAfterQuestionMethod(keep_every=1), 1

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 0.51

    def test_eviction_is_timed_after_the_question(self, case: Case) -> None:
        stats = case.answer(DropAfterQuestionMethod()).stats
        phases = list(stats.seconds)
        assert phases.index("evict") > phases.index("question")
        assert stats.ttft_s == pytest.approx(sum(stats.seconds.values()))

    def test_first_token_comes_from_the_whole_cache(self, case: Case) -> None:
        reuse, dropped = case.answer(ReuseMethod()), case.answer(DropAfterQuestionMethod())
        assert reuse.first_token_logprobs is not None
        assert dropped.first_token_logprobs is not None
        assert torch.equal(reuse.first_token_logprobs, dropped.first_token_logprobs)
        assert dropped.stats.kept_fraction < reuse.stats.kept_fraction == 1.0

    def test_decoding_runs_on_the_reduced_cache(self, case: Case) -> None:
        # Reference: a plain greedy loop on the observed (reduced) cache, written out here.
        method = DropAfterQuestionMethod()
        _, state = case.decode_state(method)
        model = state.model
        eos = eos_token_ids(model, case.engine.model.tokenizer)
        expected, logits, position = [], state.first_logits, state.next_position
        with torch.inference_mode():
            for _ in range(8):
                token = int(logits.argmax())
                if token in eos:
                    break
                expected.append(token)
                out = model(
                    input_ids=torch.tensor([[token]]),
                    position_ids=torch.tensor([[position]]),
                    **with_cache(state.model, state.cache),
                    use_cache=True,
                )
                logits, position = out.logits[0, -1], position + 1
        assert case.answer(method).token_ids == expected
