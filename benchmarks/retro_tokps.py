"""Batch-1 decode tok/s of samkv at 15% with plain, quest and retro decoding, through the engine.

Random weights of a named shape (speed only, never accuracy); special tokens can never be
picked, so every answer runs ``new`` tokens. Each spec answers twice and the second answer
is timed, from its first streamed delta to its last. Prints one JSON line per spec with the
decoder's ``details["decode"]`` stats (pages fetched, bytes moved, resident KV).

    python benchmarks/retro_tokps.py llama-3.1-8b 8x2048x64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.models import LoadedModel
from samkv_integrations.models.shapes import random_model

BASE = "samkv+ranking=global+budget=0.15"
POLICIES = [("quest", 8, ""), ("retro", 8, ""), ("retro", 8, "+retro_pool=host"), ("retro", 32, "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", default="llama-3.1-8b")
    parser.add_argument("layout", nargs="?", default="8x1024x128", help="DOCSxTOKENSxNEW")
    args = parser.parse_args()
    n_docs, doc_tokens, new = map(int, args.layout.split("x"))
    loaded = random_model(args.shape, seed=0)
    with torch.no_grad():  # an EOS would end an answer early
        loaded.model.get_output_embeddings().weight[loaded.tokenizer.all_special_ids] = 0.0
    model = LoadedModel.from_module(loaded.model, loaded.tokenizer, loaded.name)
    engine = SamKVEngine(model, KVCacheStore("memory://retro-bench"), decode_graphs=False)
    generator = torch.Generator().manual_seed(0)
    docs = [
        bytes(torch.randint(97, 123, (doc_tokens,), generator=generator).tolist()).decode()
        for _ in range(n_docs)
    ]
    refs = engine.index(docs, progress=False)
    specs = [BASE] + [f"{BASE}+decode={p}+retro_pages={k}{extra}" for p, k, extra in POLICIES]
    cuda = torch.cuda.is_available()
    for spec in specs:
        for _ in range(2):  # the first answer warms up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            stream = engine.stream("Summarize the documents.", refs, spec, max_new_tokens=new)
            start, first = time.perf_counter(), None
            for _ in stream:
                first = first or time.perf_counter()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - (first or start)
        row = {
            "decode_tokens_per_s": (len(stream.answer.token_ids) - 1) / seconds,
            "tokens": len(stream.answer.token_ids),
            "kept_fraction": stream.stats.kept_fraction,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "decode": stream.answer.details.get("decode"),
        }
        print(spec, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
