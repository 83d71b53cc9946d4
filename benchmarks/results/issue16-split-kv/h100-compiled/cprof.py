"""torch.compile of slot_step: graph breaks, compile time, rate, agreement (8B shape).

The script behind cprof.log, run from the checkout root on the H100 with
TORCH_LOGS=graph_breaks (the log shows none), before the compiled path became
``StaticDecoder(compiled=True)``; it patches ``static_decode.slot_step`` instead.
"""

import os
import sys
import time

import torch
from transformers import DynamicCache

from samkv_integrations import static_decode
from samkv_integrations.models.shapes import random_model
from samkv_integrations.static_decode import StaticDecoder

sys.path.insert(0, "benchmarks")
from decode_profile import kernel_table, random_cache, replay_ms

OUT = os.environ["OUT"]
model = random_model("llama-3.1-8b").model
torch.manual_seed(0)


def run(slots, steps=64, label=""):
    layers = random_cache(model, slots)
    cache = DynamicCache(
        ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers], config=model.config
    )
    dec = StaticDecoder(steps + 2, graphs=True)
    tok, toks, logits0 = 1, [], None
    t0 = time.perf_counter()
    for s in range(2 + steps):
        if s == 2:
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t = time.perf_counter()
        lg = dec.step(model, cache, tok, slots + 100 + s)
        if s == 0:
            logits0 = lg.float()
        tok = int(lg.argmax())
        toks.append(tok)
    rate = steps / (time.perf_counter() - t)
    print(
        f"{label} slots={slots}: {rate:.1f} tok/s, first two steps {first:.1f} s, replay {replay_ms(dec._graph):.3f} ms",
        flush=True,
    )
    return toks, logits0, dec


with torch.inference_mode():
    base_toks, base_l0, _ = run(2600, label="graphs")
    base_toks2, _, _ = run(3100, label="graphs")
    original = static_decode.slot_step
    static_decode.slot_step = torch.compile(original, dynamic=None)
    toks, l0, dec = run(2600, label="compiled")
    print(
        "same tokens:",
        sum(a == b for a, b in zip(toks, base_toks, strict=True)),
        "of",
        len(toks),
        "step-0 logits rel diff",
        float((l0 - base_l0).norm() / base_l0.norm()),
        "argmax equal",
        int(l0.argmax()) == int(base_l0.argmax()),
        flush=True,
    )
    kernel_table(dec._graph, __import__("pathlib").Path(OUT) / "compiled-slot-step-kernels.txt")
    toks2, _, _ = run(3100, label="compiled, second length")
    toks3, _, _ = run(2900, label="compiled, third length")
