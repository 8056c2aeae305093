"""Router adapters: how each transformers router family maps onto the fused gate.

An ``Adapter`` says, for one router forward (research/transformers_moe_map.md §3 names the
semantics groups S1..S7), where the router's parameters live, how its logits are computed (the
dtype recipe of its ``F.linear``), which ``RouterSpec`` reproduces its selection and weights, where
its selection bias lives, and the dtype and layout of what it returns. One adapter object serves
every router class that shares that forward; the registry is keyed by router class name. A few
families need a hook around the gate (Gemma4's normed input, Laguna's softcap, Ernie's clamped
renormalisation, Llama4's dense scores): the hooks run the family's own PyTorch ops, so what the
router returns is still bit-identical where the family computes it outside the gate. DBRX's
router returns only logits: its adapter replaces the block method that routes them. Blocks that
never call their router's forward (GPT-OSS's MXFP4 MLP) get a forward that does
(``BLOCK_FORWARDS``).

Adapters read parameters and buffers from the live module on every call (never a cached copy), so
``model.to(...)``, ``device_map`` placement and in-place weight edits are always seen.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moe_route.nn.router import TopKRouter, router_logits, weights_out_dtype
from moe_route.ops import RouterSpec

__all__ = ["Adapter", "UnsupportedModelError", "adapter_for", "register_adapter", "REGISTRY",
           "UNSUPPORTED", "BLOCK_FORWARDS", "ROUTING_BLOCKS"]


class UnsupportedModelError(ValueError):
    """The model (or one of its MoE layers) has a router moe_route cannot reproduce."""


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _first_attr(obj, names, default=None):
    """The first of the attribute paths ``names`` that is set (not None) on ``obj``."""
    for name in names:
        value = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
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
        linear_dtype, logits_dtype: the logits' dtype recipe (``moe_route.nn.router``);
            ``linear_dtype="weight"`` casts the input to the weight's dtype (MiniMax-M2).
        weights_dtype: ``"logits"``, ``"float32"`` or ``"input"``: the dtype the family's weights
            come back in.
        top_k, num_experts: attribute paths (first one set wins) of k and E on the router (a
            ``top_k`` path starting ``block.`` is read from the MoE block, DBRX's ``moe_top_k``);
            ``top_k`` may instead be an int, for a family with a fixed k (Switch, NLLB, PhiMoE),
            ``num_experts`` a function of the router (Doge's product keys).
        prologue: ``(router, hidden_states) -> hidden_states``, run on the router's input as it
            was passed (before flattening) ahead of the logits: the family's own statements there,
            side effects included. Switch's training noise multiplies the caller's tensor in
            place, so the experts' input changes as it does; Switch and NLLB record the input
            dtype on the router and cast their classifier to router_dtype for good.
        linear: ``(router, x [T, H], *args, **kwargs) -> logits`` (``args``/``kwargs``: the
            router forward's other arguments), replacing the dtype recipe where the family's
            logits are more than one GEMM (Gemma4's norm and scale, Kolibri1's CUDA path).
        pre: ``(router, logits) -> logits`` after the GEMM (Laguna's softcap): what the gate
            routes on and what the router returns as its logits.
        autocast: False for routers that compute their logits with autocast disabled (Ernie).
        returns: ``(router, block, hidden_states, logits, weights, ids, *args, **kwargs) ->
            the router's outputs`` for a family that returns more or other than ``(logits,
            weights, ids)``, or post-processes the gate's weights in PyTorch (Ernie's clamped
            renormalisation); ``args``/``kwargs`` are the router forward's other arguments
            (NLLB's padding mask).
        weighs_logits: the ``returns`` hook computes the weights from logits itself (Llama 4,
            NLLB, PhiMoE, Inkling); it is given them as the keyword ``zw``: the logits steered
            as the gate steers them (unless ``select_only``), so that the weights are those of
            the steered logits, as the gate's are. The logits it returns are the router's own.
        logits_at: the index of the logits in the router's own output (read there, reshaped to
            ``[T, E]``, by exact mode's statistics, so they are those of the draw the model
            routed on); None where the output holds no logits (Gemma4 returns probabilities,
            DBRX's block method is given them): exact mode recomputes them, with the RNG set
            back to where the router drew (so a recompute must not change its input in place).
        ids_at: the index of the ids in the router's own output. Exact mode's statistics and
            trace replay them through the gate, so that they count the experts the model routed
            to, torch.topk's choice among exactly tied scores included. None where the output
            holds no ids to replay (dense or one-hot outputs, a dispatch plan, Zaya's skipped
            slots): there they count the gate's choice, which gives a tie to the lower index.
        fixed_choice: the router's choice is not a top-k of its scores (DeepSeek-V4's hash
            routing): the patch always runs the router's own forward, records the ``(logits,
            weights, ids)`` it returns, and refuses to steer it.
        limits: what does not work or differs for this forward, in a few words for
            ``moe_route.supported()`` ("" when nothing).
        block_method: for a router that returns only its logits and leaves the routing to its
            MoE block (DBRX): the block method, called with those logits, that the gate replaces
            (its ``hidden_states`` are then the logits); None: the gate replaces the router's
            ``forward``.
        passes: ``(text config, decoder-layer index) -> int``: how many times the model runs
            the router's layer per forward (a loop layer, Inkling2-Loop: one routing *pass*
            each); None: once.
    """

    name: str
    group: str
    spec: Callable[[nn.Module, Optional[nn.Module]], RouterSpec]
    weight: str = "weight"
    bias: Optional[str] = None
    selection_bias: Optional[str] = None
    linear_dtype: Union[torch.dtype, str, None] = None
    logits_dtype: Optional[torch.dtype] = None
    weights_dtype: str = "logits"
    top_k: Union[tuple, int] = ("top_k",)
    num_experts: Union[tuple, Callable[[nn.Module], int]] = ("num_experts",)
    prologue: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    linear: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    pre: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    autocast: bool = True
    returns: Optional[Callable[..., tuple]] = None
    weighs_logits: bool = False
    logits_at: Optional[int] = 0
    ids_at: Optional[int] = 2
    fixed_choice: bool = False
    limits: str = ""
    block_method: Optional[str] = None
    passes: Optional[Callable[[object, Optional[int]], int]] = None

    def k(self, router, block: Optional[nn.Module] = None) -> int:
        if isinstance(self.top_k, int):  # a fixed k (Switch's top-1, NLLB's and PhiMoE's top-2)
            return self.top_k
        for name in self.top_k:
            owner, path = (block, name[6:]) if name.startswith("block.") else (router, name)
            if owner is None:
                raise ValueError(f"{type(router).__name__}: k lives on its MoE block "
                                 f"({path}); pass block=")
            k = _first_attr(owner, (path,))
            if k is not None:
                return int(k)
        raise UnsupportedModelError(f"{type(router).__name__}: no top-k attribute "
                                    f"(looked for {', '.join(self.top_k)})")

    def experts(self, router) -> int:
        if callable(self.num_experts):
            return int(self.num_experts(router))
        return int(_first_attr(router, self.num_experts, _attr(router, self.weight).shape[0]))

    def logits(self, router, hidden_states: torch.Tensor, args=(), kwargs=None) -> torch.Tensor:
        if self.block_method is not None:  # the block's method is given the router's logits
            return hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.prologue is not None:
            hidden_states = self.prologue(router, hidden_states)
        w = _attr(router, self.weight)
        x = hidden_states.reshape(-1, w.shape[1])
        if not self.autocast and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._logits(router, w, x, args, kwargs)
        return self._logits(router, w, x, args, kwargs)

    def _logits(self, router, w: torch.Tensor, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        if self.linear is not None:
            z = self.linear(router, x, *args, **(kwargs or {}))
        else:
            b = _attr(router, self.bias) if self.bias else None
            dtype = w.dtype if self.linear_dtype == "weight" else self.linear_dtype
            z = router_logits(x, w, b, dtype, self.logits_dtype)
        return z if self.pre is None else self.pre(router, z)

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
        return weights_out_dtype(self.weights_dtype, logits, hidden_states)

    def build_router(self, router: nn.Module, block: Optional[nn.Module] = None) -> TopKRouter:
        """A standalone ``TopKRouter`` sharing ``router``'s parameters (and selection bias)."""
        if self.block_method is not None:
            raise UnsupportedModelError(
                f"TopKRouter.from_module: {type(router).__name__} returns only its logits and its "
                f"MoE block routes them ({self.block_method}), so no TopKRouter returns what it "
                f"does; use moe_route.patch on the model")
        if self.fixed_choice:
            raise UnsupportedModelError(
                f"TopKRouter.from_module: {type(router).__name__} does not choose by top-k of its "
                f"scores, so no TopKRouter reproduces it")
        hook = next((h for h in ("prologue", "linear", "pre", "returns")
                     if getattr(self, h) is not None), None)
        if hook is not None:
            raise UnsupportedModelError(
                f"TopKRouter.from_module: {type(router).__name__} needs the {self.name!r} "
                f"adapter's {hook!r} hook, which a TopKRouter cannot express; use moe_route.patch")
        w = _attr(router, self.weight)
        E, H = w.shape
        linear_dtype = w.dtype if self.linear_dtype == "weight" else self.linear_dtype
        tk = TopKRouter(H, E, self.k(router, block), self.spec(router, block),
                        linear_dtype=linear_dtype, logits_dtype=self.logits_dtype,
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
    """DeepSeek-V3 noaux_tc: sigmoid, bias for selection, top-2-sum groups, renorm + 1e-20. The
    sigmoid runs in the logits' dtype: fp32, or bf16/fp16 under autocast, which runs the fp32
    GEMM in half precision and leaves the sigmoid there (round_scores)."""
    n_group = int(_first_attr(router, ("num_group", "n_group"), 1))
    return RouterSpec("sigmoid", n_group=n_group,
                      topk_group=int(_first_attr(router, ("topk_group",), 1)),
                      group_score="top2_sum", renormalize=_renorm_flag(router),
                      renorm_eps=1e-20 if _renorm_flag(router) else 0.0,
                      scale=float(_first_attr(router, ("routed_scaling_factor",), 1.0)),
                      round_scores=True)


def _gate(score="softmax", *, select_on="scores", renorm=False, eps=0.0, scale=None,
          round_scores=False):
    """A spec whose settings are constants or read from the router: ``score`` a name or a
    function of the router, ``renorm`` a bool or the name of the router's flag
    (``"norm_topk_prob"``), ``eps`` added to the sum when renormalising, ``scale`` None or the
    name of the router's scale attribute, ``round_scores`` for a router that scores in its
    logits' dtype."""
    def spec(router, block=None) -> RouterSpec:
        on = renorm if isinstance(renorm, bool) else bool(getattr(router, renorm))
        return RouterSpec(score(router) if callable(score) else score, select_on=select_on,
                          renormalize=on, renorm_eps=eps if on else 0.0,
                          scale=float(getattr(router, scale)) if scale else 1.0,
                          round_scores=round_scores)
    return spec


def _s6a(router, block=None) -> RouterSpec:
    """DeepSeek-V2 (DeepseekV2TopkRouter): fp32 softmax, then greedy top-k or group-limited top-k
    (a group scores its max; other groups are zeroed, which no probability can lose to), no
    renormalisation (norm_topk_prob is ignored), times routed_scaling_factor."""
    if router.topk_method == "greedy":
        n_group, topk_group = 1, 1
    elif router.topk_method == "group_limited_greedy":
        n_group, topk_group = int(router.num_group), int(router.topk_group)
    else:
        raise UnsupportedModelError(f"{type(router).__name__}: topk_method="
                                    f"{router.topk_method!r} (only greedy, group_limited_greedy)")
    return RouterSpec("softmax", n_group=n_group, topk_group=topk_group, group_score="max",
                      scale=float(router.routed_scaling_factor))


def _s6b(renorm, round_scores=False):
    """Mistral-4 (Mistral4TopkRouter): softmax, groups score the sum of their top-2
    probabilities (other groups zeroed, which no probability can lose to), renorm + 1e-20 if
    ``renorm(router)``, times routed_scaling_factor; ``round_scores`` when it scores in its
    logits' dtype."""
    def spec(router, block=None) -> RouterSpec:
        on = renorm(router)
        return RouterSpec("softmax", n_group=int(router.num_group),
                          topk_group=int(router.topk_group), group_score="top2_sum",
                          renormalize=on, renorm_eps=1e-20 if on else 0.0,
                          scale=float(router.routed_scaling_factor), round_scores=round_scores)
    return spec


def _cohere2(router, block=None) -> RouterSpec:
    """Cohere2MoeTopKRouter: top-k of the logits, then a softmax over the k (expert_selection_fn
    "softmax") or their sigmoid, renormalised if norm_topk_prob ("sigmoid")."""
    if router.expert_selection_fn == "softmax":
        return RouterSpec("softmax", select_on="logits")
    if router.expert_selection_fn == "sigmoid":
        return RouterSpec("sigmoid", select_on="logits", renormalize=bool(router.norm_topk_prob))
    raise UnsupportedModelError(f"{type(router).__name__}: expert_selection_fn="
                                f"{router.expert_selection_fn!r} (only softmax, sigmoid)")


def _score_fn(router) -> str:
    """The RouterSpec score of a router's ``score_fn`` module (``ACT2FN[config.scoring_func]``)."""
    name = type(router.score_fn).__name__
    score = {"Sigmoid": "sigmoid", "SqrtSoftplusActivation": "sqrtsoftplus"}.get(name)
    if score is None:
        raise UnsupportedModelError(f"{type(router).__name__}: scoring function {name} has no "
                                    f"RouterSpec score (sigmoid, sqrtsoftplus)")
    return score


def _gemma4_linear(router, x, *args, **kwargs):
    # Gemma4TextRouter: scale-free RMSNorm, times a learned scale and hidden_size**-0.5, then proj
    return router.proj(router.norm(x) * router.scale * router.scalar_root_size)


def _gemma4_returns(router, block, hidden_states, z, w, ids):
    # Gemma4TextRouter returns the fp32 probabilities (not the logits) and scales each chosen
    # expert's renormalised weight by its per_expert_scale
    return F.softmax(z, dim=-1, dtype=torch.float32), w * router.per_expert_scale[ids], ids


_MM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


def _kolibri_linear(router, x, *args, **kwargs):
    # Kolibri1TopKRouter: on CUDA, inference in the weight's dtype takes fp32 logits straight
    # from a half-precision GEMM (mm with out_dtype); elsewhere an fp32 GEMM
    w = router.weight
    if x.is_cuda and x.dtype == w.dtype and not torch.is_grad_enabled() and _MM_OUT_DTYPE:
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return router_logits(x, w, None, torch.float32)


def _laguna_softcap(router, z):
    # LagunaTopKRouter: tanh softcap of the fp32 logits, returned as the router logits
    cap = router.router_logit_softcapping
    return torch.tanh(z / cap) * cap if cap > 0.0 else z


def _ernie_returns(router, block, hidden_states, z, w, ids):
    # Ernie4_5_MoeTopKRouter divides by clamp(sum, min=moe_norm_min), not by sum + eps: the gate
    # leaves the chosen probabilities unnormalised and this renormalises them in fp32
    w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=router.norm_min)
    return z, w.to(hidden_states.dtype), ids


def _llama4_returns(router, block, hidden_states, z, w, ids, *, zw):
    # Llama4Router returns (dense scores [T, E], logits): the sigmoid of each chosen (steered)
    # logit, 0 elsewhere (the block runs every expert on score-scaled tokens); rebuilt from the
    # gate's ids with the family's own ops, so both outputs are bit-identical
    scores = torch.full_like(z, float("-inf")).scatter_(1, ids, zw.gather(1, ids))
    return torch.sigmoid(scores.float()).to(scores.dtype), z


def _switch_prologue(router, hidden_states):
    # SwitchTransformersTop1Router ahead of its logits, on the tensor it was given: it records the
    # input dtype, casts the input to router_dtype (the same tensor when the dtypes match, so in
    # an fp32 model the training noise multiplies the caller's tensor in place and the block's
    # experts get the jittered tokens too), and casts its classifier to router_dtype (a bf16
    # model's classifier holds fp32 weights after its first call)
    router.input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(router.dtype)
    if router.training and router.jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - router.jitter_noise,
                                                                  1.0 + router.jitter_noise)
    router.classifier = router.classifier.to(router.dtype)
    return hidden_states


