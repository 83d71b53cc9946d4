"""Decode throughput on a request's decode cache, alone and batched, and profiler tables."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.encode import layer_tensors
from samkv_integrations.models.compat import with_cache

logger = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU), so that host clocks time device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes of every key and value tensor held by ``cache``."""
    return sum(t.numel() * t.element_size() for pair in layer_tensors(cache) for t in pair)


@torch.inference_mode()
def decode_rate(
    model: PreTrainedModel, cache: DynamicCache, position: int, batch: int, steps: int
) -> float:
    """Tokens per second of greedy decoding ``batch`` copies of ``cache`` for ``steps`` steps."""
    device = next(model.parameters()).device
    stacked = DynamicCache(
        ddp_cache_data=[
            (keys.repeat(batch, 1, 1, 1), values.repeat(batch, 1, 1, 1))
            for keys, values in layer_tensors(cache)
        ],
        config=model.config,
    )
    ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
    warmup = 2
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        positions = torch.full((batch, 1), position + step, device=device)
        out = model(
            input_ids=ids, position_ids=positions, **with_cache(model, stacked), use_cache=True
        )
        ids = out.logits[:, -1:].argmax(-1)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def largest_batch_rate(
    model: PreTrainedModel, cache: DynamicCache, position: int, steps: int, cap: int
) -> tuple[int, float]:
    """Decode rate at the largest power-of-two batch (up to ``cap``) that fits in memory.

    On CUDA a batch is tried only if ``torch.cuda.mem_get_info`` says it fits (its caches,
    their growth over the steps, and the one-layer copy a cache append makes); an
    out-of-memory error ends the search too.
    """
    device = next(model.parameters()).device
    n_layers = len(cache.layers)
    per_request = cache_nbytes(cache) * (
        1 + (steps + 2) / max(cache.get_seq_length(), 1) + 2 / n_layers
    )
    best = (1, decode_rate(model, cache, position, 1, steps))
    batch = 2
    while batch <= cap:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(device)
            if batch * per_request * 1.05 > free:
                break
        try:
            best = (batch, decode_rate(model, cache, position, batch, steps))
        except torch.OutOfMemoryError:
            logger.info("batch %d ran out of memory", batch)
            break
        batch *= 2
    # Outside the handler: the traceback's frames hold the failed batch's caches, in
    # reference cycles that only a collection frees.
    release_memory(device)
    return best


def release_memory(device: torch.device) -> None:
    """Free unreachable tensors and hand cached device blocks back, between measurements."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_to(path: Path, fn: Callable[[], object]) -> None:
    """Run ``fn`` under ``torch.profiler`` and write its busiest operators to ``path``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    averages = prof.key_averages()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    tables = [
        averages.table(sort_by=sort, row_limit=30),
        averages.table(sort_by="self_cpu_time_total", row_limit=20),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables) + "\n")


def attention_backends(names: str | None) -> contextlib.AbstractContextManager[None]:
    """Restrict SDPA to the named backends (e.g. ``flash,efficient,math``) inside the block."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    known = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    try:
        return sdpa_kernel([known[n.strip()] for n in names.split(",")])
    except KeyError as e:
        raise ValueError(f"sdpa backends: unknown backend {e}; known: {', '.join(known)}") from e
