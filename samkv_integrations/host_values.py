"""Small host values on the device without waiting for it.

``torch.tensor(values, device="cuda")`` builds the tensor in pageable host memory and copies
it blocking, which PyTorch does as an asynchronous copy followed by a synchronization of the
stream: the host waits until every kernel already queued has run. On the prefill path that
wait undoes the overlap the engine relies on: the next request's host work starts while the
previous request's recompute still runs on the device (``engine._run`` reads its stats off
the lock), and a blocking copy at the start of selection would stall it until that
recompute ends. ``on_device`` pins the values and copies them without blocking, so the copy
is ordered on the stream like a kernel; PyTorch's pinned-memory cache keeps the staging
block until the copy has run. Off CUDA it is ``torch.tensor`` on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["on_device"]


def on_device(
    values: Sequence[int] | Sequence[float] | Sequence[Sequence[int]],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, copied without a stream sync on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
