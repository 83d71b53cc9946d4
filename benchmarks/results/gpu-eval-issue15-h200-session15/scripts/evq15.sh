#!/bin/bash
# Assemble the 1.5B GGUF, then the NQ eval of pool decoding over the default (resumable).
export PYTHONUNBUFFERED=1
[ -f ~/q15.gguf ] || { cat ~/m15/part.* > ~/q15.gguf && sha256sum ~/q15.gguf; }
M="full,samkv,samkv+decode=quest+retro_pages=32,samkv+decode=retro+retro_pages=32,samkv+decode=quest+retro_pages=32+retro_question=compact,samkv+budget=0.2+resident=0.15+decode=quest+retro_pages=32"
E="--data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-560} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/nq15-pool 2>&1 | grep -v Warn | tail -16
echo "took $((SECONDS-START)) s"; ls ~/runs/nq15-pool
cp -r ~/runs/nq15-pool $OUT/
