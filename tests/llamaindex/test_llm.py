from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from llama_index.core import Settings
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine import SimpleChatEngine

from llama_index.llms.samkv import SamKVLLM
from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.methods import DEFAULT_METHOD, SamKVMethod, get_method
from samkv_integrations.models import LoadedModel

PROMPT = "Name a colour."


def test_constructor_loads_nothing() -> None:
    llm = SamKVLLM(model="/nonexistent/model", max_new_tokens=4)
    assert llm.max_new_tokens == 4
    with pytest.raises(ValueError, match="name_or_path"):
        _ = llm.engine


def test_constructor_validates(talkative_llama: LoadedModel, store: KVCacheStore) -> None:
    with pytest.raises(ValueError, match="method"):
        SamKVLLM(method="nope")
    for spec, named in (("samkv+bogus=1", "bogus"), ("samkv+budget=1.5", "budget")):
        with pytest.raises(ValueError, match=named) as raised:
            SamKVLLM(method=spec)
        assert "method" in str(raised.value)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamKVLLM(max_new_tokens=0)
    with pytest.raises(ValueError, match="engine"):
        SamKVLLM(engine=SamKVEngine(talkative_llama, store), model="other")


def test_a_method_spec_is_resolved_at_construction_and_serialized() -> None:
    llm = SamKVLLM(method="samkv+budget=0.2+ranking=global")
    assert llm.method == SamKVMethod(budget=0.2, ranking="global")
    assert SamKVLLM(method=SamKVMethod(budget=0.2)).method == llm.method
    assert SamKVLLM().method == get_method(DEFAULT_METHOD)
    data = llm.to_dict()
    assert data["method"]["name"] == "samkv" and data["method"]["options"]["budget"] == 0.2
    assert SamKVLLM.from_dict(data).method == llm.method
    assert SamKVLLM.from_json(llm.to_json()).method == llm.method


def test_metadata_describes_the_loaded_model(llm: SamKVLLM) -> None:
    meta = llm.metadata
    assert meta.context_window == 4096
    assert meta.num_output == 8
    assert meta.model_name == "random:tiny-llama"
    assert meta.is_chat_model


async def test_sync_async_and_streaming_completions_agree(llm: SamKVLLM) -> None:
    text = llm.complete(PROMPT).text
    assert len(text.encode("utf-8", "replace")) > 0
    streamed = list(llm.stream_complete(PROMPT))
    assert "".join(r.delta or "" for r in streamed) == text
    assert streamed[-1].text == text
    assert (await llm.acomplete(PROMPT)).text == text
    deltas = [r.delta or "" async for r in await llm.astream_complete(PROMPT)]
    assert "".join(deltas) == text


async def test_chat_paths_agree_with_complete(llm: SamKVLLM) -> None:
    messages = [ChatMessage(role=MessageRole.USER, content=PROMPT)]
    text = llm.complete(PROMPT).text
    assert llm.chat(messages).message.content == text
    assert "".join(r.delta or "" for r in llm.stream_chat(messages)) == text
    assert (await llm.achat(messages)).message.content == text
    deltas = [r.delta or "" async for r in await llm.astream_chat(messages)]
    assert "".join(deltas) == text


def test_a_stream_can_be_read_from_changing_threads(llm: SamKVLLM) -> None:
    # As Starlette's iterate_in_threadpool reads a sync generator: each item in some thread.
    text = llm.complete(PROMPT).text
    responses = llm.stream_complete(PROMPT)
    deltas: list[str] = []

    def read_one() -> None:
        response = next(responses, None)
        deltas.append("" if response is None else response.delta or "")
        done.append(response is None)

    done: list[bool] = []
    for _ in range(4 * llm.max_new_tokens):
        thread = threading.Thread(target=read_one)
        thread.start()
        thread.join()
        if done and done[-1]:
            break
    assert done[-1]
    assert "".join(deltas) == text
    assert llm.complete(PROMPT).text == text  # the engine is free again


def test_prompt_is_rendered_with_the_chat_template(llm: SamKVLLM) -> None:
    tokenizer = llm.engine.model.tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    assert llm.complete(rendered, formatted=True).text == llm.complete(PROMPT).text
    # A system prompt is a system turn of the template.
    with_system = SamKVLLM(engine=llm.engine, max_new_tokens=8, system_prompt="Be brief.")
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert with_system.complete(PROMPT).text == llm.complete(rendered, formatted=True).text


def test_a_custom_formatter_replaces_the_chat_template(llm: SamKVLLM) -> None:
    def flat(messages: Any) -> str:
        return " | ".join(f"{m.role.value}: {m.content}" for m in messages)

    custom = SamKVLLM(engine=llm.engine, max_new_tokens=8, messages_to_prompt=flat)
    messages = [ChatMessage(role=MessageRole.USER, content=PROMPT)]
    expected = llm.complete(flat(messages), formatted=True).text
    assert custom.chat(messages).message.content == expected
    assert expected != llm.chat(messages).message.content


def test_generation_overrides_per_call(llm: SamKVLLM) -> None:
    full = llm.complete(PROMPT).text
    short = llm.complete(PROMPT, max_new_tokens=3).text
    assert len(short) < len(full)
    assert full.startswith(short.rstrip("\ufffd"))
    with pytest.raises(ValueError, match="unsupported keyword arguments"):
        llm.complete(PROMPT, top_k=3)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.complete("x" * 5000)


async def test_async_calls_leave_the_event_loop_free(llm: SamKVLLM) -> None:
    # The first forward pass waits until a coroutine on the loop has run: if the engine
    # ran on the loop thread, that coroutine could never run and the wait would time out.
    expected = llm.complete(PROMPT).text
    loop_ran = threading.Event()
    waited: list[bool] = []

    def hook(module: torch.nn.Module, args: Any) -> None:
        if not waited:
            waited.append(loop_ran.wait(timeout=30))

    async def mark() -> None:
        loop_ran.set()

    async def complete() -> str:
        return (await llm.acomplete(PROMPT)).text

    async def stream() -> str:
        return "".join([r.delta or "" async for r in await llm.astream_complete(PROMPT)])

    for run in (complete, stream):
        waited.clear()
        loop_ran.clear()
        handle = llm.engine.model.model.register_forward_pre_hook(hook)
        try:
            task = asyncio.ensure_future(run())
            await asyncio.sleep(0)
            await mark()
            assert await task == expected
        finally:
            handle.remove()
        assert waited == [True], run.__name__


def test_works_as_settings_llm_in_a_chat_engine(llm: SamKVLLM) -> None:
    previous = Settings._llm
    Settings.llm = llm
    try:
        chat_engine = SimpleChatEngine.from_defaults()
        reply = chat_engine.chat(PROMPT).response
    finally:
        Settings._llm = previous
    assert reply == llm.chat([ChatMessage(role=MessageRole.USER, content=PROMPT)]).message.content
