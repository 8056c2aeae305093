"""Router adapters: how each transformers router family maps onto the fused gate.

An ``Adapter`` says, for one router forward (research/transformers_moe_map.md §3 names the
semantics groups S1..S7), where the router's parameters live, how its logits are computed (the
dtype recipe of its ``F.linear``), which ``RouterSpec`` reproduces its selection and weights, where
its selection bias lives, and the dtype and layout of what it returns. One adapter object serves
every router class that shares that forward; the registry is keyed by router class name.

Adapters read parameters and buffers from the live module on every call (never a cached copy), so
``model.to(...)``, ``device_map`` placement and in-place weight edits are always seen.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from moe_route.nn.router import TopKRouter, router_logits
from moe_route.ops import RouterSpec

__all__ = ["Adapter", "UnsupportedModelError", "adapter_for", "register_adapter", "REGISTRY",
           "UNSUPPORTED"]


class UnsupportedModelError(ValueError):
    """The model (or one of its MoE layers) has a router moe_route cannot reproduce."""


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _first_attr(obj, names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class Adapter:
    """One router forward, described for the fused gate.

    Attributes:
        name: the adapter's name (``"softmax_topk"``...); group: the semantics group ("S1a"...).
        spec: router (and its MoE block) -> ``RouterSpec``.
        weight, bias: attribute paths of the ``[E, H]`` logit weight and optional logit bias.
        selection_bias: where the selection-only bias lives: ``"router:<path>"``,
            ``"block:<path>"`` (read from the MoE block) or ``"arg:<i>"`` (the router forward's
            i-th extra argument); None for none.
        linear_dtype, logits_dtype: the logits' dtype recipe (``moe_route.nn.router``).
        weights_dtype: ``"logits"``, ``"float32"`` or ``"input"``: the dtype the family's weights
            come back in.
        flatten: the router reshapes its input to ``[-1, H]`` itself (else it takes 2-D input).
    """

    name: str
    group: str
    spec: Callable[[nn.Module, Optional[nn.Module]], RouterSpec]
    weight: str = "weight"
    bias: Optional[str] = None
    selection_bias: Optional[str] = None
    linear_dtype: Optional[torch.dtype] = None
    logits_dtype: Optional[torch.dtype] = None
    weights_dtype: str = "logits"
    top_k: tuple = ("top_k",)
    num_experts: tuple = ("num_experts",)

    def k(self, router) -> int:
        return int(_first_attr(router, self.top_k))

    def experts(self, router) -> int:
        return int(_first_attr(router, self.num_experts, _attr(router, self.weight).shape[0]))

    def logits(self, router, hidden_states: torch.Tensor) -> torch.Tensor:
        w = _attr(router, self.weight)
        b = _attr(router, self.bias) if self.bias else None
        return router_logits(hidden_states.reshape(-1, w.shape[1]), w, b, self.linear_dtype,
                             self.logits_dtype)

    def selection_bias_of(self, router, block, args=()) -> Optional[torch.Tensor]:
        if self.selection_bias is None:
            return None
        where, _, path = self.selection_bias.partition(":")
        if where == "arg":
            bias = args[int(path)] if len(args) > int(path) else None
        else:
            owner = router if where == "router" else block
            bias = _attr(owner, path) if owner is not None else None
        if bias is None:
            return None
        bias = bias.reshape(-1)
        return bias if bias.dtype == torch.float32 else bias.float()

    def weights_out_dtype(self, logits: torch.Tensor, hidden_states: torch.Tensor) -> torch.dtype:
        if self.weights_dtype == "logits":
            return logits.dtype
        return hidden_states.dtype if self.weights_dtype == "input" else torch.float32

    def build_router(self, router: nn.Module, block: Optional[nn.Module] = None) -> TopKRouter:
        """A standalone ``TopKRouter`` sharing ``router``'s parameters (and selection bias)."""
        w = _attr(router, self.weight)
        E, H = w.shape
        tk = TopKRouter(H, E, self.k(router), self.spec(router, block),
                        linear_dtype=self.linear_dtype, logits_dtype=self.logits_dtype,
                        weights_dtype=self.weights_dtype, device="meta")
        tk.weight = w
        if self.bias:
            tk.bias = _attr(router, self.bias)
        if self.selection_bias is not None:
            if self.selection_bias.startswith("arg:"):
                raise UnsupportedModelError(
                    f"TopKRouter.from_module: {type(router).__name__} takes its selection bias as "
                    f"a forward argument; pass the MoE block and use SparseMoE.from_module")
            bias = self.selection_bias_of(router, block)
            if bias is None and self.selection_bias.startswith("block:"):
                raise ValueError(f"TopKRouter.from_module: {type(router).__name__} keeps its "
                                 f"selection bias on the MoE block; pass block=")
            tk.selection_bias = bias
        return tk


def _renorm_flag(router, block=None) -> bool:
    return bool(_first_attr(router, ("norm_topk_prob",), False))


