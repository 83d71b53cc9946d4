"""How long batched decoding waits between steps: a diagnostic of the per-step round trip.

``N`` answers start together on one engine (batched decoding on) and decode
``--max-new-tokens`` each. Every stacked step (``StackedCache.step``) is stamped
(``load_test.stamped_steps``: CUDA events on the GPU, the host's clock elsewhere); the gap
from one step's end to the next step's start is time the device waits for the host: the
worker's picks and gathering, and whatever the answers' threads hold the GIL for meanwhile. Printed and written to ``--out``: steps, batch sizes, and the median and p90 gap.
A diagnostic, not a speed figure: the CPU machine never times what is reported.

Run: python benchmarks/step_gaps.py --shape tiny-llama --device cpu --answers 16 --out gaps.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from load_test import stamped_steps

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models.shapes import random_model


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run one warm-up answer, then ``args.answers`` together; the stamped steps' summary."""
    model = random_model(args.shape, device=args.device, seed=0)
    with tempfile.TemporaryDirectory() as store_dir:
        engine = SamKVEngine(model, KVCacheStore(store_dir), max_batch=max(args.answers, 1))
        texts = [" ".join(f"w{d}x{t}" for t in range(args.words)) for d in range(args.documents)]
        refs = engine.index(texts, progress=False)

        def ask(i: int) -> None:
            engine.answer(
                f"question {i}?",
                refs,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,  # every answer in every step, to the end
                stop=[],
            )

        ask(-1)  # warm-up, alone
        with stamped_steps(engine, time.perf_counter()) as stamps:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(args.answers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    gaps = np.array([b[0] - a[1] for a, b in itertools.pairwise(stamps)]) * 1000
    return {
        "command": " ".join(sys.argv),
        "device": args.device,
        "shape": args.shape,
        "answers": args.answers,
        "max_new_tokens": args.max_new_tokens,
        "steps": len(stamps),
        "batch_sizes": dict(Counter(n for *_, n in stamps).most_common()),
        "step_ms_median": float(np.median([(e - s) * 1000 for s, e, _ in stamps])),
        "gap_ms_median": float(np.median(gaps)) if len(gaps) else None,
        "gap_ms_p90": float(np.percentile(gaps, 90)) if len(gaps) else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny-llama", help="random-weight shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--answers", type=int, default=16, help="answers decoding together")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--words", type=int, default=60, help="words per document")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    report = measure(args)
    print(json.dumps({k: v for k, v in report.items() if k != "command"}))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
