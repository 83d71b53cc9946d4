"""Host time of one SamKV prefill (serial engine, 8x2048, 8B shape, 15% kept): cProfile."""

import cProfile
import pstats
import sys
import time

sys.path.insert(0, "benchmarks")
import load_test as lt
import torch

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
        "1",
        "--min-new-tokens",
        "1",
        "--pin-memory",
        "--methods",
        "samkv",
        "--out",
        "/tmp/x.json",
    ]
)
loaded = lt.ascii_model(args)
store = KVCacheStore(f"memory://hp-{time.time_ns()}", memory_bytes=24 * 2**30, pin_memory=True)
serial = SamKVEngine(loaded, store, batch_decoding=False, decode_graphs=False)
refs = serial.index(lt.documents(serial, 8, 2048, 0), progress=False)
for i in range(3):
    lt.ask_api(serial, refs, "samkv", -1 - i, args)
torch.cuda.synchronize()
walls = []
for i in range(5):
    t = time.perf_counter()
    tm = lt.ask_api(serial, refs, "samkv", i, args)
    torch.cuda.synchronize()
    walls.append(round((time.perf_counter() - t) * 1e3, 1))
print(
    "wall ms (no profiler):", walls, "phases", {k: round(v * 1e3, 1) for k, v in tm.phases.items()}
)
prof = cProfile.Profile()
prof.enable()
for i in range(5):
    lt.ask_api(serial, refs, "samkv", 10 + i, args)
torch.cuda.synchronize()
prof.disable()
st = pstats.Stats(prof)
st.sort_stats("cumulative").print_stats(70)
st.sort_stats("tottime").print_stats(45)
