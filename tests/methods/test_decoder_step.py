"""A method that only supplies a decode step passes the contract, engine unchanged.

``RecordingDecoderMethod`` is a test-only stand-in for decode-time retrieval or correction
such as RetroAttention: it builds as ``reuse`` does and decodes through its own
``Decoder``, which keeps per-answer state (what it was fed) and wraps the plain step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.decode import Decoder
from samkv_integrations.methods import DecodeState, ReuseMethod
from samkv_integrations.models import LoadedModel

from .contract import DOCUMENTS, QUESTION, Case, MethodContract


class RecordingDecoder(Decoder):
    """The plain step, recording each token, its position and the cache length it saw."""

    def __init__(self, state: DecodeState) -> None:
        self.start = state.next_position
        self.fed: list[tuple[int, int]] = []
        self.cache_lengths: list[int] = []

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        self.fed.append((token, position))
        self.cache_lengths.append(cache.get_seq_length())
        return super().step(model, cache, token, position)


@dataclass
class RecordingDecoderMethod(ReuseMethod):
    """Reuse, decoded through a fresh ``RecordingDecoder`` per answer."""

    name = "recording-decoder"
    made: list[RecordingDecoder] = field(default_factory=list, repr=False, compare=False)

    def decoder(self, state: DecodeState) -> Decoder:
        made = RecordingDecoder(state)
        self.made.append(made)
        return made


class BanningDecoder(Decoder):
    """The plain step, with one token's logit set to ``-inf``: decoding must obey it."""

    def __init__(self, banned: int) -> None:
        self.banned = banned

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        logits = super().step(model, cache, token, position).clone()
        logits[self.banned] = float("-inf")
        return logits


@dataclass
class BanningDecoderMethod(ReuseMethod):
    """Reuse, decoded with ``banned`` never picked after the first token."""

    name = "banning-decoder"
    banned: int = 0

    def decoder(self, state: DecodeState) -> Decoder:
        return BanningDecoder(self.banned)


class TestRecordingDecoderMethod(MethodContract):
    __test__ = True

    @pytest.fixture
    def method(self) -> RecordingDecoderMethod:
        return RecordingDecoderMethod()

    @pytest.fixture
    def full_equivalent(self) -> tuple[RecordingDecoderMethod, int]:
        return RecordingDecoderMethod(), 1

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 1.0

    def test_decodes_as_the_plain_decoder(self, case: Case) -> None:
        plain, recorded = case.answer(ReuseMethod()), case.answer(RecordingDecoderMethod())
        assert recorded.token_ids == plain.token_ids
        assert recorded.text == plain.text


@pytest.fixture
def talkative_engine(talkative_llama: LoadedModel, memory_store: KVCacheStore) -> SamKVEngine:
    return SamKVEngine(talkative_llama, memory_store)


def test_each_token_reaches_the_step_at_its_position(talkative_engine: SamKVEngine) -> None:
    refs = talkative_engine.index(DOCUMENTS, progress=False)
    method = RecordingDecoderMethod()
    seen: list[DecodeState] = []
    answer = talkative_engine.answer(QUESTION, refs, method, max_new_tokens=6, observe=seen.append)
    (decoder,) = method.made
    start = decoder.start
    # Six tokens, no EOS (the talkative model never picks one): the last is never fed.
    assert len(answer.token_ids) == 6
    assert decoder.fed == [(t, start + i) for i, t in enumerate(answer.token_ids[:-1])]
    first_length = seen[0].cache.get_seq_length() - len(answer.token_ids[:-1])
    assert decoder.cache_lengths == [first_length + i for i in range(5)]


def test_each_answer_gets_its_own_decoder(talkative_engine: SamKVEngine) -> None:
    refs = talkative_engine.index(DOCUMENTS, progress=False)
    method = RecordingDecoderMethod()
    first = talkative_engine.answer(QUESTION, refs, method, max_new_tokens=3)
    second = talkative_engine.answer(QUESTION, refs[:1], method, max_new_tokens=4)
    assert [len(d.fed) for d in method.made] == [2, 3]
    assert [t for t, _ in method.made[0].fed] == first.token_ids[:2]
    assert [t for t, _ in method.made[1].fed] == second.token_ids[:3]


def test_the_steps_logits_pick_the_tokens(talkative_engine: SamKVEngine) -> None:
    refs = talkative_engine.index(DOCUMENTS, progress=False)
    plain = talkative_engine.answer(QUESTION, refs, ReuseMethod(), max_new_tokens=6)
    banned = plain.token_ids[1]
    got = talkative_engine.answer(
        QUESTION, refs, BanningDecoderMethod(banned=banned), max_new_tokens=6
    )
    assert got.token_ids[0] == plain.token_ids[0]  # the first token comes from the prefill
    assert banned not in got.token_ids[1:]