def _nllb_prologue(router, hidden_states):
    # NllbMoeTop2Router ahead of its logits: the input dtype recorded, the classifier cast to
    # router_dtype by the family's own method (which leaves bitsandbytes int8 layers as they are)
    router.input_dtype = hidden_states.dtype
    router._cast_classifier()
    return hidden_states


def _classifier_linear(router, x, *args, **kwargs):
    # SwitchTransformersTop1Router, NllbMoeTop2Router: the input and the classifier in
    # router_dtype (fp32)
    x = x.to(router.dtype)
    c = router.classifier
    b = c.bias.to(router.dtype) if c.bias is not None else None
    return F.linear(x, c.weight.to(router.dtype), b)


def _switch_returns(router, block, hidden_states, z, w, ids, *args, **kwargs):
    # SwitchTransformersTop1Router returns (one-hot dispatch [B, S, E] with the tokens beyond
    # expert_capacity in their sequence masked out, the chosen probability [B, S, 1] in the input
    # dtype, the logits [B, S, E]): the family's capacity cumsum over the gate's top-1 ids
    lead = hidden_states.shape[:-1]
    E = z.shape[-1]
    dispatch = F.one_hot(ids[:, 0], num_classes=E).reshape(*lead, E)
    dispatch = dispatch * (torch.cumsum(dispatch, dim=-2) <= router.expert_capacity)
    return dispatch, w.reshape(*lead, 1), z.reshape(*lead, E)


