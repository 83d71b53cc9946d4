#!/bin/bash
# Floor of samkv's TTFT: arrival times, then documents resident on the GPU (one H200 call).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods full,samkv --workloads 8x2048,16x2048"
nvidia-smi --query-gpu=name --format=csv,noheader
for mode in arrival resident; do
  timeout 280 python3 .stage/run/floor.py $mode $OUT/arrivals-$mode.json -- $B --output $OUT/bench-$mode.json > $OUT/log-$mode.txt 2>&1
  echo "== $mode rc=$?"; grep -v Warn $OUT/log-$mode.txt | tail -25
done
