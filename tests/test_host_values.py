"""Host values on the device without a stream sync (``host_values.on_device``)."""

from __future__ import annotations

import pytest
import torch

from samkv_integrations.host_values import on_device
from samkv_integrations.methods.block_scores import block_layout


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([3, 1, 2], torch.long), ([[5, 6]], None), ([1, 2], torch.float32), ([], torch.long)],
)
def test_on_device_holds_what_torch_tensor_holds(values: list[object], dtype: torch.dtype) -> None:
    got = on_device(values, "cpu", dtype)  # type: ignore[arg-type]
    want = torch.tensor(values, dtype=dtype)
    assert got.device.type == "cpu" and got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="stream syncs happen on CUDA")
def test_no_stream_sync_on_cuda() -> None:
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        ids = on_device([[1, 2, 3]], "cuda", torch.long)
        layout = block_layout([40, 3, 70], 4, 4, 8, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.tolist() == [[1, 2, 3]]
    cpu_layout = block_layout([40, 3, 70], 4, 4, 8, torch.device("cpu"))
    for got, want in zip(layout[2:], cpu_layout[2:], strict=True):
        assert torch.equal(got.cpu(), want)
