"""``moe_route.info()``: what was built, what loaded, which kernels serve which device."""
from __future__ import annotations

import torch

from moe_route import _loader

OPS = ("topk_gate", "dispatch_plan", "permute", "unpermute")


def info() -> dict:
    """Build and runtime facts for bug reports: versions, archs, backends and fallbacks."""
    out = {
        "moe_route": "0.1.0",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _loader.native is not None,
        "extension_error": _loader.load_error,
        "build": _loader.build_info(),
        "kernels": {op: [d for d in ("cpu", "cuda") if _loader.has_kernel(op, d)] for op in OPS},
        "cpu_threads": torch.get_num_threads(),
        # The CPU kernels' instruction-set variant (MOE_ROUTE_CPU_ISA), and those the CPU runs.
        "cpu_isa": _loader.native.cpu_isa() if _loader.native else None,
        "cpu_isas": _loader.native.cpu_isas() if _loader.native else [],
    }
    return out


def format_info(data: dict) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
