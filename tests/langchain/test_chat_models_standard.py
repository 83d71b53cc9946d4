"""LangChain's standard chat model suites, run against ChatSamKV on a tiny random-weight model.

The model is ``conftest.talkative_model()``: tiny-llama with random weights whose special
tokens can never be picked greedily, so every reply is non-empty and deterministic (the
trick is documented in ``conftest.py``). Replies are gibberish: these suites check the
LangChain contract (messages in, chunks, usage and metadata out), not answer quality.

Capabilities are declared honestly: no tool calling, no structured output or JSON mode,
text only (no image, audio, PDF or video inputs). The suites skip the tests behind them.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_samkv import ChatSamKV, SamKVCacheBuilder, document_block, document_message
from samkv_integrations.methods import DEFAULT_METHOD, SamKVMethod
from samkv_integrations.models import LoadedModel


class _Capabilities:
    """What ChatSamKV supports, shared by the unit and integration suites."""

    _params: dict[str, Any]

    @pytest.fixture(autouse=True)
    def _tiny_model(self, talkative: LoadedModel, store_url: str) -> None:
        # The suites build models from ``chat_model_params`` outside fixtures too, so the
        # session's tiny model is handed to each test instance here.
        self._params = {"model": talkative, "store": store_url}

    @property
    def chat_model_class(self) -> type[ChatSamKV]:
        return ChatSamKV

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        # One ChatSamKV serves one loaded model: switching per call would reload weights.
        return False


class TestChatSamKVUnit(_Capabilities, ChatModelUnitTests):
    pass


class TestChatSamKVIntegration(_Capabilities, ChatModelIntegrationTests):
    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # Short replies keep the suite fast on CPU; the unit suite passes max_tokens too.
        return {"max_tokens": 12}

    @property
    def supported_usage_metadata_details(self) -> dict[Any, list[Any]]:
        details = ["cache_read_input", "cache_creation_input"]
        return {"invoke": details, "stream": details}

    def _over_documents(self, *, stream: bool, cached: bool) -> AIMessage:
        llm = ChatSamKV(**self.chat_model_params, max_tokens=4)
        docs = [Document("Paris is the capital of France."), Document("Fuji is in Japan.")]
        if cached:
            docs = list(SamKVCacheBuilder(llm).transform_documents(docs))
        message = [document_message("Which mountain?", docs)]
        if not stream:
            return llm.invoke(message)  # type: ignore[return-value]
        chunks = list(llm.stream(message))
        full = chunks[0]
        for chunk in chunks[1:]:
            full += chunk
        return AIMessage(content=full.text, usage_metadata=full.usage_metadata)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        return self._over_documents(stream=stream, cached=True)

    def invoke_with_cache_creation_input(self, *, stream: bool = False) -> AIMessage:
        return self._over_documents(stream=stream, cached=False)


# --- Beyond the standard suites: what ChatSamKV itself promises -------------------------


@pytest.fixture
def llm(talkative: LoadedModel, store_url: str) -> ChatSamKV:
    return ChatSamKV(model=talkative, store=store_url, max_tokens=10)


@pytest.fixture
def docs(llm: ChatSamKV) -> list[Document]:
    texts = ["Paris is the capital of France.", "Mount Fuji is the highest mountain in Japan."]
    return list(SamKVCacheBuilder(llm).transform_documents([Document(t) for t in texts]))


def test_plain_chat_is_a_full_prefill_of_the_chat_template(
    llm: ChatSamKV, talkative: LoadedModel
) -> None:
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Hello"),
        AIMessage("Hi!"),
        HumanMessage("Why?"),
    ]
    reply = llm.invoke(messages)

    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = talkative.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generated = talkative.model.generate(ids, max_new_tokens=10, do_sample=False)  # type: ignore[operator]
    generated = generated[0, ids.shape[1] :]
    assert reply.text == talkative.tokenizer.decode(generated, skip_special_tokens=True)
    assert reply.usage_metadata == {
        "input_tokens": ids.shape[1],
        "output_tokens": 10,
        "total_tokens": ids.shape[1] + 10,
        "input_token_details": {"cache_read": 0, "cache_creation": 0},  # no cache
    }
    assert reply.response_metadata["model_provider"] == "samkv"
    assert reply.response_metadata["model_name"] == "random:tiny-llama"
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.response_metadata["method"] == "prompt"  # no documents: a plain prefill


def test_document_reply_reports_method_stats(llm: ChatSamKV, docs: list[Document]) -> None:
    question = "Which mountain?"
    reply = llm.invoke([document_message(question, docs)], method="reuse")
    meta = reply.response_metadata
    assert meta["method"] == "reuse"
    assert meta["kept_fraction"] == 1.0  # reuse keeps every document token
    assert meta["recomputed_documents"] == 0
    assert meta["ttft_s"] == pytest.approx(sum(meta["seconds"].values()))
    context = sum(d.metadata["samkv_n_tokens"] for d in docs)
    assert meta["context_tokens"] == context
    # Counted independently of the adapter: the engine's framing, token by token.
    framer = llm.engine.framer
    prompt = len(framer.prefix_ids()) + context + len(framer.question_ids(question))
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == prompt
    assert reply.usage_metadata["output_tokens"] == 10
    # Every document token came from a stored cache; nothing was encoded during the call.
    assert reply.usage_metadata["input_token_details"] == {
        "cache_read": context,
        "cache_creation": 0,
    }
    assert meta["model_provider"] == "samkv"
    default = llm.invoke([document_message(question, docs)])
    assert default.response_metadata["method"] == DEFAULT_METHOD


async def test_every_entry_point_gives_the_same_text(llm: ChatSamKV, docs: list[Document]) -> None:
    for messages in ([HumanMessage("Hello")], [document_message("Which mountain?", docs)]):
        expected = llm.invoke(messages).text
        assert len(expected) > 0
        assert "".join(c.text for c in llm.stream(messages)) == expected
        assert (await llm.ainvoke(messages)).text == expected
        assert "".join([c.text async for c in llm.astream(messages)]) == expected


async def test_async_generation_runs_off_the_event_loop(llm: ChatSamKV) -> None:
    expected = llm.invoke("Hello").text
    held, release, timed_out = threading.Event(), threading.Event(), []

    def hold_the_model() -> None:
        with llm.engine._lock:
            held.set()
            timed_out.append(not release.wait(timeout=60))

    holder = threading.Thread(target=hold_the_model)
    holder.start()
    held.wait()
    task = asyncio.create_task(llm.ainvoke("Hello"))
    for _ in range(50):
        await asyncio.sleep(0)
    # The call waits for the model in its own thread while the event loop keeps running;
    # a call that blocked the loop would only get here after the holder timed out.
    assert not task.done()
    release.set()
    reply = await task
    holder.join()
    assert timed_out == [False]
    assert reply.text == expected


async def test_concurrent_calls_give_the_sequential_answers(
    llm: ChatSamKV, docs: list[Document]
) -> None:
    inputs: list[Any] = ["Hello", [document_message("Which mountain?", docs)], "How are you?"]
    expected = [llm.invoke(i).text for i in inputs]
    assert [r.text for r in await llm.abatch(inputs)] == expected
    assert [r.text for r in llm.batch(inputs, config={"max_concurrency": 3})] == expected


def test_stop_strings_cut_the_reply(llm: ChatSamKV, talkative: LoadedModel, store_url: str) -> None:
    full = llm.invoke("Hello").text
    stop = full[4:6]
    expected = full[: full.find(stop)]
    assert llm.invoke("Hello", stop=[stop]).text == expected
    assert (
        ChatSamKV(model=talkative, store=store_url, max_tokens=10, stop=[stop]).invoke("Hello").text
        == expected
    )


def test_sampling_is_reproducible_with_a_seed(llm: ChatSamKV) -> None:
    first = llm.invoke("Hello", temperature=1.0, seed=7).text
    assert llm.invoke("Hello", temperature=1.0, seed=7).text == first
    assert llm.invoke("Hello", max_new_tokens=3).usage_metadata["output_tokens"] == 3  # type: ignore[index]


def test_weights_load_on_first_use(tmp_path: Path) -> None:
    missing = ChatSamKV(model=str(tmp_path / "no-such-model"), store=str(tmp_path / "kv"))
    assert not missing._engine.built
    with pytest.raises(ValueError, match="does not exist"):
        missing.invoke("Hello")
    by_name = ChatSamKV(model="random:tiny-qwen2", store=str(tmp_path / "kv"), max_tokens=2)
    assert not by_name._engine.built
    reply = by_name.invoke("Hello")
    assert by_name.engine.model.name == reply.response_metadata["model_name"] == "random:tiny-qwen2"


def test_from_engine_shares_the_engine(llm: ChatSamKV) -> None:
    shared = ChatSamKV.from_engine(llm.engine, method="full")
    assert shared.engine is llm.engine
    assert shared._get_ls_params()["ls_model_name"] == "random:tiny-llama"


def test_tools_and_structured_output_are_not_supported(llm: ChatSamKV) -> None:
    with pytest.raises(NotImplementedError, match="tool calling"):
        llm.bind_tools([])
    with pytest.raises(NotImplementedError, match="structured output"):
        llm.with_structured_output({"title": "Answer", "type": "object", "properties": {}})
    with pytest.raises(NotImplementedError, match="tool calling"):
        llm.invoke([HumanMessage("2+2?"), ToolMessage("4", tool_call_id="call-1")])


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("method", "nope", "method"),
        ("method", "samkv+bogus=1", "bogus"),
        ("method", "samkv+budget=1.5", "budget"),
        ("temperature", -1.0, "temperature"),
        ("max_tokens", 0, "max_tokens"),
        ("on_foreign_cache", "ignore", "on_foreign_cache"),
    ],
)
def test_invalid_settings_name_the_field(
    talkative: LoadedModel, field: str, value: Any, named: str
) -> None:
    with pytest.raises(ValueError, match=named) as raised:
        ChatSamKV(model=talkative, **{field: value})
    assert field in str(raised.value)


def test_a_method_spec_is_resolved_at_construction(talkative: LoadedModel, store_url: str) -> None:
    llm = ChatSamKV(model=talkative, store=store_url, max_tokens=4, method="samkv+budget=0.2")
    assert llm.method == SamKVMethod(budget=0.2)
    assert llm._identifying_params["method_options"]["budget"] == 0.2
    assert llm.model_dump()["method"]["options"]["budget"] == 0.2
    assert ChatSamKV(model=talkative, method=SamKVMethod(budget=0.2)).method == llm.method
    # Long enough for the budget to bind (SamKV always keeps each document's ends).
    text = "Mount Fuji is the highest mountain in Japan. " * 8
    docs = list(SamKVCacheBuilder(llm).transform_documents([Document(text), Document(text[1:])]))
    message = document_message("Which mountain?", docs)
    meta = llm.invoke([message]).response_metadata
    assert meta["method"] == "samkv"
    assert 0 < meta["kept_fraction"] <= 0.2 + 1e-9
    assert (
        llm.invoke([message], method="samkv+budget=0.6").response_metadata["kept_fraction"]
        > meta["kept_fraction"]
    )


def test_invalid_requests_are_refused(llm: ChatSamKV, docs: list[Document]) -> None:
    with pytest.raises(ValueError, match="unsupported call arguments"):
        llm.invoke("Hello", top_k=3)
    with pytest.raises(ValueError, match="method"):
        llm.invoke("Hello", method="nope")
    with pytest.raises(ValueError, match="must be a human message; got 'ai' last"):
        llm.invoke([document_message("Which mountain?", docs), AIMessage("Fuji.")])
    with pytest.raises(ValueError, match="documents go in human messages"):
        llm.invoke([SystemMessage(content_blocks=[document_block(docs[0])]), HumanMessage("Q?")])
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])])
    with pytest.raises(ValueError, match="no question"):
        llm.invoke([HumanMessage(content_blocks=[document_block(docs[0])])])
