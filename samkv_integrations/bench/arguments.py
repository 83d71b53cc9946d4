"""The ``samkv bench`` command line: its options and their checks."""

from __future__ import annotations

import argparse

from samkv_integrations.bench.throughput import DECODE_PATHS, attention_backends
from samkv_integrations.bench.workloads import Workload
from samkv_integrations.cli import (
    add_engine_arguments,
    int_at_least,
    method_specs,
    not_empty,
    number_at_least,
)
from samkv_integrations.methods import METHODS

__all__ = ["DEFAULT_WORKLOADS", "add_arguments"]

DEFAULT_WORKLOADS = "8x512,8x1024,8x2048,16x2048"

#: Operating points the bench reports beside each method's default, so that speed is read
#: at the budgets the accuracy tables report (README: samkv at 0.15, its default, and 0.3).
EXTRA_OPERATING_POINTS = ("samkv+budget=0.3",)


def _workloads(text: str) -> str:
    """Argparse ``type=`` for ``--workloads``: the text, once every ``DxT`` in it parses."""
    try:
        if not [Workload.parse(w) for w in text.split(",") if w.strip()]:
            raise ValueError("no workload given, e.g. 8x2048")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("workloads: ")) from None
    return text


def _decode_paths_arg(text: str) -> str:
    """Argparse ``type=`` for ``--decode-paths``: ``auto`` or known path names."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if text != "auto" and (not names or set(names) - set(DECODE_PATHS)):
        raise argparse.ArgumentTypeError(
            f"expected auto or a comma-separated subset of {','.join(DECODE_PATHS)}, got {text!r}"
        )
    return text


def _sdpa_backends(text: str) -> str:
    """Argparse ``type=`` for ``--sdpa-backends``: the text, once every name in it is known."""
    try:
        attention_backends(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("sdpa backends: ")) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    which = parser.add_mutually_exclusive_group()
    add_engine_arguments(
        parser,
        store_help="KV cache store directory (default: a temporary one, removed after)",
        model_group=which,
    )
    which.add_argument(
        "--shape",
        default=None,
        help="random-weight model of a named shape (llama-3.1-8b, qwen2.5-7b, tiny-llama, ...)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--workloads",
        type=_workloads,
        default=DEFAULT_WORKLOADS,
        help=f"comma-separated DxT (default {DEFAULT_WORKLOADS})",
    )
    parser.add_argument(
        "--methods",
        type=method_specs,
        default=",".join([*METHODS, *EXTRA_OPERATING_POINTS]),
        metavar="SPECS",
        help="comma-separated method specs name[+option=value...], e.g. full,samkv+budget=0.15 "
        f"(default: all registered, and {','.join(EXTRA_OPERATING_POINTS)}); results are "
        "keyed by spec",
    )
    parser.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=3,
        help="measured repetitions per method (median reported)",
    )
    parser.add_argument(
        "--warmup", type=int_at_least(0), default=1, help="unmeasured repetitions before them"
    )
    parser.add_argument(
        "--decode-steps",
        type=int_at_least(0),
        default=16,
        help="decode steps timed per batch size (0: skip decoding)",
    )
    parser.add_argument(
        "--decode-paths",
        type=_decode_paths_arg,
        default="auto",
        help="batch-1 decode paths timed through the engine's decoder: eager, static (static "
        "cache, no graph), graphs (CUDA graph replay), compiled (graphs of the step compiled by "
        "torch.compile), method (the method's own decoder, e.g. "
        "+decode=retro), method-graphs (that decoder as an engine with CUDA graphs runs it: "
        "its graph twin where it has one); auto: eager,graphs on CUDA, eager,static elsewhere",
    )
    parser.add_argument(
        "--max-batch", type=int_at_least(1), default=256, help="largest decode batch tried"
    )
    parser.add_argument(
        "--memory-gib",
        type=number_at_least(0),
        default=0.0,
        help="in-memory LRU tier of the store, GiB of host RAM",
    )
    parser.add_argument(
        "--pin-memory", action="store_true", help="the store returns pinned host tensors"
    )
    parser.add_argument(
        "--device-cache-gib",
        type=number_at_least(0),
        default=0.0,
        help="documents' KV kept on the device between answers (LRU), GiB: an answer finds "
        "there the documents an earlier one loaded, if they fit (0: off; each result gives "
        "the tier's hits and misses so far)",
    )
    parser.add_argument(
        "--profile",
        type=not_empty,
        default=None,
        help="directory for torch.profiler tables (one extra run per method)",
    )
    parser.add_argument(
        "--sdpa-backends",
        type=_sdpa_backends,
        default=None,
        help="comma-separated SDPA backends to allow: flash, efficient, math, cudnn (default: torch's choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=not_empty,
        default=None,
        help="JSON path (default: benchmarks/results/bench-<model>-<time>.json)",
    )
