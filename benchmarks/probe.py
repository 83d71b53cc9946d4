"""Ceilings and the cost of each step of loading a stored document cache, on one GPU.

Run on the device machine: ``python benchmarks/probe.py [--prefill]``. Prints one line per
measurement (median of several runs, seconds and the rate it implies) and writes
``$OUT/probe.json`` when OUT is set. Used to explain the bench's load phase.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import safetensors.torch
import torch

GIB = 2**30


def timed(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--prefill", action="store_true", help="also time plain HF prefill of the 8B shape"
    )
    args = parser.parse_args()
    results: dict[str, float] = {}

    def report(
        name: str, seconds: float, nbytes: float | None = None, flops: float | None = None
    ) -> None:
        results[name] = seconds
        rate = f"{nbytes / seconds / 1e9:8.1f} GB/s" if nbytes else ""
        rate += f"{flops / seconds / 1e12:8.0f} TFLOP/s" if flops else ""
        print(f"{name:<44}{seconds * 1000:10.2f} ms {rate}")

    dev = torch.device("cuda")
    big = torch.randn(GIB // 2, device=dev, dtype=torch.bfloat16)  # 1 GiB
    out = torch.empty_like(big)
    report("d2d copy 1 GiB (read+write)", timed(lambda: out.copy_(big)), 2 * GIB)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    report("bf16 matmul 8192^3", timed(lambda: a @ a), flops=2 * 8192**3)

    # One Llama-3.1-8B document of 2048 tokens: [32 layers, 8 kv heads, 2048, 128] bf16 K and V.
    shape = (32, 8, 2048, 128)
    doc = {
        "keys": torch.randn(shape, dtype=torch.bfloat16),
        "values": torch.randn(shape, dtype=torch.bfloat16),
    }
    nbytes = sum(t.nbytes for t in doc.values())
    data = safetensors.torch.save(doc)
    path = os.path.join(tempfile.mkdtemp(), "doc.safetensors")
    with open(path, "wb") as f:
        f.write(data)

    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    report("file read 256 MiB (page cache)", timed(read), nbytes)
    report("sha256 256 MiB", timed(lambda: hashlib.sha256(data).hexdigest()), nbytes)
    report("safetensors.load(bytes)", timed(lambda: safetensors.torch.load(data)), nbytes)
    report("safetensors.load_file (mmap)", timed(lambda: safetensors.torch.load_file(path)), nbytes)
    host = doc["keys"]
    report("clone on host 128 MiB", timed(lambda: host.clone()), host.nbytes)
    report("pin_memory() 128 MiB (alloc+copy)", timed(lambda: host.pin_memory()), host.nbytes)
    pinned = host.pin_memory()
    report("h2d pageable 128 MiB", timed(lambda: host.to(dev)), host.nbytes)
    report(
        "h2d pinned non_blocking 128 MiB",
        timed(lambda: pinned.to(dev, non_blocking=True)),
        host.nbytes,
    )
    target = torch.empty(shape, dtype=torch.bfloat16, device=dev)
    report(
        "h2d pinned into preallocated",
        timed(lambda: target.copy_(pinned, non_blocking=True)),
        host.nbytes,
    )
    rows = torch.randperm(2048)[:307].sort().values
    report(
        "gather 15% tokens on host (index_select)",
        timed(lambda: host.index_select(2, rows)),
        host.nbytes * 0.15,
    )

    if args.prefill:
        from transformers import AutoModelForCausalLM, DynamicCache

        from samkv_integrations.models.shapes import shape_config

        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(
                shape_config("llama-3.1-8b"), dtype=torch.bfloat16, attn_implementation="sdpa"
            ).eval()
        for n in (16384, 32768):
            ids = torch.randint(256, (1, n), device=dev)
            with torch.inference_mode():
                report(
                    f"plain prefill {n} tokens",
                    timed(lambda ids=ids: model(input_ids=ids, logits_to_keep=1), 3),
                    flops=2 * 8e9 * n,
                )
                prefix = DynamicCache(config=model.config)
                model(input_ids=ids[:, :32], past_key_values=prefix)
                kv = [(layer.keys, layer.values) for layer in prefix.layers]

                def behind_prefix(ids: torch.Tensor = ids, kv: list[Any] = kv, n: int = n) -> None:
                    cache = DynamicCache(ddp_cache_data=kv, config=model.config)
                    pos = torch.arange(32, 32 + n, device=dev)[None]
                    model(input_ids=ids, position_ids=pos, past_key_values=cache, logits_to_keep=1)

                report(
                    f"prefill {n} tokens behind a 32-token cache",
                    timed(behind_prefix, 3),
                    flops=2 * 8e9 * n,
                )
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "seconds": results}, f, indent=2)


if __name__ == "__main__":
    main()
