"""Bounded load test (issue 16, item 3): concurrent answers through the API and the web server.

Every request answers its own question over the same ``--workload`` documents (``8x2048``:
8 documents of 2048 tokens), indexed once. For each method and each concurrency N, three
ways of serving the same N requests are timed:

``serial``: one after another through ``SamKVEngine.answer`` on an engine with
    ``batch_decoding=False`` (each answer decodes alone, as before batching; CUDA graphs
    where ``decode_graphs="auto"`` takes them). TTFT is counted from each request's start.
``api``: N threads at once, each iterating ``engine.stream`` on the batching engine.
``server``: N threads at once, each posting to ``/api/ask`` of the demo app
    (``examples/chroma_demo/server.py``) served by uvicorn on 127.0.0.1, reading the SSE.

TTFT is from the start of the round (or, serial, of the request) to the first answer
delta; ``request_tokens_per_s`` is a request's tokens after the first over the time after
the first. The model has random weights of a named shape (``samkv bench --shape``); its
output rows are zeroed except for tokens that print one ASCII character, so that steps
yield one delta each, and EOS is kept out of the first ``--min-new-tokens`` tokens (all of
them by default): otherwise answers end wherever EOS wins, at random lengths, and the
concurrent and serial rounds, whose numerics differ, would be timed on different amounts of
work. (Until the ninth session the random shapes also kept their family's EOS id, 2, a
printable byte ('#') in their tokenizer; they now end with the tokenizer's own.)

The server is driven with pre-indexed refs: a stand-in for the demo's Chroma index returns
every document as a retrieved chunk (no embeddings, no vector search). Its chunk texts are
short labels unless ``--server-chunk-text``: the page's per-token display of a chunk
detokenizes every prefix (about 0.25 s per 2048-token chunk on a CPU), which is the demo
page's cost, not the engine's.

    python benchmarks/load_test.py --shape llama-3.1-8b --workload 8x2048 \\
        --concurrency 1,4,16,32 --methods samkv,full --out benchmarks/results/load-8b.json
    python benchmarks/load_test.py --shape tiny-llama --workload 2x48 --concurrency 1,2 \\
        --max-new-tokens 4 --out /tmp/load.json        # the CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import random
import socket
import string
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.shapes import random_model

INTERFACES = ("serial", "api", "server")
QUESTION = "Request {i}: which two documents mention the same city, and in what year?"


@dataclass
class Timing:
    """One request: seconds from its start to its first delta and to its end, tokens made."""

    ttft_s: float | None = None
    total_s: float | None = None
    tokens: int = 0
    error: str | None = None
    #: The engine's phase times (load, select, ..., question), measured on the device: their
    #: sum is the prefill's own time, and ``prefilled_s - prefill_s`` when it started.
    phases: dict[str, float] | None = None
    prefill_s: float | None = None
    #: Seconds from the request's start until its prefill ended (its device work done).
    prefilled_s: float | None = None


def ascii_model(args: argparse.Namespace) -> LoadedModel:
    """The random-weight model, able to emit only tokens that print one ASCII character."""
    loaded = random_model(args.shape, device=args.device, dtype=args.dtype, seed=args.seed)
    tokenizer = loaded.tokenizer
    printable = [
        i for i in range(len(tokenizer)) if len(s := tokenizer.decode([i])) == 1 and " " <= s <= "~"
    ]
    keep = torch.zeros(loaded.model.config.vocab_size, dtype=torch.bool)
    keep[printable] = True
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight[~keep.to(loaded.device)] = 0.0
    return LoadedModel.from_module(loaded.model, tokenizer, loaded.name)


def documents(engine: SamKVEngine, count: int, tokens: int, seed: int) -> list[str]:
    """``count`` random ASCII texts, each ``tokens`` tokens once framed (byte tokenizer)."""
    framing = len(engine.document_ids("x")) - 1
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,"
    return ["".join(rng.choices(alphabet, k=max(tokens - framing, 1))) for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ask_api(engine: SamKVEngine, refs: list[Any], method: str, i: int, args: Any) -> Timing:
    timing, start = Timing(), time.perf_counter()

    def prefilled(_state: Any) -> None:
        timing.prefilled_s = time.perf_counter() - start

    try:
        stream = engine.stream(
            QUESTION.format(i=i),
            refs,
            method,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            observe=prefilled,
        )
        for _ in stream:
            if timing.ttft_s is None:
                timing.ttft_s = time.perf_counter() - start
        timing.tokens = len(stream.answer.token_ids)
        timing.phases = dict(stream.answer.stats.seconds)
        timing.prefill_s = sum(timing.phases.values())
    except Exception as e:  # one failed request is a result, not the end of the run
        timing.error = f"{type(e).__name__}: {e}"
    timing.total_s = time.perf_counter() - start
    return timing


def ask_server(url: str, method: str, i: int, top_k: int) -> Timing:
    import httpx

    timing, start, event, text = Timing(), time.perf_counter(), "", ""
    body = {"question": QUESTION.format(i=i), "method": method, "top_k": top_k}
    try:
        with (
            httpx.Client(timeout=None) as client,
            client.stream("POST", f"{url}/api/ask", json=body) as response,
        ):
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read()!r}")
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "delta":
                    if timing.ttft_s is None:
                        timing.ttft_s = time.perf_counter() - start
                elif line.startswith("data: ") and event == "done":
                    text = json.loads(line[6:])["text"]
                elif line.startswith("data: ") and event == "error":
                    raise RuntimeError(json.loads(line[6:])["error"])
        timing.tokens = len(text)  # one printable character per token (see ascii_model)
    except Exception as e:
        timing.error = f"{type(e).__name__}: {e}"
    timing.total_s = time.perf_counter() - start
    return timing


def in_threads(calls: list[Any]) -> list[Timing]:
    """Start every call at once (a barrier), each in its own thread; their timings."""
    results: list[Timing] = [Timing()] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(k: int) -> None:
        barrier.wait()
        results[k] = calls[k]()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def summary(timings: list[Timing], wall_s: float) -> dict[str, Any]:
    """Throughput, TTFT percentiles, the median per-request decode rate, the prefill interval."""
    done = [t for t in timings if t.error is None and t.ttft_s is not None]
    ttfts = [t.ttft_s for t in done if t.ttft_s is not None]
    rates = [
        (t.tokens - 1) / (t.total_s - t.ttft_s)
        for t in done
        if t.tokens > 1 and t.total_s is not None and t.ttft_s is not None and t.total_s > t.ttft_s
    ]
    tokens = sum(t.tokens for t in done)
    # Prefills run one after another (the engine's lock): the spacing of their ends is what
    # each one adds to the round, whatever overlaps it on the host.
    ends = sorted(t.prefilled_s for t in done if t.prefilled_s is not None)
    return {
        "requests": len(timings),
        "completed": len(done),
        "errors": sorted({t.error for t in timings if t.error is not None}),
        "generated_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": float(np.percentile(ttfts, 50)) if ttfts else None,
        "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "request_tokens_per_s_p50": float(np.median(rates)) if rates else None,
        "prefill_interval_s": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None,
        "timings": [asdict(t) for t in timings],
    }


def run_round(interface: str, method: str, n: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Serve ``n`` requests one way; the round's summary."""
    args, device = ctx["args"], ctx["device"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    start, before = time.perf_counter(), None
    if interface == "serial":
        timings = [ask_api(ctx["serial"], ctx["refs"], method, i, args) for i in range(n)]
    elif interface == "api":
        engine, refs = ctx["batched"], ctx["refs"]
        before = engine.batcher.counts() if engine.batcher is not None else None
        with stamped_steps(engine, start) as stamps:
            timings = in_threads(
                [lambda i=i: ask_api(engine, refs, method, i, args) for i in range(n)]
            )
    else:
        url, top_k = ctx["url"], min(len(ctx["refs"]), 8)
        timings = in_threads([lambda i=i: ask_server(url, method, i, top_k) for i in range(n)])
    sync(device)
    result = {"interface": interface, "method": method, "concurrency": n} | summary(
        timings, time.perf_counter() - start
    )
    if before is not None:  # the api round: what it cost the batcher
        # Its steps (wall per step), and how often it rebuilt its stack and recaptured its
        # CUDA graph (each capture costs a few steps' time).
        after = ctx["batched"].batcher.counts()
        result["batched_decode"] = {k: after[k] - before[k] for k in before} | step_summary(stamps)
    return result


@contextmanager
def stamped_steps(engine: SamKVEngine, start: float) -> Iterator[list[tuple[float, float, int]]]:
    """Each batched step's (start, end, rows), seconds from ``start``, while the block runs.

    On CUDA a step returns once its work is queued, so the stamps are CUDA events, measured
    from one recorded at entry (the device idle): one recorded before the step's host work
    (a rebuild, a capture, eager launches: on an idle device they count as the step's) and
    one after its kernels, so a gap to the next step's start is time the device waited for
    the worker's picks and gathering. Elsewhere they are the host's clock around each step.
    """
    stamps: list[tuple[float, float, int]] = []
    stack = engine.batcher._stack if engine.batcher is not None else None
    if stack is None:
        yield stamps
        return
    plain = stack.step
    cuda = next(stack.model.parameters()).device.type == "cuda"
    events: list[tuple[Any, Any, int]] = []
    origin = torch.cuda.Event(enable_timing=True) if cuda else None
    if origin is not None:
        origin.record()
    origin_s = time.perf_counter() - start

    def stamped(batch: list[Any], settled: bool = False) -> torch.Tensor:
        if not cuda:
            begin = time.perf_counter() - start
            logits = plain(batch, settled)
            stamps.append((begin, time.perf_counter() - start, len(batch)))
            return logits
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record()
        logits = plain(batch, settled)
        ended.record()
        events.append((began, ended, len(batch)))
        return logits

    stack.step = stamped  # type: ignore[method-assign]
    try:
        yield stamps
    finally:
        del stack.step
        if origin is not None:
            torch.cuda.synchronize()
            stamps.extend(
                (
                    origin_s + origin.elapsed_time(b) / 1000,
                    origin_s + origin.elapsed_time(e) / 1000,
                    n,
                )
                for b, e, n in events
            )


def step_summary(stamps: list[tuple[float, float, int]]) -> dict[str, Any]:
    """When the batched steps ran, their median time and gap, their median rows, and each step.

    ``steps_ms`` lists every step as ``[start, end, rows]`` (ms from the round's start), so
    that where a round's decoding time goes (eager steps, captures, rebuilds) can be read
    from the JSON without rerunning it.
    """
    if not stamps:
        return {}
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(stamps)]
    return {
        "first_step_s": stamps[0][0],
        "last_step_end_s": stamps[-1][1],
        "step_ms_median": 1000 * float(np.median([end - begin for begin, end, _ in stamps])),
        "gap_ms_median": 1000 * float(np.median(gaps)) if gaps else None,
        "rows_median": float(np.median([rows for *_, rows in stamps])),
        "steps_ms": [[round(1000 * b, 2), round(1000 * e, 2), rows] for b, e, rows in stamps],
    }


