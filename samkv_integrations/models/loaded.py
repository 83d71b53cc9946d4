"""A loaded model and its fingerprint: the exact computation a KV cache came from.

The fingerprint covers architecture, full config, weights and dtype: the store refuses a
cache whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from samkv_integrations.models import digests, registry

__all__ = [
    "LoadedModel",
    "fingerprint_model",
    "weights_identity_of_dir",
    "weights_identity_of_module",
]

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

    Every weight file is hashed in full, so changing any byte changes the identity; the
    digests are cached by file identity under ``$SAMKV_HOME`` (see :mod:`digests`), so a
    16 GB checkpoint is hashed once and later loads only stat it. A converted registry
    directory whose weight files still have the digests recorded at conversion answers with
    its pinned source sha256, so that loading it by name or by path gives one fingerprint;
    once its files are modified, the pinned sha256 no longer describes them and the
    directory is identified by content like any other.

    Raises:
        ValueError: ``path`` is a directory without weight files.
        OSError: a weight file cannot be read.
    """
    current = digests.weight_digests(path)
    if path.is_dir() and (source := registry.verified_source(path, current)) is not None:
        sha = source.get("sha256")
        if isinstance(sha, str):
            return sha
    return digests.content_identity(current)
