#!/bin/bash
# The fused rotation's CUDA tests after review (int64 offsets, signed zeros, dispatch counted).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_rope_kernel.py tests/test_split_kv_attention.py tests/test_invariants.py > $OUT/gpu-pytest-review.log 2>&1; tail -15 $OUT/gpu-pytest-review.log
