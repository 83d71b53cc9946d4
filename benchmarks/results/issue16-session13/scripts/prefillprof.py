"""GPU busy time while 16 concurrent SamKV prefills run (8x2048, 8B shape, 15% kept)."""

import gzip
import json
import os
import shutil
import sys
import time

from engine_8b import engine_8b, sixteen_requests
from torch.profiler import ProfilerActivity, profile

out = os.environ.get("OUT", "/tmp")
tag = sys.argv[1]
args, batched, refs = engine_8b(batched=True, max_new_tokens=128)
threads = sixteen_requests(batched, refs, args)
time.sleep(0.5)
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    time.sleep(1.2)
for t in threads:
    t.join()
path = f"/tmp/trace-{tag}.json"
prof.export_chrome_trace(path)
with open(path) as trace_file:
    trace = json.load(trace_file)["traceEvents"]
gpu = [
    e
    for e in trace
    if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
]
by_stream = {}
for e in gpu:
    by_stream.setdefault(e.get("args", {}).get("stream", e.get("tid")), []).append(
        (e["ts"], e["ts"] + e["dur"], e["name"], e["cat"])
    )
t0 = min(s for v in by_stream.values() for s, *_ in v)
t1 = max(e for v in by_stream.values() for _, e, *_ in v)
print(f"[{tag}] window {(t1 - t0) / 1e3:.1f} ms")
for stream, ev in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
    ev.sort()
    busy, end, gaps = 0.0, None, []
    for s, e, name, _cat in ev:
        if end is None or s > end:
            if end is not None:
                gaps.append((s - end, name))
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    big = sorted(gaps, reverse=True)[:8]
    print(
        f"  stream {stream}: {len(ev)} ops, busy {busy / 1e3:.1f} ms ({busy / (t1 - t0):.0%}), "
        f"gaps >0.2ms: {sum(g for g, _ in gaps if g > 200) / 1e3:.1f} ms in {sum(1 for g, _ in gaps if g > 200)}; biggest {[(round(g / 1e3, 2), n[:40]) for g, n in big]}"
    )
with open(path, "rb") as f, gzip.open(f"{out}/trace-{tag}.json.gz", "wb") as g:
    shutil.copyfileobj(f, g)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
