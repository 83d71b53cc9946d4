"""``samkv bench``: time to first token, memory and decode throughput per method.

Every method answers the same workloads (D documents of T random token ids, plus one
question) in one run, through ``SamKVEngine.answer`` from caches held in a real
``KVCacheStore``, so that the load phase is measured too. Ratios are taken against the
``full`` method measured in the same run. Random-weight shapes are right for speed and
memory; they say nothing about accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from samkv_integrations.batch_decoders import runs_plain_step
from samkv_integrations.bench.arguments import add_arguments
from samkv_integrations.bench.report import (
    environment,
    median_runs,
    print_report,
    ratios,
)
from samkv_integrations.bench.throughput import (
    attention_backends,
    batch1_paths,
    copy_bandwidth,
    decode_path_list,
    decode_rate,
    largest_batch_rate,
    profile_to,
    release_memory,
    sync,
)
from samkv_integrations.bench.workloads import Workload, random_documents, vocabulary_ids
from samkv_integrations.decode import Decoder
from samkv_integrations.encode import cache_nbytes
from samkv_integrations.engine import SamKVEngine
from samkv_integrations.methods import BaseMethod, DecodeState, get_method
from samkv_integrations.methods.specs import parse_methods
from samkv_integrations.models import LoadedModel, load_model
from samkv_integrations.store import KVCacheStore

logger = logging.getLogger(__name__)

#: Namespace entries that are not settings: the dispatcher's, and the measured bandwidth.
_NOT_SETTINGS = ("handler", "delegate", "copy_bandwidth")
QUESTION = "Which two documents mention the same city, and what year do both of them give?"


def measure_answer(
    engine: SamKVEngine, refs: list[Any], method: BaseMethod
) -> tuple[dict[str, Any], DecodeState]:
    """Answer once with one new token; return the measurement and the decode state.

    With one new token, decoding runs no forward: the observed state's cache is the one
    decoding would run on (prefix, kept document tokens and question).
    """
    device = engine.model.device
    sink: list[DecodeState] = []
    cuda = device.type == "cuda"
    # No garbage of earlier measurements in the baseline. The allocator's cached blocks stay,
    # as in a serving engine: emptying them put cudaMalloc/cudaFree calls into every TTFT
    # (22 ms of host time in one profiled answer on the 8B shape, docs/performance.md).
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    answer = engine.answer(QUESTION, refs, method=method, max_new_tokens=1, observe=sink.append)
    sync(device)
    wall = time.perf_counter() - start
    stats = answer.stats
    result = {
        "ttft_s": stats.ttft_s,
        "wall_s": wall,
        "phases": dict(stats.seconds),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - baseline if cuda else None,
        "allocated_before_bytes": baseline if cuda else None,
        "kv_bytes": cache_nbytes(sink[0].cache),
        "kept_fraction": stats.kept_fraction,
        "recomputed_fraction": stats.recomputed_fraction,
        "recomputed_documents": stats.recomputed_documents,
    }
    return result, sink.pop()


def bench_workload(
    engine: SamKVEngine, workload: Workload, methods: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Index one workload's documents, then measure every method on it."""
    documents = random_documents(vocabulary_ids(engine.model), workload, args.seed)
    device = engine.model.device
    sync(device)
    start = time.perf_counter()
    refs = engine.index_token_ids(documents, progress=False)
    sync(device)
    index_s = time.perf_counter() - start
    question_len = len(engine.framer.question_ids(QUESTION))
    results: dict[str, Any] = {}
    for method in methods:
        try:
            results[method] = _bench_method(engine, refs, method, args)
        except Exception as e:  # one broken method must not lose the others' numbers
            # The traceback with -v; ``run`` exits non-zero and names the failure.
            verbose = logger.isEnabledFor(logging.INFO)
            logger.error("%s %s failed: %s", workload.name, method, e, exc_info=verbose)
            results[method] = {"error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            release_memory(device)
        logger.info("%s %s: TTFT %.4f s", workload.name, method, results[method]["ttft_s"])
    return {
        "workload": workload.name,
        "documents": workload.documents,
        "tokens_per_document": workload.tokens,
        "context_tokens": workload.documents * workload.tokens,
        "question_tokens": question_len,
        "index_s": index_s,
        "methods": results,
        "ratios": ratios(results),
    }


def _method_decoder(method: BaseMethod, state: DecodeState, cache: DynamicCache) -> Decoder:
    """The method's own decoder for ``state`` decoding on ``cache`` (a copy of its cache)."""
    return method.decoder(dataclasses.replace(state, cache=cache))


def _bench_method(
    engine: SamKVEngine, refs: list[Any], method: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Median measurements of one method, then its decode rates on the cache it built."""
    instance = get_method(method)  # a validated spec: name[+option=value...]
    runs = []
    for rep in range(args.warmup + args.repeats):
        measured, state = measure_answer(engine, refs, instance)
        if rep >= args.warmup:
            runs.append(measured)
        if rep + 1 < args.warmup + args.repeats:
            del state  # before the next measurement, so its baseline excludes this cache
    result = median_runs(runs)
    result["runs"] = runs
    if (tier := engine.device_tier) is not None:  # counts so far, the warmup's included
        documents, held = tier.usage()
        counts = {"hits": tier.hits, "misses": tier.misses}
        result["device_tier"] = {**counts, "documents": documents, "bytes": held}
    if args.decode_steps > 0:
        position = state.next_position
        model = engine.model.model
        result["decode_tokens_per_s_batch1"] = decode_rate(
            model, state.cache, position, 1, args.decode_steps
        )
        # The engine batches only the plain step (``batching``): a method with its own
        # decoder (``+decode=quest``) decodes one answer at a time, so no batched rate.
        batched = runs_plain_step(instance.decoder(state))
        batch, rate = (
            largest_batch_rate(model, state.cache, position, args.decode_steps, args.max_batch)
            if batched
            else (None, None)
        )
        result["decode_max_batch"] = batch
        result["decode_tokens_per_s_max_batch"] = rate
        paths, bandwidth = args.decode_path_list, args.copy_bandwidth
        own = partial(_method_decoder, instance, state)
        result.update(
            batch1_paths(model, state.cache, position, paths, args.decode_steps, bandwidth, own)
        )
    if args.profile:  # the answer, and a few decode steps unless decoding is skipped
        # A method spec holds '+' and '='; file names keep to letters, digits, '.', '_', '-'.
        name = re.sub(r"[^A-Za-z0-9._-]", "_", method)
        where = Path(args.profile) / f"profile-{len(refs)}docs-{state.context_end}-{name}.txt"
        profile_to(
            where,
            lambda: (
                measure_answer(engine, refs, instance),
                args.decode_steps > 0
                and decode_rate(engine.model.model, state.cache, state.next_position, 1, 4),
            ),
        )
    return result


def _model(args: argparse.Namespace) -> LoadedModel:
    if args.shape is not None:
        from samkv_integrations.models.loading import _resolve_device
        from samkv_integrations.models.shapes import random_model

        dtype = getattr(torch, args.dtype) if args.dtype else None
        device = _resolve_device(args.device)  # a device torch lacks is named, as load_model does
        return random_model(args.shape, device=device, dtype=dtype, seed=args.seed)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    """Run the bench, print the tables and write the JSON report.

    Returns 1, after writing the report, when a method failed on some workload.
    """
    workloads = [Workload.parse(w) for w in args.workloads.split(",") if w.strip()]
    methods = [spec.label for spec in parse_methods(args.methods, reference=False)]
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"output: {args.output} is a directory; give a JSON file path")
    loaded = _model(args)
    name = loaded.name.replace("random:", "").replace("/", "_")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    output = Path(
        args.output or f"benchmarks/results/bench-{name}-{loaded.device.type}-{stamp}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    store_dir = args.store or tempfile.mkdtemp(prefix="samkv-bench-")
    store = KVCacheStore(
        store_dir, memory_bytes=int(args.memory_gib * 2**30), pin_memory=args.pin_memory
    )
    engine = SamKVEngine(loaded, store, device_cache_bytes=int(args.device_cache_gib * 2**30))
    device = loaded.device
    args.decode_path_list = decode_path_list(args.decode_paths, device)
    args.copy_bandwidth = copy_bandwidth(device) if args.decode_steps > 0 else None
    config = loaded.model.config
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {**environment(device), "copy_bytes_per_s": args.copy_bandwidth},
        "model": {
            "name": loaded.name,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "layers": int(config.num_hidden_layers),
            "weights_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
            "max_context": loaded.max_context,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS},
        "workloads": [],
    }
    try:
        for workload in workloads:
            with attention_backends(args.sdpa_backends):
                measured = _bench_if_fits(engine, workload, methods, args)
            if measured is None:
                continue
            report["workloads"].append(measured)
            # Written after every workload, so that a run cut short keeps what it measured.
            output.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if args.store is None:
            shutil.rmtree(store_dir, ignore_errors=True)
    print_report(report)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {output}")
    failed = [
        f"{method} on {work['workload']}: {result['error']}"
        for work in report["workloads"]
        for method, result in work["methods"].items()
        if "error" in result
    ]
    if failed:
        more = f" (and {len(failed) - 1} more; see the report)" if len(failed) > 1 else ""
        print(f"samkv bench: error: {failed[0]}{more}", file=sys.stderr)
        return 1
    return 0


def _bench_if_fits(
    engine: SamKVEngine, workload: Workload, methods: list[str], args: argparse.Namespace
) -> dict[str, Any] | None:
    loaded = engine.model
    needed = engine.prefix.length + workload.documents * workload.tokens + 64
    if needed > loaded.max_context:
        logger.warning(
            "skipping %s: %d tokens exceed the context of %d",
            workload.name,
            needed,
            loaded.max_context,
        )
        return None
    return bench_workload(engine, workload, methods, args)


def main(argv: list[str] | None = None) -> int:
    """``python -m samkv_integrations.bench.cli``."""
    parser = argparse.ArgumentParser(
        prog="python -m samkv_integrations.bench.cli", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
