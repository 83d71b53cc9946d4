#!/bin/bash
# Fused RoPE rotation, 16x2048 only, in turns: base, new, base, new (3 repeats).
export PYTHONUNBUFFERED=1
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods full,samkv --workloads 16x2048"
S=$SECONDS
for i in 2 3; do
(cd .stage/base && PYTHONPATH=$PWD timeout 130 python3 -m samkv_integrations.cli bench $B --output $OUT/bench16-base$i.json 2>&1 | grep -E "^samkv" | tail -1)
PYTHONPATH=$PWD timeout 130 python3 -m samkv_integrations.cli bench $B --output $OUT/bench16-new$i.json 2>&1 | grep -E "^samkv" | tail -1
echo "$((SECONDS-S)) s"
done
echo "$((SECONDS-S)) s"
