"""The ``"moe_route"`` experts implementation for transformers' ``ExpertsInterface``.

After ``import moe_route.nn``, any model whose experts class carries transformers'
``@use_experts_implementation`` decorator can run its experts through the moe_route dispatch ops:

    model.set_experts_implementation("moe_route")
    # or AutoModelForCausalLM.from_pretrained(..., experts_implementation="moe_route")

The forward plans the (token, slot) -> expert-row layout once (``dispatch_plan``), gathers rows
(``permute``), runs the up and down projections as grouped GEMMs over the plan's offsets
(``torch.nn.functional.grouped_mm`` where the device and dtype allow, else one GEMM per expert),
and combines with ``unpermute`` (fp32 accumulation in slot order, no atomics). It honours the
decorator's layout flags: ``has_gate`` (else ``act_fn`` on ``up_proj``), ``has_bias``,
``is_transposed``, the class's own ``_apply_gate`` (GPT-OSS interleaved, clamped gating),
``has_post_expert_norm``, and expert-parallel sentinel ids (>= num_experts get no row).

Numerics against transformers' ``"grouped_mm"``: the GEMMs are the same; the combine differs in that
transformers multiplies by the routing weight in the activation dtype before its fp32 sum, while
``unpermute`` multiplies in fp32, so bf16 outputs can differ in the last bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_route.dispatch import DispatchPlan, dispatch_plan, permute, unpermute

NAME = "moe_route"


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ExpertsInterface`` signature: ``(experts, hidden [T, H], ids [T, k], weights [T, k])``."""
    plan = dispatch_plan(top_k_index, self.num_experts)
    x = permute(hidden_states, plan, zero_tail=False)  # rows of dropped ids: never read
    if self.has_gate:
        h = _grouped_linear(self, x, self.gate_up_proj, _bias(self, "gate_up_proj_bias"), plan)
        h = self._apply_gate(h)
    else:
        h = self.act_fn(_grouped_linear(self, x, self.up_proj, _bias(self, "up_proj_bias"), plan))
    y = _grouped_linear(self, h, self.down_proj, _bias(self, "down_proj_bias"), plan)
    if getattr(self, "has_post_expert_norm", False):  # absent in transformers 5.17
        y = self.post_expert_norm(y)
    return unpermute(y, plan, top_k_weights).to(hidden_states.dtype)


def _bias(module, name):
    return getattr(module, name, None) if module.has_bias else None


def _grouped_linear(module, x: torch.Tensor, weight: torch.Tensor, bias, plan: DispatchPlan):
    """Rows of expert e (plan.expert_offsets[e]:[e+1]) times expert e's weight.

    ``weight`` is ``[E, out, in]`` (F.linear orientation) or ``[E, in, out]`` when the module is
    ``is_transposed``; rows past ``expert_offsets[E]`` are left unspecified (never read).
    """
    w = weight if module.is_transposed else weight.transpose(-2, -1)  # [E, in, out]
    x = x.to(w.dtype)
    if _grouped_mm_ok(x, w):
        out = F.grouped_mm(x, w, offs=plan.expert_offsets[1:].to(torch.int32))
    else:
        out = _per_expert_linear(x, w, plan.expert_offsets)
    if bias is not None:
        out = out + bias[_row_experts(plan, x.shape[0])]
    return out


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or torch.compiler.is_compiling():
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    # The CPU kernel wants 16-byte aligned operands (memory-mapped weights may not be).
    return x.device.type == "cpu" and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def _per_expert_linear(x, w, offsets):
    out = x.new_empty((x.shape[0], w.shape[-1]))
    bounds = offsets.tolist()  # host sync: only on the fallback path
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = x[lo:hi] @ w[e]
    return out


def _row_experts(plan: DispatchPlan, rows: int) -> torch.Tensor:
    """Expert of each row (tail rows clamp to the last expert; they are never read)."""
    r = torch.arange(rows, device=plan.expert_offsets.device)
    E = plan.counts.shape[0]
    return torch.searchsorted(plan.expert_offsets[1:], r, right=True).clamp_(max=E - 1)


def register() -> bool:
    """Register ``"moe_route"`` with transformers' ExpertsInterface; False without transformers."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, experts_forward)
    return True