def _s1(renorm):
    return lambda router, block=None: RouterSpec("softmax", renormalize=renorm(router))


def _s3(router, block=None) -> RouterSpec:
    """DeepSeek-V3 noaux_tc: sigmoid, bias for selection, top-2-sum groups, renorm + 1e-20."""
    n_group = int(_first_attr(router, ("num_group", "n_group"), 1))
    return RouterSpec("sigmoid", n_group=n_group,
                      topk_group=int(_first_attr(router, ("topk_group",), 1)),
                      group_score="top2_sum", renormalize=_renorm_flag(router),
                      renorm_eps=1e-20 if _renorm_flag(router) else 0.0,
                      scale=float(_first_attr(router, ("routed_scaling_factor",), 1.0)))


# The adapters; EXEMPLARS below says which router forward each one reproduces.
SOFTMAX_TOPK = Adapter("softmax_topk", "S1a", _s1(_renorm_flag))
SOFTMAX_TOPK_RENORM_FP32 = Adapter("softmax_topk_renorm", "S1b", _s1(lambda r: True),
                                   weights_dtype="float32")
SOFTMAX_TOPK_RENORM = Adapter("softmax_topk_renorm", "S1b", _s1(lambda r: True))
TOPK_SOFTMAX_BIAS = Adapter("topk_softmax", "S2",
                            lambda r, b=None: RouterSpec("softmax", select_on="logits"),
                            bias="bias")
TOPK_SOFTMAX_FP32_LOGITS = Adapter("topk_softmax", "S2",
                                   lambda r, b=None: RouterSpec("softmax", select_on="logits"),
                                   logits_dtype=torch.float32, weights_dtype="input")
SIGMOID_GROUPED = Adapter("sigmoid_grouped", "S3", _s3,
                          selection_bias="router:e_score_correction_bias",
                          linear_dtype=torch.float32, weights_dtype="float32")

# Each adapter is defined by the forward of one exemplar router class (module, class). Any other
# router class whose forward has the same syntax tree (transformers copies router code between
# families with "# Copied from"/modular) gets the same adapter: see ``adapter_for``.
EXEMPLARS: dict[str, tuple[Adapter, str]] = {
    "OlmoeTopKRouter": (SOFTMAX_TOPK, "olmoe"),
    "MixtralTopKRouter": (SOFTMAX_TOPK_RENORM_FP32, "mixtral"),
    "GptOssTopKRouter": (TOPK_SOFTMAX_BIAS, "gpt_oss"),
    "GraniteMoeTopKRouter": (TOPK_SOFTMAX_FP32_LOGITS, "granitemoe"),
    "DeepseekV3TopkRouter": (SIGMOID_GROUPED, "deepseek_v3"),
}

# Router class name -> adapter: the exemplars, plus classes matched or registered since.
REGISTRY: dict[str, Adapter] = {name: adapter for name, (adapter, _) in EXEMPLARS.items()}

# Router classes moe_route knows and cannot reproduce, with the reason.
UNSUPPORTED: dict[str, str] = {}


def register_adapter(router_class: str, adapter: Adapter) -> None:
    """Route ``router_class`` (a class name) through ``adapter``; replaces any earlier entry."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter: adapter must be an Adapter, got {type(adapter).__name__}")
    REGISTRY[router_class] = adapter
    UNSUPPORTED.pop(router_class, None)


@functools.lru_cache(maxsize=None)
def forward_key(cls: type) -> Optional[str]:
    """The syntax tree of ``cls.forward``'s body (docstring, comments and layout ignored)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    func = ast.parse(source).body[0]
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    args = [a.arg for a in func.args.args]
    return repr(args) + "".join(ast.dump(node) for node in body)


@functools.lru_cache(maxsize=None)
def _exemplar_keys() -> tuple:
    keys = []
    for name, (adapter, family) in EXEMPLARS.items():
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        keys.append((forward_key(getattr(module, name)), adapter))
    return tuple(keys)


def lookup(router_cls: type) -> Optional[Adapter]:
    """The adapter of a router class, by name or by the syntax tree of its forward; None if none."""
    adapter = REGISTRY.get(router_cls.__name__)
    if adapter is None and router_cls.__name__ not in UNSUPPORTED:
        key = forward_key(router_cls)
        adapter = next((a for k, a in _exemplar_keys() if key is not None and k == key), None)
        if adapter is not None:
            REGISTRY[router_cls.__name__] = adapter
    return adapter


def adapter_for(router: nn.Module) -> Adapter:
    adapter = lookup(type(router))
    if adapter is None:
        name = type(router).__name__
        reason = UNSUPPORTED.get(name, "no adapter matches this router class")
        raise UnsupportedModelError(f"{name}: {reason} (see moe_route.supported())")
    return adapter


def replace(adapter: Adapter, **changes) -> Adapter:
    return dataclasses.replace(adapter, **changes)
