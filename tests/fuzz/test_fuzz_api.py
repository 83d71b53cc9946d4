"""Bad input through the Python API: one named, documented error per case, never a bug's.

Every case calls the engine (or a method, or the generation options) with one bad input and
consumes the answer stream, since a stream's errors may come at its first step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from samkv_integrations import CacheRef, KVCacheStore, SamKVEngine
from samkv_integrations.decode import GenerationOptions
from samkv_integrations.methods import CacheBlendMethod, EpicMethod, SamKVMethod
from samkv_integrations.models import LoadedModel
from tests.fuzz.common import Case, check_error, check_store

Call = Callable[[SamKVEngine, list[CacheRef]], Any]
DOCS = ["The lighthouse keeper rows to the island at dawn.", "The glacier moves a metre a day."]
LONG = "word " * 5000  # longer than tiny-llama's 4096-token context
NAN, INF = float("nan"), float("inf")


def ask(question: Any = "Who rows?", method: Any = "samkv", **kwargs: Any) -> Call:
    """Answer through ``stream`` and consume it (errors may come at the first step)."""
    kwargs.setdefault("max_new_tokens", 2)
    return lambda e, refs: "".join(e.stream(question, refs, method, **kwargs))


def ask_refs(make: Callable[[SamKVEngine, list[CacheRef]], Any], **kwargs: Any) -> Call:
    """Answer a good question over the refs ``make`` builds."""
    kwargs.setdefault("max_new_tokens", 2)
    return lambda e, refs: "".join(e.stream("Who rows?", make(e, refs), "samkv", **kwargs))


def bad_key(key: Any) -> Callable[[SamKVEngine, list[CacheRef]], list[CacheRef]]:
    return lambda e, refs: [dataclasses.replace(refs[0], key=key, text=None)]


def api(id: str, keyword: str, call: Call, gap: str | None = None) -> Case:
    return Case(id, keyword, call, gap)


DOCUMENT_CASES = [
    api("index-one-string", "not one string", lambda e, r: e.index("hello")),
    api("index-bytes-whole", "str", lambda e, r: e.index(b"hello")),
    *[
        api(f"index-{name}", "document text must be a str", lambda e, r, v=value: e.index([v]))
        for name, value in [
            ("int", 5),
            ("none", None),
            ("bytes", b"abc"),
            ("float", 3.5),
            ("list", ["nested"]),
            ("dict", {"text": "x"}),
            ("ref", CacheRef("a" * 64, 3, "m")),
        ]
    ],
    *[
        api(f"index-{name}", keyword, lambda e, r, v=value: e.index([v]))
        for name, value, keyword in [
            ("empty", "", "empty"),
            ("blank", "   ", "empty"),
            ("newlines", "\n\t\n", "empty"),
            ("surrogate", "a\ud800b", "not valid text"),
            ("low-surrogate", "\udcff", "valid text"),
            ("half-emoji", "smile \ud83d", "valid text"),
            ("too-long", LONG, "context"),
        ]
    ],
    api("index-second-empty", "document 1", lambda e, r: e.index(["fine", ""])),
    api("index-texts-none", "texts", lambda e, r: e.index(None)),
    api("index-texts-int", "texts", lambda e, r: e.index(5)),
    api("cache-ref-int", "str", lambda e, r: e.cache_ref(5)),
    api("cache-ref-empty", "empty", lambda e, r: e.cache_ref("")),
    api("cache-ref-surrogate", "valid text", lambda e, r: e.cache_ref("\ud800")),
    api("cache-ref-too-long", "context", lambda e, r: e.cache_ref(LONG)),
    api("prompt-tokens-empty-question", "question", lambda e, r: e.prompt_tokens("", [])),
    api("prompt-tokens-int-question", "question", lambda e, r: e.prompt_tokens(5, [])),
    api("prompt-tokens-int-document", "str", lambda e, r: e.prompt_tokens("q", [5])),
    api("prompt-tokens-empty-document", "empty", lambda e, r: e.prompt_tokens("q", [""])),
]

QUESTION_CASES = [
    api(f"question-{name}", keyword, ask(value))
    for name, value, keyword in [
        ("empty", "", "question is empty"),
        ("blank", " \n ", "question is empty"),
        ("none", None, "question must be a str"),
        ("int", 5, "question must be a str"),
        ("bytes", b"who?", "question must be a str"),
        ("list", ["who?"], "question"),
        ("surrogate", "\ud800", "not valid text"),
        ("trailing-surrogate", "who\udfff", "valid"),
        ("too-long", LONG, "context"),
    ]
]

OPTION_CASES = [
    api(f"{field}-{name}", field, ask(**{field: value}))
    for field, cases in {
        "max_new_tokens": [
            ("zero", 0),
            ("negative", -1),
            ("str", "2"),
            ("float", 2.5),
            ("bool", True),
            ("none", None),
            ("huge", 10**9),
        ],
        "temperature": [
            ("nan", NAN),
            ("inf", INF),
            ("minus-inf", -INF),
            ("negative", -1.0),
            ("str", "1"),
            ("none", None),
            ("bool", True),
        ],
        "top_p": [
            ("zero", 0.0),
            ("negative", -0.5),
            ("above-one", 1.5),
            ("nan", NAN),
            ("inf", INF),
            ("str", "0.9"),
            ("none", None),
        ],
        "seed": [("str", "x"), ("float", 1.5), ("bool", True)],
        "stop": [
            ("int", 5),
            ("int-list", [5]),
            ("empty-string", [""]),
            ("none-item", [None]),
            ("bytes", b"x"),
        ],
        "on_foreign_cache": [("unknown", "maybe"), ("none", None)],
    }.items()
    for name, value in cases
]
OPTION_CASES.append(api("unknown-option", "bogus", ask(bogus=1)))

METHOD_CASES = [
    *[
        api(f"method-{name}", keyword, ask(method=value))
        for name, value, keyword in [
            ("int", 5, "method must be"),
            ("none", None, "method must be"),
            ("float", 0.2, "method must be"),
            ("unknown", "nope", "unknown method"),
            ("empty", "", "unknown method"),
            ("plus-only", "samkv+", "key=value"),
            ("no-value", "samkv+budget", "key=value"),
            ("no-key", "samkv+=1", "key=value"),
            ("unknown-option", "samkv+budgt=0.2", "budgt"),
            ("budget-2", "samkv+budget=2", "budget"),
            ("budget-0", "samkv+budget=0", "budget"),
            ("budget-nan", "samkv+budget=nan", "budget"),
            ("ranking", "samkv+ranking=best", "ranking"),
            ("update", "samkv+update=x", "update"),
            ("n-init", "samkv+n_init=-1", "n_init"),
            ("block-size", "samkv+block_size=0", "block"),
            ("layers", "samkv+selection_layers=a/b", "selection_layers"),
            ("theta", "samkv+fusion_theta=1.5", "fusion_theta"),
            ("ratio", "cacheblend+recompute_ratio=0", "recompute_ratio"),
            ("check-layer", "cacheblend+check_layer=-1", "check_layer"),
            ("check-layer-deep", "cacheblend+check_layer=99", "check_layer"),
            ("epic-k", "epic+k=0", "k must be"),
            ("full-option", "full+x=1", "unknown option"),
            ("reuse-option", "reuse+k=1", "unknown option"),
        ]
    ],
    *[
        api(f"method-options-{name}", keyword, ask(method=m, method_options=options))
        for name, m, options, keyword in [
            ("budget-str", "samkv", {"budget": "0.2"}, "budget"),
            ("budget-none", "samkv", {"budget": None}, "budget"),
            ("budget-nan", "samkv", {"budget": NAN}, "budget"),
            ("budget-bool", "samkv", {"budget": True}, "budget"),
            ("budget-list", "samkv", {"budget": [0.2]}, "budget"),
            ("unknown", "samkv", {"nope": 1}, "nope"),
            ("n-init-str", "samkv", {"n_init": "8"}, "n_init"),
            ("n-init-float", "samkv", {"n_init": 1.5}, "n_init"),
            ("layers-str", "samkv", {"selection_layers": "ab"}, "selection_layers"),
            ("layers-empty", "samkv", {"selection_layers": []}, "selection_layers"),
            ("ranking-int", "samkv", {"ranking": 5}, "ranking"),
            ("theta-list", "samkv", {"fusion_theta": [0.5]}, "fusion_theta"),
            ("ratio-str", "cacheblend", {"recompute_ratio": "x"}, "recompute_ratio"),
            ("check-layer-float", "cacheblend", {"check_layer": 1.0}, "check_layer"),
            ("check-layer-deep", "cacheblend", {"check_layer": 99}, "check_layer"),
            ("epic-k-str", "epic", {"k": "16"}, "k must be"),
            ("full-any", "full", {"k": 1}, "'k'"),
        ]
    ],
    api(
        "method-instance-with-options",
        "method options",
        ask(method=SamKVMethod(), method_options={"budget": 0.2}),
    ),
    api("method-options-list", "method_options", ask(method_options=[1])),
    *[
        api(f"construct-{name}", keyword, lambda e, r, c=construct: c())
        for name, construct, keyword in [
            ("samkv-budget-str", lambda: SamKVMethod(budget="0.2"), "budget"),
            ("samkv-theta-none", lambda: SamKVMethod(fusion_theta=None), "fusion_theta"),
            ("samkv-layers-int-list", lambda: SamKVMethod(selection_layers=[1.5]), "selection"),
            ("cacheblend-ratio-str", lambda: CacheBlendMethod(recompute_ratio="0.2"), "ratio"),
            ("cacheblend-ratio-inf", lambda: CacheBlendMethod(recompute_ratio=INF), "ratio"),
            ("epic-k-float", lambda: EpicMethod(k=2.0), "k must be"),
            ("options-temperature-nan", lambda: GenerationOptions(temperature=NAN), "temperature"),
            ("options-top-p-str", lambda: GenerationOptions(top_p="1"), "top_p"),
        ]
    ],
]

REF_CASES = [
    api("ref-key-short", "key", ask_refs(bad_key("zz"))),
    api("ref-key-int", "key", ask_refs(bad_key(5))),
    api("ref-key-upper", "key", ask_refs(bad_key("A" * 64))),
    api("ref-key-path", "key", ask_refs(bad_key("../" * 21 + "x"))),
    api("ref-key-missing", "no kv cache", ask_refs(bad_key("0" * 64))),
    api(
        "ref-other-model",
        "model",
        ask_refs(lambda e, r: [dataclasses.replace(r[0], model="another-model", text=None)]),
    ),
    api(
        "ref-other-model-with-text",
        "on_foreign_cache",
        ask_refs(lambda e, r: [dataclasses.replace(r[0], model="another-model")]),
    ),
    api(
        "ref-missing-empty-text",
        "empty",
        ask_refs(lambda e, r: [dataclasses.replace(r[0], key="1" * 64, text="")]),
    ),
    api(
        "ref-missing-int-text",
        "str",
        ask_refs(lambda e, r: [dataclasses.replace(r[0], key="2" * 64, text=5)]),
    ),
    *[
        api(f"refs-{name}", "refs", ask_refs(lambda e, r, v=value: v))
        for name, value in [
            ("none", None),
            ("string", "abc"),
            ("none-item", [None]),
            ("key-strings", ["a" * 64]),
            ("int-item", [5]),
        ]
    ],
    api("prompt-empty", "prompt_ids is empty", lambda e, r: e.stream_prompt([])),
    api(
        "prompt-zero-tokens",
        "max_new_tokens",
        lambda e, r: "".join(e.stream_prompt([1], max_new_tokens=0)),
    ),
    api(
        "prompt-too-long",
        "context",
        lambda e, r: "".join(e.stream_prompt([1] * 5000, max_new_tokens=2)),
    ),
    api("prompt-string", "prompt_ids", lambda e, r: "".join(e.stream_prompt("abc"))),
    api(
        "prompt-id-out-of-vocab",
        "token",
        lambda e, r: "".join(e.stream_prompt([10**9])),
    ),
    api("prompt-id-negative", "token", lambda e, r: "".join(e.stream_prompt([-1]))),
    api("chat-empty", "messages", lambda e, r: e.chat_ids([])),
    api("chat-string", "messages", lambda e, r: e.chat_ids("hello")),
    api("chat-no-content", "messages[0]", lambda e, r: e.chat_ids([{"role": "user"}])),
    api(
        "chat-int-content",
        "messages[1]",
        lambda e, r: e.chat_ids([{"role": "user", "content": "a"}, {"role": "user", "content": 5}]),
    ),
    api("ids-documents-none", "documents", lambda e, r: e.index_token_ids(None, progress=False)),
    api("ids-documents-string", "documents", lambda e, r: e.index_token_ids("ab", progress=False)),
    api("ids-empty-document", "token ids", lambda e, r: e.index_token_ids([[]], progress=False)),
    api("ids-too-long", "token ids", lambda e, r: e.index_token_ids([[1] * 5000], progress=False)),
    api(
        "ids-out-of-vocab",
        "token",
        lambda e, r: e.index_token_ids([[10**9]], progress=False),
    ),
    api("ids-negative", "token", lambda e, r: e.index_token_ids([[-1]], progress=False)),
]

API_CASES = DOCUMENT_CASES + QUESTION_CASES + OPTION_CASES + METHOD_CASES + REF_CASES


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-api-store")


@pytest.fixture(scope="module")
def engine(tiny_llama: LoadedModel, store_dir: Path) -> SamKVEngine:
    return SamKVEngine(tiny_llama, KVCacheStore(store_dir))


@pytest.fixture(scope="module")
def refs(engine: SamKVEngine) -> list[CacheRef]:
    return engine.index(DOCS, progress=False)


@pytest.mark.parametrize("case", [c.param() for c in API_CASES])
def test_bad_api_input_is_a_named_error(
    case: Case, engine: SamKVEngine, refs: list[CacheRef], store_dir: Path
) -> None:
    with pytest.raises(Exception) as caught:  # check_error checks the type
        case.args(engine, list(refs))
    check_error(caught.value, case.keyword)
    assert check_store(store_dir) >= len(DOCS)
    # The good refs still answer: no bad input left the engine or its store unusable.
    assert engine.store.contains(refs[0].key) and engine.store.contains(refs[1].key)


def test_good_input_still_answers(engine: SamKVEngine, refs: list[CacheRef]) -> None:
    # The cases' baseline: the same calls with good input succeed.
    assert engine.answer("Who rows?", refs, "samkv", max_new_tokens=2).token_ids
    assert "".join(engine.stream_prompt([1, 2, 3], max_new_tokens=2)) is not None
