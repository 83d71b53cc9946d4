"""Documents anywhere in a conversation, and the usual LangChain prompt wiring.

Documented on ``ChatSamKV``: document blocks may come in any human message; the last human
message is the question; earlier turns follow it as a transcript, prefilled with it. The
expected prompts are written out here, so that a change of that format is a visible change.
A stock ``prompt | llm`` chain that pastes the documents' text into the prompt is answered
with a full prefill and warns once (``FullPrefillWarning``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from langchain_samkv import (
    ChatSamKV,
    FullPrefillWarning,
    SamKVCacheBuilder,
    document_block,
    document_message,
    format_docs_as_messages,
)
from samkv_integrations import SamKVEngine

TEXTS = [
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "Mount Fuji, the highest mountain in Japan, rises 3,776 metres above sea level.",
]


@pytest.fixture
def llm(engine: SamKVEngine) -> ChatSamKV:
    return ChatSamKV.from_engine(engine, max_tokens=8)


@pytest.fixture
def docs(llm: ChatSamKV) -> list[Document]:
    return list(SamKVCacheBuilder(llm).transform_documents([Document(t) for t in TEXTS]))


def test_documents_in_an_earlier_message_answer_the_last_question(
    llm: ChatSamKV, docs: list[Document]
) -> None:
    conversation = [
        SystemMessage("Be brief."),
        document_message("When was the tower completed?", docs),
        AIMessage("In 1889."),
        HumanMessage("And how high is the mountain?"),
    ]
    reply = llm.invoke(conversation)

    written_out = (
        "And how high is the mountain?\n\n"
        "The conversation so far, for context:\n"
        "System: Be brief.\n"
        "User: When was the tower completed?\n"
        "Assistant: In 1889."
    )
    expected = llm.invoke([document_message(written_out, docs)])
    assert reply.text == expected.text
    meta = reply.response_metadata
    assert meta["method"] == "samkv"  # from the caches, not a plain prefill
    assert meta["recomputed_documents"] == 0
    context = sum(d.metadata["samkv_n_tokens"] for d in docs)
    assert meta["context_tokens"] == context
    assert reply.usage_metadata == expected.usage_metadata
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == llm.engine.prompt_tokens(written_out) + context
    assert reply.usage_metadata["input_token_details"]["cache_read"] == context


def test_documents_from_several_messages_are_read_in_order(
    llm: ChatSamKV, docs: list[Document]
) -> None:
    split = [
        HumanMessage(content_blocks=[document_block(docs[0])]),
        HumanMessage(content_blocks=[document_block(docs[1])]),
        HumanMessage("How high is the mountain?"),
    ]
    # Messages holding only documents add no text to the transcript.
    assert llm.invoke(split).text == llm.invoke([document_message(split[-1].text, docs)]).text
    assert [d.page_content for d in docs] == TEXTS


def test_placeholder_prompt_answers_from_the_caches(
    llm: ChatSamKV, docs: list[Document], keyword_chroma: Callable[..., Chroma]
) -> None:
    retriever = keyword_chroma(["eiffel", "fuji"], docs).as_retriever(search_kwargs={"k": 2})
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer from the documents."),
            ("placeholder", "{documents}"),
            ("human", "{question}"),
        ]
    )
    chain: Any = (
        {"documents": retriever | format_docs_as_messages, "question": RunnablePassthrough()}
        | prompt
        | llm
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FullPrefillWarning)
        reply = chain.invoke("How high is Mount Fuji?")
    assert reply.response_metadata["method"] == "samkv"
    assert reply.response_metadata["recomputed_documents"] == 0
    retrieved = retriever.invoke("How high is Mount Fuji?")
    written_out = (
        "How high is Mount Fuji?\n\n"
        "The conversation so far, for context:\n"
        "System: Answer from the documents."
    )
    assert reply.text == llm.invoke([document_message(written_out, retrieved)]).text
    assert format_docs_as_messages([]) == []


def _format_docs(documents: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in documents)


def test_stock_prompt_is_a_full_prefill_and_warns_once(
    llm: ChatSamKV, keyword_chroma: Callable[..., Chroma]
) -> None:
    # Long enough to pass the warning's threshold (tiny-llama's tokenizer is byte-level).
    long_docs = [Document(t * 5) for t in TEXTS]
    retriever = keyword_chroma(["eiffel", "fuji"], long_docs).as_retriever(search_kwargs={"k": 2})
    prompt = ChatPromptTemplate.from_messages(
        [("human", "Answer from this context:\n{context}\n\nQuestion: {question}")]
    )
    stuffed: Any = {"context": retriever | _format_docs, "question": RunnablePassthrough()}
    chain = stuffed | prompt | llm | StrOutputParser()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FullPrefillWarning)
        reply = llm.invoke("Hello")  # a short plain chat does not warn
    assert reply.response_metadata["method"] == "prompt"
    with pytest.warns(FullPrefillWarning, match="without document blocks.*create_samkv_rag_chain"):
        first = chain.invoke("How high is Mount Fuji?")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FullPrefillWarning)
        assert chain.invoke("How high is Mount Fuji?") == first  # once per model
    other = ChatSamKV.from_engine(llm.engine, max_tokens=8)
    with pytest.warns(FullPrefillWarning):  # once per model: another model warns again
        assert (stuffed | prompt | other | StrOutputParser()).invoke("How high is Mount Fuji?")
