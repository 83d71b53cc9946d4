#!/bin/bash
# Fused RoPE rotation, 8x2048 only, in turns: base, new, base, new (5 repeats), then a profile of new.
export PYTHONUNBUFFERED=1
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 5 --methods full,samkv --workloads 8x2048"
S=$SECONDS
for i in 2 3; do
(cd .stage/base && PYTHONPATH=$PWD timeout 100 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-base$i.json 2>&1 | grep -E "^samkv" | tail -1)
PYTHONPATH=$PWD timeout 100 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-new$i.json 2>&1 | grep -E "^samkv" | tail -1
echo "$((SECONDS-S)) s"
done
PYTHONPATH=$PWD timeout 150 python3 -m samkv_integrations.cli bench ${B/--repeats 5/--repeats 1} --methods samkv --profile $OUT/profile-new --output $OUT/bench-new-profiled.json 2>&1 | grep -E "^samkv" | tail -1
echo "$((SECONDS-S)) s"
