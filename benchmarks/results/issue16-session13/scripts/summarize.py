"""Rows of the results README from load-test JSON files: rates, ratio, TTFT, prefill cycle."""

import json
import sys

for f in sorted(sys.argv[1:]):
    with open(f) as report:
        r = json.load(report)
    res = {x["interface"]: x for x in r["results"]}
    api, ser = res["api"], res["serial"]
    ts = sorted(t["prefilled_s"] for t in api["timings"] if t.get("prefilled_s"))
    cyc = (ts[-1] - ts[0]) / (len(ts) - 1) * 1e3
    print(
        f"{f.split('/')[-1]:24s} serial {ser['tokens_per_s']:6.1f} api {api['tokens_per_s']:6.1f} x{api['tokens_per_s'] / ser['tokens_per_s']:.2f} "
        f"TTFT p50/p99 {api['ttft_p50_s']:.3f}/{api['ttft_p99_s']:.3f} prefill cycle {cyc:.1f} ms first step {api['batched_decode']['first_step_s']:.3f} step {api['batched_decode']['step_ms_median']:.2f}"
    )
