"""The stacked KV of the answers decoding together: one ``[rows, heads, capacity, dim]`` cache.

``batching.DecodeBatcher`` runs each decode step of the answers in flight as one forward on
this cache. Each answer's compact cache (its own length, its positions with gaps) is
left-padded into ``static_decode.SlotLayer`` buffers; every row writes its new KV at the
same slot, with its own ``position_ids``, and ``visible`` says which slots each row attends
to, so that padding, unused slots and the slots of steps a row sat out stay hidden.

Between rebuilds every tensor of the step keeps its shape and address (the input buffers,
the slot, ``visible``), so on CUDA the step is captured once per stack as a CUDA graph and
replayed, as ``static_decode.StaticDecoder`` does for one answer: an eager step of an 8B
model is launch-bound, and the Python of hundreds of launches also holds the GIL that the
answers' threads need. A stack is captured once it has lived ``CAPTURE_AFTER`` steps,
since answers joining one after another rebuild it at every step, or at once when every
answer in flight is in it (no join is coming).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from samkv_integrations.decode import GreedyRun
from samkv_integrations.encode import layer_tensors
from samkv_integrations.grouped_decode import grouped_decode_scope
from samkv_integrations.static_decode import SlotLayer, capture_step, slot_step

__all__ = ["Member", "StackedCache", "take_kv", "to_device_async"]

logger = logging.getLogger(__name__)

_EMPTY = torch.zeros(0)

#: Ended rows times steps left above which a captured stack drops its ended rows (``_drop_ended``).
RIDE_ALONG_ROW_STEPS = 2048
#: Eager steps a stack runs before its step is captured: a capture costs about two steps
#: (a warm-up run and the capture), and a join or a rebuild throws it away.
CAPTURE_AFTER = 4


@dataclass(eq=False)
class Member:
    """One answer's decoding, as the batcher sees it (guarded by the batcher's condition)."""

    max_steps: int
    #: Its KV while outside the stacked cache: ``(keys, values)`` ``[1, heads, n, dim]`` per layer.
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    steps_done: int = 0
    open: bool = True
    #: The step it asked for: ``(token, position)``; then its logits or the error.
    request: tuple[int, int] | None = None
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    #: Row in the stacked cache (-1: not in it).
    row: int = -1
    #: A greedy answer's run, whose tokens the worker picks (``None``: its thread picks).
    run: GreedyRun | None = None
    #: ``steps_done`` when the run started, and when it will have picked all its tokens.
    run_start: int = 0
    run_until: int = 0
    #: Tokens the worker picked that the answer has not read yet.
    picked: collections.deque[int] = field(default_factory=collections.deque)
    #: The run ended (an EOS or its last token picked): the answer asks for no more steps.
    finished: bool = False
    #: Its answer closed its decoder (``DecodeBatcher.leave``).
    closed: bool = False
    _joined: bool = field(default=False, repr=False)


def to_device_async(
    values: list[Any], device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, copied without waiting for the device's queue.

    A copy from pageable host memory to CUDA synchronizes with the stream, so a step that
    made one returned only once its kernels had run and the answers' threads could not use
    that time. The pinned copy is ordered on the stream and its buffer kept until it has run.
    """
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def take_kv(model: PreTrainedModel, cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An answer's KV for the stack: check ``cache`` fits ``model``, take its tensors, empty it."""
    tensors = layer_tensors(cache)
    device = next(model.parameters()).device
    expected = len(DynamicCache(config=model.config).layers)
    if len(tensors) != expected:
        raise ValueError(f"batched decoding: cache has {len(tensors)} layers, model {expected}")
    for i, (keys, values) in enumerate(tensors):
        if keys.shape[0] != 1 or keys.shape[:3] != values.shape[:3] or keys.shape[2] < 1:
            raise ValueError(
                f"batched decoding: cache layer {i} holds keys {tuple(keys.shape)} and "
                f"values {tuple(values.shape)}; expected [1, heads, n >= 1, dim] each"
            )
        if keys.device != device or keys.dtype != model.dtype:
            raise ValueError(
                f"batched decoding: cache layer {i} is {keys.dtype} on {keys.device}; "
                f"the model is {model.dtype} on {device}"
            )
    # The batch holds the only copy from here: free the request's tensors as rows move.
    for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
        emptied = cast(DynamicLayer, layer)  # layer_tensors checked it holds tensors
        emptied.keys, emptied.values = keys[:, :, :0].clone(), values[:, :, :0].clone()
    return tensors


class StackedCache:
    """The rows of the answers in the last step, their KV stacked (see the module doc).

    Args:
        model: The model the cache feeds (all of its cache layers full attention).
        graphs: Capture each stack's step in a CUDA graph (the model must be on CUDA).
    """

    def __init__(self, model: PreTrainedModel, *, graphs: bool = False) -> None:
        self.model = model
        self.graphs = graphs
        self.rows: list[Member] = []
        self.steps = 0  # forwards run (eager or replayed), for tests and logs
        self.rebuilds = 0
        self.captures = 0
        self._layers: list[SlotLayer] = []
        self._cache: Cache | None = None
        # The step's inputs, refilled in place: a captured graph reads them where they are.
        self._tokens = self._positions = self._slot = self._columns = _EMPTY
        #: ``[rows, capacity]`` which slots each row attends to (its own, real entries).
        self._visible = torch.zeros(0, 0, dtype=torch.bool)
        self._next_slot = self._capacity = self._stack_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    def drop(self) -> None:
        """Forget the stacked cache (its buffers are freed once no step holds them)."""
        self.rows, self._layers, self._cache = [], [], None
        self._graph = self._logits = None
        self._next_slot = self._capacity = self._stack_steps = 0

    def step(self, batch: list[Member], settled: bool = False) -> torch.Tensor:
        """One step for ``batch``: ``[rows, vocab]`` logits, row ``member.row`` each.

        Rows of the stack whose answer did not ask in time (or has ended) ride along with
        a placeholder token: its KV lands in this step's slot, which stays hidden from that
        row for good (``_visible``), so a late answer costs no rebuild. The stack is rebuilt
        only when an answer joins, the slots run out, or most rows have ended (once captured,
        only if that pays: ``_drop_ended``). ``settled``: no answer is about to join, so the
        step is captured now rather than after ``CAPTURE_AFTER`` steps.
        """
        stacked = set(map(id, self.rows))
        ended = sum(not m.open for m in self.rows)
        if (
            any(id(m) not in stacked for m in batch)
            or self._next_slot >= self._capacity
            or (2 * ended > len(self.rows) and self._drop_ended(ended))
        ):
            self._rebuild(batch)
        device = self._visible.device
        requests: list[tuple[int, int]] = [(0, 0)] * len(self.rows)
        present = [False] * len(self.rows)
        for member in batch:
            if member.request is not None:
                requests[member.row], present[member.row] = member.request, True
        table = to_device_async(requests, device)  # [rows, 2]: token, position
        self._tokens.copy_(table[:, :1])
        self._positions.copy_(table[:, 1:])
        self._slot.fill_(self._next_slot)
        if self.graphs and self._graph is None and (settled or self._stack_steps >= CAPTURE_AFTER):
            self._capture()
        if self._graph is not None and self._logits is not None:
            self._graph.replay()
            logits = self._logits.clone()  # the next replay overwrites the graph's output
        else:
            logits = self._forward()
        # From now on the slot shows each row its own KV only if the row asked for this step.
        self._visible[:, self._next_slot] = to_device_async(present, device)
        self._next_slot += 1
        self._stack_steps += 1
        self.steps += 1
        return logits

    def _drop_ended(self, ended: int) -> bool:
        """Whether dropping ``ended`` rows pays for a rebuild: always, until the step is captured.

        Replayed, a step with ended rows riding along costs a read of their KV each (about
        0.1 ms per row for 2.6k slots of the 8B shape on an H200), where a rebuild costs a new
        capture (the first step of a 16-row stack, build and capture, took 283 ms there).
        """
        steps_left = max((m.max_steps - m.steps_done for m in self.rows if m.open), default=0)
        return self._graph is None or ended * steps_left >= RIDE_ALONG_ROW_STEPS

    def _forward(self) -> torch.Tensor:
        """One step from the input buffers: the function that is captured, or run eagerly.

        Every row sees this step's slot (a placeholder row must see something; its output
        is discarded), besides the slots ``visible`` gives it.
        """
        if self._cache is None:
            raise RuntimeError("StackedCache._forward before a rebuild")
        visible = self._visible | (self._columns == self._slot)
        with grouped_decode_scope(self.model):
            return slot_step(self.model, self._cache, self._tokens, self._positions, visible)

    def _capture(self) -> None:
        """Capture ``_forward`` (``static_decode.capture_step``), or stay eager if that fails.

        The warm-up runs write this step's KV at this step's slot, as the replay that follows
        does again. The answers' threads keep using the GPU meanwhile (``capture_step``).
        """
        try:
            self._graph, self._logits = capture_step(self._forward)
        except RuntimeError as e:
            logger.warning("batched decoding stays eager: CUDA graph capture failed (%s)", e)
            self.graphs = False
            return
        self.captures += 1

    def _rebuild(self, batch: list[Member]) -> None:
        """Stack ``batch``'s KV into new buffers, left-padded to a common length.

        Each row keeps only its visible entries (placeholder slots are dropped). Rows of the
        old stack that are still open but not in ``batch`` get their own copy first; the
        old buffers are freed layer by layer as the new ones fill.
        """
        old_rows, old_layers, old_visible = self.rows, self._layers, self._visible
        self.drop()
        self.rebuilds += 1

        def kept(member: Member) -> torch.Tensor:
            return old_visible[member.row].nonzero().squeeze(1)

        for member in old_rows:
            if member.open and member not in batch:
                index = kept(member)
                member.kv = [
                    (
                        k[member.row : member.row + 1, :, index],
                        v[member.row : member.row + 1, :, index],
                    )
                    for k, v in (layer.buffers for layer in old_layers)
                ]
                member.row = -1
        indices = [kept(m) if m.kv is None else None for m in batch]
        lengths = [
            int(i.numel()) if i is not None else m.kv[0][0].shape[2]  # type: ignore[index]
            for m, i in zip(batch, indices, strict=True)
        ]
        n = max(lengths)
        capacity = n + max(m.max_steps - m.steps_done for m in batch)
        n_layers = len(old_layers) if old_layers else len(batch[0].kv or [])
        device = next(self.model.parameters()).device
        slot = torch.zeros(1, dtype=torch.long, device=device)
        for i in range(n_layers):
            sources = [
                (old_layers[i].buffers[0][m.row, :, index], old_layers[i].buffers[1][m.row, :, index])
                if index is not None else (m.kv[i][0][0], m.kv[i][1][0])  # type: ignore[index]
                for m, index in zip(batch, indices, strict=True)
            ]  # fmt: skip
            keys, values = sources[0]
            shape = (len(batch), keys.shape[0], 0, keys.shape[-1])
            layer = SlotLayer(keys.new_zeros(shape), values.new_zeros(shape), capacity, slot)
            for row, ((k, v), length) in enumerate(zip(sources, lengths, strict=True)):
                layer.buffers[0][row, :, n - length : n] = k
                layer.buffers[1][row, :, n - length : n] = v
            self._layers.append(layer)
            if old_layers:
                old_layers[i] = layer  # drop the old buffers of this layer
            for m in batch:
                if m.kv is not None:  # moved: drop this layer of the answer's own copy
                    m.kv[i] = (_EMPTY, _EMPTY)
        column = torch.arange(capacity, device=device)
        self._visible = torch.stack([(column >= n - length) & (column < n) for length in lengths])
        for row, member in enumerate(batch):
            member.row, member.kv = row, None
        self.rows = list(batch)
        self._tokens = torch.zeros((len(batch), 1), dtype=torch.long, device=device)
        self._positions = torch.zeros_like(self._tokens)
        self._slot, self._columns, self._next_slot, self._capacity = slot, column, n, capacity
        self._cache = Cache(layers=list(self._layers))
        logger.debug("decode batch rebuilt: %d answers, %d slots", len(batch), capacity)
