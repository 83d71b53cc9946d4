"""Cached-KV retrieval-augmented generation with SamKV sparse attention."""

from samkv_integrations.engine import Answer, AnswerStream, SamKVEngine
from samkv_integrations.errors import (
    CacheCorruptedError,
    CacheError,
    CacheMismatchError,
    CacheMissError,
)
from samkv_integrations.methods import METHODS, BaseMethod, get_method
from samkv_integrations.models import LoadedModel, load_model
from samkv_integrations.records import CacheRef, MethodStats
from samkv_integrations.store import KVCacheStore

__all__ = [
    "METHODS",
    "Answer",
    "AnswerStream",
    "BaseMethod",
    "CacheCorruptedError",
    "CacheError",
    "CacheMismatchError",
    "CacheMissError",
    "CacheRef",
    "KVCacheStore",
    "LoadedModel",
    "MethodStats",
    "SamKVEngine",
    "get_method",
    "load_model",
]
