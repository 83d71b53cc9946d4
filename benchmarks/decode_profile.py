"""Where a batch-1 decode step's GPU time goes on a model shape (a CUDA diagnostic).

Builds a random-weight model of ``--shape`` and a random compact cache of ``--slots`` slots,
then reports: tokens/s of the plain decoder and of the CUDA-graph ``StaticDecoder``, the
graph's replay time back to back with the bytes it reads, the same linear layers alone in a
graph (the GEMV ceiling), and with ``--compile`` the compiled path (``decode_graphs=
"compiled"``) with how many of its greedy tokens match the uncompiled graphs'. Kernel tables
from the profiler go to ``--out``.

    python benchmarks/decode_profile.py --shape llama-3.1-8b --slots 2600 --out DIR [--compile]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, PreTrainedModel

from samkv_integrations.decode import Decoder
from samkv_integrations.models.shapes import random_model
from samkv_integrations.static_decode import StaticDecoder


def random_cache(model: PreTrainedModel, slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random bf16 keys and values ``[1, n_kv_heads, slots, head_dim]`` for every layer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, slots, head_dim)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def draw() -> torch.Tensor:
        return torch.randn(shape, device="cuda", generator=generator).to(model.dtype)

    return [(draw(), draw()) for _ in range(config.num_hidden_layers)]


def tokens_per_s(
    model: PreTrainedModel,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    decoder: Decoder,
    steps: int,
) -> tuple[float, list[int]]:
    """Greedy decoding from a copy of the cache: tokens/s after two untimed steps, and tokens."""
    cache = DynamicCache(
        ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers], config=model.config
    )
    position, token, tokens = layers[0][0].shape[2] + 100, 1, []
    for step in range(2 + steps):
        if step == 2:
            torch.cuda.synchronize()
            start = time.perf_counter()
        token = int(decoder.step(model, cache, token, position + step).argmax())
        tokens.append(token)
    return steps / (time.perf_counter() - start), tokens


def replay_ms(graph: torch.cuda.CUDAGraph, runs: int = 50) -> float:
    """Milliseconds per replay, back to back, timed with CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / runs


def kernel_table(graph: torch.cuda.CUDAGraph, path: Path) -> None:
    """The profiler's kernel table over five replays, by device time."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))


def linears_graph(model: PreTrainedModel) -> torch.cuda.CUDAGraph:
    """Every decoder layer's linear layers and the head on one token, captured."""
    config = model.config
    hidden = torch.randn(1, 1, config.hidden_size, device="cuda", dtype=model.dtype)
    inner = torch.randn(1, 1, config.intermediate_size, device="cuda", dtype=model.dtype)

    def run() -> None:
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                projection(hidden)
            attention.o_proj(hidden)
            mlp.gate_proj(hidden), mlp.up_proj(hidden), mlp.down_proj(inner)
        model.lm_head(hidden)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--slots", type=int, default=2600, help="compact cache length")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the step")
    parser.add_argument("--out", type=Path, required=True, help="folder for kernel tables")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = random_model(args.shape).model
    layers = random_cache(model, args.slots)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.model.embed_tokens.weight.numel() * model.dtype.itemsize  # one row read
    kv = sum(2 * k.numel() * k.element_size() for k, _ in layers)
    print(torch.cuda.get_device_name(), args.shape, f"{args.slots} slots")
    rate, _ = tokens_per_s(model, layers, Decoder(), args.steps // 2)
    print(f"plain decoder: {rate:.1f} tok/s")
    static = StaticDecoder(args.steps + 2, graphs=True)
    rate, graph_tokens = tokens_per_s(model, layers, static, args.steps)
    graph = static._graph
    assert graph is not None
    ms = replay_ms(graph)
    print(
        f"CUDA graphs: {rate:.1f} tok/s; replay {ms:.3f} ms, {(weights + kv) / ms / 1e6:.0f} GB/s"
    )
    kernel_table(graph, args.out / "graph-replay-kernels.txt")
    linears = linears_graph(model)
    ms = replay_ms(linears)
    print(f"linear layers alone: {ms:.3f} ms, {weights / ms / 1e6:.0f} GB/s")
    kernel_table(linears, args.out / "linears-kernels.txt")
    if args.compile:
        start = time.perf_counter()
        compiled = StaticDecoder(args.steps + 2, graphs=True, compiled=True)
        rate, compiled_tokens = tokens_per_s(model, layers, compiled, args.steps)
        seconds = time.perf_counter() - start
        print(f"compiled CUDA graphs: {rate:.1f} tok/s (compiling and the run: {seconds:.1f} s)")
        same = sum(a == b for a, b in zip(compiled_tokens, graph_tokens, strict=True))
        print(f"greedy tokens equal to the uncompiled graphs': {same} of {len(graph_tokens)}")
        assert compiled._graph is not None
        print(f"compiled replay {replay_ms(compiled._graph):.3f} ms")
        kernel_table(compiled._graph, args.out / "compiled-replay-kernels.txt")


if __name__ == "__main__":
    main()
