"""What a HuggingFaceLLM user configures on SamKVLLM, and caches written in another dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llama_index.vector_stores.chroma import ChromaVectorStore

import samkv_integrations.lazy_engine as lazy_engine
from llama_index.llms.samkv import SamKVLLM, SamKVQueryEngine
from samkv_integrations import CacheMismatchError, KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel

from .conftest import DOCS, KeywordEmbedding, ingest

PROMPT = "Name a colour."
QUESTION = "What grows in the apple orchard?"


def test_generate_kwargs_take_hugging_face_names() -> None:
    llm = SamKVLLM(generate_kwargs={"do_sample": False, "max_new_tokens": 5, "stop_strings": ["."]})
    assert (llm.temperature, llm.max_new_tokens, llm.stop) == (0.0, 5, ["."])
    assert SamKVLLM(generate_kwargs={"do_sample": True}).temperature == 1.0
    assert SamKVLLM(generate_kwargs={"do_sample": True, "temperature": 0.7}).temperature == 0.7
    again = SamKVLLM.from_dict(llm.to_dict())
    assert (again.max_new_tokens, again.generate_kwargs) == (5, llm.generate_kwargs)
    with pytest.raises(ValueError, match=r"generate_kwargs.*\['top_k'\]"):
        SamKVLLM(generate_kwargs={"top_k": 5})
    with pytest.raises(ValueError, match="generate_kwargs: max_new_tokens=5 contradicts"):
        SamKVLLM(max_new_tokens=3, generate_kwargs={"max_new_tokens": 5})
    with pytest.raises(ValueError, match="do_sample=True contradicts temperature=0"):
        SamKVLLM(generate_kwargs={"do_sample": True, "temperature": 0})


def test_hugging_face_names_work_per_call(llm: SamKVLLM) -> None:
    greedy = llm.complete(PROMPT).text
    assert llm.complete(PROMPT, do_sample=False).text == greedy
    assert "4" in greedy  # what this random model says
    cut = llm.complete(PROMPT, stop_strings=["4"]).text
    assert cut == llm.complete(PROMPT, stop=["4"]).text == greedy[: greedy.index("4")]


def test_placement_and_store_options_are_checked_at_construction(
    talkative_llama: LoadedModel, store: KVCacheStore
) -> None:
    with pytest.raises(ValueError, match="dtype"):
        SamKVLLM(dtype="int8")
    with pytest.raises(ValueError, match="device"):
        SamKVLLM(device="warp-drive")
    with pytest.raises(ValueError, match="memory_bytes"):
        SamKVLLM(memory_bytes=-1)
    for option in (
        {"memory_bytes": 1},
        {"model_kwargs": {"revision": "main"}},
        {"dtype": "float32"},
    ):
        with pytest.raises(ValueError, match="engine"):
            SamKVLLM(engine=SamKVEngine(talkative_llama, store), **option)
    with pytest.raises(
        ValueError, match="model_kwargs: 'device_map' is set by the loader; use device"
    ):
        SamKVLLM(model_kwargs={"device_map": "auto"})
    with pytest.raises(ValueError, match="model_kwargs: 'torch_dtype'"):
        SamKVLLM(model_kwargs={"torch_dtype": "bfloat16"})
    # Credentials stay out of serialized forms.
    assert "storage_options" not in SamKVLLM(storage_options={"key": "secret"}).to_dict()


def test_store_options_open_the_store_with_its_memory_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[dict[str, Any]] = []

    class Recording(KVCacheStore):
        def __init__(self, url: Any, **options: Any) -> None:
            opened.append(options)
            super().__init__(url, **options)

    monkeypatch.setattr(lazy_engine, "KVCacheStore", Recording)
    options = {"memory_bytes": 1 << 26, "storage_options": {"auto_mkdir": True}, "pin_memory": True}
    llm = SamKVLLM(model="random:tiny-llama", store=str(tmp_path), max_new_tokens=2, **options)
    refs = llm.engine.index([d.text for d in DOCS])
    assert opened == [options]
    llm.engine.answer(QUESTION, refs, llm.method, max_new_tokens=2)
    assert llm.engine.store.stats().memory_hits == len(DOCS)


def test_model_kwargs_reach_the_loader(
    talkative_llama: LoadedModel, store: KVCacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_load(
        name: Any, *, device: Any = None, dtype: Any = None, model_kwargs: Any = None
    ) -> LoadedModel:
        calls.append({"name": name, "device": device, "dtype": dtype, **model_kwargs})
        return talkative_llama

    monkeypatch.setattr(lazy_engine, "load_model", fake_load)
    llm = SamKVLLM(
        model="org/model", store=store.url, dtype="float32", model_kwargs={"revision": "v1"}
    )
    assert llm.engine.model is talkative_llama
    assert calls == [{"name": "org/model", "device": None, "dtype": "float32", "revision": "v1"}]


def test_model_kwargs_are_kept_for_the_loader() -> None:
    assert SamKVLLM(model_kwargs={"revision": "v1"}).model_kwargs == {"revision": "v1"}


def test_caches_of_another_dtype_name_the_dtype_that_serves_them(
    vector_store: ChromaVectorStore, embed_model: KeywordEmbedding, tmp_path: Path
) -> None:
    def llm(dtype: str) -> SamKVLLM:
        return SamKVLLM(
            model="random:tiny-llama", store=str(tmp_path), dtype=dtype, max_new_tokens=2
        )

    index, nodes = ingest(llm("float32"), vector_store, embed_model, DOCS[:1])
    assert nodes[0].metadata["samkv_dtype"] == "float32"
    bf16 = llm("bfloat16")
    with pytest.raises(CacheMismatchError, match=r"float32.*bfloat16.*dtype='float32'") as raised:
        SamKVQueryEngine.from_index(index, bf16).query(QUESTION)
    assert "on_foreign_cache='recompute'" in str(raised.value)
    served = SamKVQueryEngine.from_index(index, llm("float32")).query(QUESTION)
    assert served.metadata["samkv"]["recomputed_documents"] == 0
    recomputed = SamKVQueryEngine.from_index(index, bf16, on_foreign_cache="recompute")
    assert recomputed.query(QUESTION).metadata["samkv"]["recomputed_documents"] == 1
    # A method that reads no stored KV answers from the text, whatever wrote the caches.
    full = SamKVQueryEngine.from_index(index, llm("bfloat16"), method="full").query(QUESTION)
    assert full.metadata["samkv"]["method"] == "full"
