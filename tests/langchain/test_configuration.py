"""What a Hugging Face user configures on ChatSamKV: dtype, model and generation keywords, the
store's memory tier and fsspec options. Nothing loads at construction; bad options fail
there, naming the option.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from langchain_core.documents import Document

from langchain_samkv import ChatSamKV, SamKVCacheBuilder, document_message
from samkv_integrations import KVCacheStore
from samkv_integrations.models import LoadedModel


@pytest.mark.parametrize(
    ("generate_kwargs", "fields"),
    [
        ({"do_sample": False, "max_new_tokens": 5}, {"temperature": 0.0, "max_new_tokens": 5}),
        ({"do_sample": True}, {"temperature": 1.0}),
        ({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_p": 0.9}),
        ({"stop_strings": "\n", "seed": 3}, {"stop": ["\n"], "seed": 3}),
        ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
    ],
)
def test_generate_kwargs_set_the_fields(
    generate_kwargs: dict[str, Any], fields: dict[str, Any]
) -> None:
    llm = ChatSamKV(generate_kwargs=generate_kwargs)
    assert {name: getattr(llm, name) for name in fields} == fields
    assert llm.generate_kwargs == generate_kwargs
    assert not llm._engine.built


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"generate_kwargs": {"top_k": 5}}, r"generate_kwargs: unsupported \['top_k'\]"),
        ({"generate_kwargs": {"do_sample": True, "temperature": 0}}, "do_sample=True contradicts"),
        ({"generate_kwargs": {"temperature": 0.5}, "temperature": 0.2}, "contradicts temperature"),
        ({"generate_kwargs": {"max_new_tokens": 5}, "max_tokens": 6}, "contradicts max_tokens"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "nonsense"}, "device"),
        ({"memory_bytes": -1}, "memory_bytes"),
        ({"model_kwargs": {"device_map": "auto"}}, "model_kwargs: 'device_map'"),
    ],
)
def test_bad_options_name_themselves(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ChatSamKV(**kwargs)


def test_options_that_cannot_apply_are_refused(talkative: LoadedModel, store_url: str) -> None:
    with pytest.raises(ValueError, match="model_kwargs"):
        ChatSamKV(model=talkative, model_kwargs={"revision": "main"})
    with pytest.raises(ValueError, match="memory_bytes"):
        ChatSamKV(model=talkative, store=KVCacheStore(store_url), memory_bytes=1 << 20)
    llm = ChatSamKV(model=talkative, store=store_url)
    with pytest.raises(ValueError, match="memory_bytes"):
        ChatSamKV.from_engine(llm.engine, memory_bytes=1 << 20)
    assert ChatSamKV(generate_kwargs={"temperature": 0.5}, temperature=0.5).temperature == 0.5


def test_dtype_loads_the_model_in_it(tmp_path: Any) -> None:
    llm = ChatSamKV(
        model="random:tiny-llama", store=str(tmp_path), dtype=torch.bfloat16, max_tokens=2
    )
    assert llm.dtype == "bfloat16"  # kept by name, so it serializes
    assert not llm._engine.built
    assert llm.engine.model.dtype == torch.bfloat16
    assert llm.invoke("Hello").usage_metadata["output_tokens"] == 2  # type: ignore[index]


def test_memory_tier_serves_repeated_documents(talkative: LoadedModel) -> None:
    url = f"memory://samkv-tier-{uuid.uuid4().hex}"
    llm = ChatSamKV(
        model=talkative,
        store=url,
        memory_bytes=64 << 20,
        storage_options={"token": "s3cr3t"},
        max_tokens=2,
    )
    docs = list(SamKVCacheBuilder(llm).transform_documents([Document("Fuji is in Japan.")]))
    for _ in range(2):
        llm.invoke([document_message("Where?", docs)])
    stats = llm.engine.store.stats()
    assert stats.entries_in_memory == 1
    assert stats.memory_hits >= 1
    # Credentials stay out of reprs, serialization and traces.
    assert "s3cr3t" not in repr(llm)
    assert "s3cr3t" not in str(llm.model_dump())
    assert "storage_options" not in llm._identifying_params
