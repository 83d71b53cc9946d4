"""LangChain integration for samkv-integrations: answers from precomputed document KV caches."""

from langchain_samkv.chains import create_samkv_rag_chain, document_block, document_message
from langchain_samkv.chat_models import ChatSamKV
from langchain_samkv.document_transformers import SamKVCacheBuilder
from langchain_samkv.embeddings import MiniLMEmbeddings

__all__ = [
    "ChatSamKV",
    "MiniLMEmbeddings",
    "SamKVCacheBuilder",
    "create_samkv_rag_chain",
    "document_block",
    "document_message",
]
