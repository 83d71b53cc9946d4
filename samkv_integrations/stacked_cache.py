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
answers' threads need. A stack is captured only once it has lived ``CAPTURE_AFTER`` steps,
since answers joining one after another rebuild it at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from samkv_integrations.grouped_decode import grouped_decode_scope
from samkv_integrations.static_decode import SlotLayer, capture_step, slot_step

__all__ = ["Member", "StackedCache"]

logger = logging.getLogger(__name__)

_EMPTY = torch.zeros(0)

#: Eager steps a stack runs before its step is captured: a capture costs about three steps
#: (two warm-up runs and the capture), and a join or a rebuild throws it away.
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
    _joined: bool = field(default=False, repr=False)


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

    def step(self, batch: list[Member]) -> torch.Tensor:
        """One step for ``batch``: ``[rows, vocab]`` logits, row ``member.row`` each.

        Rows of the stack whose answer did not ask in time (or has ended) ride along with
        a placeholder token: its KV lands in this step's slot, which stays hidden from that
        row for good (``_visible``), so a late answer costs no rebuild. The stack is rebuilt
        only when an answer joins, the slots run out, or most rows have ended.
        """
        stacked = set(map(id, self.rows))
        ended = sum(not m.open for m in self.rows)
        if (
            any(id(m) not in stacked for m in batch)
            or self._next_slot >= self._capacity
            or 2 * ended > len(self.rows)
        ):
            self._rebuild(batch)
        device = self._visible.device
        requests: list[tuple[int, int]] = [(0, 0)] * len(self.rows)
        present = [False] * len(self.rows)
        for member in batch:
            if member.request is not None:
                requests[member.row], present[member.row] = member.request, True
        table = torch.tensor(requests, device=device)  # [rows, 2]: token, position
        self._tokens.copy_(table[:, :1])
        self._positions.copy_(table[:, 1:])
        self._slot.fill_(self._next_slot)
        if self.graphs and self._graph is None and self._stack_steps >= CAPTURE_AFTER:
            self._capture()
        if self._graph is not None and self._logits is not None:
            self._graph.replay()
            logits = self._logits.clone()  # the next replay overwrites the graph's output
        else:
            logits = self._forward()
        # From now on the slot shows each row its own KV only if the row asked for this step.
        self._visible[:, self._next_slot] = torch.tensor(present, device=device)
        self._next_slot += 1
        self._stack_steps += 1
        self.steps += 1
        return logits

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
