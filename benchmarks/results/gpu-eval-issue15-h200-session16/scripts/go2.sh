#!/bin/bash
# 1.5B long answers (--task summarize, 256 new tokens), the 0.5B run's methods and limit. Resumable.
export PYTHONUNBUFFERED=1
M="full,samkv,samkv+decode=quest,samkv+decode=retro,samkv+decode=quest+retro_pages=32"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-540} python3 -m samkv_integrations.cli eval --task summarize --data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 80 --workers 12 --discard-kv --methods "$M" --out ~/runs/nq15-summarize > ~/sum15.log 2>&1
echo "took $((SECONDS-START)) s"; grep -v Warn ~/sum15.log | tail -14
cp -r ~/runs/nq15-summarize ~/sum15.log $OUT/
