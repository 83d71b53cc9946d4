"""Full recompute and SamKV side by side: the answer, time to first token and kept tokens.

Run: python examples/compare_methods.py  (add --method "samkv+budget=0.3" for another setting)
"""

import argparse

from samkv_integrations import SamKVEngine

DOCUMENTS = [
    "The Kestrel-9 weather satellite was launched in 2019 from the island of Ternholm. "
    "It carries a microwave sounder built by the Oskarvik Space Laboratory.",
    "The Oskarvik Space Laboratory was founded in 1984 by the physicist Marisol Quintero. "
    "It employs about four hundred engineers on the northern coast of Ternholm.",
    "Ternholm is an island of 12,000 inhabitants whose economy rests on fishing, "
    "a small spaceport and a yearly festival of folk music held every August.",
]
QUESTION = "Who founded the laboratory that built the Kestrel-9's sounder?"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
parser.add_argument("--store", default=None, help="default: $SAMKV_HOME/kvcache")
parser.add_argument("--method", default="samkv", help="a method spec, e.g. samkv+budget=0.3")
args = parser.parse_args()

engine = SamKVEngine.from_pretrained(args.model, args.store)
refs = engine.index(DOCUMENTS)
for method in ("full", args.method):
    answer = engine.answer(QUESTION, refs, method=method, max_new_tokens=48)
    stats = answer.stats
    print(f"[{method}] TTFT {stats.ttft_s * 1000:.0f} ms, kept {stats.kept_fraction:.0%}")
    print(f"  {answer.text.strip()}")
