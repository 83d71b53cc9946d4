#!/bin/bash
# 0.5B NQ: the SAGE-KV yardstick (kernel=5, its present default) beside the default, at 15% and 30%. Resumable.
export PYTHONUNBUFFERED=1
[ -f ~/q05.gguf ] || { cat ~/m05/part.* > ~/q05.gguf; }; sha256sum ~/q05.gguf
M="full,samkv,sagekv,samkv+budget=0.3,sagekv+budget=0.3"
E="--data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q05.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-400} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/nq05-yardstick > ~/nq05y.log 2>&1
echo "rc=$? took $((SECONDS-START)) s"; grep -v Warn ~/nq05y.log | tail -14
cp -r ~/runs/nq05-yardstick $OUT/; cp ~/nq05y.log $OUT/
