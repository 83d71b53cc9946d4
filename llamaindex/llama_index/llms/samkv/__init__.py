"""LlamaIndex integration: answer from stored per-document KV caches with SamKV."""

from llama_index.llms.samkv.base import SamKVLLM
from llama_index.llms.samkv.cache_builder import SamKVCacheBuilder
from llama_index.llms.samkv.embedding import MiniLMEmbedding
from llama_index.llms.samkv.query_engine import SamKVQueryEngine
from llama_index.llms.samkv.synthesizer import SamKVSynthesizer

__all__ = [
    "MiniLMEmbedding",
    "SamKVCacheBuilder",
    "SamKVLLM",
    "SamKVQueryEngine",
    "SamKVSynthesizer",
]
