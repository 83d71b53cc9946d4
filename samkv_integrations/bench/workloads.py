"""The bench's workloads: documents of random token ids, indexed through an engine.

The bench measures speed, which depends only on shapes, so its documents are random
ordinary token ids (never specials) of an exact length. No text tokenizes back to such
ids, so they are indexed as ids (``SamKVEngine.index_token_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samkv_integrations.models import LoadedModel


@dataclass(slots=True, frozen=True)
class Workload:
    """``documents`` documents of ``tokens`` token ids each."""

    documents: int
    tokens: int

    @property
    def name(self) -> str:
        """The workload as written on the command line, e.g. ``8x2048``."""
        return f"{self.documents}x{self.tokens}"

    @classmethod
    def parse(cls, text: str) -> Workload:
        """Parse ``DxT`` (documents x tokens)."""
        try:
            documents, tokens = (int(part) for part in text.lower().split("x"))
        except ValueError as e:
            raise ValueError(f"workloads: {text!r} is not DxT, e.g. 8x2048") from e
        if documents < 1 or tokens < 1:
            raise ValueError(f"workloads: {text!r} needs at least 1 document of 1 token")
        return cls(documents, tokens)


def vocabulary_ids(loaded: LoadedModel) -> torch.Tensor:
    """Ids that are ordinary tokens of both the tokenizer and the model's embedding."""
    tokenizer = loaded.tokenizer
    size = min(len(tokenizer), int(loaded.model.config.vocab_size))
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(size) if i not in special])


def random_documents(vocabulary: torch.Tensor, workload: Workload, seed: int) -> list[list[int]]:
    """``workload.documents`` lists of ``workload.tokens`` ids drawn from ``vocabulary``."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(
        len(vocabulary), (workload.documents, workload.tokens), generator=generator
    )
    return vocabulary[picks].tolist()