def _nllb_spec(router, block=None) -> RouterSpec:
    """NllbMoeTop2Router: fp32 softmax top-2 (top-1 by probability, top-2 by logit: the same
    order). Only second_expert_policy "all" is deterministic; "sampling" adds Gumbel noise to the
    logits and "random" drops second choices at random (in eval too), which no gate reproduces."""
    if router.second_expert_policy != "all":
        raise UnsupportedModelError(
            f"{type(router).__name__}: second_expert_policy={router.second_expert_policy!r} "
            f"samples the second expert (only 'all' is deterministic)")
    return RouterSpec("softmax")


def _nllb_returns(router, block, hidden_states, z, w, ids, padding_mask=None, *, zw):
    # NllbMoeTop2Router.route_tokens on the (steered) logits with the top-1/top-2 one-hots taken
    # from the gate's ids (the gate's weights are unused): normalisation before or after dropping, padding masks,
    # batch-prioritised or in-order capacity locations, the eval capacity (moe_eval_capacity_
    # token_fraction, stored on the router as the family does); returns (top-1 mask, combine
    # weights [N, E] in the input dtype, logits)
    if router.second_expert_policy != "all":  # changed after patching
        raise UnsupportedModelError(
            f"{type(router).__name__}: second_expert_policy={router.second_expert_policy!r} "
            f"samples the second expert (only 'all' is deterministic); set after patching")
    E, nb_tokens = router.num_experts, z.shape[0]
    router_probs = F.softmax(zw, dim=-1, dtype=router.dtype).to(hidden_states.dtype)
    top_1_mask = F.one_hot(ids[:, 0], num_classes=E)
    top_2_mask = F.one_hot(ids[:, 1], num_classes=E)
    if router.normalize_router_prob_before_dropping:
        top_1_max_probs, top_2_max_probs = router.normalize_router_probabilities(
            router_probs, top_1_mask, top_2_mask)
    if padding_mask is not None and not router.router_ignore_padding_tokens:
        if len(padding_mask.shape) == 4:
            padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-nb_tokens:]
        non_padding = ~padding_mask.bool()
        top_1_mask = top_1_mask * non_padding.unsqueeze(-1).to(top_1_mask.dtype)
        top_2_mask = top_2_mask * non_padding.unsqueeze(-1).to(top_1_mask.dtype)
    if router.batch_prioritized_routing:
        order = (-1 * router_probs.max(dim=1)[0]).argsort(dim=0)
        back = order.argsort(dim=0)
        sorted_1, sorted_2 = top_1_mask[order], top_2_mask[order]
        locations1 = ((torch.cumsum(sorted_1, dim=0) - 1) * sorted_1)[back]
        locations2 = ((torch.cumsum(sorted_2, dim=0) - 1) * sorted_2)[back]
    else:
        locations1 = torch.cumsum(top_1_mask, dim=0) - 1
        locations2 = torch.cumsum(top_2_mask, dim=0) - 1
    locations2 = locations2 + torch.sum(top_1_mask, dim=0, keepdim=True)
    if not router.training and router.moe_eval_capacity_token_fraction > 0:
        router.expert_capacity = math.ceil(router.moe_eval_capacity_token_fraction * nb_tokens)
    elif router.expert_capacity is None:
        router.expert_capacity = 2 * math.ceil(nb_tokens / E)
    top_1_mask = top_1_mask * torch.lt(locations1, router.expert_capacity)
    top_2_mask = top_2_mask * torch.lt(locations2, router.expert_capacity)
    if not router.normalize_router_prob_before_dropping:
        top_1_max_probs, top_2_max_probs = router.normalize_router_probabilities(
            router_probs, top_1_mask, top_2_mask)
    probs = top_1_max_probs[:, None] * top_1_mask + top_2_max_probs[:, None] * top_2_mask
    return top_1_mask, probs, z.reshape(*hidden_states.shape[:-1], E)


def _phimoe_linear(router, x, *args, **kwargs):
    # PhimoeTopKRouter (an nn.Linear): logits in the model dtype. In training sparsemixer samples
    # both choices (Gumbel) and scales their gradients (Heun's method): not reproducible
    if router.training:
        raise UnsupportedModelError(
            f"{type(router).__name__}: sparsemixer samples its experts in training (Gumbel noise, "
            f"input jitter); moe_route reproduces its eval routing only (call model.eval())")
    return F.linear(x, router.weight, router.bias)


