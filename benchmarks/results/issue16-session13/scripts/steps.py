"""Profile the batched decode steps of 16 concurrent SamKV answers (8x2048, 8B shape, 15% kept)."""

import time

import torch
from engine_8b import engine_8b, sixteen_requests
from torch.profiler import ProfilerActivity, profile

args, batched, refs = engine_8b(batched=True, max_new_tokens=128)
threads = sixteen_requests(batched, refs, args)
time.sleep(2.7)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    time.sleep(0.4)
    torch.cuda.synchronize()
for t in threads:
    t.join()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
