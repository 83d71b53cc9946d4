#!/bin/bash
# GPU tests, then the 16-request load test in turns: new (working tree) and base (.stage/base = main).
export PYTHONUNBUFFERED=1
START=$SECONDS
PYTHONPATH=$PWD python3 .stage/run/pin.py 2>&1 | grep on_device
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/methods/test_kept_tokens.py tests/test_host_values.py tests/methods/test_samkv_attention.py tests/methods/test_samkv.py > $OUT/gpu-pytest.log 2>&1; tail -2 $OUT/gpu-pytest.log
LT="--shape llama-3.1-8b --workload 8x2048 --interfaces serial,api --max-new-tokens 128 --pin-memory --methods samkv --concurrency 16"
for turn in $TURNS; do
  if (( SECONDS - START > 420 )); then echo "time guard: skipped $turn"; continue; fi
  tree=${turn%[0-9]}
  if [ "$tree" = base ]; then dir=.stage/base; else dir=.; fi
  (cd $dir && PYTHONPATH=$PWD python3 benchmarks/load_test.py $LT --out $OUT/load-$turn.json 2>&1 | grep -v Warn | tail -1)
done
