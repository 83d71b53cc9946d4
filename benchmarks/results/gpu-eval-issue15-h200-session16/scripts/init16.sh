#!/bin/bash
# First call of session 16: gguf wheel and the three data sets under ~, then keep part $1 of model $2.
mkdir -p ~/m15 ~/m05 ~/data ~/runs && cp .stage/data*/* ~/data/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .whl/*.whl && ls ~/data; nvidia-smi --query-gpu=name --format=csv,noheader
