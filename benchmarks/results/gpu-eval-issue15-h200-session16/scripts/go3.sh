#!/bin/bash
# Issue 15's cost at the largest batch: 16 concurrent quest requests against 16 one after another,
# plain samkv beside it (8B shape, random weights, 8x2048, 64 new tokens).
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-$PWD}  # given on the command line when it ran
START=$SECONDS
timeout ${1:-300} python3 benchmarks/load_test.py --shape llama-3.1-8b --workload 8x2048 --concurrency 1,16 --methods "samkv,samkv+decode=quest+retro_pages=32" --interfaces serial,api --max-new-tokens 64 --memory-gib 24 --pin-memory --out $OUT/load-quest-8x2048-h200.json 2>&1 | grep -v Warn | tail -20
echo "took $((SECONDS-START)) s"
