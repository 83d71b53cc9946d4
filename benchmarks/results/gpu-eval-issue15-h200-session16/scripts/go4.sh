#!/bin/bash
# Finish the 0.5B short-HotpotQA run (resumes) beside the 1.5B long answers.
export PYTHONUNBUFFERED=1
M="full,samkv,samkv+decode=quest+retro_pages=32,samkv+decode=retro+retro_pages=32,samkv+decode=quest+retro_pages=32+retro_question=compact"
PYTHONPATH=$PWD:$HOME/site timeout ${1:-540} python3 -m samkv_integrations.cli eval --data $HOME/data/hotpotqa_dev_300.jsonl --device cuda --chunk-tokens 512 --limit 300 --discard-kv --model $HOME/q05.gguf --workers 4 --methods "$M" --out ~/runs/hs05-pool > ~/hs05b.log 2>&1 &
bash .stage/run/go2.sh ${1:-540}
wait
grep -v Warn ~/hs05b.log | tail -12
cp -r ~/runs/hs05-pool ~/hs05b.log $OUT/
