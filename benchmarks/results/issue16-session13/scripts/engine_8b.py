"""The setup the diagnostic scripts share: the load test's 8B-shape engine over 8x2048 documents.

Run the scripts from the repository root (``PYTHONPATH=$PWD``), where ``benchmarks/`` holds
``load_test.py``.
"""

import sys
import threading
import time
from typing import Any

sys.path.insert(0, "benchmarks")
import load_test as lt

from samkv_integrations.engine import SamKVEngine
from samkv_integrations.store import KVCacheStore

__all__ = ["engine_8b", "lt", "sixteen_requests"]


def engine_8b(*, batched: bool, max_new_tokens: int) -> tuple[Any, SamKVEngine, list[Any]]:
    """The load test's arguments, a SamKV engine (batched decoding or serial) and 8 cached documents."""
    argv = ["--shape", "llama-3.1-8b", "--workload", "8x2048", "--interfaces", "api",
            "--max-new-tokens", str(max_new_tokens), "--min-new-tokens", str(max_new_tokens),
            "--pin-memory", "--methods", "samkv", "--out", "/tmp/unused.json"]  # fmt: skip
    args = lt.parse_args(argv)
    loaded = lt.ascii_model(args)
    store = KVCacheStore(
        f"memory://diag-{time.time_ns()}", memory_bytes=24 * 2**30, pin_memory=True
    )
    if batched:
        engine = SamKVEngine(loaded, store, batch_decoding=True, max_batch=64)
    else:
        engine = SamKVEngine(loaded, store, batch_decoding=False, decode_graphs=False)
    refs = engine.index(lt.documents(engine, 8, 2048, 0), progress=False)
    return args, engine, refs


def sixteen_requests(engine: SamKVEngine, refs: list[Any], args: Any) -> list[threading.Thread]:
    """Warm the engine (one request, then 16 together), then start 16 requests in threads."""
    lt.ask_api(engine, refs, "samkv", -1, args)
    lt.in_threads([lambda i=i: lt.ask_api(engine, refs, "samkv", i, args) for i in range(16)])
    threads = [
        threading.Thread(target=lt.ask_api, args=(engine, refs, "samkv", 100 + i, args))
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    return threads
