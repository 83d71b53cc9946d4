"""Model acquisition: loading, the pinned registry, random shapes, and the MiniLM embedder."""

from samkv_integrations.models.loaded import LoadedModel
from samkv_integrations.models.loading import RANDOM_PREFIX, load_model
from samkv_integrations.models.registry import DEFAULT_MODEL, samkv_home
from samkv_integrations.models.shapes import random_model

__all__ = [
    "DEFAULT_MODEL",
    "RANDOM_PREFIX",
    "LoadedModel",
    "load_model",
    "random_model",
    "samkv_home",
]
