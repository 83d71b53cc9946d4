"""The GPU bench (``samkv bench``): TTFT phases, memory and decode throughput per method."""
