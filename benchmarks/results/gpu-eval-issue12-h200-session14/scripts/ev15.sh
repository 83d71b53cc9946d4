#!/bin/bash
# Assemble the 1.5B GGUF, then the NQ eval (resumable: run again to go on).
export PYTHONUNBUFFERED=1
[ -f ~/q15.gguf ] || { cat ~/m15/part.* > ~/q15.gguf && sha256sum ~/q15.gguf; }
M="full,samkv,sagekv,samkv+budget=0.2+resident=0.15,samkv+budget=0.3+resident=0.15"
E="--data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-560} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/nq15-resident 2>&1 | grep -v Warn | tail -14
echo "took $((SECONDS-START)) s"; ls ~/runs/nq15-resident
cp -r ~/runs/nq15-resident $OUT/
