"""``create_samkv_rag_chain``: question -> retriever -> ChatSamKV over the documents' caches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.messages.content import PlainTextContentBlock, TextContentBlock
from langchain_core.output_parsers import StrOutputParser
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough

from langchain_samkv._tags import TAG_KEYS
from langchain_samkv.chat_models import ChatSamKV
from samkv_integrations.methods import BaseMethod, get_method


def document_block(document: Document) -> PlainTextContentBlock:
    """The ``text-plain`` content block that carries a Document to ``ChatSamKV``.

    The text stays in the block, so a missing cache can be re-encoded from it; the block's
    ``extras`` carry the Document's ``samkv_*`` cache metadata, if any.
    """
    block = PlainTextContentBlock(
        type="text-plain", mime_type="text/plain", text=document.page_content
    )
    extras = {key: document.metadata[key] for key in TAG_KEYS if key in document.metadata}
    if extras:
        block["extras"] = extras
    return block


def document_message(question: str, documents: Sequence[Document]) -> HumanMessage:
    """A human message asking ``question`` over ``documents`` (one block each, in order)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question: expected a non-empty string, got {question!r}")
    question_block = TextContentBlock(type="text", text=question)
    return HumanMessage(content_blocks=[*(document_block(d) for d in documents), question_block])


def format_docs_as_messages(documents: Sequence[Document]) -> list[HumanMessage]:
    """The retrieved documents as messages for a prompt placeholder: ``format_docs`` for ChatSamKV.

    The usual LangChain RAG chain pastes ``format_docs(docs)`` into the prompt as text,
    which ``ChatSamKV`` can only answer with a full prefill. Put this in the chain instead,
    and a ``("placeholder", "{documents}")`` in the prompt: the documents then reach the
    model as blocks that carry their cache keys, and it answers the last human message from
    their caches (earlier messages' text follows the question, as ``ChatSamKV`` documents).

    Returns:
        One human message holding a ``text-plain`` block per document, in order; no
        message when there are no documents.

    Examples:
        >>> from langchain_core.prompts import ChatPromptTemplate
        >>> from langchain_core.runnables import RunnablePassthrough
        >>> prompt = ChatPromptTemplate.from_messages(
        ...     [("placeholder", "{documents}"), ("human", "{question}")]
        ... )
        >>> chain = {  # doctest: +SKIP
        ...     "documents": retriever | format_docs_as_messages,
        ...     "question": RunnablePassthrough(),
        ... } | prompt | llm
    """
    documents = list(documents)
    if not documents:
        return []
    return [HumanMessage(content_blocks=[document_block(d) for d in documents])]


def _messages_from_inputs(inputs: Mapping[str, Any]) -> list[BaseMessage]:
    return [document_message(inputs["question"], inputs["documents"])]


def create_samkv_rag_chain(
    retriever: BaseRetriever | Runnable[str, list[Document]],
    llm: ChatSamKV,
    *,
    method: str | BaseMethod | None = None,
) -> Runnable[str, dict[str, Any]]:
    """Build an LCEL chain: question -> retriever -> ``llm`` over the retrieved documents' caches.

    Args:
        retriever: Returns the Documents for a question, e.g.
            ``SamKVVectorStore(Chroma(...), llm).as_retriever()``, or the retriever of a store
            whose Documents went through ``SamKVCacheBuilder(llm)``. Each Document is answered
            from the cache of its text; one whose cache is missing is encoded on the spot
            (and reported as recomputed).
        llm: The chat model that answers.
        method: The method to answer with: a spec, ``name[+option=value...]`` such as
            ``"samkv+budget=0.2"``, or a ``BaseMethod`` (``None``: ``llm.method``, by default
            ``samkv``). It is resolved here, so a bad one fails before any question.

    Returns:
        A runnable from a question string to ``{"answer": str, "documents": list[Document]}``.
        It streams (``answer`` arrives in deltas after ``documents``) and works with
        ``invoke``, ``batch``, ``stream`` and their async forms, and ``astream_events``.

    Examples:
        With ``llm`` a ``ChatSamKV`` and ``store`` a ``Chroma`` collection of Documents that
        went through ``SamKVCacheBuilder(llm)`` (the README builds both):

        >>> chain = create_samkv_rag_chain(store.as_retriever(search_kwargs={"k": 2}), llm)
        >>> chain.invoke("How high is Mount Fuji?")["answer"]
        'The answer to the question is: Mount Fuji is 3,776 meters above sea level.'
    """
    if not isinstance(llm, ChatSamKV):
        raise ValueError(f"llm: expected a ChatSamKV, got {type(llm).__name__}")
    model: Runnable[Any, Any] = llm if method is None else llm.bind(method=get_method(method))
    answer = (
        RunnableLambda(_messages_from_inputs, name="document_message") | model | StrOutputParser()
    )
    return (
        RunnableParallel(question=RunnablePassthrough(), documents=retriever)
        .assign(answer=answer)
        .pick(["answer", "documents"])
        .with_config(run_name="samkv_rag_chain")
    )
