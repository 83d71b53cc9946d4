"""LazyEngine: what an adapter holds instead of an engine, so that constructing it loads nothing.

Framework objects are built eagerly (settings, chains, pipelines, test collection) and often
never used; loading weights in their constructors would make every import slow. An adapter
keeps a ``LazyEngine`` and asks it for the engine when it first needs one.
"""

from __future__ import annotations

import os
import threading

import torch

from samkv_integrations.engine import SamKVEngine
from samkv_integrations.models import LoadedModel
from samkv_integrations.store import KVCacheStore

__all__ = ["LazyEngine"]


class LazyEngine:
    """Builds a :class:`SamKVEngine` on first use, once, whichever thread asks first.

    Args:
        model: As :meth:`SamKVEngine.from_pretrained`: a registry name, path or hub id
            (``None``: the embedded default), or a loaded model.
        store: A store directory or fsspec URL (``None``: ``$SAMKV_HOME/kvcache``), or a store.
        device: Torch device for a model loaded by name.
        dtype: Model dtype for a model loaded by name.

    Examples:
        >>> from samkv_integrations.lazy_engine import LazyEngine
        >>> lazy = LazyEngine("smollm2-135m-instruct")
        >>> lazy.built
        False
        >>> lazy.get().model.name  # doctest: +SKIP
        'smollm2-135m-instruct'
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | LoadedModel | None = None,
        store: str | os.PathLike[str] | KVCacheStore | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self._args = (model, store, device, dtype)
        self._engine: SamKVEngine | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, engine: SamKVEngine) -> LazyEngine:
        """One that hands out an engine that is already built."""
        if not isinstance(engine, SamKVEngine):
            raise ValueError(f"engine: expected a SamKVEngine, got {type(engine).__name__}")
        lazy = cls(engine.model, engine.store)
        lazy._engine = engine
        return lazy

    @property
    def built(self) -> bool:
        """Whether the engine exists (a failed build leaves it unbuilt, to retry)."""
        return self._engine is not None

    def get(self) -> SamKVEngine:
        """The engine, built on the first call; concurrent first calls build it once."""
        engine = self._engine
        if engine is None:
            with self._lock:
                engine = self._engine
                if engine is None:
                    model, store, device, dtype = self._args
                    engine = SamKVEngine.from_pretrained(model, store, device=device, dtype=dtype)
                    self._engine = engine
        return engine
