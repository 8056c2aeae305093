"""``TopKRouter``: a drop-in MoE router module over the fused gate.

A router is a linear map from hidden states to expert logits followed by the gate. It returns what
transformers' routers return, ``(logits [T, E], weights [T, k], ids [T, k] int64)``, so it can
stand in for a model's own router, and it carries optional steering and statistics buffers.
``moe_route.patch`` runs patched transformers routers through the same ``route`` function.

Numerics:
    * logits: ``F.linear(x, weight, bias)`` in ``linear_dtype`` (None: the input's dtype;
      DeepSeek-V3 routers compute in fp32), then cast to ``logits_dtype`` if given (Granite: fp32
      after the GEMM);
    * ids and weights: the fused gate (``moe_route.topk_gate``), fp32 math;
    * returned weights are cast to ``weights_dtype``: ``"logits"`` (OLMoE, Qwen), ``"float32"``
      (Mixtral, DeepSeek-V3) or ``"input"`` (Granite: the hidden states' dtype).
When the logits need a gradient (training), ``topk_gate`` recomputes the weights of the chosen
ids with differentiable PyTorch ops (``reference.gate_weights``); the ids, and hence the routing,
are the kernel's either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_route._checks import check_bool, check_int
from moe_route.ops import GateStats, RouterSpec, SteerSpec, topk_gate

__all__ = ["TopKRouter", "route", "router_logits", "weights_out_dtype"]

WEIGHTS_DTYPES = ("logits", "float32", "input")


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  linear_dtype: Optional[torch.dtype] = None,
                  logits_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in ``linear_dtype`` (None: as given), cast to
    ``logits_dtype``."""
    if linear_dtype is not None:
        x, weight = x.to(linear_dtype), weight.to(linear_dtype)
        bias = bias.to(linear_dtype) if bias is not None else None
    z = F.linear(x, weight, bias)
    return z if logits_dtype is None else z.to(logits_dtype)


def weights_out_dtype(rule: str, logits: torch.Tensor, hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype a family returns its weights in: ``rule`` is one of ``WEIGHTS_DTYPES``."""
    if rule == "logits":
        return logits.dtype
    return hidden_states.dtype if rule == "input" else torch.float32


def _check_groups(spec: RouterSpec, E: int, k: int) -> None:
    """The group limit of ``spec`` against E experts and k: ValueError at construction, not at
    the first forward."""
    if E % spec.n_group:
        raise ValueError(f"TopKRouter: spec.n_group={spec.n_group} must divide "
                         f"num_experts={E}")
    if spec.n_group > 1 and k > spec.topk_group * (E // spec.n_group):
        raise ValueError(f"TopKRouter: top_k={k} must be <= spec.topk_group * experts per group "
                         f"= {spec.topk_group * (E // spec.n_group)}")


def route(logits: torch.Tensor, k: int, spec: RouterSpec, *, selection_bias=None,
          steer: Optional[SteerSpec] = None, stats: Optional[GateStats] = None, groups=None,
          replay: Optional[torch.Tensor] = None, weights_dtype: torch.dtype = torch.float32):
    """Gate ``logits [T, E]``: ``(weights [T, k] in weights_dtype, ids [T, k] int64)``.
    ``replay`` ``[T, k]`` gives tokens their ids (``topk_gate``)."""
    w, ids = topk_gate(logits, k, spec, selection_bias=selection_bias, steer=steer, stats=stats,
                       groups=groups, replay=replay)
    return w.to(weights_dtype), ids.long()


class TopKRouter(nn.Module):
    """Linear router + fused top-k gate, with optional steering and statistics.

    Args:
        hidden_size, num_experts, top_k: shapes; ``weight`` is ``[num_experts, hidden_size]``.
        spec: the routing semantics (``RouterSpec``; default softmax -> top-k).
        bias: a learned logit bias (GPT-OSS).
        selection_bias: an ``[E]`` fp32 buffer added for selection only (DeepSeek-V3
            ``e_score_correction_bias``).
        linear_dtype, logits_dtype, weights_dtype: the dtype recipe (module docstring).

    Attributes ``steer`` (a ``SteerSpec``) and ``stats`` (a ``GateStats``) may be set at any time;
    ``forward(x, groups=None, replay=None)`` takes the statistics group of each token and,
    for router replay, the ``[T, k]`` ids to route them to (rows of -1 select as usual).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 spec: Optional[RouterSpec] = None, *, bias: bool = False,
                 selection_bias: bool = False, linear_dtype: Optional[torch.dtype] = None,
                 logits_dtype: Optional[torch.dtype] = None, weights_dtype: str = "logits",
                 device=None, dtype=None):
        super().__init__()
        hidden_size = check_int("TopKRouter", "hidden_size", hidden_size, 1)
        num_experts = check_int("TopKRouter", "num_experts", num_experts, 1)
        top_k = check_int("TopKRouter", "top_k", top_k, 1, num_experts,
                          means=f"of num_experts={num_experts}")
        check_bool("TopKRouter", "bias", bias)
        check_bool("TopKRouter", "selection_bias", selection_bias)
        if weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"TopKRouter: weights_dtype={weights_dtype!r} must be one of "
                             f"{WEIGHTS_DTYPES}")
        if spec is not None and not isinstance(spec, RouterSpec):
            raise TypeError(f"TopKRouter: spec must be a RouterSpec, got {type(spec).__name__}")
        if spec is not None:
            _check_groups(spec, num_experts, top_k)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.spec = spec or RouterSpec()
        self.linear_dtype, self.logits_dtype, self.weights_dtype = (linear_dtype, logits_dtype,
                                                                    weights_dtype)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.bias = nn.Parameter(torch.zeros(num_experts, **factory)) if bias else None
        self.register_buffer("selection_bias",
                             torch.zeros(num_experts, device=device) if selection_bias else None)
        self.steer: Optional[SteerSpec] = None
        self.stats: Optional[GateStats] = None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return router_logits(hidden_states.reshape(-1, self.hidden_size), self.weight, self.bias,
                             self.linear_dtype, self.logits_dtype)

    def forward(self, hidden_states: torch.Tensor, groups: Optional[torch.Tensor] = None,
                replay: Optional[torch.Tensor] = None):
        z = self.logits(hidden_states)
        bias = self.selection_bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        out_dtype = weights_out_dtype(self.weights_dtype, z, hidden_states)
        w, ids = route(z, self.top_k, self.spec, selection_bias=bias, steer=self.steer,
                       stats=self.stats, groups=groups, replay=replay, weights_dtype=out_dtype)
        return z, w, ids

    @classmethod
    def from_module(cls, router: nn.Module, block: Optional[nn.Module] = None) -> "TopKRouter":
        """A ``TopKRouter`` that returns exactly what the transformers ``router`` returns (same
        ids; weights to fp32 rounding). It shares the router's parameters (no copy), so training
        one trains the other. ``block`` is the MoE block, for families that keep the selection
        bias there (MiniMax-M2, AFMoE, LFM2-MoE)."""
        from moe_route.hf.adapters import adapter_for  # hf sits above nn; imported on use

        return adapter_for(router).build_router(router, block)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, spec={self.spec}")
