#!/bin/bash
# Assemble both GGUFs, then short HotpotQA with pool decoding over the default: 1.5B (8 workers)
# and 0.5B (6 workers) side by side (accuracy only; their TTFTs are not reported). Resumable.
export PYTHONUNBUFFERED=1
[ -f ~/q15.gguf ] || { cat ~/m15/part.* > ~/q15.gguf; }; sha256sum ~/q15.gguf
[ -f ~/q05.gguf ] || { cat ~/m05/part.* > ~/q05.gguf; }; sha256sum ~/q05.gguf
M="full,samkv,samkv+decode=quest+retro_pages=32,samkv+decode=retro+retro_pages=32,samkv+decode=quest+retro_pages=32+retro_question=compact"
E="--data $HOME/data/hotpotqa_dev_300.jsonl --device cuda --chunk-tokens 512 --limit 300 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-540} python3 -m samkv_integrations.cli eval $E --model $HOME/q15.gguf --workers 8 --methods "$M" --out ~/runs/hs15-pool > ~/hs15.log 2>&1 &
PYTHONPATH=$PWD:$HOME/site timeout ${1:-540} python3 -m samkv_integrations.cli eval $E --model $HOME/q05.gguf --workers 6 --methods "$M" --out ~/runs/hs05-pool > ~/hs05.log 2>&1 &
wait
echo "took $((SECONDS-START)) s"
for r in hs15 hs05; do echo "== $r"; grep -v Warn ~/$r.log | tail -12; done
cp -r ~/runs/hs15-pool ~/runs/hs05-pool ~/hs15.log ~/hs05.log $OUT/