def _phimoe_returns(router, block, hidden_states, z, w, ids, *args, zw, **kwargs):
    # PhimoeTopKRouter's eval sparsemixer on the (steered) logits with the gate's two ids as its
    # choices: each choice's weight is its softmax over the logits within the relative jitter
    # threshold ((z_chosen - z) / max(|z|, z_chosen) <= 2 * router_jitter_noise) of the chosen
    # logit, the first choice masked out of the second's; the family's own ops, so the weights
    # are bit-identical
    eps2 = 2 * router.router_jitter_noise
    first, second = ids[:, :1], ids[:, 1:2]
    with torch.no_grad():
        top = zw.gather(-1, first)
        drop = ((top - zw) / zw.abs().clamp(min=top)) > eps2
    w1 = torch.softmax(zw.masked_fill(drop, float("-inf")), dim=-1).gather(-1, first)
    rest = torch.scatter(zw, -1, first, float("-inf"))
    with torch.no_grad():
        top = rest.gather(-1, second)
        drop = ((top - zw) / zw.abs().clamp(min=top)) > eps2
    w2 = torch.softmax(rest.masked_fill(drop, float("-inf")), dim=-1).gather(-1, second)
    return z, torch.concat((w1, w2), dim=-1), ids


def _jetmoe_returns(router, block, hidden_states, z, w, ids):
    # JetMoeTopKGating returns a dispatch plan, not (logits, weights, ids): the (token, slot)
    # pairs sorted by expert (the family's own unstable sort, so the order is the same), their
    # tokens and weights, the per-expert counts as a host list (the family's .tolist() sync) and
    # the fp32 logits; rebuilt from the gate's ids and weights
    flat = ids.flatten()
    order = flat.sort(0)[1]
    sizes = torch.bincount(flat, minlength=router.num_experts).tolist()
    return order, order.div(router.top_k, rounding_mode="trunc"), w.flatten()[order], sizes, z


def _inkling_linear(router, x, *args, **kwargs):
    # InklingTopkRouter: one fp32 GEMM over the routed and the shared experts' rows (autocast
    # off, see INKLING); the gate routes on the routed experts' logits
    return F.linear(x.float(), router.weight.float())[..., :-router.n_shared_experts]


def _inkling_returns(router, block, hidden_states, z, w, ids, *, zw):
    # InklingTopkRouter's weights: the chosen and the shared experts' sigmoids normalised
    # together (in log space), times route_scale and global_scale; the shared ones come back as a
    # 4th output (the shared experts' gammas). The family's ops on the gate's ids and the
    # (steered) logits, so the weights are bit-identical; the shared logits, never steered, come
    # from the same full GEMM as the family's (a second router GEMM)
    S = router.n_shared_experts
    flat = hidden_states.reshape(-1, router.hidden_dim)
    with torch.autocast(flat.device.type, enabled=False):
        shared = F.linear(flat.float(), router.weight.float())[..., -S:]
        logp = F.logsigmoid(torch.cat([zw.gather(-1, ids), shared], dim=-1))
        w = torch.exp(logp - torch.logsumexp(logp, dim=-1, keepdim=True))
        w = (w * router.route_scale * router.global_scale.float()).to(hidden_states.dtype)
    return z, w[..., :router.top_k].contiguous(), ids, w[..., -S:].contiguous()


def _zaya_state(router, x, router_states=None):
    # ZayaRouter's router hidden states: a down-projection plus the previous MoE layer's state
    # (scaled) from layer 1 on
    h = router.down_proj(x)
    if router.use_eda and router_states is not None:
        h = h + router_states.reshape(h.shape) * router.router_states_scale
    return h


def _zaya_linear(router, x, router_states=None):
    # ZayaRouter: an MLP over the router hidden states gives logits for the experts and a skip
    # class (E + 1 classes)
    return router.router_mlp(_zaya_state(router, x, router_states))


def _zaya_returns(router, block, hidden_states, z, w, ids, router_states=None):
    # ZayaRouter returns (logits, weights, ids, the state for the next MoE layer): a chosen skip
    # class (id E) comes back as expert 0 with weight 0; the state is recomputed on the family's
    # [B, S, .] layout (a second down-projection) so it is bit-identical
    skip = ids == router.config.num_experts
    state = _zaya_state(router, hidden_states, router_states)
    return (z, w.masked_fill(skip, 0), ids.masked_fill(skip, 0),
            state[:, -hidden_states.shape[1]:].clone())


def _dbrx_p(block):
    p = block.moe_normalize_expert_weights if block is not None else 1.0
    if p is not None and not (isinstance(p, (int, float)) and p > 0):
        raise UnsupportedModelError(f"{type(block).__name__}: moe_normalize_expert_weights={p!r} "
                                    f"(a positive p-norm order or None)")
    return p


def _dbrx_spec(router, block=None) -> RouterSpec:
    """DbrxFFN.route_tokens_to_experts: softmax of the router's logits (in their dtype), top-k
    with the block's k, the k probabilities divided by their p-norm (p =
    moe_normalize_expert_weights: 1, the usual renormalisation, in the gate; another p by
    ``_dbrx_returns``; None: unnormalised)."""
    return RouterSpec("softmax", renormalize=_dbrx_p(block) == 1)


def _dbrx_returns(router, block, logits, z, w, ids):
    # DbrxFFN.route_tokens_to_experts returns (weights, ids); a p-norm other than 1 is the
    # family's own torch.norm on the chosen probabilities
    p = block.moe_normalize_expert_weights
    if p is not None and p != 1:
        w = w / torch.norm(w, p=p, dim=-1, keepdim=True)
    return w, ids


def _routed_gpt_oss_mxfp4(block, hidden_states):
    # Mxfp4GptOssMLP.forward routes with a Triton kernel on F.linear of the router's weight (the
    # router's forward never runs) unless its experts are hooked for expert parallelism; the
    # patched block always takes that second path: the router's (patched) forward, then the
    # experts' forward on the ids and weights it returns
    batch_size, H = hidden_states.shape[0], block.router.hidden_dim
    hidden_states = hidden_states.reshape(-1, H)
    logits, weights, ids = block.router(hidden_states)
    out = block.experts(hidden_states, ids, weights)
    return out.reshape(batch_size, -1, H), logits


# The adapters; EXEMPLARS below says which router forward each one reproduces.
SOFTMAX_TOPK = Adapter("softmax_topk", "S1a", _s1(_renorm_flag))
SOFTMAX_TOPK_RENORM_FP32 = Adapter("softmax_topk_renorm", "S1b", _s1(lambda r: True),
                                   weights_dtype="float32")
SOFTMAX_TOPK_RENORM = Adapter("softmax_topk_renorm", "S1b", _s1(lambda r: True))
# HunYuanMoEV1Gate: an fp32 nn.Linear child `wg`; the input follows its dtype
SOFTMAX_TOPK_RENORM_WG = Adapter("softmax_topk_renorm", "S1b", _s1(lambda r: True),
                                 weight="wg.weight", linear_dtype="weight")
