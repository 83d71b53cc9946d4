#!/bin/bash
export PYTHONUNBUFFERED=1
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods full,samkv --workloads 8x2048,16x2048"
PYTHONPATH=$PWD timeout 280 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-new.json 2>&1 | grep -E "samkv|full" | grep -v -i warn | tail -6
(cd .stage/base && PYTHONPATH=$PWD timeout 250 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-base.json 2>&1 | grep -E "samkv|full" | grep -v -i warn | tail -6)
