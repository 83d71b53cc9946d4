"""Indexing from several processes into one store, and a writer killed mid-way (issue 14).

Two processes index the same documents into one store with different batch sizes, so
that the same document's KV bytes differ between them (batch composition changes float
rounding): before an entry was one file, their tensors and metadata could interleave into
an entry that failed its checksum. A writer killed with SIGKILL keeps every batch it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel

# Run by each writer: index the documents of docs.json into <root>/round<r> for each round,
# meeting the other writer at a file barrier first, so that both write at once.
WORKER = """
import json, os, sys, time
from pathlib import Path
import torch
from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models.shapes import random_model

root, batch_tokens, rounds, writers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
docs = json.loads((root / "docs.json").read_text())
torch.set_num_threads(1)  # two writers on a small machine: oversubscribed threads crawl
model = random_model("tiny-llama", device="cpu", seed=0)
for r in range(rounds):
    (root / f"ready{r}.{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(root.glob(f"ready{r}.*"))) < writers:
        if time.monotonic() > deadline:
            sys.exit("the other writer never came")
        time.sleep(0.005)
    store = KVCacheStore(root / f"round{r}")
    SamKVEngine(model, store, batch_tokens=batch_tokens).index(docs, progress=False)
"""


def documents(n: int) -> list[str]:
    return [
        f"Note {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(4 + (i * 7) % 37))
        for i in range(n)
    ]


def start_writer(root: Path, batch_tokens: int, rounds: int, writers: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(root), str(batch_tokens), str(rounds), str(writers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SAMKV_HOME": str(root / "home")},
    )


def finish(proc: subprocess.Popen, timeout: float = 45) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]


def broken_entries(store: KVCacheStore, fingerprint: str) -> list[str]:
    broken = []
    for entry in store.entries():
        try:
            store.verify(entry.key, fingerprint=fingerprint, extras=("query_means",))
        except Exception as e:
            broken.append(f"{entry.key}: {e}")
    return broken


def test_two_processes_indexing_one_store_write_no_corrupt_entry(
    tmp_path: Path, tiny_llama: LoadedModel
) -> None:
    n_docs, rounds = 24, 6
    docs = documents(n_docs)
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    writers = [start_writer(tmp_path, batch_tokens, rounds, 2) for batch_tokens in (1, 4096)]
    for proc in writers:
        finish(proc)
    fingerprint = SamKVEngine(tiny_llama, KVCacheStore(tmp_path / "probe")).fingerprint
    for r in range(rounds):
        store = KVCacheStore(tmp_path / f"round{r}")
        assert len(store.entries()) == n_docs
        assert broken_entries(store, fingerprint) == []
        files = sorted(p.name for p in (tmp_path / f"round{r}").rglob("*") if p.is_file())
        assert all(name.endswith(".safetensors") for name in files), files  # no stray temps


def test_a_writer_killed_mid_way_keeps_what_it_wrote(
    tmp_path: Path, tiny_llama: LoadedModel
) -> None:
    n_docs = 60
    docs = documents(n_docs)
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    root = tmp_path / "round0"
    proc = start_writer(tmp_path, 1, 1, 1)  # one document per batch: a write per document
    deadline = time.monotonic() + 50
    try:
        while len(list(root.glob("*/*.safetensors"))) < 5:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the writer wrote too little: {proc.communicate()[0][-2000:]!r}")
            time.sleep(0.002)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.communicate()
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.glob("*/*.safetensors")}
    assert 5 <= len(written) < n_docs

    store = KVCacheStore(root)
    engine = SamKVEngine(tiny_llama, store)
    assert broken_entries(store, engine.fingerprint) == []
    refs = engine.index(docs, progress=False)
    assert {e.key for e in store.entries()} == {ref.key for ref in refs}
    assert broken_entries(store, engine.fingerprint) == []
    for name, (mtime_ns, data) in written.items():
        path = next(root.glob(f"*/{name}"))
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime_ns, data), name
