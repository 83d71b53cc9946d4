"""RetroAttention decoding (``+decode=retro``): exactness limits, the correction, scoping, specs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from samkv_integrations.decode import Decoder
from samkv_integrations.methods import (
    ContextCache,
    DecodeState,
    MethodInput,
    RetroMethod,
    SamKVMethod,
    get_method,
    parse_spec,
)
from samkv_integrations.methods.pages import merge_partials, partial_attention
from samkv_integrations.methods.quest_graph import StaticQuestDecoder
from samkv_integrations.methods.retro_attention import RetroDecoder
from samkv_integrations.models import LoadedModel
from samkv_integrations.static_decode import with_graphs

from .contract import Case, MethodContract, prefill

#: A budget that keeps well under half of the documents, so that the pool is not empty.
SMALL = SamKVMethod(ranking="global", budget=0.2)


def decode_state(inputs: MethodInput, method: RetroMethod) -> DecodeState:
    """Build with ``method`` and prefill the question under its scope, as the engine does."""
    context = method(inputs)
    with method.question_scope(inputs, context):
        logits = prefill(inputs, context.cache, context.next_position)
    return DecodeState.after_prefill(inputs, context, logits, {})


def with_pool(state: DecodeState | ContextCache) -> DynamicCache:
    """A copy of the cache with every pooled token appended to each layer."""
    pool = state.pool
    assert pool is not None
    _, n_kv_heads, n_pages, page_size, head_dim = pool.keys.shape
    flat = pool.valid.reshape(-1)
    data = []
    for i, layer in enumerate(state.cache.layers):
        keys = pool.keys[i].reshape(n_kv_heads, n_pages * page_size, head_dim)[:, flat]
        values = pool.values[i].reshape(n_kv_heads, n_pages * page_size, head_dim)[:, flat]
        data.append(
            (torch.cat([layer.keys, keys[None]], dim=2), torch.cat([layer.values, values[None]], 2))
        )
    return DynamicCache(ddp_cache_data=data)


def forced_logits(
    state: DecodeState, decoder: Decoder, tokens: list[int], cache: DynamicCache | None = None
) -> list[torch.Tensor]:
    """Logits after feeding ``tokens`` one by one from ``state`` (teacher forcing)."""
    cache = state.cache if cache is None else cache
    with torch.inference_mode():
        return [
            decoder.step(state.model, cache, token, state.next_position + i)
            for i, token in enumerate(tokens)
        ]


def greedy_tokens(state: DecodeState, cache: DynamicCache, n: int) -> list[int]:
    tokens, logits, decoder = [], state.first_logits, Decoder()
    with torch.inference_mode():
        for i in range(n):
            tokens.append(int(logits.argmax()))
            logits = decoder.step(state.model, cache, tokens[-1], state.next_position + i)
    return tokens


class TestRetroMethod(MethodContract):
    __test__ = True

    @pytest.fixture(params=["retro", "quest", "quest+retro_question=compact"])
    def method(self, request: pytest.FixtureRequest) -> RetroMethod:
        spec = f"samkv+ranking=global+budget=0.2+decode={request.param}+retro_pages=2"
        method = get_method(spec + "+retro_page_size=4")
        assert isinstance(method, RetroMethod)
        return method

    @pytest.fixture
    def question_in_build(self, method: RetroMethod) -> bool:
        # The pooled question prefill must run under question_scope, so not in samkv's build.
        return method.retro_question == "compact"

    @pytest.fixture
    def full_equivalent(self) -> tuple[RetroMethod, int]:
        return RetroMethod(SamKVMethod(ranking="global", budget=1.0, update="overwrite")), 3

    @pytest.fixture
    def max_kept_fraction(self) -> float:
        return 0.2

    def test_whole_pool_budget_decodes_as_the_full_cache(self, case: Case) -> None:
        # The done-when test: every pool page fetched at every step is exact attention
        # over compact cache + dropped tokens, so greedy decoding is full-cache decoding.
        method = RetroMethod(SMALL, retro_pages=10_000, retro_page_size=4, retro_window=3)
        state = decode_state(case.inputs, method)
        assert state.pool is not None and state.pool.n_tokens > 0
        reference = with_pool(state)
        tokens = greedy_tokens(state, with_pool(state), 8)
        decoder = method.decoder(state)
        got = forced_logits(state, decoder, tokens)
        expected = forced_logits(state, Decoder(), tokens, reference)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
        assert [int(g.argmax()) for g in got[:-1]] == tokens[1:]
        stats = state.details["decode"]
        assert isinstance(stats, dict)
        assert stats["corrections"] == 0  # every step saw every page: nothing to correct
        assert (
            stats["pages_per_step"]
            == state.pool.n_pages * len(state.cache.layers) * (state.cache.layers[0].keys.shape[1])
        )

    @pytest.mark.parametrize("pool_place", ["device", "host"])
    def test_pool_holds_the_dropped_tokens_at_global_positions(
        self, case: Case, pool_place: str
    ) -> None:
        inputs = case.inputs
        method = RetroMethod(SMALL, retro_page_size=4, retro_pool=pool_place)
        context = method(inputs)
        pool = context.pool
        assert pool is not None and pool.on_host == (pool_place == "host")
        keys, values, positions = [], [], []
        for i, (doc, kept) in enumerate(zip(inputs.documents, context.kept_indices, strict=True)):
            dropped = torch.ones(doc.n_tokens, dtype=torch.bool)
            dropped[kept] = False
            keys.append(inputs.aligned_keys(i)[:, :, dropped])
            values.append(doc.values[:, :, dropped])
            positions.append(inputs.doc_starts[i] + dropped.nonzero().squeeze(1))
        n_layers, n_kv_heads, _, _, head_dim = pool.keys.shape
        flat = pool.valid.reshape(-1)

        def tokens(paged: torch.Tensor) -> torch.Tensor:
            return paged.reshape(n_layers, n_kv_heads, -1, head_dim)[:, :, flat]

        torch.testing.assert_close(tokens(pool.keys), torch.cat(keys, dim=2))
        torch.testing.assert_close(tokens(pool.values), torch.cat(values, dim=2))
        assert torch.equal(pool.positions, torch.cat(positions))
        for page in range(pool.n_pages):
            inside = pool.keys[:, :, page][:, :, pool.valid[page]]
            torch.testing.assert_close(pool.key_min[:, :, page], inside.amin(dim=2))
            torch.testing.assert_close(pool.key_max[:, :, page], inside.amax(dim=2))

    def test_static_quest_decodes_as_the_eager_quest(self, case: Case) -> None:
        # The CUDA-graph twin of decode=quest, run eagerly here: the same attention on
        # preallocated buffers behind a mask must give the eager decoder's logits and stats.
        method = RetroMethod(SMALL, decode="quest", retro_pages=2, retro_page_size=4)
        eager_state = decode_state(case.inputs, method)
        static_state = decode_state(case.inputs, method)
        assert static_state.pool is not None
        tokens = greedy_tokens(eager_state, with_pool(eager_state), 6)
        eager = forced_logits(eager_state, method.decoder(eager_state), tokens)
        twin = StaticQuestDecoder(static_state.pool, 2, static_state.details, len(tokens))
        static = forced_logits(static_state, twin, tokens)
        for a, b in zip(eager, static, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        eager_stats, static_stats = eager_state.details["decode"], static_state.details["decode"]
        assert isinstance(eager_stats, dict) and isinstance(static_stats, dict)
        for key in ("policy", "steps", "pages_per_step", "pool_tokens", "bytes_moved"):
            assert static_stats[key] == eager_stats[key], key

    def test_only_quest_from_a_device_pool_has_a_graph_twin(self, case: Case) -> None:
        def decoder(**options: Any) -> Decoder:
            method = RetroMethod(SMALL, retro_pages=2, retro_page_size=4, **options)
            return method.decoder(decode_state(case.inputs, method))

        quest = decoder(decode="quest")
        assert isinstance(with_graphs(quest, True, 8), StaticQuestDecoder)
        assert with_graphs(quest, False, 8) is quest
        for kept in (decoder(decode="retro"), decoder(decode="quest", retro_pool="host")):
            assert with_graphs(kept, True, 8) is kept
        pool = decode_state(case.inputs, RetroMethod(SMALL, retro_page_size=4)).pool
        assert pool is not None
        with pytest.raises(ValueError, match="pages must be in 1"):
            StaticQuestDecoder(pool, pool.n_pages + 1, {}, 4)

    def test_pooled_question_prefill_reads_the_whole_pool(self, case: Case) -> None:
        # Dense over compact cache + pool = a plain prefill on a cache holding both.
        inputs = case.inputs
        method = RetroMethod(SMALL, retro_page_size=4, retro_pool="host")
        context = method(inputs)
        assert context.pool is not None and context.pool.n_tokens > 0
        reference = prefill(inputs, with_pool(context), context.next_position)
        compact = prefill(inputs, method(inputs).cache, context.next_position)
        with method.question_scope(inputs, context):
            pooled = prefill(inputs, context.cache, context.next_position)
        torch.testing.assert_close(pooled, reference, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(pooled, compact, atol=1e-3)
        # The pool was read, not added: the cache holds the compact entries and the question.
        n_kept = sum(int(k.numel()) for k in context.kept_indices)
        expected_len = inputs.prefix.length + n_kept + len(inputs.question_ids)
        assert context.cache.get_seq_length() == expected_len
        stats = context.details["question_pool"]
        assert isinstance(stats, dict) and stats["tokens"] == context.pool.n_tokens
        assert stats["bytes_moved"] == context.pool.nbytes  # each layer's pages, once

    def test_compact_question_scope_is_the_inner_methods(self, case: Case) -> None:
        plain = case.answer(SMALL)
        got = case.answer(RetroMethod(SMALL, retro_pages=0, retro_question="compact"))
        assert got.first_token_logprobs is not None and plain.first_token_logprobs is not None
        assert torch.equal(got.first_token_logprobs, plain.first_token_logprobs)

    def test_zero_pages_decode_as_the_compact_cache(self, case: Case) -> None:
        plain = case.answer(SMALL)
        got = case.answer(RetroMethod(SMALL, retro_pages=0, retro_question="compact"))
        assert got.token_ids == plain.token_ids
        assert got.first_token_logprobs is not None and plain.first_token_logprobs is not None
        assert torch.equal(got.first_token_logprobs, plain.first_token_logprobs)
        assert got.stats.kept_tokens == plain.stats.kept_tokens

    def test_retro_differs_from_quest_only_by_the_correction(self, case: Case) -> None:
        options = {"retro_pages": 1, "retro_page_size": 4}
        quest = RetroMethod(SMALL, decode="quest", **options)
        retro = RetroMethod(SMALL, decode="retro", retro_window=3, **options)
        quest_state = decode_state(case.inputs, quest)
        retro_state = decode_state(case.inputs, retro)
        tokens = greedy_tokens(quest_state, with_pool(quest_state), 6)
        quest_logits = forced_logits(quest_state, quest.decoder(quest_state), tokens)
        retro_decoder = retro.decoder(retro_state)
        retro_logits = forced_logits(retro_state, retro_decoder, tokens)
        # The first step has no past to correct: the two are the same computation.
        torch.testing.assert_close(retro_logits[0], quest_logits[0], atol=0, rtol=0)
        assert isinstance(retro_decoder, RetroDecoder)
        assert retro_decoder.stats.corrections > 0
        assert any(not torch.equal(r, q) for r, q in zip(retro_logits, quest_logits, strict=True))

    def test_output_cache_holds_attention_over_everything_seen(self, case: Case) -> None:
        # Layer 0's cache is never refreshed, so a past step's corrected output there must
        # equal its query's exact attention over the compact cache it saw plus every page it
        # has seen so far (its own fetch and the later ones merged in).
        method = RetroMethod(SMALL, retro_pages=1, retro_page_size=4, retro_window=4)
        state = decode_state(case.inputs, method)
        decoder = method.decoder(state)
        assert isinstance(decoder, RetroDecoder) and state.pool is not None
        forced_logits(state, decoder, greedy_tokens(state, with_pool(state), 5))
        oldest = decoder.past[0]
        query, out, seen = oldest.query[0], oldest.out[0], oldest.seen[0]
        assert query is not None and out is not None and seen is not None
        assert bool((seen.sum(-1) > 1).any()), "the window must have brought new pages"
        pool, layer = state.pool, state.cache.layers[0]
        scaling = query.shape[-1] ** -0.5  # Llama's and Qwen2's head_dim ** -0.5
        for head in range(query.shape[0]):
            page_keys = pool.keys[0, head][seen[head]].reshape(-1, query.shape[-1])
            page_values = pool.values[0, head][seen[head]].reshape(-1, query.shape[-1])
            valid = pool.valid[seen[head]].reshape(-1)
            keys = torch.cat([layer.keys[0, head, : oldest.cache_index + 1], page_keys[valid]])
            values = torch.cat(
                [layer.values[0, head, : oldest.cache_index + 1], page_values[valid]]
            )
            weights = torch.softmax((query[head] @ keys.T).float() * scaling, dim=-1)
            torch.testing.assert_close(out[head], weights @ values.float(), atol=1e-5, rtol=1e-4)

    def test_stats_reach_the_answer(self, case: Case) -> None:
        method = RetroMethod(SMALL, retro_pages=2, retro_page_size=4, retro_pool="host")
        answer = case.answer(method)
        stats = answer.details["decode"]
        assert isinstance(stats, dict)
        assert stats["steps"] == len(answer.token_ids) - 1
        assert stats["pool_on_host"] is True
        pages, head_dim = stats["pages_per_step"], case.inputs.prefix.keys[0].shape[-1]
        # Each fetched page moves its keys and values: 2 x 4 tokens x head_dim float32s.
        assert pages > 0 and stats["bytes_moved"] == pages * stats["steps"] * 2 * 4 * head_dim * 4
        assert stats["pool_tokens"] == case.context_tokens - sum(answer.stats.kept_tokens)
        assert answer.stats.method == "samkv+decode=retro"

    def test_attention_hook_is_scoped_even_on_error(self, case: Case) -> None:
        model = case.inputs.model
        before = (dict(ALL_ATTENTION_FUNCTIONS), model.config._attn_implementation)
        hooks = [len(layer._forward_pre_hooks) for layer in model.get_decoder().layers]
        method = RetroMethod(SMALL, retro_pages=2, retro_page_size=4, retro_window=3)
        state = decode_state(case.inputs, method)
        decoder = method.decoder(state)

        def boom(*_: object) -> None:
            raise RuntimeError("boom")

        failing = model.get_decoder().layers[-1].register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
                decoder.step(model, state.cache, 1, state.next_position)
        finally:
            failing.remove()
        assert (dict(ALL_ATTENTION_FUNCTIONS), model.config._attn_implementation) == before
        assert [len(layer._forward_pre_hooks) for layer in model.get_decoder().layers] == hooks


def test_log_sum_exp_merge_is_exact_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 8, generator=gen)
    keys, values = torch.randn(2, 20, 8, generator=gen), torch.randn(2, 20, 8, generator=gen)
    split = torch.zeros(2, 1, 20, dtype=torch.bool)
    split[0, :, ::3], split[1, :, 5:] = True, True
    out_a, lse_a = partial_attention(query, keys, values, 0.3, split)
    out_b, lse_b = partial_attention(query, keys, values, 0.3, ~split)
    merged, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    expected = torch.softmax(query @ keys.transpose(1, 2) * 0.3, dim=-1) @ values
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(lse, torch.logsumexp(query @ keys.transpose(1, 2) * 0.3, -1))
    # A head with no entries weighs nothing: merging it changes nothing.
    empty_out, empty_lse = partial_attention(query, keys, values, 0.3, torch.zeros_like(split))
    assert bool((empty_lse == float("-inf")).all()) and not bool(empty_out.any())
    same, _ = merge_partials(merged, lse, empty_out, empty_lse)
    torch.testing.assert_close(same, merged)


@pytest.mark.parametrize(
    ("spec", "option"),
    [
        ("samkv+decode=later", "decode"),
        ("samkv+decode=retro+retro_pages=-1", "retro_pages"),
        ("samkv+decode=retro+retro_page_size=0", "retro_page_size"),
        ("samkv+decode=retro+retro_window=0", "retro_window"),
        ("samkv+decode=retro+retro_pool=disk", "retro_pool"),
        ("samkv+decode=quest+retro_question=all", "retro_question"),
        ("samkv+retro_pages=4", "retro_pages"),
        ("samkv+decode=retro+retro_pages=1.5", "retro_pages"),
    ],
)
def test_bad_decoding_options_name_the_option(spec: str, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        parse_spec(spec)
    with pytest.raises(ValueError, match=option):
        get_method(spec)


def test_spec_wraps_any_method(tiny_llama: LoadedModel) -> None:
    spec = parse_spec("cacheblend+decode=retro+retro_pages=3")
    assert spec.options == {} and spec.decoding == {"decode": "retro", "retro_pages": 3}
    method = spec.build()
    assert isinstance(method, RetroMethod) and method.inner.name == "cacheblend"
    assert method.name == "cacheblend+decode=retro"
    assert get_method("samkv", decode="quest").name == "samkv+decode=quest"
    assert not isinstance(get_method("samkv"), RetroMethod)
