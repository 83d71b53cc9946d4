"""Indexing under stress (issue 14): concurrent writers, peak memory, a writer killed mid-way.

Two measurements, each run in fresh subprocesses so that every number is one process's own:

``race``: two processes index the same documents into one store at once, with different
batch sizes (so a document's KV bytes differ between them), ``--rounds`` times, each round
into a fresh store; then every entry is verified. Done when: 0 corrupt entries.

    python benchmarks/index_stress.py race --model random:tiny-llama --docs 300 --rounds 10

``memory``: one process indexes ``--docs`` chunks into a fresh store and reports its peak
RSS (``getrusage``) next to the RSS of the loaded model before indexing; then another is
killed with SIGKILL once ``--kill-after`` entries are stored, what it wrote is verified, a
second run completes the store, and the entries written before the kill must be unchanged
(on the first ``--kill-docs`` documents, so that the rerun stays short).
Done when: peak RSS under 2 GB for 1,000 chunks on the default model; the kill keeps all.

    python benchmarks/index_stress.py memory --docs 1000 --data hotpotqa_dev_300.jsonl

Documents are the paragraphs of an eval-format JSON Lines file (``--data``; unique, in file
order) or, without it, synthetic text. Results are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run in each child: index docs.json into each given store in turn (meeting the other
# writer at a file barrier first, for a race), printing what it measured as JSON lines.
WRITER = """
import json, resource, sys, time
from pathlib import Path
from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import load_model

workdir, docs_file, model, batch_tokens, writers, *stores = sys.argv[1:]
docs = json.loads(Path(workdir, docs_file).read_text())
loaded = load_model(None if model == "default" else model, device="cpu")
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
for r, store in enumerate(stores):
    engine = SamKVEngine(loaded, KVCacheStore(store), batch_tokens=int(batch_tokens))
    engine.prefix  # computed before the baseline is taken
    model_rss = rss()
    Path(workdir, f"go{r}.{batch_tokens}").touch()
    while len(list(Path(workdir).glob(f"go{r}.*"))) < int(writers):
        time.sleep(0.005)
    start = time.perf_counter()
    engine.index(docs, progress=False)
    print(json.dumps({"model_rss_mib": round(model_rss), "peak_rss_mib": round(rss()),
                      "index_seconds": round(time.perf_counter() - start, 1), "docs": len(docs)}),
          flush=True)
"""


def documents(n: int, data: str | None) -> list[str]:
    if data is None:
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
        return [
            f"Chunk {i}. " + " ".join(words[(i * j) % len(words)] for j in range(60 + i % 140))
            for i in range(n)
        ]
    from samkv_integrations.eval.data import read_questions

    seen: dict[str, None] = {}
    for question in read_questions(data):
        for paragraph in question.contexts:
            seen.setdefault(paragraph.document_text)
    if len(seen) < n:
        raise SystemExit(f"{data} holds {len(seen)} paragraphs, fewer than --docs {n}")
    return list(seen)[:n]


def writer(
    workdir: Path,
    stores: list[Path],
    model: str,
    batch_tokens: int,
    *,
    writers: int = 1,
    docs: str = "docs.json",
) -> subprocess.Popen[str]:
    """A child indexing ``docs`` into each of ``stores``; racing ``writers`` share the CPUs."""
    threads = str(max(1, (os.cpu_count() or 1) // writers))  # oversubscribed threads crawl
    args = [str(workdir), docs, model, str(batch_tokens), str(writers), *map(str, stores)]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": threads},
    )


def report(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Each line the child printed (one per store), once it exits successfully."""
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a writer failed with status {proc.returncode}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def verify_all(store_dir: Path) -> tuple[int, list[str]]:
    from samkv_integrations import KVCacheStore
    from samkv_integrations.errors import CacheError

    store = KVCacheStore(store_dir)
    broken = []
    for entry in store.entries():
        try:
            store.verify(entry.key)
        except CacheError as e:
            broken.append(str(e))
    return len(store.entries()), broken


def race(args: argparse.Namespace, workdir: Path) -> None:
    stores = [workdir / f"race{r}" for r in range(args.rounds)]
    start = time.perf_counter()
    procs = [writer(workdir, stores, args.model, bt, writers=2) for bt in (512, 8192)]
    runs = [report(p) for p in procs]
    corrupt = 0
    for r, store in enumerate(stores):
        entries, broken = verify_all(store)
        corrupt += len(broken)
        row = {"round": r, "entries": entries, "corrupt": len(broken)}
        print(json.dumps({**row, "writers": [run[r] for run in runs]}), flush=True)
    total = {"rounds": args.rounds, "docs": args.docs, "corrupt_total": corrupt}
    print(json.dumps({**total, "seconds": round(time.perf_counter() - start, 1)}))


def memory(args: argparse.Namespace, workdir: Path) -> None:
    (run,) = report(writer(workdir, [workdir / "full"], args.model, args.batch_tokens))
    entries, broken = verify_all(workdir / "full")
    print(json.dumps({"measure": "peak_rss", **run, "entries": entries, "corrupt": len(broken)}))

    store = workdir / "killed"
    docs = json.loads((workdir / "docs.json").read_text())[: args.kill_docs]
    (workdir / "kill_docs.json").write_text(json.dumps(docs))
    proc = writer(workdir, [store], args.model, args.batch_tokens, docs="kill_docs.json")
    while len(list(store.glob("*/*.safetensors"))) < args.kill_after and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*/*.safetensors")}
    written, broken = verify_all(store)
    (rerun,) = report(
        writer(workdir, [store], args.model, args.batch_tokens, docs="kill_docs.json")
    )
    unchanged = sum((p.stat().st_mtime_ns, p.read_bytes()) == v for p, v in kept.items())
    entries, broken_after = verify_all(store)
    print(
        json.dumps(
            {
                "measure": "kill_-9",
                "entries_at_kill": written,
                "corrupt_at_kill": len(broken),
                "unchanged_after_rerun": unchanged,
                "entries_after_rerun": entries,
                "corrupt_after_rerun": len(broken_after),
                "rerun": rerun,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["race", "memory"])
    parser.add_argument(
        "--model",
        default=None,
        help="default: random:tiny-llama for race, the embedded SmolLM2-135M for memory",
    )
    parser.add_argument("--docs", type=int, default=None, help="default: 300 race, 1000 memory")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--data", default=None, help="eval-format JSON Lines to take paragraphs from"
    )
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--kill-after", type=int, default=20, help="entries stored before SIGKILL")
    parser.add_argument(
        "--kill-docs", type=int, default=200, help="documents the killed run indexes"
    )
    parser.add_argument("--workdir", default=None, help="default: a fresh temp directory")
    args = parser.parse_args()
    args.model = args.model or ("random:tiny-llama" if args.mode == "race" else "default")
    args.docs = args.docs or (300 if args.mode == "race" else 1000)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="samkv-index-stress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "docs.json").write_text(json.dumps(documents(args.docs, args.data)))
    print(
        json.dumps(
            {
                "mode": args.mode,
                "model": args.model,
                "docs": args.docs,
                "workdir": str(workdir),
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )
    (race if args.mode == "race" else memory)(args, workdir)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"max_child_rss_mib": round(children)}))


if __name__ == "__main__":
    main()
