"""``SparseMoE``: a complete sparse MoE layer (router, experts, dispatch, combine) as one module.

For people building their own MoE models, and for running one transformers MoE block standalone:
``SparseMoE.from_module(block)`` shares the block's parameters and gives its outputs. The experts
run through the same function as the ``"moe_route"`` experts implementation
(``moe_route.nn.experts.experts_forward``): ``dispatch_plan`` -> ``permute`` -> grouped GEMMs ->
``unpermute`` (fp32 combine in slot order, deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_route._checks import check_bool, check_int
from moe_route.nn.experts import experts_forward
from moe_route.nn.router import TopKRouter
from moe_route.ops import RouterSpec

__all__ = ["SparseMoE", "Experts"]

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu}


def _check_sizes(where: str, **sizes) -> None:
    for name, value in sizes.items():
        check_int(where, name, value, 1)


class Experts(nn.Module):
    """E feed-forward experts in transformers' fused layout (``gate_up_proj [E, 2I, H]`` as
    ``[gate; up]``, ``down_proj [E, H, I]``; ``gated=False``: ``up_proj [E, I, H]``)."""

    is_transposed = False
    has_post_expert_norm = False

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, *,
                 activation: str = "silu", gated: bool = True, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_sizes("Experts", hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_experts=num_experts)
        check_bool("Experts", "gated", gated)
        check_bool("Experts", "bias", bias)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Experts: activation={activation!r} must be one of "
                             f"{sorted(ACTIVATIONS)}")
        factory = dict(device=device, dtype=dtype)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.has_gate, self.has_bias = E, gated, bias
        self.act_fn = ACTIVATIONS[activation]
        up_rows = 2 * I if gated else I
        up = nn.Parameter(torch.empty(E, up_rows, H, **factory))
        if gated:
            self.gate_up_proj = up
        else:
            self.up_proj = up
        self.down_proj = nn.Parameter(torch.empty(E, H, I, **factory))
        if bias:
            bias_up = nn.Parameter(torch.zeros(E, up_rows, **factory))
            setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", bias_up)
            self.down_proj_bias = nn.Parameter(torch.zeros(E, H, **factory))
        nn.init.normal_(up, std=H ** -0.5)
        nn.init.normal_(self.down_proj, std=I ** -0.5)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


class SparseMoE(nn.Module):
    """Router + experts + dispatch + combine: ``[..., H] -> [..., H]``.

    Args:
        hidden_size, intermediate_size, num_experts, top_k: shapes.
        spec: the routing semantics (``RouterSpec``); the router's ``steer`` and ``stats``
            attributes steer it and collect statistics (``forward(x, groups=...)``).
        activation, gated, bias: the experts (``Experts``).
        shared: an optional module run on every token and added to the output (DeepSeek-style
            shared experts); ``shared_gate``: an optional ``[H] -> [1]`` module whose sigmoid
            scales it (Qwen2-MoE).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 spec: Optional[RouterSpec] = None, *, activation: str = "silu",
                 gated: bool = True, bias: bool = False, shared: Optional[nn.Module] = None,
                 shared_gate: Optional[nn.Module] = None, device=None, dtype=None):
        super().__init__()
        _check_sizes("SparseMoE", hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_experts=num_experts)
        check_int("SparseMoE", "top_k", top_k, 1, num_experts,
                  means=f"of num_experts={num_experts}")
        self.router = TopKRouter(hidden_size, num_experts, top_k, spec, device=device,
                                 dtype=dtype)
        self.experts = Experts(hidden_size, intermediate_size, num_experts,
                               activation=activation, gated=gated, bias=bias, device=device,
                               dtype=dtype)
        self.shared, self.shared_gate = shared, shared_gate

    def forward(self, hidden_states: torch.Tensor,
                groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.router(x, groups=groups)
        out = experts_forward(self.experts, x, ids, weights)
        if self.shared is not None:
            extra = self.shared(x)
            if self.shared_gate is not None:
                extra = torch.sigmoid(self.shared_gate(x)) * extra
            out = out + extra
        return out.view(shape)

    @classmethod
    def from_module(cls, block: nn.Module, *, check: bool = True) -> "SparseMoE":
        """A ``SparseMoE`` over a transformers MoE block's own parameters (shared, not copied).

        The block needs a router with a moe_route adapter (``gate`` or ``router``) and experts
        decorated with ``@use_experts_implementation`` (``experts``); shared experts
        (``shared_experts``, or ``shared_expert`` with ``shared_expert_gate``) are kept.
        ``check`` runs both on a few random tokens and raises ``UnsupportedModelError`` if the
        outputs differ (a block whose forward does more than route, run experts and add the
        shared experts, e.g. scaling after the experts).
        """
        from moe_route.hf.adapters import UnsupportedModelError  # hf sits above nn

        router = getattr(block, "gate", None)
        if not isinstance(router, nn.Module):
            router = getattr(block, "router", None)
        experts = getattr(block, "experts", None)
        if router is None or experts is None or not hasattr(experts, "has_gate"):
            raise UnsupportedModelError(
                f"SparseMoE.from_module: {type(block).__name__} needs a router (.gate/.router) and "
                f"transformers-decorated experts (.experts with has_gate); got router="
                f"{type(router).__name__}, experts={type(experts).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.router = TopKRouter.from_module(router, block)
        self.experts = experts
        self.shared = (getattr(block, "shared_experts", None)
                       or getattr(block, "shared_expert", None))
        self.shared_gate = getattr(block, "shared_expert_gate", None)
        if check:
            _check_same(self, block)
        return self


def _check_same(moe: SparseMoE, block: nn.Module) -> None:
    from moe_route.hf.adapters import UnsupportedModelError

    # the probe in the experts' dtype, the block's: a router kept in fp32 under a bf16 model
    # (DeepSeek-V3's _keep_in_fp32_modules_strict) casts its input itself
    p = next(moe.experts.parameters())
    x = torch.randn(1, 8, moe.router.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        got = moe(x)
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2
    if want.shape != got.shape or not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise UnsupportedModelError(
            f"SparseMoE.from_module: {type(block).__name__}'s forward does more than route, run "
            f"the experts and add shared experts (outputs differ on a random probe)")
