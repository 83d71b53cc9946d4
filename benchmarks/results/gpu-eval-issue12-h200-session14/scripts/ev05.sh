#!/bin/bash
# Assemble the 0.5B GGUF, then the NQ eval (resumable: run again to go on).
export PYTHONUNBUFFERED=1
[ -f ~/q05.gguf ] || { cat ~/m05/part.* > ~/q05.gguf && sha256sum ~/q05.gguf; }
M="full,samkv,sagekv,samkv+budget=0.2+resident=0.15,samkv+budget=0.3+resident=0.15"
E="--data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q05.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-560} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/nq05-resident 2>&1 | grep -v Warn | tail -14
echo "took $((SECONDS-START)) s"; ls ~/runs/nq05-resident
cp -r ~/runs/nq05-resident $OUT/
