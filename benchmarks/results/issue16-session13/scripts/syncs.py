"""Where does one SamKV request (serial engine, 8x2048, 8B shape) synchronize the host with the device?"""

import collections
import os
import traceback
import warnings

import torch
from engine_8b import engine_8b, lt

args, serial, refs = engine_8b(batched=False, max_new_tokens=3)
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
