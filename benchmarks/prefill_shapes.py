"""Prefill time as shapes and threads change, with SDPA's cuDNN backend off and on.

PyTorch prefers cuDNN's fused attention on Hopper GPUs; cuDNN builds an execution graph for
every new attention shape and keeps it in a thread-local cache, so a prefill of a new
question length, or the first one in a new thread, pays for the graphs (docs/performance.md,
"cuDNN attention"). The engine turns that backend off while it runs the model
(``model_lock``). This diagnostic indexes ``D + 2`` random documents of ``T`` tokens and
times the method's prefill (its phases, summed) in four cases: the same question again,
questions of new lengths, new document counts, and each answer in a fresh thread. It runs
them with the engine as it is (``engine``) and with the cuDNN backend left on
(``cudnn``, the behaviour before), and writes the milliseconds to ``--out``.

A CUDA diagnostic: on the CPU it runs (the tests use it) but times nothing worth reading.

    python benchmarks/prefill_shapes.py --shape llama-3.1-8b --workload 8x2048 --out shapes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from load_test import QUESTION as REQUEST
from load_test import documents

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models.shapes import random_model

QUESTION = REQUEST.format(i=1)  # the load test's question


def prefill_ms(engine: SamKVEngine, refs: list[Any], method: str, question: str) -> float:
    """One answer of one token: the engine's phase times, summed, in milliseconds."""
    answer = engine.answer(question, refs, method, max_new_tokens=1)
    return 1000 * sum(answer.stats.seconds.values())


def in_new_thread(call: Callable[[], float]) -> float:
    """``call()`` run in a thread of its own, started for it."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    thread.join()
    return result[0]


def cases(engine: SamKVEngine, refs: list[Any], documents: int, method: str) -> dict[str, Any]:
    """The four cases' prefill times (ms) on ``engine``."""

    def ask(question: str = QUESTION, count: int = documents) -> float:
        return prefill_ms(engine, refs[:count], method, question)

    for _ in range(3):  # warm-up: kernels, allocator, the repeated shape's graphs
        ask()
    counts = [c for c in range(max(documents - 3, 1), documents + 3) if c != documents]
    return {
        "repeated_shape": [ask() for _ in range(4)],
        "new_question_lengths": [ask(QUESTION + " x" * k) for k in range(1, 6)],
        "new_document_counts": {str(c): ask(count=c) for c in counts if c <= len(refs)},
        "new_thread_each": [in_new_thread(ask) for _ in range(4)],
    }


def _rounded(ms: list[float] | dict[str, float]) -> list[int] | dict[str, int]:
    if isinstance(ms, dict):
        return {k: round(v) for k, v in ms.items()}
    return [round(v) for v in ms]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help="random-weight shape")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--workload", default="8x2048", help="documents x tokens")
    parser.add_argument("--method", default="samkv", help="method spec")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    args.documents, args.tokens = (int(x) for x in args.workload.lower().split("x"))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = random_model(args.shape, device=args.device, seed=0)
    store = KVCacheStore(
        f"memory://samkv-prefill-shapes-{time.time_ns()}",
        memory_bytes=24 * 2**30,
        pin_memory=args.device == "cuda",
    )
    engine = SamKVEngine(loaded, store)
    refs = engine.index(documents(engine, args.documents + 2, args.tokens, 0), progress=False)
    modes: dict[str, Any] = {"engine": cases(engine, refs, args.documents, args.method)}
    engine._lock.skip_cudnn_attention = False  # the backend PyTorch picks, as before
    modes["cudnn"] = cases(engine, refs, args.documents, args.method)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "shape": args.shape,
        "workload": args.workload,
        "method": args.method,
        "prefill_ms": modes,
    }
    for mode, times in modes.items():
        print(mode, {case: _rounded(ms) for case, ms in times.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
