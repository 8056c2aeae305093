"""Host tensors a per-call hook needs on a device: copied there once, not at every call.

A blocking host-to-device copy waits for the device's stream, so a hook that copies at every
model call (the recorder's row table, its ignored token ids, a replay's ids) stalls the GPU at
every forward. ``copy_on`` keeps one copy per device; ``cacheable`` keeps out the tensors made
while tracing (``torch.export``'s FakeTensors), which a later eager call cannot use.
"""
from __future__ import annotations

import torch

__all__ = ["cacheable", "copy_on", "to_device"]


def cacheable(t: torch.Tensor) -> bool:
    """Whether a tensor made for a call may be kept for later calls: not one made while tracing
    (torch.export's FakeTensors, functional tensors), which an eager call cannot use."""
    return type(t) is torch.Tensor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: from the host to a CUDA device through pinned memory, without
    waiting for the copy (the caching host allocator keeps the pinned block until it is done)."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def copy_on(copies: dict, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied there at the first call and kept in ``copies`` (by
    device): a model call's hook copies nothing from the host after that."""
    copy = copies.get(device)
    if copy is None:
        copy = to_device(tensor, device)
        if cacheable(copy):
            copies[device] = copy
    return copy
