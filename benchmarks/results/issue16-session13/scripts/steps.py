"""Profile the batched decode steps of 16 concurrent SamKV answers (8x2048, 8B shape, 15% kept)."""

import sys
import threading
import time

sys.path.insert(0, "benchmarks")
import load_test as lt
import torch
from torch.profiler import ProfilerActivity, profile

from samkv_integrations.engine import SamKVEngine
from samkv_integrations.store import KVCacheStore

args = lt.parse_args(
    [
        "--shape",
        "llama-3.1-8b",
        "--workload",
        "8x2048",
        "--interfaces",
        "api",
        "--max-new-tokens",
        "128",
        "--pin-memory",
        "--methods",
        "samkv",
        "--out",
        "/tmp/x.json",
    ]
)
loaded = lt.ascii_model(args)
store = KVCacheStore(f"memory://steps-{time.time_ns()}", memory_bytes=24 * 2**30, pin_memory=True)
batched = SamKVEngine(loaded, store, batch_decoding=True, max_batch=64)
refs = batched.index(lt.documents(batched, 8, 2048, 0), progress=False)
lt.ask_api(batched, refs, "samkv", -1, args)
lt.in_threads(
    [lambda i=i: lt.ask_api(batched, refs, "samkv", i, args) for i in range(16)]
)  # warm the 16-row graph
threads = [
    threading.Thread(target=lt.ask_api, args=(batched, refs, "samkv", 100 + i, args))
    for i in range(16)
]
for t in threads:
    t.start()
time.sleep(2.7)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    time.sleep(0.4)
    torch.cuda.synchronize()
for t in threads:
    t.join()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