class PreIndexed:
    """What the demo app reads of its ``DemoIndex``, over refs indexed beforehand."""

    def __init__(
        self,
        engine: SamKVEngine,
        refs: list[Any],
        texts: list[str],
        full: bool,
        min_new_tokens: int,
    ) -> None:
        from samkv_chroma_demo.pipeline import RetrievedChunk

        self.engine, self.name, self.min_new_tokens = engine, "load-test", min_new_tokens
        self.chunks = [
            RetrievedChunk(f"d{k}", f"document {k}", text if full else f"document {k}", 1.0, ref)
            for k, (ref, text) in enumerate(zip(refs, texts, strict=True))
        ]

    def count(self) -> int:
        return len(self.chunks)

    def retrieve(self, question: str, top_k: int) -> list[Any]:
        return list(self.chunks)  # every document, whatever top_k (capped at 8 by the app)

    def stream(self, question: str, chunks: Any, method: str, **kwargs: Any) -> Any:
        refs = [c.ref for c in chunks]
        return self.engine.stream(
            question, refs, method, min_new_tokens=self.min_new_tokens, **kwargs
        )


def start_server(index: PreIndexed, max_new_tokens: int) -> tuple[str, Any]:
    """The demo app on a free loopback port, served from a thread; (base URL, server)."""
    import uvicorn
    from samkv_chroma_demo.server import create_app

    app = create_app(index, max_new_tokens=max_new_tokens)  # type: ignore[arg-type]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the demo server did not start within 60 s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", help="random-weight shape (models.shapes)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workload", default="8x2048", help="documents x tokens per request")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated request counts")
    p.add_argument("--methods", default="samkv,full", help="comma-separated method specs")
    p.add_argument("--interfaces", default=",".join(INTERFACES), help="serial,api,server")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--min-new-tokens",
        type=int,
        default=None,
        help="tokens before EOS may end an answer (default: --max-new-tokens, equal work)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="the engine's max_batch")
    p.add_argument(
        "--serial-decode-graphs",
        default="auto",
        choices=["auto", "off"],
        help="decode_graphs of the serial engine (auto: CUDA graphs where supported)",
    )
    p.add_argument("--server-chunk-text", action="store_true", help="send chunk texts to the page")
    p.add_argument(
        "--memory-gib",
        type=float,
        default=24.0,
        help="the store's in-memory tier, as samkv bench (0: every load reads and verifies "
        "the stored file, which dominates TTFT at 8x2048)",
    )
    p.add_argument("--pin-memory", action="store_true", help="pin the in-memory tier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype) if args.dtype else None
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.interfaces = [i.strip() for i in args.interfaces.split(",") if i.strip()]
    bad = set(args.interfaces) - set(INTERFACES)
    if args.min_new_tokens is None:
        args.min_new_tokens = args.max_new_tokens
    if bad or min(args.concurrency) < 1 or not 0 <= args.min_new_tokens <= args.max_new_tokens >= 1:
        p.error(f"interfaces {sorted(bad)} / concurrency / min- or max-new-tokens out of range")
    count, tokens = (int(x) for x in args.workload.lower().split("x"))
    args.documents, args.tokens = count, tokens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = ascii_model(args)
    store = KVCacheStore(
        f"memory://samkv-load-test-{time.time_ns()}",
        memory_bytes=int(args.memory_gib * 2**30),
        pin_memory=args.pin_memory,
    )
    batched = SamKVEngine(loaded, store, batch_decoding=True, max_batch=args.max_batch)
    graphs = "auto" if args.serial_decode_graphs == "auto" else False
    serial = SamKVEngine(loaded, store, batch_decoding=False, decode_graphs=graphs)
    texts = documents(batched, args.documents, args.tokens, args.seed)
    refs = batched.index(texts, progress=False)
    ctx: dict[str, Any] = {
        "args": args,
        "device": loaded.device,
        "batched": batched,
        "serial": serial,
        "refs": refs,
    }
    server = None
    if "server" in args.interfaces:
        ctx["url"], server = start_server(
            PreIndexed(batched, refs, texts, args.server_chunk_text, args.min_new_tokens),
            args.max_new_tokens,
        )
    results = []
    try:
        for method in args.methods:
            ask_api(serial, refs, method, -1, args)  # warm-up: allocator, kernels, caches
            ask_api(batched, refs, method, -1, args)
            for n in args.concurrency:
                for interface in args.interfaces:
                    result = run_round(interface, method, n, ctx)
                    results.append(result)
                    print(
                        f"{method:>8} {interface:>6} x{n:<3} {result['tokens_per_s'] or 0:9.1f} tok/s"
                        f"  TTFT p50 {result['ttft_p50_s'] or 0:.3f} s p99 {result['ttft_p99_s'] or 0:.3f} s"
                        f"  errors {len(result['errors'])}",
                        flush=True,
                    )
    finally:
        if server is not None:
            server.should_exit = True
    rates = {(r["interface"], r["method"], r["concurrency"]): r["tokens_per_s"] for r in results}
    speedups = [
        {"method": m, "concurrency": n, "interface": i, "over_serial": rates[i, m, n] / base}
        for (i, m, n) in rates
        if i != "serial" and (base := rates.get(("serial", m, n))) and rates[i, m, n]
    ]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(loaded.device),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": args.shape,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "workload": args.workload,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "max_batch": args.max_batch,
        "memory_gib": args.memory_gib,
        "pin_memory": args.pin_memory,
        "server_chunk_text": args.server_chunk_text,
        "serial_decode_graphs": serial.decode_graphs,
        "batched_decode_graphs": batched.decode_graphs,
        "torch": torch.__version__,
        "results": results,
        "speedups": speedups,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