# Gemma4TextRouter: normed and scaled input, probabilities returned, per-expert weight scale
SOFTMAX_TOPK_RENORM_GEMMA4 = Adapter("softmax_topk_renorm_scaled", "S1b", _s1(lambda r: True),
                                     weight="proj.weight", linear=_gemma4_linear,
                                     weights_dtype="float32", returns=_gemma4_returns,
                                     top_k=("config.top_k_experts",), logits_at=None)
# LaraMiniTopKRouter: OLMoE's forward with fp32 logits (input and weight cast to fp32) and the
# weights cast to the input dtype
SOFTMAX_TOPK_FP32 = dataclasses.replace(SOFTMAX_TOPK, linear_dtype=torch.float32,
                                        weights_dtype="input")
# JambaTopKRouter: never renormalised; weights in the input dtype
SOFTMAX_TOPK_NO_RENORM = Adapter("softmax_topk", "S1c", _gate(), weights_dtype="input")
TOPK_SOFTMAX_BIAS = Adapter("topk_softmax", "S2",
                            lambda r, b=None: RouterSpec("softmax", select_on="logits"),
                            bias="bias")
# AriaTextTopKRouter: GPT-OSS's forward without the logit bias
TOPK_SOFTMAX = dataclasses.replace(TOPK_SOFTMAX_BIAS, bias=None)
TOPK_SOFTMAX_FP32_LOGITS = Adapter("topk_softmax", "S2",
                                   lambda r, b=None: RouterSpec("softmax", select_on="logits"),
                                   logits_dtype=torch.float32, weights_dtype="input")
# Cohere2MoeTopKRouter: softmax (fp32) or sigmoid of the k chosen logits; input-dtype weights
TOPK_SCORE = Adapter("topk_softmax", "S2", _cohere2, weights_dtype="input")
# OpenAIPrivacyFilterTopKRouter: fp32 logits with bias; the weights are divided by k (its
# block multiplies the expert output by k again)
TOPK_SOFTMAX_PER_K = Adapter("topk_softmax", "S2",
                             lambda r, b=None: RouterSpec("softmax", select_on="logits",
                                                          scale=1.0 / r.top_k),
                             bias="bias", linear_dtype=torch.float32)
# DeepseekV3TopkRouter: the weights follow the logits' dtype (fp32, or bf16 under autocast)
SIGMOID_GROUPED = Adapter("sigmoid_grouped", "S3", _s3,
                          selection_bias="router:e_score_correction_bias",
                          linear_dtype=torch.float32)
# AXK2TopkRouter: the same, grouped only when n_group is set; its apply_group_scoring fills the
# dropped groups' scores with 0.0 instead of -inf, so where a kept expert's biased score (sigmoid +
# e_score_correction_bias) is below 0 it can choose an expert of a dropped group, which the gate
# never does (the same ids whenever k experts of the kept groups score above 0)
SIGMOID_GROUPED_ZERO_FILL = dataclasses.replace(
    SIGMOID_GROUPED, limits="dropped groups filled with 0.0, not -inf: where a kept expert's "
                            "biased score is below 0 the model may choose from a dropped group, "
                            "moe_route does not")
# MiniMaxM2TopKRouter: input in the weight's dtype, fp32 sigmoid, the block's bias as the
# forward's argument, renormalised (no eps); fp32 weights
SIGMOID_TOPK_ARG_BIAS = Adapter("sigmoid_topk", "S4", _gate("sigmoid", renorm=True),
                                selection_bias="arg:0", linear_dtype="weight",
                                weights_dtype="float32")
# MiniMaxM3VLTopKRouter, Step3p7TopKRouter: the same with the bias on the router (the block
# applies the routed scaling factor after the experts)
SIGMOID_TOPK_BIAS = dataclasses.replace(SIGMOID_TOPK_ARG_BIAS,
                                        selection_bias="router:e_score_correction_bias")
# HYV3TopKRouter, Dots3NoteVisionTopKRouter: fp32 logits, the block's bias as an argument,
# renorm + 1e-20, times router_scaling_factor
SIGMOID_TOPK_ARG_BIAS_SCALED = Adapter("sigmoid_topk", "S4",
                                       _gate("sigmoid", renorm=True, eps=1e-20,
                                             scale="router_scaling_factor"),
                                       selection_bias="arg:0", linear_dtype=torch.float32)
# AfmoeTokenChoiceRouter: nn.Linear child `gate`, logits cast to fp32 after the GEMM, the
# block's expert_bias as an argument, renorm + 1e-20, times route_scale
SIGMOID_TOPK_AFMOE = Adapter("sigmoid_topk", "S4",
                             _gate("sigmoid", renorm=True, eps=1e-20, scale="route_scale"),
                             weight="gate.weight", selection_bias="arg:0",
                             logits_dtype=torch.float32)
# Lfm2MoeTopKRouter: all in the model dtype; the block passes its expert_bias, or None when the
# router does not use one; optional renorm + 1e-6, times routed_scaling_factor. A half-precision
# model selects on sigmoids rounded to its dtype plus the fp32 bias, and so does the gate
# (round_scores); the family's exact ties at that precision go to torch.topk's choice, the
# gate's to the lower index.
SIGMOID_TOPK_LFM2 = Adapter("sigmoid_topk", "S4",
                            _gate("sigmoid", renorm="norm_topk_prob", eps=1e-6,
                                  scale="routed_scaling_factor", round_scores=True),
                            selection_bias="arg:0")
# LagunaTopKRouter: fp32 logits after the GEMM, optional tanh softcap, router bias, renorm;
# weights in the input dtype (the block applies its scaling factor after the experts)
SIGMOID_TOPK_SOFTCAP = Adapter("sigmoid_topk", "S4", _gate("sigmoid", renorm=True),
                               selection_bias="router:e_score_correction_bias",
                               logits_dtype=torch.float32, pre=_laguna_softcap,
                               weights_dtype="input")
# MuseSparkTopkRouter: fp32 logits times output_multiplier (returned as the logits),
# renorm + 1e-15, times routed_scaling_factor
SIGMOID_TOPK_MULTIPLIER = Adapter("sigmoid_topk", "S4",
                                  _gate("sigmoid", renorm=True, eps=1e-15,
                                        scale="routed_scaling_factor", round_scores=True),
                                  selection_bias="router:e_score_correction_bias",
                                  linear_dtype=torch.float32,
                                  pre=lambda r, z: z * r.output_multiplier)
# DeepseekV4TopKRouter: score_fn (sigmoid or sqrt(softplus)) in the model dtype (rounded as the
# Lfm2 note says), router bias, renorm + 1e-20, times routed_scaling_factor
SCORE_TOPK_BIAS = Adapter("score_topk", "S4",
                          _gate(_score_fn, renorm=True, eps=1e-20,
                                scale="routed_scaling_factor", round_scores=True),
                          selection_bias="router:e_score_correction_bias")
# DeepseekV4HashRouter: experts from a frozen token-id table (tid2eid[input_ids]), weighted by
# their renormalised scores; its own forward runs and its choice is recorded (no steering)
HASH_CHOICE = dataclasses.replace(SCORE_TOPK_BIAS, name="hash_table", selection_bias=None,
                                  fixed_choice=True,
                                  limits="hash layers: recorded, cannot be steered or replayed")
# Inkling2TopKRouter: the same in fp32
SCORE_TOPK_BIAS_FP32 = dataclasses.replace(SCORE_TOPK_BIAS, linear_dtype=torch.float32)


