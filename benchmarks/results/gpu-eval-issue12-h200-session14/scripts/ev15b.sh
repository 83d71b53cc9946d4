#!/bin/bash
# The committed path (queries recorded in the build): 1.5B NQ again for resident 0.2 and sagekv.
export PYTHONUNBUFFERED=1
mkdir -p ~/data && cp .stage/data/* ~/data/
[ -d ~/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .whl/*.whl
[ -f ~/q15.gguf ] || { cat ~/m15/part.* > ~/q15.gguf && sha256sum ~/q15.gguf; }
M="full,samkv+budget=0.2+resident=0.15,sagekv"
E="--data $HOME/data/nq_dev_300_30doc.jsonl --model $HOME/q15.gguf --device cuda --chunk-tokens 512 --limit 300 --workers 8 --discard-kv"
START=$SECONDS
PYTHONPATH=$PWD:$HOME/site timeout ${1:-500} python3 -m samkv_integrations.cli eval $E --methods "$M" --out ~/runs/nq15-recorded 2>&1 | grep -v Warn | grep -v "eval:\|Loading\|Convert" | tail -7
echo "took $((SECONDS-START)) s"; cp -r ~/runs/nq15-recorded $OUT/
