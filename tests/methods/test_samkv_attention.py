"""SamKV with blocks scored by the question's softmax attention (``scoring="attention"``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

from samkv_integrations import tail_attention as tail
from samkv_integrations.methods import MethodInput, SamKVMethod, block_scores
from samkv_integrations.methods.aligned import aligned_cache, gather_aligned
from samkv_integrations.methods.block_scores import question_queries, selection_layer_indices
from samkv_integrations.methods.question_attention import (
    keep_by_mass,
    question_block_mass,
    rotate_queries,
)
from samkv_integrations.methods.recompute import assemble_cache
from samkv_integrations.methods.specs import parse_spec
from samkv_integrations.models.compat import with_cache
from samkv_integrations.rope import shift_keys
from samkv_integrations.tail_attention import tail_causal_attention

from .contract import Case, MethodContract

#: The layout ``_attended_block`` crafts keys for: 16-token blocks, the documents' keys at
#: their global positions, and queries from a question that read only the anchors.
CRAFTED = {"block_size": 16, "score_positions": "global", "question_context": "anchors"}


class TestSamKVAttention(MethodContract):
    __test__ = True

    @pytest.fixture(
        params=[
            SamKVMethod(scoring="attention"),
            SamKVMethod(scoring="attention", personal_weight=0.5, head_pool="max", tau=0.8),
            SamKVMethod(scoring="attention", **CRAFTED),  # the earlier default
            SamKVMethod(scoring="attention", question_context="anchors"),
            SamKVMethod(scoring="attention", lexical_weight=0.5),
        ],
        ids=["attention", "personal-max-tau", "earlier-default", "anchors-only", "lexical"],
    )
    def method(self, request: pytest.FixtureRequest) -> SamKVMethod:
        return request.param

    @pytest.fixture
    def question_in_build(self) -> bool:
        return True

    @pytest.fixture
    def full_equivalent(self) -> tuple[SamKVMethod, int]:
        return SamKVMethod(scoring="attention", budget=1.0, update="overwrite"), 3

    @pytest.fixture
    def max_kept_fraction(self, method: SamKVMethod) -> float:
        return method.budget

    def test_budget_one_keeps_everything(self, case: Case) -> None:
        context = SamKVMethod(scoring="attention", budget=1.0)(case.inputs)
        lengths = [doc.n_tokens for doc in case.inputs.documents]
        assert [k.tolist() for k in context.kept_indices] == [list(range(n)) for n in lengths]
        assert context.details["block_mass_kept"] == pytest.approx(1.0)

    def test_min_kept_is_a_floor_under_the_budget(self, case: Case) -> None:
        n = case.context_tokens
        kept = [
            sum(map(len, SamKVMethod(budget=0.2, min_kept=floor)(case.inputs).kept_indices))
            for floor in (0, n // 2, n)
        ]
        assert kept[0] <= math.floor(0.2 * n)
        assert n // 2 - SamKVMethod().block_size < kept[1] <= n // 2  # type: ignore[operator]
        assert kept[2] == n
        # Under the budget's own share, the floor changes nothing.
        same = SamKVMethod(budget=0.5, min_kept=1)(case.inputs).kept_indices
        assert [k.tolist() for k in same] == [
            k.tolist() for k in SamKVMethod(budget=0.5)(case.inputs).kept_indices
        ]
        with pytest.raises(ValueError, match="ranking must be 'global' with min_kept"):
            SamKVMethod(scoring="paper", ranking="per_document", min_kept=100)
        with pytest.raises(ValueError, match="min_kept must be an int >= 0"):
            SamKVMethod(min_kept=-1)
        with pytest.raises(ValueError, match="ranking must be 'global' with scoring='attention'"):
            SamKVMethod(scoring="attention", ranking="per_document")

    def test_the_block_the_question_attends_to_is_kept(self, case: Case) -> None:
        method = SamKVMethod(scoring="attention", budget=0.25, update="overwrite", **CRAFTED)
        before = method(case.inputs).kept_indices[0].tolist()
        # A block of document 0 that the unmodified keys leave out, 16 tokens after n_init.
        start = next(
            method.n_init + b * method.block_size
            for b in range(20)
            if method.n_init + b * method.block_size not in before
        )
        block = range(start, start + method.block_size)
        inputs = _attended_block(case.inputs, 0, block)
        kept = method(inputs).kept_indices[0].tolist()
        assert set(block) <= set(kept)
        assert set(block) - set(before)

    def test_tau_keeps_fewer_blocks_when_the_mass_is_concentrated(self, case: Case) -> None:
        inputs = _attended_block(case.inputs, 0, range(8, 24))
        budget = SamKVMethod(scoring="attention", budget=0.6, **CRAFTED)(inputs)
        concentrated = SamKVMethod(scoring="attention", budget=0.6, tau=0.5, **CRAFTED)(inputs)
        n_anchors = sum(len(a) for a in budget.details["anchor_indices"])  # type: ignore[arg-type]
        kept_budget = sum(len(k) for k in budget.kept_indices)
        kept_tau = sum(len(k) for k in concentrated.kept_indices)
        assert kept_tau == n_anchors + 16  # the one attended block holds half the mass
        assert kept_tau < kept_budget <= math.floor(0.6 * sum(d.n_tokens for d in inputs.documents))
        share = concentrated.details["block_mass_kept"]
        assert isinstance(share, float)  # read back from the device, not left as a tensor
        assert 0.5 <= share < 1  # the blocks dropped held the rest

    @pytest.mark.parametrize("budget", [0.2, 0.5])
    def test_tau_never_exceeds_the_budget(self, case: Case, budget: float) -> None:
        limit = math.floor(budget * case.context_tokens)
        kept = []
        for tau in (0.3, 0.6, 0.9, 0.99, None):
            context = SamKVMethod(scoring="attention", budget=budget, tau=tau)(case.inputs)
            kept.append(sum(len(k) for k in context.kept_indices))
        assert all(k <= limit for k in kept)
        assert kept == sorted(kept), "a larger tau never keeps less"

    def test_adjacent_positions_move_the_documents_not_the_question(self, case: Case) -> None:
        # One document already ends right before the question: both layouts are the same.
        one = dataclasses.replace(case.inputs, documents=case.inputs.documents[:1])
        methods = [SamKVMethod(budget=0.3, score_positions=p) for p in ("global", "adjacent")]
        kept = [[k.tolist() for k in m(one).kept_indices] for m in methods]
        assert kept[0] == kept[1]
        # Several: the earlier documents move next to the question, and the choice changes.
        kept = [[k.tolist() for k in m(case.inputs).kept_indices] for m in methods]
        assert kept[0] != kept[1]
        with pytest.raises(ValueError, match="score_positions applies to scoring='attention'"):
            SamKVMethod(scoring="paper", ranking="per_document", score_positions="adjacent")

    def test_question_context_all_reads_every_reused_token(
        self, case: Case, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seen: list[int] = []

        def spy(model, context, token_ids, start, layers):  # type: ignore[no-untyped-def]
            seen.append(context.layers[0].keys.shape[2] - case.inputs.prefix.length)
            return question_queries(model, context, token_ids, start, layers)

        monkeypatch.setattr(block_scores, "question_queries", spy)
        anchors = SamKVMethod(budget=0.3, question_context="anchors")(case.inputs)
        everything = SamKVMethod(budget=0.3)(case.inputs)  # "all" is the default
        n_anchors = sum(len(a) for a in anchors.details["anchor_indices"])  # type: ignore[arg-type]
        assert seen == [n_anchors, case.context_tokens]
        assert sum(map(len, everything.kept_indices)) <= math.floor(0.3 * case.context_tokens)
        with pytest.raises(ValueError, match="question_context must be one of"):
            SamKVMethod(question_context="everything")

    @pytest.mark.parametrize("question_context", ["all", "anchors"])
    def test_the_question_pass_attends_as_the_models_own_attention(
        self, case: Case, monkeypatch: pytest.MonkeyPatch, question_context: str
    ) -> None:
        queries: list[torch.Tensor] = []
        attended: list[int] = []

        def spy(*args):  # type: ignore[no-untyped-def]
            queries.append(question_queries(*args))
            return queries[-1]

        def attend(layer: int, *args):  # type: ignore[no-untyped-def]
            attended.append(layer)
            return tail_causal_attention(layer, *args)

        monkeypatch.setattr(block_scores, "question_queries", spy)
        monkeypatch.setattr(tail, "tail_causal_attention", attend)
        method = SamKVMethod(budget=0.3, question_context=question_context)
        method(case.inputs)
        deepest = max(selection_layer_indices(case.inputs.documents[0].keys.shape[0], None))
        assert attended == list(range(deepest))  # the pass stops at the deepest one's q_proj
        monkeypatch.setattr(block_scores, "tail_attention", lambda _model: contextlib.nullcontext())
        method(case.inputs)  # the model's own SDPA under transformers' mask
        assert len(attended) == deepest
        torch.testing.assert_close(queries[0], queries[1])

    def test_three_defaults_follow_the_scoring(self) -> None:
        def chosen(method: SamKVMethod) -> tuple[object, ...]:
            return method.block_size, method.score_positions, method.question_context

        assert chosen(SamKVMethod()) == (32, "adjacent", "all")
        paper = SamKVMethod(scoring="paper", ranking="per_document")
        assert chosen(paper) == (16, "global", "anchors")
        assert chosen(SamKVMethod(block_size=8, question_context="anchors")) == (
            8, "adjacent", "anchors",
        )  # fmt: skip
        assert chosen(parse_spec("samkv+score_positions=global").build()) == (32, "global", "all")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="scoring must be one of"):
            SamKVMethod(scoring="mystery")

    def test_lexical_weight_one_keeps_the_block_with_the_questions_rare_ids(
        self, case: Case
    ) -> None:
        method = SamKVMethod(budget=0.25, update="overwrite", lexical_weight=1.0, block_size=16)
        inputs = case.inputs
        before = method(inputs).kept_indices[1].tolist()
        start = next(s for s in range(8, inputs.documents[1].n_tokens - 24, 16) if s not in before)
        # Give one dropped block of document 1 ids that only the question holds.
        rare = [
            t
            for t in inputs.question_ids
            if t not in {i for d in inputs.documents for i in d.token_ids}
        ]
        assert len(rare) >= 2, "the contract's question has ids of its own"
        ids = list(inputs.documents[1].token_ids)
        ids[start : start + 2] = rare[:2]
        documents = list(inputs.documents)
        documents[1] = dataclasses.replace(inputs.documents[1], token_ids=ids)
        kept = method(dataclasses.replace(inputs, documents=documents)).kept_indices[1].tolist()
        assert set(range(start, start + 16)) <= set(kept)

    def test_block_mass_is_the_models_attention(self, case: Case) -> None:
        # Queries captured over every reused token; the mass per token must be the eager
        # attention's probabilities over the context, renormalized without the question.
        inputs, model = case.inputs, case.inputs.model
        n_layers = len(inputs.prefix.keys)
        layers = selection_layer_indices(n_layers, None)
        everything = [torch.arange(d.n_tokens) for d in inputs.documents]
        context = gather_aligned(model, inputs.documents, inputs.doc_starts, everything)
        start = inputs.context_end
        seen = aligned_cache(
            model, inputs.prefix, inputs.documents, inputs.doc_starts, None, max(layers) + 1
        )
        queries = question_queries(model, seen, inputs.question_ids, start, layers)
        n_context = sum(d.n_tokens for d in inputs.documents)
        token = torch.arange(n_context)
        mass = question_block_mass(
            model, inputs.prefix, inputs.documents, inputs.doc_starts, layers,
            queries, start, None, 0.0, token, n_context,
        )  # fmt: skip
        expected = _eager_context_attention(inputs, context, layers)
        torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-4)


def test_keep_by_mass_tau_and_room() -> None:
    mass = torch.tensor([[0.05, 0.6, 0.1], [0.2, 0.05, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    tokens = torch.tensor([[16, 16, 16], [16, 8, 0]])
    keep = keep_by_mass(mass, valid, tokens, room=1000, tau=1.0)
    assert keep.tolist() == [[True, True, True], [True, True, False]]
    # 0.6 of 1.0 is enough for tau 0.6; 0.8 needs the second heaviest block too.
    assert keep_by_mass(mass, valid, tokens, 1000, 0.6).tolist() == [
        [False, True, False],
        [False, False, False],
    ]
    assert keep_by_mass(mass, valid, tokens, 1000, 0.8).tolist() == [
        [False, True, False],
        [True, False, False],
    ]
    # The room caps tau: only the heaviest block fits in 20 tokens.
    assert keep_by_mass(mass, valid, tokens, 20, 0.9).sum() == 1


def test_spec_strings_reach_the_options() -> None:
    spec = parse_spec("samkv+scoring=attention+tau=0.9+personal_weight=0.3+head_pool=max")
    method = spec.build()
    assert isinstance(method, SamKVMethod)
    assert (method.scoring, method.tau, method.personal_weight, method.head_pool) == (
        "attention",
        0.9,
        0.3,
        "max",
    )
    assert parse_spec("samkv+scoring=attention+tau=1+personal_weight=0").build().tau == 1


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"scoring": "softmax"}, "scoring"),
        ({"scoring": "attention", "tau": 0.0}, "tau"),
        ({"scoring": "attention", "tau": 1.5}, "tau"),
        ({"scoring": "attention", "tau": "half"}, "tau"),
        ({"scoring": "attention", "tau": True}, "tau"),
        ({"scoring": "attention", "personal_weight": -0.1}, "personal_weight"),
        ({"scoring": "attention", "personal_weight": 2}, "personal_weight"),
        ({"scoring": "attention", "head_pool": "min"}, "head_pool"),
        ({"scoring": "attention", "ranking": "per_document"}, "ranking"),
        ({"scoring": "paper", "tau": 0.9}, "tau"),
        ({"scoring": "paper", "personal_weight": 0.5}, "personal_weight"),
        ({"ranking": "per_document", "head_pool": "max"}, "head_pool"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamKVMethod(**options)  # type: ignore[arg-type]


def _attended_block(inputs: MethodInput, index: int, block: range) -> MethodInput:
    """``inputs`` whose document ``index`` has keys the question's queries all point to.

    At each selection layer, the keys of ``block`` become a large multiple of the sum of
    the question tokens' rotated queries (per KV group), and every other non-anchor key of
    the document zero, so the question's attention on the documents lands on ``block``.
    Anchor keys are left alone: the question's queries, run over the anchors, stay the same.
    """
    model, doc = inputs.model, inputs.documents[index]
    layers = selection_layer_indices(len(inputs.prefix.keys), None)
    anchors = [[*range(8), *range(d.n_tokens - 8, d.n_tokens)] for d in inputs.documents]
    local = [torch.tensor(a) for a in anchors]
    n_layers = max(layers) + 1
    seen = aligned_cache(model, inputs.prefix, inputs.documents, inputs.doc_starts, local, n_layers)
    start = inputs.context_end
    queries = question_queries(model, seen, inputs.question_ids, start, layers)
    positions = torch.arange(start, start + queries.shape[1])
    keys = doc.keys.clone()
    middle = torch.arange(8, doc.n_tokens - 8)
    for s, layer in enumerate(layers):
        rotated = rotate_queries(model, layer, queries[s], positions)  # [n_q_heads, m, d]
        target = rotated.unflatten(0, (keys.shape[1], -1)).sum(dim=(1, 2))  # [n_kv_heads, d]
        target = 1000.0 * target / target.norm(dim=-1, keepdim=True)
        global_keys = torch.zeros(keys.shape[1], len(middle), keys.shape[-1])
        global_keys[:, torch.tensor(block) - 8] = target[:, None]
        delta = inputs.doc_starts[index] - doc.prefix_len
        keys[layer][:, middle] = shift_keys(model, global_keys, -delta).to(keys.dtype)
    documents = list(inputs.documents)
    documents[index] = dataclasses.replace(doc, keys=keys)
    return MethodInput(model, inputs.prefix, documents, inputs.question_ids)


def _eager_context_attention(
    inputs: MethodInput, context: tuple[torch.Tensor, torch.Tensor], layers: list[int]
) -> torch.Tensor:
    """``[S, n_kv_heads, N]``: the question's eager attention over the documents' tokens.

    Per query head and token, renormalized over the prefix and the documents (the
    question's own keys left out), then averaged over each KV group's heads and the tokens.
    """
    model = inputs.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        start = inputs.context_end
        positions = torch.arange(start, start + len(inputs.question_ids))
        out = model.get_decoder()(
            input_ids=torch.tensor([inputs.question_ids]),
            position_ids=positions[None],
            **with_cache(model.get_decoder(), assemble_cache(inputs.prefix, [context])),
            use_cache=True,
            output_attentions=True,
        )
    finally:
        model.set_attn_implementation(previous)
    n_kv = inputs.prefix.keys[0].shape[1]
    result = []
    for layer in layers:
        probs = out.attentions[layer][0].float()[..., :start]  # [n_q_heads, m, context]
        probs = probs / probs.sum(-1, keepdim=True)
        pooled = probs.unflatten(0, (n_kv, -1)).mean(dim=(1, 2))
        result.append(pooled[:, inputs.prefix.length :])
    return torch.stack(result)
