#!/bin/bash
# Floor of samkv's TTFT: decoder layers compiled (full and samkv alike), then the plain bench again.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods full,samkv --workloads 8x2048,16x2048"
timeout 420 python3 .stage/run/floor.py compiled $OUT/arrivals-compiled.json -- $B --warmup 3 --output $OUT/bench-compiled.json > $OUT/log-compiled.txt 2>&1
echo "== compiled rc=$?"; grep -v Warn $OUT/log-compiled.txt | tail -40
