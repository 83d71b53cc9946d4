"""Decode throughput on a request's decode cache, alone and batched, and profiler tables.

Batch 1 is timed two ways: ``decode_rate`` keeps the picked token on the device (the
launch cost alone), while ``decoder_rate`` runs the engine's own ``Decoder`` step and picks
each token on the host, as answering does, so that the eager, static and CUDA-graph paths
are compared at what a user gets.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.decode import Decoder
from samkv_integrations.encode import cache_nbytes, layer_tensors
from samkv_integrations.models.compat import with_cache
from samkv_integrations.static_decode import StaticDecoder, with_graphs

#: Batch-1 decode paths the bench can time: the plain ``Decoder`` on a ``DynamicCache``,
#: the static cache run eagerly, the static cache replayed as a CUDA graph, the method's
#: own decoder (a decoding policy such as ``+decode=retro``; plain otherwise), and that
#: decoder as an engine with CUDA graphs runs it (its graph twin, where it offers one).
DECODE_PATHS = ("eager", "static", "graphs", "compiled", "method", "method-graphs")
#: Paths that replay CUDA graphs: CUDA only.
_GRAPH_PATHS = {"graphs", "compiled", "method-graphs"}

#: Builds the method's own decoder for a decode cache (``BaseMethod.decoder`` on the state
#: that holds it).
MethodDecoder = Callable[[DynamicCache], Decoder]

logger = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU), so that host clocks time device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@torch.inference_mode()
def decoder_rate(
    model: PreTrainedModel,
    cache: DynamicCache,
    position: int,
    path: str,
    steps: int,
    method_decoder: MethodDecoder | None = None,
) -> dict[str, float]:
    """Greedy batch-1 decoding through the engine's decoder of ``path``, on a copy of ``cache``.

    Returns ``tokens_per_s`` over ``steps`` steps after two untimed ones, and ``first_step_s``:
    the first step alone, which for the static paths copies the cache (and captures the graph).
    The ``method`` paths need ``method_decoder``.
    """
    if path not in DECODE_PATHS:
        raise ValueError(f"decode paths: unknown path {path!r}; known: {', '.join(DECODE_PATHS)}")
    own = path in ("method", "method-graphs")
    if own and method_decoder is None:
        raise ValueError(f"decode paths: the {path} path needs the method's decoder")
    device = next(model.parameters()).device
    copy = DynamicCache(
        ddp_cache_data=[(k.clone(), v.clone()) for k, v in layer_tensors(cache)],
        config=model.config,
    )
    warmup = 2
    if own and method_decoder is not None:
        decoder = method_decoder(copy)
        if path == "method-graphs":
            decoder = with_graphs(decoder, True, warmup + steps)
    elif path == "eager":
        decoder = Decoder()
    else:
        graphs = path in ("graphs", "compiled")
        decoder = StaticDecoder(warmup + steps, graphs=graphs, compiled=path == "compiled")
    token, first_step_s = 0, 0.0
    sync(device)
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == 1:
            first_step_s = time.perf_counter() - start
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        token = int(decoder.step(model, copy, token, position + step).argmax())  # syncs
    rate = steps / (time.perf_counter() - start)
    return {"tokens_per_s": rate, "first_step_s": first_step_s}


def copy_bandwidth(device: torch.device) -> float | None:
    """Device memory bandwidth in bytes/s, as ``benchmarks/probe.py`` measures it (CUDA only).

    A 1 GiB device-to-device copy reads and writes 2 GiB; the median of five copies.
    """
    if device.type != "cuda":
        return None
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        times.append(time.perf_counter() - start)
    del source, target
    return 2 * 2**30 / statistics.median(times[1:])


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
    """Run ``fn`` under ``torch.profiler`` and write its busiest operators to ``path``.

    The first table holds the labelled ranges alone (``Stopwatch`` phases, ``phase:…``, and
    the methods' ``samkv.…`` steps), their device time summing what ran inside them.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    averages = prof.key_averages()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    # torch's table() fails on ranges alone (no self device time to take shares of).
    labelled = sorted(
        (e for e in averages if e.key.startswith(("phase:", "samkv."))),
        key=lambda e: -e.device_time_total,
    )
    ranges = [f"{'range':<28} {'CPU total ms':>12} {'device total ms':>15} {'calls':>6}"] + [
        f"{e.key:<28} {e.cpu_time_total / 1e3:>12.2f} {e.device_time_total / 1e3:>15.2f} {e.count:>6}"
        for e in labelled
    ]
    tables = [
        "\n".join(ranges),
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


def batch1_paths(
    model: PreTrainedModel,
    cache: DynamicCache,
    position: int,
    paths: list[str],
    steps: int,
    bandwidth: float | None,
    method_decoder: MethodDecoder | None = None,
) -> dict[str, Any]:
    """Batch-1 rates of each decode path, and the memory bound they are read against.

    Each step reads every weight and the whole decode cache once, so the bound is the copy
    bandwidth over their bytes (``None`` where the bandwidth is not measured, off CUDA).
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bandwidth / (weights + cache_nbytes(cache)) if bandwidth else None
    measured: dict[str, dict[str, float | None]] = {}
    for path in paths:
        rates = decoder_rate(model, cache, position, path, steps, method_decoder)
        share = rates["tokens_per_s"] / bound if bound else None
        measured[path] = {**rates, "of_memory_bound": share}
    return {"decode_paths_batch1": measured, "decode_memory_bound_tokens_per_s": bound}


def decode_path_list(text: str, device: torch.device) -> list[str]:
    """``--decode-paths``: the named paths; ``auto`` is eager and graphs on CUDA, else static.

    Raises:
        ValueError: ``graphs``, ``compiled`` or ``method-graphs`` named for a model off CUDA.
    """
    if text == "auto":
        return ["eager", "graphs" if device.type == "cuda" else "static"]
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if _GRAPH_PATHS & set(paths) and device.type != "cuda":
        raise ValueError(
            f"decode paths: {', '.join(sorted(_GRAPH_PATHS & set(paths)))} need a CUDA device; "
            f"the model is on {device.type}"
        )
    return paths