def _loop_passes(config, index: Optional[int]) -> int:
    """Inkling2-Loop runs decoder layers [loop_layer_index_start, loop_layer_index_end)
    loop_num_passes times per forward, the others once."""
    start, end = config.loop_layer_index_start, config.loop_layer_index_end
    if index is None:
        raise UnsupportedModelError(f"{type(config).__name__}: a router outside model.layers.N, "
                                    f"so which of them are loop layers is unknown")
    return config.loop_num_passes if start <= index < end else 1


# Inkling2LoopTopKRouter: Inkling2's forward, in a model that runs its loop layers
# loop_num_passes times per forward, so each of those routers is called once per pass
SCORE_TOPK_BIAS_FP32_LOOPED = dataclasses.replace(
    SCORE_TOPK_BIAS_FP32, passes=_loop_passes,
    limits="a loop layer routes once per pass: recorded, steered and replayed per pass "
           "(layer@passN); steering one pass differently from another cannot be recomputed "
           "by activation checkpointing")
# Kolibri1TopKRouter: selects on logits + bias, weights are the sigmoid of the chosen logits,
# optionally renormalised (no eps); fp32 logits
LOGIT_BIAS_TOPK_SIGMOID = Adapter("logit_topk_sigmoid", "S4",
                                  _gate("sigmoid", select_on="logits", renorm="norm_topk_prob"),
                                  selection_bias="router:e_score_correction_bias",
                                  linear=_kolibri_linear)
# FlintTopKRouter: fp32 with autocast off, sigmoid top-k without a bias, optional renorm
SIGMOID_TOPK = Adapter("sigmoid_topk", "S4", _gate("sigmoid", renorm="norm_topk_prob"),
                       linear_dtype=torch.float32, autocast=False)
# Ernie4_5_MoeTopKRouter: fp32 with autocast off, softmax + moe_statics bias for selection,
# weights renormalised by clamp(sum, min=moe_norm_min) and cast to the input dtype
SOFTMAX_BIAS_CLAMP_RENORM = Adapter("softmax_bias_topk", "S5", _gate(),
                                    selection_bias="router:moe_statics.e_score_correction_bias",
                                    linear_dtype=torch.float32, weights_dtype="float32",
                                    autocast=False, returns=_ernie_returns)
# LongcatFlashTopkRouter: fp32 softmax over the routed plus the identity ("zero") experts, router
# bias, times routed_scaling_factor; the classifier's own bias is not used
SOFTMAX_BIAS_SCALED = Adapter("softmax_bias_topk", "S5", _gate(scale="routed_scaling_factor"),
                              weight="classifier.weight",
                              selection_bias="router:e_score_correction_bias",
                              linear_dtype=torch.float32, num_experts=("n_routed_experts",))
# DeepseekV2TopkRouter: fp32 softmax, greedy or group-max limited top-k, scaled
SOFTMAX_GROUPED_MAX = Adapter("softmax_grouped", "S6a", _s6a, linear_dtype=torch.float32)
# Mistral4TopkRouter: softmax and the groups' top-2 sums in the model dtype (rounded as the Lfm2
# note says), optional renorm, scaled
SOFTMAX_GROUPED = Adapter("softmax_grouped", "S6b", _s6b(_renorm_flag, round_scores=True))
# MistralLarge4TextTopkRouter: the same in fp32, always renormalised
SOFTMAX_GROUPED_FP32 = Adapter("softmax_grouped", "S6b", _s6b(lambda r: True),
                               linear_dtype=torch.float32)
# Llama4Router (an nn.Linear): top-k of the logits, sigmoid of each; dense scores returned
LOGIT_TOPK_DENSE_SIGMOID = Adapter("logit_topk_dense_sigmoid", "S7",
                                   lambda r, b=None: RouterSpec("sigmoid", select_on="logits"),
                                   returns=_llama4_returns, weighs_logits=True, logits_at=1,
                                   ids_at=None)
# record's statistics and trace hold each token's choice; Switch and NLLB then drop the tokens
# beyond an expert's capacity
_CAPACITY_LIMIT = "record counts tokens dropped for expert capacity as routed to their choice"
# SwitchTransformersTop1Router: fp32 softmax top-1 (the weight is the chosen probability, in the
# input dtype); the one-hot dispatch with its per-sequence expert capacity is rebuilt from the
# gate's id. The gate's statistics count that id for every token, so a token the dispatch drops
# for capacity is still counted (a limit). (A half-precision model takes the argmax of
# probabilities rounded to its dtype, the gate of fp32 ones: experts closer than that rounding
# may swap.)
SWITCH_TOP1 = Adapter("switch_top1", "S7", lambda r, b=None: RouterSpec("softmax"),
                      weight="classifier.weight", weights_dtype="input", top_k=1,
                      prologue=_switch_prologue, linear=_classifier_linear,
                      returns=_switch_returns, logits_at=2, ids_at=None,
                      limits=_CAPACITY_LIMIT)
# NllbMoeTop2Router: fp32 softmax top-2 (second_expert_policy "all" only); the family's masks,
# capacity and combine weights rebuilt from the gate's ids (the Switch caveats on half precision
# and on capacity drops in the statistics apply)
NLLB_TOP2 = Adapter("nllb_top2", "S7", _nllb_spec, weight="classifier.weight",
                    weights_dtype="input", top_k=2, prologue=_nllb_prologue,
                    linear=_classifier_linear,
                    returns=_nllb_returns, weighs_logits=True, logits_at=2, ids_at=None,
                    limits=f"second_expert_policy 'all' only (the others sample); "
                           f"{_CAPACITY_LIMIT}")
# PhimoeTopKRouter: top-2 of the logits (sparsemixer's eval choices), weights rebuilt by the
# family's sparsemixer from the gate's ids; eval only. Sparsemixer always picks two experts: the
# router's top_k (num_experts_per_tok) is passed to it and ignored, so k is fixed like NLLB's.
# The gate (and so the statistics) sees a plain softmax top-2: same ids, its weights are the
# full-softmax probabilities, not sparsemixer's masked ones
SPARSEMIXER = Adapter("sparsemixer", "S7", lambda r, b=None: RouterSpec("softmax"), top_k=2,
                      linear=_phimoe_linear, returns=_phimoe_returns, weighs_logits=True,
                      limits="eval only (training samples its experts)")
# JetMoeTopKGating: fp32 logits after the GEMM, top-k of the logits, softmax over the k in fp32,
# weights in the input dtype; its dispatch plan (used by both its MLP and attention experts) is
# rebuilt from the gate's ids
JETMOE = Adapter("topk_softmax_plan", "S2",
                 lambda r, b=None: RouterSpec("softmax", select_on="logits"),
                 weight="layer.weight", logits_dtype=torch.float32, weights_dtype="input",
                 returns=_jetmoe_returns, logits_at=4, ids_at=None)
# InklingTopkRouter: fp32 with autocast off, sigmoid of the routed logits plus a selection bias;
# weights normalised together with the shared experts' (the returns hook)
INKLING = Adapter("sigmoid_topk_shared_norm", "S7", _gate("sigmoid"),
                  selection_bias="router:e_score_correction_bias", linear=_inkling_linear,
                  autocast=False, returns=_inkling_returns, weighs_logits=True)
