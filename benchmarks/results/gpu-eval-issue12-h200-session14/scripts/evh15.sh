#!/bin/bash
# 1.5B on HotpotQA long: does the resident stage hold where the default already nears full?
export PYTHONUNBUFFERED=1
cp .stage/data2/* ~/data/
M="full,samkv,samkv+budget=0.2+resident=0.15,samkv+budget=0.3+resident=0.15"
E="--data $HOME/data/hotpotqa_dev_300_long.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-540} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/hl15-resident 2>&1 | grep -v Warn | grep -v "eval:\|Loading\|Convert" | tail -8
echo "took $((SECONDS-START)) s"; ls ~/runs/hl15-resident
cp -r ~/runs/hl15-resident $OUT/
