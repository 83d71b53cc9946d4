#!/bin/bash
# HotpotQA long on the 1.5B: SAGE-KV with and without SnapKV's clustering (run as one command
# line; it stopped at its 240 s timeout after 261 questions).
export PYTHONUNBUFFERED=1
M="full,sagekv,sagekv+kernel=5"
E="--data $HOME/data/hotpotqa_dev_300_long.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
PYTHONPATH=$PWD:$HOME/site timeout 240 python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/hl15-kernel 2>&1 | grep -v Warn | tail -6
cp -r ~/runs/hl15-kernel $OUT/
