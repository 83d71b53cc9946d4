"""LazyEngine: what an adapter holds instead of an engine, so that constructing it loads nothing.

Framework objects are built eagerly (settings, chains, pipelines, test collection) and often
never used; loading weights in their constructors would make every import slow. An adapter
keeps a ``LazyEngine`` and asks it for the engine when it first needs one. It also carries
what a Hugging Face user configures besides the model name: extra ``from_pretrained``
arguments and the store's tier and fsspec options. These are checked when it is built, so a
bad option fails where it is written, not at the first query.

Caches written in another dtype: the model fingerprint covers the dtype (a float32 cache is
not the KV a bfloat16 model computes), so such a cache is another model's to the engine. An
adapter that records the writer's dtype next to the cache key (:func:`dtype_name`) can say
which dtype to serve them in with :func:`dtype_mismatch`, rather than report a stranger's
fingerprint.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import torch

from samkv_integrations.engine import SamKVEngine
from samkv_integrations.models import LoadedModel, load_model, samkv_home
from samkv_integrations.store import KVCacheStore

__all__ = ["DTYPES", "ENGINE_OPTIONS", "LazyEngine", "dtype_mismatch", "dtype_name"]

#: The dtypes a model may be loaded in, by name.
DTYPES = ("bfloat16", "float16", "float32")

#: The adapters' settings that build an engine: not to be passed next to an already built one.
ENGINE_OPTIONS = (
    "model",
    "store",
    "device",
    "dtype",
    "model_kwargs",
    "memory_bytes",
    "storage_options",
    "pin_memory",
)

# ``from_pretrained`` arguments the loader sets itself, and the option to use instead.
_RESERVED_MODEL_KWARGS = {
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "device_map": "device",
    "attn_implementation": "nothing: the methods need SDPA attention",
    "local_files_only": "nothing: only a hub id may reach the network",
    "gguf_file": "a .gguf path as the model",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"torch.bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_mismatch(engine: SamKVEngine, written: object, *, on_foreign_cache: str) -> str | None:
    """Why a cache written in ``written`` dtype cannot be served by ``engine``, with the fix.

    Args:
        engine: The engine that would read the cache.
        written: The writer's dtype name as recorded beside the cache key (``None`` if not
            recorded: nothing can be said then).
        on_foreign_cache: The caller's policy; with ``"recompute"`` nothing is wrong.

    Returns:
        ``None`` if the dtypes agree (or are unknown, or the caller re-encodes foreign
        caches); otherwise a sentence naming both dtypes and the options that fix it.
    """
    serving = dtype_name(engine.model.dtype)
    if on_foreign_cache == "recompute" or not isinstance(written, str) or written == serving:
        return None
    return (
        f"it was written in {written} and this engine runs {serving}; the model fingerprint "
        f"covers the dtype, so its caches do not match. Pass dtype={written!r} to serve the "
        f"caches as written, or on_foreign_cache='recompute' to re-encode them in {serving}"
    )


class LazyEngine:
    """Builds a :class:`SamKVEngine` on first use, once, whichever thread asks first.

    Args:
        model: As :meth:`SamKVEngine.from_pretrained`: a registry name, path or hub id
            (``None``: the embedded default), or a loaded model.
        store: A store directory or fsspec URL (``None``: ``$SAMKV_HOME/kvcache``), or a store.
        device: Torch device for a model loaded by name (``"cuda:1"``, ``"cpu"``).
        dtype: Model dtype for a model loaded by name: one of :data:`DTYPES`.
        model_kwargs: Extra ``from_pretrained`` arguments for a model loaded by name
            (``revision``, ``trust_remote_code``, ``quantization_config``, ...). The ones the
            loader sets itself (``dtype``, ``device_map``, ``attn_implementation``, ...) are
            refused with the option to use instead.
        memory_bytes: Cap of the store's in-memory LRU tier, in tensor bytes; 0 disables it.
        storage_options: fsspec options for a store URL (credentials, endpoints).
        pin_memory: Pin the tensors of the memory tier (CUDA), for fast copies to the GPU.

    Raises:
        ValueError: A bad option, or store options next to an already opened store (or
            ``model_kwargs`` next to a loaded model); the message names the option.

    Examples:
        >>> from samkv_integrations.lazy_engine import LazyEngine
        >>> lazy = LazyEngine("smollm2-135m-instruct", memory_bytes=1 << 30)
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
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        memory_bytes: int = 0,
        storage_options: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        if dtype is not None and dtype_name(dtype) not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        if device is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device: {device!r} is not a torch device") from e
        self._model_kwargs = _checked_model_kwargs(model, model_kwargs)
        self._store_options: dict[str, Any] = {}
        if memory_bytes or storage_options or pin_memory:
            if memory_bytes < 0:
                raise ValueError(f"memory_bytes: must be >= 0, got {memory_bytes}")
            if isinstance(store, KVCacheStore):
                raise ValueError(
                    "memory_bytes, storage_options, pin_memory: pass them to the KVCacheStore "
                    "you open, or pass the store as a URL"
                )
            self._store_options = {
                "memory_bytes": memory_bytes,
                "storage_options": dict(storage_options or {}),
                "pin_memory": pin_memory,
            }
        self._args = (model, store, device, dtype)
        self._engine: SamKVEngine | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: object) -> LazyEngine:
        """One built from an adapter's fields named in :data:`ENGINE_OPTIONS`."""
        return cls(**{name: getattr(settings, name) for name in ENGINE_OPTIONS})

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
                    engine = self._build()
                    self._engine = engine
        return engine

    def _build(self) -> SamKVEngine:
        model, store, device, dtype = self._args
        if self._store_options and not isinstance(store, KVCacheStore):  # refused together
            store = KVCacheStore(store or samkv_home() / "kvcache", **self._store_options)
        if self._model_kwargs:
            model = load_model(
                model,  # type: ignore[arg-type]  # a LoadedModel was refused at construction
                device=device,
                dtype=dtype,
                model_kwargs=self._model_kwargs,
            )
        return SamKVEngine.from_pretrained(model, store, device=device, dtype=dtype)


def _checked_model_kwargs(model: object, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    if not kwargs:
        return kwargs
    if isinstance(model, LoadedModel):
        raise ValueError("model_kwargs: the model is already loaded")
    for key in kwargs:
        if key in _RESERVED_MODEL_KWARGS:
            raise ValueError(
                f"model_kwargs: {key!r} is set by the loader; use {_RESERVED_MODEL_KWARGS[key]}"
            )
    return kwargs
