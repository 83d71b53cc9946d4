"""Host time of one SamKV prefill (serial engine, 8x2048, 8B shape, 15% kept): cProfile."""

import cProfile
import pstats
import time

import torch
from engine_8b import engine_8b, lt

args, serial, refs = engine_8b(batched=False, max_new_tokens=1)
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
