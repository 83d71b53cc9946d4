#!/bin/bash
# First call: keep the gguf wheel and the data under ~, then the 8B-shape TTFT of the resident variants.
export PYTHONUNBUFFERED=1
mkdir -p ~/m05 ~/m15 ~/data ~/runs && cp .stage/data/* ~/data/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .whl/*.whl && ls ~/data ~/site | head
M="full,samkv,samkv+budget=0.2+resident=0.15,samkv+budget=0.3+resident=0.15,samkv+budget=0.3"
PYTHONPATH=$PWD timeout 420 python3 -m samkv_integrations.cli bench --shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods "$M" --workloads 8x2048 --output $OUT/bench-resident-8x2048.json 2>&1 | grep -v Warn | tail -12
