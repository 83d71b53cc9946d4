"""Documents' KV loaded a layer at a time: every reader sees the layers it waited for."""

from __future__ import annotations

import pytest
import torch

from samkv_integrations.encode import encode_documents, encode_prefix
from samkv_integrations.layer_arrival import copy_stream, to_device_by_layer
from samkv_integrations.methods import MethodInput, SamKVMethod
from samkv_integrations.models.shapes import random_model
from samkv_integrations.records import DocumentKV

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _documents(device: str) -> tuple[MethodInput, list[DocumentKV]]:
    """Inputs on ``device``, and the same documents' caches on the host (pinned on CUDA)."""
    model = random_model("tiny-llama", device=device, dtype=torch.float32, seed=3)
    prefix = encode_prefix(model.model, list(range(30, 42)))
    ids = [list(range(40 + 7 * i, 40 + 7 * i + 90)) for i in range(3)]
    docs = encode_documents(
        model.model, prefix, ids, "test", progress=False, extras=["query_means"]
    )
    host = [d.to("cpu") for d in docs]
    if device == "cuda":
        host = [d.map_tensors(torch.Tensor.pin_memory) for d in host]
    return MethodInput(model.model, prefix, docs, list(range(140, 152))), host


def _delay_copies(device: torch.device) -> None:
    """Hold the copy stream back (~50 ms), so that a read that does not wait sees garbage.

    Freed blocks filled with NaN first: the destinations, allocated next, likely reuse them.
    """
    junk = [torch.full((4096,), float("nan"), device=device) for _ in range(512)]
    del junk
    with torch.cuda.stream(copy_stream(device)):
        torch.cuda._sleep(100_000_000)


def test_off_cuda_the_documents_are_moved_at_once() -> None:
    _, host = _documents("cpu")
    placed, arrival = to_device_by_layer(host, torch.device("cpu"), torch.float64)
    arrival.wait()  # nothing to wait for
    for doc, source in zip(placed, host, strict=True):
        assert doc.keys.dtype == torch.float64
        torch.testing.assert_close(doc.keys, source.keys.double(), atol=0, rtol=0)
        torch.testing.assert_close(doc.query_means, source.query_means.double(), atol=0, rtol=0)


@needs_cuda
def test_layers_arrive_on_the_device_intact_once_waited_for() -> None:
    inputs, host = _documents("cuda")
    device = inputs.model.device
    on_device = inputs.documents[0]  # already there: left as it is, not copied again
    _delay_copies(device)
    placed, arrival = to_device_by_layer([on_device, *host], device, torch.float32)
    assert placed[0].keys is on_device.keys
    arrival.wait()
    for doc, source in zip(placed[1:], host, strict=True):
        assert doc.keys.device == device
        torch.testing.assert_close(doc.keys.cpu(), source.keys, atol=0, rtol=0)
        torch.testing.assert_close(doc.values.cpu(), source.values, atol=0, rtol=0)
        torch.testing.assert_close(doc.query_means.cpu(), source.query_means, atol=0, rtol=0)


@needs_cuda
def test_samkv_reading_layers_as_they_arrive_builds_the_same_cache() -> None:
    inputs, host = _documents("cuda")
    method = SamKVMethod(budget=0.3, block_size=8)
    expected = method(inputs)
    _delay_copies(inputs.model.device)
    placed, arrival = to_device_by_layer(host, inputs.model.device, torch.float32)
    streamed = method(
        MethodInput(inputs.model, inputs.prefix, placed, inputs.question_ids, arrival)
    )
    assert [k.tolist() for k in streamed.kept_indices] == [
        k.tolist() for k in expected.kept_indices
    ]
    for got, want in zip(streamed.cache.layers, expected.cache.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=0, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=0, rtol=0)
