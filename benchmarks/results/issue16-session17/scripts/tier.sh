#!/bin/bash
# Device tier on the 8B shape: the CUDA test, then samkv bench with the tier and without, in turns.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_device_tier.py > $OUT/gpu-pytest-tier.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/gpu-pytest-tier.log
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods full,samkv --workloads 8x2048,16x2048"
timeout 130 python3 -m samkv_integrations.cli bench $B --device-cache-gib 16 --output $OUT/bench-tier.json > $OUT/log-tier.txt 2>&1; echo "tier rc=$?"; grep -A3 '^method' $OUT/log-tier.txt
timeout 130 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-plain.json > $OUT/log-plain.txt 2>&1; echo "plain rc=$?"; grep -A3 '^method' $OUT/log-plain.txt
