"""Documents' KV copied to the GPU a layer at a time, beside the work that reads it.

Loading is a host-to-device copy of every layer of every document (2 GiB, about 40 ms over
PCIe for 8×2048 tokens on the Llama-3.1-8B shape), and SamKV's first work, the question's
pass over the reused context, reads the layers in order. ``to_device_by_layer`` issues the
copies on a side stream, layer by layer for all documents, and records an event after each
layer; ``LayerArrival.wait(n)`` makes the current stream wait for the first ``n`` layers
only, so the pass over layer ``l`` runs while layer ``l + 1`` is still crossing the bus.
"""

from __future__ import annotations

import threading

import torch

from samkv_integrations.records import DocumentKV

#: One copy stream per device: its copies are ordered, so the events mark a prefix of layers.
_STREAMS: dict[int, torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


class LayerArrival:
    """When each layer of the documents' KV has reached the device.

    Args:
        events: One CUDA event per layer, recorded on the copy stream once that layer of
            every document is copied; empty when everything is already in place.
        device: The device the documents are copied to.
    """

    def __init__(
        self, events: list[torch.cuda.Event] | None = None, device: torch.device | None = None
    ) -> None:
        self._events = events or []
        self._device = device
        self._waited = 0

    @property
    def done(self) -> torch.cuda.Event | None:
        """The event after the last layer's copies; None when nothing is being copied."""
        return self._events[-1] if self._events else None

    def wait(self, n_layers: int | None = None) -> None:
        """Make the device's current stream wait for the first ``n_layers`` (all: ``None``).

        The wait is queued on the device; the host goes on at once. One reading stream is
        assumed: a wait already queued is not queued again.
        """
        n = len(self._events) if n_layers is None else min(n_layers, len(self._events))
        if n > self._waited:
            torch.cuda.current_stream(self._device).wait_event(self._events[n - 1])
            self._waited = n


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream that carries the documents' K/V to ``device`` (one per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STREAMS_LOCK:
        if index not in _STREAMS:
            _STREAMS[index] = torch.cuda.Stream(device=index)
        return _STREAMS[index]


def to_device_by_layer(
    documents: list[DocumentKV], device: torch.device, dtype: torch.dtype
) -> tuple[list[DocumentKV], LayerArrival]:
    """The documents on ``device`` in ``dtype``, their K/V arriving a layer at a time.

    Off CUDA, or for documents already on the device, this is ``DocumentKV.to``, and the
    arrival is immediate. On CUDA, the destination tensors are allocated on the current
    stream and filled on a side stream; whoever reads layer ``l`` first calls
    ``arrival.wait(l + 1)``, and no destination may be freed before ``arrival.wait()``
    (the copies write into it until then). Extras are small and copied first: the current
    stream waits for them at once.
    """
    moving = [
        i
        for i, doc in enumerate(documents)
        if doc.keys.numel() and doc.keys.device != device and device.type == "cuda"
    ]
    placed = [
        doc if i in moving or not doc.keys.numel() else doc.to(device, dtype)
        for i, doc in enumerate(documents)
    ]
    if not moving:
        return placed, LayerArrival()
    for i in moving:
        source = documents[i]
        placed[i] = DocumentKV(
            token_ids=source.token_ids,
            keys=torch.empty(source.keys.shape, dtype=dtype, device=device),
            values=torch.empty(source.values.shape, dtype=dtype, device=device),
            fingerprint=source.fingerprint,
            prefix_len=source.prefix_len,
            extras={
                name: torch.empty(t.shape, dtype=dtype, device=device)
                for name, t in source.extras.items()
            },
        )
    current, stream = torch.cuda.current_stream(device), copy_stream(device)
    stream.wait_stream(current)  # the destinations exist
    events = []
    with torch.cuda.stream(stream):
        # Extras first, on the copy stream too: a copy on the current stream was measured
        # to finish only behind the layers' copies (H200), holding up everything after it.
        for i in moving:
            for name, tensor in placed[i].extras.items():
                tensor.copy_(documents[i].extras[name], non_blocking=True)
        extras_copied = torch.cuda.Event()
        extras_copied.record(stream)
        for layer in range(documents[moving[0]].keys.shape[0]):
            for i in moving:
                placed[i].keys[layer].copy_(documents[i].keys[layer], non_blocking=True)
                placed[i].values[layer].copy_(documents[i].values[layer], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
    current.wait_event(extras_copied)
    return placed, LayerArrival(events, device)
