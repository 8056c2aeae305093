"""Loads the native extension once, remembers why it could not be loaded, never raises.

``MOE_ROUTE_NO_EXT=1`` skips the extension (pure reference, for testing the fallback);
``MOE_ROUTE_STRICT=1`` turns every fallback to the reference into an error;
``MOE_ROUTE_CPU_ISA=base|avx2|avx512`` picks the CPU kernels' instruction-set variant (default:
the best the CPU runs; all compute the same bits), with a warning if the CPU cannot run it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("moe_route")

native = None  # the moe_route._C module when loaded
load_error: str | None = None
_warned: set[str] = set()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("", "0", "false", "no")


def strict() -> bool:
    return _flag("MOE_ROUTE_STRICT")


def _load() -> None:
    global native, load_error
    if _flag("MOE_ROUTE_NO_EXT"):
        load_error = "MOE_ROUTE_NO_EXT is set"
        return
    try:
        from moe_route import _C
    except Exception as exc:  # a missing or broken build must not break `import moe_route`
        load_error = f"{type(exc).__name__}: {exc}"
        return
    native = _C
    if _C.cpu_isa_env_error():
        log.warning("moe_route: MOE_ROUTE_CPU_ISA ignored, the CPU kernels run %s: %s",
                    _C.cpu_isa(), _C.cpu_isa_env_error())


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.moe_route.<op> has a kernel for this device type (CPU, CUDA; meta
    tensors run the ops' fake kernels, which compute shapes only)."""
    if native is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"moe_route::{op}", key)


def fallback(op: str, device_type: str) -> None:
    """Called before using the reference instead of a kernel: warn once per (op, device), or
    raise under MOE_ROUTE_STRICT."""
    reason = load_error or f"the extension has no {device_type} kernel for {op}"
    if strict():
        raise RuntimeError(f"moe_route: no native {op} for {device_type} ({reason}) and "
                           "MOE_ROUTE_STRICT is set")
    if (op, device_type) not in _warned:
        _warned.add((op, device_type))
        log.warning("moe_route: %s on %s runs the pure-PyTorch reference (%s)", op, device_type,
                    reason)


def build_info() -> dict:
    path = Path(__file__).with_name("_build_info.json")
    info = json.loads(path.read_text()) if path.exists() else {}
    if native is not None:
        info["native"] = native.build_info()
    return info


_load()
