"""Host tensors a per-call hook needs on a device: copied there once, not at every call.

A blocking host-to-device copy waits for the device's stream, so a hook that copies at every
model call (the recorder's row table, its ignored token ids, a replay's ids) stalls the GPU at
every forward. ``copy_on`` keeps one copy per device; ``cacheable`` keeps out the tensors made
while tracing (``torch.export``'s FakeTensors), which a later eager call cannot use.
``module_device`` says where a router runs, for what is put there before its first call (the
recorder's statistics buffers, a steering plan's tables).
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn

__all__ = ["cacheable", "copy_on", "module_device", "to_device"]


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


def module_device(module: nn.Module) -> Optional[torch.device]:
    """Where a module (a router) runs: its weights' device, or, for weights that accelerate
    offloads (kept on the meta device and moved in by a hook at each call), the hook's execution
    device; None for meta weights without such a hook."""
    hook = module.__dict__.get("_hf_hook")
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for t in itertools.chain(module.parameters(), module.buffers()):
        return None if t.device.type == "meta" else t.device
    return torch.device("cpu")
