"""What bounds samkv's TTFT on the 8B shape (issue 16), measured through `samkv bench`.

Usage: python floor.py MODE ARRIVALS.json -- <samkv bench arguments>

MODE:
  arrival   the bench as it is, plus when each layer of the documents' K/V reaches the GPU
            (ms after the load was issued), per answer that loaded documents;
  resident  the documents' K/V kept on the GPU after their first load (no host-to-device
            copy in the timed answers): TTFT without the PCIe transfer;
  compiled  every decoder layer wrapped in torch.compile(dynamic=True), for every method
            (full too): what fusing the forward's small kernels would give.
"""

import json
import sys

import torch

import samkv_integrations.resolve as resolve
from samkv_integrations.bench import cli
from samkv_integrations.layer_arrival import LayerArrival, to_device_by_layer

mode, arrivals_path = sys.argv[1], sys.argv[2]
bench_args = sys.argv[sys.argv.index("--") + 1 :]
recorded = []
resident = {}
watcher = None


def timed_load(documents, device, dtype):
    global watcher
    if mode == "resident" and all(d.keys.numel() for d in documents):
        placed = []
        for d in documents:
            key = (tuple(d.token_ids[:64]), len(d.token_ids))
            if key not in resident:
                resident[key] = d.to(device, dtype)
            placed.append(resident[key])
        return placed, LayerArrival()
    if torch.device(device).type != "cuda":
        return to_device_by_layer(documents, device, dtype)
    start = torch.cuda.Event(enable_timing=True)
    start.record(torch.cuda.current_stream(device))
    placed, arrival = to_device_by_layer(documents, device, dtype)
    if arrival._events:
        watcher = watcher or torch.cuda.Stream(device=device)
        marks = []
        for event in arrival._events:
            watcher.wait_event(event)
            mark = torch.cuda.Event(enable_timing=True)
            mark.record(watcher)
            marks.append(mark)
        recorded.append((start, marks))
    return placed, arrival


resolve.to_device_by_layer = timed_load

if mode == "compiled":
    torch._dynamo.config.cache_size_limit = 64
    original_model = cli._model

    def compiled_model(args):
        loaded = original_model(args)
        for layer in loaded.model.get_decoder().layers:
            layer.compile(dynamic=True)
        return loaded

    cli._model = compiled_model

code = cli.main(bench_args)
if torch.cuda.is_available():
    torch.cuda.synchronize()
rows = [[round(start.elapsed_time(m), 3) for m in marks] for start, marks in recorded]
with open(arrivals_path, "w") as f:
    json.dump({"mode": mode, "bench_args": bench_args, "arrival_ms_per_load": rows}, f, indent=1)
for row in rows:
    print("arrival ms, layers 1, 12, 24, all:", row[0], row[11], row[23], row[-1])
sys.exit(code)
