#!/bin/bash
# HotpotQA long on the 1.5B: pool decoding over the default (resumable).
export PYTHONUNBUFFERED=1
M="full,samkv,samkv+decode=quest+retro_pages=32,samkv+decode=retro+retro_pages=32"
E="--data $HOME/data/hotpotqa_dev_300_long.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-560} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/hl15-pool 2>&1 | grep -v Warn | tail -12
echo "took $((SECONDS-START)) s"; ls ~/runs/hl15-pool
cp -r ~/runs/hl15-pool $OUT/
