#!/bin/bash
# 8B shape, 8x2048: the resident stage with queries recorded in the build (new) and rerun (base), in turns.
export PYTHONUNBUFFERED=1
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --workloads 8x2048"
M="full,samkv,samkv+budget=0.2+resident=0.15,samkv+budget=0.3+resident=0.15,sagekv"
PYTHONPATH=$PWD timeout 200 python3 -m samkv_integrations.cli bench $B --methods "$M" --output $OUT/bench-recorded.json 2>&1 | grep -v Warn | tail -9
(cd .stage/base && PYTHONPATH=$PWD timeout 160 python3 -m samkv_integrations.cli bench $B --methods "full,samkv,samkv+budget=0.2+resident=0.15" --output $OUT/bench-rerun.json 2>&1 | grep -v Warn | tail -6)
