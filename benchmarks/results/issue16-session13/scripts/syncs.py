"""Where does one SamKV request (serial engine, 8x2048, 8B shape) synchronize the host with the device?"""

import collections
import os
import sys
import time
import traceback
import warnings

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
        "3",
        "--pin-memory",
        "--methods",
        "samkv",
        "--out",
        "/tmp/x.json",
    ]
)
loaded = lt.ascii_model(args)
store = KVCacheStore(f"memory://syncs-{time.time_ns()}", memory_bytes=24 * 2**30, pin_memory=True)
serial = SamKVEngine(loaded, store, batch_decoding=False, decode_graphs=False)
refs = serial.index(lt.documents(serial, 8, 2048, 0), progress=False)
lt.ask_api(serial, refs, "samkv", -1, args)
lt.ask_api(serial, refs, "samkv", -2, args)
sites = collections.Counter()


def show(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    frames = [f for f in traceback.extract_stack()[:-1] if "samkv_integrations" in f.filename]
    key = " <- ".join(
        f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames[-4:])
    )
    sites[key] += 1


warnings.showwarning = show
warnings.simplefilter("always")
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("warn")
t = lt.ask_api(serial, refs, "samkv", 7, args)
torch.cuda.set_sync_debug_mode("default")
print("request error:", t.error)
for key, n in sites.items():
    print(f"{n:4d}  {key}")
