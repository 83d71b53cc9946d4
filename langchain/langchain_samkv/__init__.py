"""LangChain integration for samkv-integrations: answers from precomputed document KV caches."""

from langchain_samkv.chains import (
    create_samkv_rag_chain,
    document_block,
    document_message,
    format_docs_as_messages,
)
from langchain_samkv.chat_models import ChatSamKV, FullPrefillWarning
from langchain_samkv.conversation import StaleCacheKeyWarning
from langchain_samkv.document_transformers import SamKVCacheBuilder
from langchain_samkv.embeddings import MiniLMEmbeddings
from langchain_samkv.vectorstores import SamKVVectorStore

__all__ = [
    "ChatSamKV",
    "FullPrefillWarning",
    "MiniLMEmbeddings",
    "SamKVCacheBuilder",
    "SamKVVectorStore",
    "StaleCacheKeyWarning",
    "create_samkv_rag_chain",
    "document_block",
    "document_message",
    "format_docs_as_messages",
]
