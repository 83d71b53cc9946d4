"""LlamaIndex integration: answer from stored per-document KV caches with SamKV."""

from llama_index.llms.samkv.base import SamKVCachesSkippedWarning, SamKVLLM
from llama_index.llms.samkv.cache_builder import SamKVCacheBuilder
from llama_index.llms.samkv.embedding import MiniLMEmbedding
from llama_index.llms.samkv.query_engine import SamKVQueryEngine
from llama_index.llms.samkv.synthesizer import SamKVSynthesizer
from llama_index.llms.samkv.vector_store import SamKVVectorStore

__all__ = [
    "MiniLMEmbedding",
    "SamKVCacheBuilder",
    "SamKVCachesSkippedWarning",
    "SamKVLLM",
    "SamKVQueryEngine",
    "SamKVSynthesizer",
    "SamKVVectorStore",
]
