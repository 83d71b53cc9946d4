#!/bin/bash
# Fused RoPE rotation: GPU tests, then TTFT A/B, new tree then base (.stage/base = 93c3700+).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_rope_kernel.py tests/test_split_kv_attention.py > $OUT/gpu-pytest.log 2>&1; tail -3 $OUT/gpu-pytest.log
B="--shape llama-3.1-8b --sdpa-backends flash,efficient --memory-gib 24 --pin-memory --decode-steps 0 --repeats 3 --methods full,samkv --workloads 8x2048,16x2048"
S=$SECONDS
PYTHONPATH=$PWD timeout 270 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-new1.json 2>&1 | grep -E "samkv|full" | grep -v -i warn | tail -6
echo "new took $((SECONDS-S)) s"
(cd .stage/base && PYTHONPATH=$PWD timeout 270 python3 -m samkv_integrations.cli bench $B --output $OUT/bench-base1.json 2>&1 | grep -E "samkv|full" | grep -v -i warn | tail -6)
echo "both took $((SECONDS-S)) s"