# ZayaRouter: MLP logits over E experts and a skip class, softmax in the model dtype (rounded as
# the Lfm2 note says), selection on the probabilities plus balancing_biases (the skip class's -1
# keeps it out unless steered or trained in), weights the unrenormalised probabilities; the
# statistics count the skip class as expert E
ZAYA = Adapter("softmax_topk_skip", "S5", _gate(round_scores=True), weight="down_proj.weight",
               selection_bias="router:balancing_biases", num_experts=("num_router_classes",),
               linear=_zaya_linear, returns=_zaya_returns, ids_at=None)
# DbrxRouter returns only its logits; the gate replaces DbrxFFN.route_tokens_to_experts, which
# routes them (softmax in the logits' dtype, then top-k without a bias: half-precision
# probabilities order the experts as the logits do, except where they tie at that precision,
# which the model leaves to torch.topk and the gate gives to the higher logit)
DBRX = Adapter("dbrx_softmax_topk", "S1d", _dbrx_spec, weight="layer.weight",
               top_k=("block.top_k",), returns=_dbrx_returns, logits_at=None, ids_at=1,
               block_method="route_tokens_to_experts")

# DogeCDMoE has no router module: the block routes by product keys. router_gate's output, viewed
# as the model views it ([2, T, sqrt(E)]: the view runs across tokens, so a token's two key
# halves may come from other tokens' rows, as in the model), gives each token key scores x and y;
# expert i*sqrt(E) + j scores x_i + y_j. The model takes the top sqrt(E) of each half and the
# top-k of their sums, which is the top-k of all sqrt(E)^2 sums when k <= sqrt(E); weights are
# the softmax over the k. The block is patched as its own router: the gate routes the dense sums,
# the returns hook runs the block's expert embeddings and shared MLP.
def _doge_keys(block) -> int:
    nk = block.num_keys
    if block.top_k > nk:
        raise UnsupportedModelError(f"{type(block).__name__}: top_k={block.top_k} is more than "
                                    f"its sqrt(num_experts)={nk} keys per half, where the model's "
                                    f"product-key search is not the top-k of all the sums")
    return nk


def _doge_experts(block) -> int:
    return _doge_keys(block) ** 2  # num_experts beyond the square of the keys are never reached


def _doge_halves(block, x: torch.Tensor) -> torch.Tensor:
    return block.router_gate(x).view(2, x.shape[0], -1)


def _doge_linear(block, x, *args, **kwargs):
    kx, ky = _doge_halves(block, x)
    return (kx.unsqueeze(-1) + ky.unsqueeze(-2)).flatten(1)  # [T, nk * nk], the model's dtype


def _doge_returns(block, parent, hidden_states, z, w, ids, *args, **kwargs):
    B, S, H = hidden_states.shape
    x = hidden_states.reshape(B * S, H)
    ids = ids.long()
    chosen = block.act_fn(block.down_embed(ids) @ x.unsqueeze(-1)).squeeze(-1) * w
    routed = (chosen.unsqueeze(1) @ block.up_embed(ids)).view(B, S, H)
    shared = block.down_proj(block.act_fn(block.gate_proj(hidden_states))
                             * block.up_proj(hidden_states))
    return shared + routed, _doge_halves(block, x)


PRODUCT_KEYS = Adapter("product_key_topk_softmax", "S7",
                       lambda r, b=None: RouterSpec("softmax", select_on="logits",
                                                    renormalize=bool(r.norm_topk_prob)),
                       weight="router_gate.weight", num_experts=_doge_experts,
                       linear=_doge_linear, returns=_doge_returns, logits_at=None, ids_at=None,
                       limits="the block is its router (experts i*sqrt(E)+j of the product keys); "
                              "needs top_k <= sqrt(num_experts); on CUDA num_experts <= 16384 "
                              "(the config default) and top_k <= 256")

# Each adapter is defined by the forward of one exemplar router class (module, class). Any other
# router class whose forward has the same syntax tree (transformers copies router code between
# families with "# Copied from"/modular) gets the same adapter: see ``adapter_for``.
EXEMPLARS: dict[str, tuple[Adapter, str]] = {
    "OlmoeTopKRouter": (SOFTMAX_TOPK, "olmoe"),
    "LaraMiniTopKRouter": (SOFTMAX_TOPK_FP32, "lara_mini"),
    "MixtralTopKRouter": (SOFTMAX_TOPK_RENORM_FP32, "mixtral"),
    "Qwen3VLMoeTextTopKRouter": (SOFTMAX_TOPK_RENORM, "qwen3_vl_moe"),
    "HunYuanMoEV1Gate": (SOFTMAX_TOPK_RENORM_WG, "hunyuan_v1_moe"),
    "Gemma4TextRouter": (SOFTMAX_TOPK_RENORM_GEMMA4, "gemma4"),
    "JambaTopKRouter": (SOFTMAX_TOPK_NO_RENORM, "jamba"),
    "GptOssTopKRouter": (TOPK_SOFTMAX_BIAS, "gpt_oss"),
    "AriaTextTopKRouter": (TOPK_SOFTMAX, "aria"),
    "GraniteMoeTopKRouter": (TOPK_SOFTMAX_FP32_LOGITS, "granitemoe"),
    "Cohere2MoeTopKRouter": (TOPK_SCORE, "cohere2_moe"),
    "OpenAIPrivacyFilterTopKRouter": (TOPK_SOFTMAX_PER_K, "openai_privacy_filter"),
    "DeepseekV3TopkRouter": (SIGMOID_GROUPED, "deepseek_v3"),
    # BeamTopKRouter: sorted top-k, no scaling factor on the router (its block scales)
    "BeamTopKRouter": (SIGMOID_GROUPED, "beam"),
    "AXK2TopkRouter": (SIGMOID_GROUPED_ZERO_FILL, "axk2"),
    "MiniMaxM2TopKRouter": (SIGMOID_TOPK_ARG_BIAS, "minimax_m2"),
    "MiniMaxM3VLTopKRouter": (SIGMOID_TOPK_BIAS, "minimax_m3_vl"),
    "HYV3TopKRouter": (SIGMOID_TOPK_ARG_BIAS_SCALED, "hy_v3"),
    "AfmoeTokenChoiceRouter": (SIGMOID_TOPK_AFMOE, "afmoe"),
    "Lfm2MoeTopKRouter": (SIGMOID_TOPK_LFM2, "lfm2_moe"),
    "LagunaTopKRouter": (SIGMOID_TOPK_SOFTCAP, "laguna"),
    "MuseSparkTopkRouter": (SIGMOID_TOPK_MULTIPLIER, "muse_spark"),
    "DeepseekV4TopKRouter": (SCORE_TOPK_BIAS, "deepseek_v4"),
    "DeepseekV4HashRouter": (HASH_CHOICE, "deepseek_v4"),
    "Inkling2TopKRouter": (SCORE_TOPK_BIAS_FP32, "inkling2"),
    "Inkling2LoopTopKRouter": (SCORE_TOPK_BIAS_FP32_LOOPED, "inkling2_loop"),
    "Kolibri1TopKRouter": (LOGIT_BIAS_TOPK_SIGMOID, "kolibri1"),
    "FlintTopKRouter": (SIGMOID_TOPK, "flint"),
    "Ernie4_5_MoeTopKRouter": (SOFTMAX_BIAS_CLAMP_RENORM, "ernie4_5_moe"),
    "LongcatFlashTopkRouter": (SOFTMAX_BIAS_SCALED, "longcat_flash"),
    "DeepseekV2TopkRouter": (SOFTMAX_GROUPED_MAX, "deepseek_v2"),
    "Mistral4TopkRouter": (SOFTMAX_GROUPED, "mistral4"),
    "MistralLarge4TextTopkRouter": (SOFTMAX_GROUPED_FP32, "mistral_large4"),
    "Llama4Router": (LOGIT_TOPK_DENSE_SIGMOID, "llama4"),
    "SwitchTransformersTop1Router": (SWITCH_TOP1, "switch_transformers"),
    "NllbMoeTop2Router": (NLLB_TOP2, "nllb_moe"),
    "PhimoeTopKRouter": (SPARSEMIXER, "phimoe"),
    "DbrxRouter": (DBRX, "dbrx"),
    "JetMoeTopKGating": (JETMOE, "jetmoe"),
    "InklingTopkRouter": (INKLING, "inkling"),
    "ZayaRouter": (ZAYA, "zaya"),
    "DogeCDMoE": (PRODUCT_KEYS, "doge"),
}

