#!/bin/bash
# First call: keep the gguf wheel and both data sets under ~.
mkdir -p ~/m15 ~/data ~/runs && cp .stage/data/* .stage/data2/* ~/data/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .whl/*.whl && ls ~/data ~/site | head; nvidia-smi --query-gpu=name --format=csv
