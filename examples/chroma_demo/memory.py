"""What one answer costs in memory, for the page's side-by-side comparison.

On CUDA: the peak of ``torch.cuda.max_memory_allocated`` during the answer, above what was
allocated before it (the weights, mostly). Everywhere: the bytes of the KV cache that
decoding holds at the end (its tokens times the model's KV bytes per token), which is
what a method's sparsification saves and what does not depend on the allocator.
"""

from __future__ import annotations

from typing import Any

import torch

from samkv_integrations.engine import Answer, SamKVEngine

__all__ = ["MemoryProbe", "kv_bytes_per_token"]


def kv_bytes_per_token(engine: SamKVEngine) -> int:
    """K and V bytes one token holds over all layers (read off the shared prefix cache)."""
    prefix = engine.prefix
    return sum(
        k.shape[1] * k.shape[-1] * k.element_size() + v.shape[1] * v.shape[-1] * v.element_size()
        for k, v in zip(prefix.keys, prefix.values, strict=True)
    )


class MemoryProbe:
    """Start it right before an answer; :meth:`report` once the answer is complete."""

    def __init__(self, engine: SamKVEngine) -> None:
        self.engine = engine
        self.device = engine.model.device
        self.base = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)

    def report(self, answer: Answer, question: str) -> dict[str, Any]:
        """``kv_tokens``, ``kv_bytes`` and, on CUDA, ``peak_bytes``, each with how it was measured."""
        engine = self.engine
        # The prompt without documents (prefix and question), the kept document tokens
        # and the generated ones.
        tokens = (
            engine.prompt_tokens(question) + sum(answer.stats.kept_tokens) + len(answer.token_ids)
        )
        out: dict[str, Any] = {
            "kv_tokens": tokens,
            "kv_bytes": tokens * kv_bytes_per_token(engine),
            "kv_measure": "KV cache held for decoding (tokens in it times KV bytes per token)",
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - self.base
            out["peak_measure"] = (
                "torch.cuda.max_memory_allocated during the answer, above what was allocated before"
            )
        return out