# MoE blocks that route inside their own forward, with no router module: patched as their own
# router (the adapter's returns hook does the rest of the block).
ROUTING_BLOCKS = frozenset({"DogeCDMoE"})

# MoE block classes whose forward does not call the router's forward, with the forward the patch
# gives them instead (what they do with every router call going through the router).
BLOCK_FORWARDS: dict[str, Callable] = {
    "Mxfp4GptOssMLP": _routed_gpt_oss_mxfp4,
}

# Router class name -> adapter: the exemplars, plus classes matched or registered since.
REGISTRY: dict[str, Adapter] = {name: adapter for name, (adapter, _) in EXEMPLARS.items()}

# Router classes moe_route knows and cannot reproduce, with the reason: filled by ``lookup`` with
# classes whose code changed (``unvalidated``); ``register_adapter`` removes an entry.
UNSUPPORTED: dict[str, str] = {}

# Class names given an adapter by ``register_adapter``: trusted whatever their code.
_USER_REGISTERED: set[str] = set()


def register_adapter(router_class: str, adapter: Adapter) -> None:
    """Route ``router_class`` (a class name) through ``adapter``; replaces any earlier entry."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter: adapter must be an Adapter, got "
                        f"{type(adapter).__name__}")
    REGISTRY[router_class] = adapter
    _USER_REGISTERED.add(router_class)
    UNSUPPORTED.pop(router_class, None)


def _canonical(node) -> str:
    """An AST as text, the same on every Python version this package supports: fields that are
    empty or None are left out (Python 3.13's ``ast.dump`` drops them, 3.11's prints them) and so
    are the ones that do not change what the code does (type comments, string kinds, 3.12's
    type parameters)."""
    if isinstance(node, ast.AST):
        fields = [f"{f}={_canonical(v)}" for f in node._fields
                  if f not in _IGNORED_FIELDS and (v := getattr(node, f, None)) is not None
                  and not (isinstance(v, list) and not v)]
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(_canonical(v) for v in node)}]"
    return repr(node)


_IGNORED_FIELDS = frozenset({"type_comment", "kind", "type_params"})


@functools.lru_cache(maxsize=None)
def forward_key(cls: type, method: str = "forward") -> Optional[str]:
    """The parameter names and syntax tree of ``cls.<method>``'s body (docstring, comments,
    layout and annotations ignored); None where the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    except (AttributeError, OSError, TypeError):
        return None
    func = ast.parse(source).body[0]
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    args = [a.arg for a in func.args.args]
    return repr(args) + _canonical(body)


@functools.lru_cache(maxsize=None)
def fingerprint(cls: type, method: str = "forward") -> Optional[str]:
    """A short hash of ``forward_key(cls, method)``: what ``validated.FINGERPRINTS`` holds."""
    key = forward_key(cls, method)
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:16]


def unvalidated(cls: type, method: str = "forward") -> Optional[str]:
    """Why moe_route does not trust ``cls.<method>``, or None. Code that an adapter was written
    against (the exemplars, patched block methods) is trusted only where its fingerprint is one
    the test suite passed with: a class of the same name whose code changed in another
    transformers release would otherwise be routed by rules written for different code."""
    from moe_route.hf import validated  # here: `python -m moe_route.hf.validated` imports this

    name = f"{cls.__name__}.{method}"
    known = validated.FINGERPRINTS.get(name)
    if known is None or cls.__name__ in _USER_REGISTERED or fingerprint(cls, method) in known:
        return None
    import transformers

    return (f"{name} in transformers {transformers.__version__} is not the code moe_route was "
            f"tested against (transformers {', '.join(validated.TRANSFORMERS)}); "
            f"moe_route.hf.register_adapter overrides this")


def transformers_class(module: str, name: str) -> tuple[Optional[type], Optional[str]]:
    """``(class, None)`` for class ``name`` of transformers module ``module``, or ``(None, why)``
    when the installed release lacks the module or the class."""
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        return None, f"cannot import {module} ({exc})"
    cls = getattr(found, name, None)
    return cls, None if cls is not None else f"{name} not found in transformers"


def family_module(family: str) -> str:
    """The modeling module of a transformers model_type."""
    return f"transformers.models.{family}.modeling_{family}"


@functools.lru_cache(maxsize=None)
def _exemplar_keys() -> tuple:
    keys = []
    for name, (adapter, family) in EXEMPLARS.items():
        cls, _ = transformers_class(family_module(family), name)  # None: not in this release
        if cls is not None and unvalidated(cls) is None:
            keys.append((forward_key(cls), adapter))
    return tuple(keys)


def lookup(router_cls: type) -> Optional[Adapter]:
    """The adapter of a router class, by name or by the syntax tree of its forward; None if none
    (or if the class's code is not the code its adapter was tested with: ``unvalidated``)."""
    name = router_cls.__name__
    reason = unvalidated(router_cls)
    if reason is not None:
        UNSUPPORTED.setdefault(name, reason)
        return None
    adapter = REGISTRY.get(name)
    if adapter is None and name not in UNSUPPORTED:
        key = forward_key(router_cls)
        adapter = next((a for k, a in _exemplar_keys() if key is not None and k == key), None)
        if adapter is not None:
            REGISTRY[name] = adapter
    return adapter


def unsupported_reason(name: str) -> str:
    """Why the router class ``name`` has no adapter: its ``UNSUPPORTED`` entry, else that no
    exemplar forward matches its own (naming the tested transformers releases when another one is
    installed, whose changed exemplars match nothing)."""
    if name in UNSUPPORTED:
        return UNSUPPORTED[name]
    import transformers

    from moe_route.hf import validated

    if transformers.__version__ in validated.TRANSFORMERS:
        return "no adapter matches its forward"
    return (f"no adapter matches its forward in transformers {transformers.__version__} "
            f"(moe_route was tested against transformers {', '.join(validated.TRANSFORMERS)})")


def check_block(block: nn.Module, method: str) -> None:
    """Raise ``UnsupportedModelError`` if the block method a patch replaces is not the code it
    was tested against (``unvalidated``)."""
    reason = unvalidated(type(block), method)
    if reason is not None:
        raise UnsupportedModelError(f"{type(block).__name__}: {reason}")


def adapter_for(router: nn.Module) -> Adapter:
    adapter = lookup(type(router))
    if adapter is None:
        name = type(router).__name__
        reason = unsupported_reason(name)
        raise UnsupportedModelError(f"{name}: {reason} (see moe_route.supported())")
    return adapter
