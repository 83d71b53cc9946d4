"""Load any Hugging Face causal LM, the embedded default, or random weights of a named shape."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from samkv_integrations.models import registry
from samkv_integrations.models.loaded import (
    LoadedModel,
    fingerprint_model,
    weights_identity_of_dir,
)
from samkv_integrations.models.shapes import random_model

__all__ = ["RANDOM_PREFIX", "load_model"]

logger = logging.getLogger(__name__)

#: ``model_kwargs`` that also locate the tokenizer's files.
_TOKENIZER_KWARGS = frozenset({"revision", "trust_remote_code", "token", "cache_dir", "subfolder"})

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device") from e
    # Asking torch for a device it lacks fails deep inside the load, without naming it.
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device: {device!r} was asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device: {device!r} was asked for, but torch sees {count} CUDA devices"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} was asked for, but torch sees no MPS device")
    elif dev.type == "meta":
        raise ValueError("device: 'meta' holds no weights; use cpu or cuda")
    return dev


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype: {dtype!r} is not one of {sorted(_DTYPES)}")


def _looks_local(name: str) -> bool:
    # A hub id is "org/name": one slash, no leading dot, tilde or slash.
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in {".", ".."}
        or name.count("/") > 1
        or "\\" in name
        or name.endswith(".gguf")
    )


#: Prefix of model names that build a random-weight model of a named shape (for
#: benchmarks and tests), e.g. ``random:llama-3.1-8b``.
RANDOM_PREFIX = "random:"


def local_model_path(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The path ``load_model`` would read for ``name_or_path``; ``None`` for other sources.

    Cheap (no torch work), so that a caller about to start processes can check first.

    Raises:
        ValueError: It names a local path that does not exist.
    """
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and (
        name.startswith(RANDOM_PREFIX) or name in registry.MODELS
    ):
        return None
    if not (isinstance(name_or_path, os.PathLike) or _looks_local(name) or Path(name).exists()):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"name_or_path: local path {name!r} does not exist")
    return path


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention.

    Args:
        name_or_path: A registry name (``None``: ``smollm2-135m-instruct``), a local HF
            directory, a ``.gguf`` file (dequantised at load; slow) or a hub id. Only a hub
            id may reach the network.
        device: Defaults to ``cuda`` when available, else ``cpu``.
        dtype: ``bfloat16``, ``float16`` or ``float32`` (dtype or name); defaults to
            bfloat16 on CUDA, float32 on CPU.
        model_kwargs: Extra ``from_pretrained`` arguments (``revision``, ``trust_remote_code``,
            ``quantization_config``, ...); the tokenizer gets the ones that locate files.
            Whatever they change in the computation shows in the config the fingerprint hashes.

    Returns:
        The model, its tokenizer and its fingerprint.

    Raises:
        ValueError: bad device or dtype, a local path that does not exist or holds no
            model, or a bare name that is not a registry model.
    """
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    if name_or_path is None:
        name_or_path = registry.DEFAULT_MODEL
    name = os.fspath(name_or_path)
    extra = dict(model_kwargs or {})
    if isinstance(name_or_path, str) and name.startswith(RANDOM_PREFIX):
        if extra:
            raise ValueError(f"model_kwargs: random weights of {name!r} take none")
        return random_model(name.removeprefix(RANDOM_PREFIX), device=dev, dtype=dt)
    kwargs: dict[str, Any] = {"local_files_only": True}
    source: str | Path
    if not isinstance(name_or_path, os.PathLike) and name in registry.MODELS:
        built = registry.ensure_model(name)
        # The pinned sha256: ensure_model rebuilt the directory if its files were modified.
        source, identity = built, weights_identity_of_dir(built)
    elif (path := local_model_path(name_or_path)) is not None:
        if path.is_file() and path.suffix == ".gguf":
            source, kwargs["gguf_file"] = path.parent, path.name
        elif (path / "config.json").is_file():
            source = path
        else:
            raise ValueError(f"name_or_path: {name!r} is neither a .gguf file nor has config.json")
        identity = weights_identity_of_dir(path)
    elif "/" not in name:
        known = ", ".join(sorted(registry.MODELS))
        raise ValueError(
            f"name_or_path: {name!r} is not a registry model ({known}), a local path"
            " or a hub id (org/name)"
        )
    else:
        source, identity, kwargs = name, name, {}
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dt, attn_implementation="sdpa", device_map=dev, **kwargs, **extra
        )
        located = {k: v for k, v in extra.items() if k in _TOKENIZER_KWARGS}
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs, **located)
    except OSError as e:
        raise ValueError(f"name_or_path: could not load {name!r}: {e}") from e
    model.eval()
    if not kwargs:
        identity = _hub_commit(name) or identity
    logger.info("Loaded %s on %s (%s) in %.1fs", name, dev, dt, time.perf_counter() - start)
    return LoadedModel(model, tokenizer, name, fingerprint_model(model, identity))


def _hub_commit(repo_id: str) -> str | None:
    # The snapshot directory of the cached config is named by the resolved commit hash.
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return f"{repo_id}@{Path(cached).parent.name}"
    return None
