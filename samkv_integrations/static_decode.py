"""Fixed-shape decode steps on a preallocated cache, replayed as one CUDA graph per answer.

Batch-1 decoding of an 8B model is launch-bound: hundreds of small kernels per token, each
launched from Python, cost more than reading the weights (issue 16). A step whose every
tensor keeps its shape and address can be captured once and replayed with one launch, as
gpt-fast (``torch.compile(mode="reduce-overhead")`` over a static KV cache) and nano-vllm
(``torch.cuda.graph`` over its block tables) do. Here the shapes are fixed by a cache
preallocated for the whole answer:

- the decode cache (``DynamicCache``, ``[1, n_kv_heads, n, head_dim]`` per layer, global
  positions with gaps) is copied into ``[1, n_kv_heads, n + max_new_tokens, head_dim]``
  buffers on the first step;
- each step writes its KV at a *slot* (the next free index) read from a device buffer, while
  RoPE gets the token's *global position* from another: slots and positions are independent,
  so gap positions keep working;
- attention reads every slot, and an additive mask built in the step from the slot buffer
  hides the unused tail (``slot index > slot``), so the answer equals the eager path.

On CUDA the step is captured in a ``torch.cuda.CUDAGraph`` and replayed; elsewhere the same
function runs eagerly (the CPU tests check it against the plain ``Decoder``).

``decode_graphs="compiled"`` also runs the step through ``torch.compile`` before capture,
which fuses the small kernels between the matrix products (RMSNorm, RoPE, the MLP's
activation): on the H100 it took the 8B shape's batch-1 step from 8.5 to 6.9 ms. Compiling
takes tens of seconds per cache shape, so the capacity is rounded up to ``CAPACITY_STEP``
slots (answers of similar length share one compiled step) and the option is off by default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from samkv_integrations.decode import Decoder
from samkv_integrations.encode import layer_tensors
from samkv_integrations.grouped_decode import grouped_decode_scope
from samkv_integrations.models.compat import with_cache
from samkv_integrations.split_kv_attention import TRITON

__all__ = [
    "CAPACITY_STEP",
    "DecodeGraphs",
    "GraphMode",
    "StaticDecoder",
    "capture_step",
    "compiled_slot_step",
    "decode_graphs_for",
    "slot_step",
    "static_unsupported",
    "with_graphs",
]

logger = logging.getLogger(__name__)

#: The engine option: capture decode steps in CUDA graphs (True), never (False), where the
#: model runs on CUDA and the static path supports it ("auto"), or capture them compiled
#: ("compiled": as True, the step first run through ``torch.compile``).
DecodeGraphs = bool | Literal["auto", "compiled"]

#: ``decode_graphs_for``'s answer: off, CUDA graphs, or compiled CUDA graphs.
GraphMode = bool | Literal["compiled"]

#: A compiled step's cache capacity is a multiple of this: each new capacity compiles again.
CAPACITY_STEP = 512

#: ``torch.compile``'s backend for compiled steps (the tests trace with "eager", which keeps
#: the arithmetic of the uncompiled step).
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"

#: Eager runs on a side stream before capture, as ``torch.cuda.graphs`` asks: they let
#: lazy initialisation (cuBLAS workspaces, autotuning) happen outside the graph. One is
#: enough for a decode step (the CUDA tests capture after it); each costs an eager step
#: (25 ms for a 16-row step of the 8B shape on an H200, more the first time a shape runs).
WARMUP_RUNS = 1


def static_unsupported(model: PreTrainedModel) -> str | None:
    """Why the static path cannot decode for ``model`` (``None`` when it can).

    It needs every layer to be a plain full-attention KV layer (no sliding window, no
    linear attention: their caches are not one growing ``[.., seq, ..]`` tensor) and an
    attention that takes an additive 4-D mask (``sdpa`` or ``eager``).
    """
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention {attention!r} takes no 4-D mask (sdpa or eager does)"
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__}:
        return f"cache layers {', '.join(sorted(kinds))} are not all full attention"
    return None


def decode_graphs_for(model: PreTrainedModel, decode_graphs: DecodeGraphs) -> GraphMode:
    """Resolve the engine option to whether the plain decoder captures CUDA graphs.

    ``"auto"`` is on for a CUDA model the static path supports and off otherwise (on CPU
    the static path does not pay: each step attends over the whole preallocated cache).
    ``"compiled"`` resolves to itself where ``True`` would be allowed.

    Raises:
        ValueError: ``decode_graphs=True`` or ``"compiled"`` for a model off CUDA or one the
            static path cannot decode; the message says why.
    """
    if decode_graphs not in (True, False, "auto", "compiled"):
        raise ValueError(
            f"decode_graphs must be True, False, 'auto' or 'compiled', got {decode_graphs!r}"
        )
    if decode_graphs is False:
        return False
    device = next(model.parameters()).device
    if device.type != "cuda":
        reason: str | None = f"CUDA graphs need a CUDA device; the model is on {device.type}"
    else:
        reason = static_unsupported(model)
    if reason is None and decode_graphs == "compiled" and not TRITON:
        reason = "torch.compile's GPU code needs Triton, which this PyTorch install lacks"
    if reason is None:
        return "compiled" if decode_graphs == "compiled" else True
    if decode_graphs != "auto":
        raise ValueError(f"decode_graphs={decode_graphs!r}: {reason} (use 'auto' or False)")
    logger.info("decoding eagerly: %s", reason)
    return False


def with_graphs(decoder: Decoder, graphs: GraphMode, max_new_tokens: int) -> Decoder:
    """The decoder an answer runs: with ``graphs``, its CUDA-graph twin where it has one.

    The plain ``Decoder`` becomes a graph-replaying ``StaticDecoder`` (compiled first when
    ``graphs == "compiled"``); a method's own decoder is replaced only by the twin it offers
    (``Decoder.graph_twin``), since it may read or change the ``DynamicCache`` at each step,
    which the static path no longer extends.
    """
    if not graphs:
        return decoder
    if type(decoder) is Decoder:
        return StaticDecoder(max_new_tokens, graphs=True, compiled=graphs == "compiled")
    return decoder.graph_twin(max_new_tokens) or decoder


class SlotLayer(StaticLayer):
    """A preallocated layer that writes each step's KV at the slot a device buffer names.

    ``StaticLayer`` writes at its own running count; here the slot is shared by every layer
    and set by the decoder before each step, so a replayed graph writes where the host says.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, capacity: int, slot: torch.Tensor
    ) -> None:
        super().__init__(max_cache_len=capacity)
        batch, heads, n, _ = keys.shape
        #: ``[1, n_kv_heads, capacity, head_dim]`` keys and values (also ``keys``/``values``).
        self.buffers = (
            keys.new_zeros((batch, heads, capacity, keys.shape[-1])),
            values.new_zeros((batch, heads, capacity, values.shape[-1])),
        )
        self.keys, self.values = self.buffers
        self.buffers[0][:, :, :n] = keys
        self.buffers[1][:, :, :n] = values
        self.device, self.batch_size, self.num_heads = keys.device, batch, heads
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.cumulative_length = torch.tensor(n, device=keys.device)
        self.slot = slot
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[1, n_kv_heads, 1, head_dim]`` states at the slot; return the whole buffers."""
        keys, values = self.buffers
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        return keys, values


class StaticDecoder(Decoder):
    """The plain decode step on a cache preallocated for ``max_new_tokens`` more tokens.

    One instance serves one answer. The first ``step`` copies the decode cache into the
    static buffers and re-points the ``DynamicCache``'s layers at their first ``n`` slots
    (the same values, held once); later steps write only to the buffers, so the
    ``DynamicCache`` is not extended.

    Args:
        max_new_tokens: How many tokens ``step`` may feed; one more raises ``ValueError``.
        graphs: Capture the step in a CUDA graph on the first call and replay it after.
        compiled: Run the step through ``torch.compile`` (``compiled_slot_step``), on a
            capacity rounded up to ``CAPACITY_STEP``.
    """

    def __init__(
        self, max_new_tokens: int, *, graphs: bool = False, compiled: bool = False
    ) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.graphs = graphs
        self.compiled = compiled
        self._model: PreTrainedModel | None = None
        self._cache: Cache | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._first_slot = 0
        self._next_slot = 0
        self._handed_back = False

    @torch.inference_mode()
    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """Feed one token at global ``position``; ``[vocab]`` logits for the next one.

        The logits are a copy: a replay overwrites the graph's output buffer.
        """
        if self._handed_back:
            raise ValueError("this StaticDecoder handed its cache back: it takes no more steps")
        if self._model is None:
            self._prepare(model, cache)
        elif model is not self._model:
            raise ValueError("a StaticDecoder serves one answer of one model")
        if self._next_slot - self._first_slot >= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens: this decoder was sized for {self.max_new_tokens} steps"
            )
        # ``fill_`` from host scalars queues the copies without waiting for the device.
        self._token.fill_(token)
        self._position.fill_(position)
        self._slot.fill_(self._next_slot)
        self._next_slot += 1
        if not self.graphs:
            return self._forward()
        if self._graph is None:
            self._capture()
        graph, logits = self._graph, self._logits
        if graph is None or logits is None:  # _capture sets both
            raise RuntimeError("CUDA graph capture left no graph")
        graph.replay()
        return logits.clone()

    def hand_back(self, cache: DynamicCache) -> None:
        """Point ``cache``'s layers at every slot written so far, and take no more steps.

        The layers view the buffers (no copy); the CUDA graph is released.
        """
        self._handed_back = True
        if self._cache is None:  # no step taken: ``cache`` is as it came
            return
        for dynamic, static in zip(cache.layers, self._cache.layers, strict=True):
            keys, values = cast(SlotLayer, static).buffers
            cast(DynamicLayer, dynamic).keys = keys[:, :, : self._next_slot]
            cast(DynamicLayer, dynamic).values = values[:, :, : self._next_slot]
        self._graph = self._logits = self._cache = None

    def _prepare(self, model: PreTrainedModel, cache: DynamicCache) -> None:
        """Allocate the input buffers and the static cache, from the decode cache."""
        reason = static_unsupported(model)
        if reason is not None:
            raise ValueError(f"static decoding: {reason}")
        device = next(model.parameters()).device
        if self.graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device.type}")
        tensors = layer_tensors(cache)
        n = tensors[0][0].shape[-2]
        capacity = n + self.max_new_tokens
        if self.compiled:
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
            if (id(model), capacity) not in _COMPILED_SHAPES:
                _COMPILED_SHAPES.add((id(model), capacity))
                logger.info("compiling the decode step for %d cache slots (once)", capacity)
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._slot = torch.zeros(1, dtype=torch.long, device=device)
        self._kv_index = torch.arange(capacity, device=device)
        layers = [SlotLayer(k, v, capacity, self._slot) for k, v in tensors]
        # The decode cache's tensors are freed: its layers now view the buffers' first n slots.
        for dynamic, static in zip(cache.layers, layers, strict=True):
            keys, values = static.buffers
            cast(DynamicLayer, dynamic).keys = keys[:, :, :n]  # every layer is one (checked)
            cast(DynamicLayer, dynamic).values = values[:, :, :n]
        self._cache = Cache(layers=list(layers))
        self._model = model
        self._first_slot = self._next_slot = n

    def _forward(self) -> torch.Tensor:
        """One step from the input buffers: the function that is captured, or run eagerly."""
        model, cache = self._model, self._cache
        if model is None or cache is None:
            raise RuntimeError("StaticDecoder._forward before _prepare")
        visible = (self._kv_index <= self._slot)[None]
        step = compiled_slot_step() if self.compiled else slot_step
        with self._attention(model):
            return step(model, cache, self._token, self._position, visible)[0]

    def _attention(self, model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
        """What the step's attention runs under: the grouped decode attention (``sdpa`` models).

        A subclass with its own attention (``StaticQuestDecoder``) returns its scope instead.
        """
        return grouped_decode_scope(model)

    def _capture(self) -> None:
        """Capture ``_forward`` (``capture_step``).

        The warm-up runs write this step's KV at this step's slot, as the replay that follows
        does again: the buffers hold the same values either way.
        """
        self._graph, self._logits = capture_step(self._forward)


def slot_step(
    model: PreTrainedModel,
    cache: Cache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    visible: torch.Tensor,
) -> torch.Tensor:
    """One decode forward on a slot cache: ``[rows, vocab]`` logits.

    ``tokens`` and ``positions`` are ``[rows, 1]``; ``visible`` ``[rows, capacity]`` says
    which slots each row attends to, passed as an additive mask (0 or the dtype's minimum).
    The forward runs under whatever attention scope the caller holds.
    """
    mask = torch.zeros(visible.shape, dtype=model.dtype, device=visible.device)
    mask = mask.masked_fill(~visible, torch.finfo(model.dtype).min)
    out = model(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=mask[:, None, None, :],
        **with_cache(model, cache),
        use_cache=True,
    )
    return out.logits[:, -1]


#: ``compiled_slot_step``'s one compiled function, once built (the tests reset it).
_COMPILED: list[Callable[..., torch.Tensor]] = []

#: (model id, capacity) pairs a compiled step was built for: the first of each is logged.
_COMPILED_SHAPES: set[tuple[int, int]] = set()


def compiled_slot_step() -> Callable[..., torch.Tensor]:
    """``slot_step`` through ``torch.compile``, built once per process.

    The ``COMPILE_BACKEND`` of that first call stays. Shapes are static: one compiled graph
    per model and cache capacity, up to dynamo's recompile limit
    (``torch._dynamo.config.recompile_limit``, 8 by default), after which new shapes run
    uncompiled, with dynamo's warning. The batched steps of concurrent answers
    (``stacked_cache``) are not compiled.
    """
    if not _COMPILED:
        _COMPILED.append(torch.compile(slot_step, dynamic=False, backend=COMPILE_BACKEND))
    return _COMPILED[0]


def capture_step(forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``forward`` up on a side stream, then capture it (the pattern of ``torch.cuda.graphs``).

    The capture's errors are thread-local: other answers' threads pick tokens and copy
    logits on the GPU, outside the model lock, while one answer captures its step; under
    the default (global) mode such a call from another thread fails and invalidates the
    capture. Returns the graph and the output tensor that each replay overwrites.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = forward()
    return graph, output
