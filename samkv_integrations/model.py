"""Load any Hugging Face causal LM, or the embedded default, and fingerprint it.

The fingerprint names the exact computation a KV cache came from (architecture, full
config, weights, dtype): the store refuses a cache whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from samkv_integrations import registry
from samkv_integrations.registry import samkv_home

__all__ = [
    "LoadedModel",
    "fingerprint_model",
    "load_model",
    "samkv_home",
    "weights_identity_of_dir",
    "weights_identity_of_module",
]

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Config keys that change with the loader, not with the computation the model performs.
_VOLATILE_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_model_name_or_path",
        "name_or_path",
        "architectures",
        "dtype",
        "torch_dtype",
        "attn_implementation",
        "_attn_implementation",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
    }
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_EDGE = 1 << 20


@dataclass(slots=True)
class LoadedModel:
    """A causal LM ready for inference, with the identity its KV caches are stored under.

    Attributes:
        model: The model, in eval mode, on its device.
        tokenizer: Its tokenizer.
        name: What the caller asked for (registry name, path, hub id) or ``random:<shape>``.
        fingerprint: sha256 hex of architecture, config, weights identity and dtype.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters."""
        return self.model.dtype

    @property
    def max_context(self) -> int:
        """Longest sequence the model was trained for (``config.max_position_embeddings``)."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        if not isinstance(value, int):
            raise ValueError(f"max_position_embeddings: {self.name} has none in its config")
        return value

    @classmethod
    def from_module(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str
    ) -> LoadedModel:
        """Wrap an already-built model; its fingerprint hashes every parameter's bytes."""
        model.eval()
        return cls(
            model, tokenizer, name, fingerprint_model(model, weights_identity_of_module(model))
        )


def fingerprint_model(model: PreTrainedModel, weights_identity: str) -> str:
    """Return the sha256 hex fingerprint of ``model`` given its weights' identity."""
    config = _strip_volatile(json.loads(model.config.to_json_string(use_diff=False)))
    payload = {
        "architecture": type(model).__name__,
        "config": config,
        "weights": weights_identity,
        "dtype": str(model.dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _strip_volatile(value: Any) -> Any:
    # Sub-configs (text_config, vision_config) carry their own copies of these keys.
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def weights_identity_of_module(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes (for small models)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        # A uint8 view hashes bfloat16 too, which numpy cannot represent.
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_identity_of_dir(path: Path) -> str:
    """Identity of the weights under ``path`` (a directory, or one weight file).

    A converted registry directory answers with its pinned source sha256, so that loading it
    by name or by path gives one fingerprint. Otherwise: sha256 over each weight file's name,
    size and the sha256 of its first and last MiB, which is fast on a 16 GB checkpoint.
    """
    if path.is_dir():
        source = path / registry.SOURCE_FILE
        if source.is_file():
            sha = json.loads(source.read_text()).get("sha256")
            if isinstance(sha, str):
                return sha
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    else:
        files = [path]
    if not files:
        raise ValueError(f"name_or_path: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {path}")
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(_EDGE)
            fh.seek(max(size - _EDGE, 0))
            tail = fh.read(_EDGE)
        digest.update(f"{file.name}|{size}|".encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return digest.hexdigest()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device") from e


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


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention.

    Args:
        name_or_path: A registry name (``None``: ``smollm2-135m-instruct``), a local HF
            directory, a ``.gguf`` file (dequantised at load; slow) or a hub id. Only a hub
            id may reach the network.
        device: Defaults to ``cuda`` when available, else ``cpu``.
        dtype: ``bfloat16``, ``float16`` or ``float32`` (dtype or name); defaults to
            bfloat16 on CUDA, float32 on CPU.

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
    if isinstance(name_or_path, str) and name.startswith(RANDOM_PREFIX):
        # Imported here: shapes builds on this module.
        from samkv_integrations.shapes import random_model

        return random_model(name.removeprefix(RANDOM_PREFIX), device=dev, dtype=dt)
    kwargs: dict[str, Any] = {"local_files_only": True}
    source: str | Path
    if not isinstance(name_or_path, os.PathLike) and name in registry.MODELS:
        path = registry.ensure_model(name)
        source, identity = path, registry.MODELS[name].sha256
    elif isinstance(name_or_path, os.PathLike) or _looks_local(name) or Path(name).exists():
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(f"name_or_path: local path {name!r} does not exist")
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
            source, dtype=dt, attn_implementation="sdpa", device_map=dev, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
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
