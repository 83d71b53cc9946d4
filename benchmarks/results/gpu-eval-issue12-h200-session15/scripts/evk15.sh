#!/bin/bash
# Assemble the 1.5B GGUF, then NQ: SnapKV's clustering in the head-level eviction (resumable).
export PYTHONUNBUFFERED=1
[ -f ~/q15.gguf ] || { cat ~/m15/part.* > ~/q15.gguf && sha256sum ~/q15.gguf; }
M="full,sagekv,sagekv+kernel=5,samkv+budget=0.2+resident=0.15,samkv+budget=0.2+resident=0.15+resident_kernel=5"
E="--data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-560} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/nq15-kernel 2>&1 | grep -v Warn | tail -9
echo "took $((SECONDS-START)) s"; ls ~/runs/nq15-kernel
cp -r ~/runs/nq15-kernel $OUT/
