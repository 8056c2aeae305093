"""The ``"moe_route"`` experts implementation for transformers' ``ExpertsInterface``.

After ``import moe_route.nn``, any model whose experts class carries transformers'
``@use_experts_implementation`` decorator can run its experts through the moe_route dispatch ops:

    moe_route.nn.experts.enable(model)      # checks that every experts module will
    # or model.set_experts_implementation("moe_route"), or
    # AutoModelForCausalLM.from_pretrained(..., experts_implementation="moe_route")

transformers accepts a registered implementation for any model and checks nothing: where the
experts class lacks the decorator (DBRX, JetMoE, Llama4, LongCat-Flash, Step3p7, Switch, NLLB) the
model silently keeps its own experts, and Dots3-Note's vision tower keeps ``"grouped_mm"`` because
its experts hold per-layer copies of the config that ``set_experts_implementation`` does not
reach. ``enable`` refuses the first case and sets those copies too.

The forward plans the (token, slot) -> expert-row layout once (``dispatch_plan``), gathers rows
(``permute``), runs the up and down projections as grouped GEMMs over the plan's offsets
(``torch.nn.functional.grouped_mm`` where the device and dtype allow, else one GEMM per expert,
which a compiled graph holds as one op, ``expert_linear``, since its loop reads the offsets; in a
CUDA graph capture, which cannot read them, every expert's GEMM over all rows, masked),
and combines with ``unpermute`` (fp32 accumulation in slot order, no atomics). It honours the
decorator's layout flags: ``has_gate`` (else ``act_fn`` on ``up_proj``), ``has_bias``,
``is_transposed``, the class's own ``_apply_gate`` (GPT-OSS interleaved, clamped gating),
``has_post_expert_norm``, and expert-parallel sentinel ids (>= num_experts get no row).

Numerics against transformers' ``"grouped_mm"``: the GEMMs are the same; the combine differs in that
transformers multiplies by the routing weight in the activation dtype before its fp32 sum, while
``unpermute`` multiplies in fp32, so bf16 outputs can differ in the last bit.
"""
from __future__ import annotations

import importlib.abc
import sys

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
        if torch.is_grad_enabled():
            # Rows of dropped ids (expert-parallel sentinels) hold whatever the GEMM left there;
            # their zero gradient times a NaN there would make the norm's weight gradient NaN.
            y = torch.where(_row_experts(plan, y.shape[0])[:, None] < self.num_experts, y, 0)
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
    elif torch.compiler.is_compiling():  # the loop reads the offsets: an op the graph holds
        out = expert_linear(x, w, plan.expert_offsets)
    elif x.is_cuda and torch.cuda.is_current_stream_capturing():
        out = _masked_expert_linear(x, w, plan)
    else:
        out = _per_expert_linear(x, w, plan.expert_offsets)
    if bias is not None:
        # Rows of dropped ids take a zero bias row: their gradient, which the grouped GEMM's
        # backward leaves unspecified, must not reach a real expert's bias.
        bias = torch.cat([bias, bias.new_zeros((1, bias.shape[-1]))])
        out = out + bias[_row_experts(plan, x.shape[0])]
    return out


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or torch.compiler.is_compiling():
        return False
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16
                                    or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return False  # torch's grouped GEMM on CUDA is bf16; other dtypes read offs on the host
    # grouped_mm wants 16-byte aligned operands (memory-mapped weights may not be) and strides
    # (a bf16 row of 12 features is not), the output's too: its backward takes the output's
    # gradient [rows, out] as an operand
    return (x.device.type in ("cpu", "cuda") and _aligned16(x) and _aligned16(w)
            and w.shape[-1] * w.element_size() % 16 == 0)


def _aligned16(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def _expert_rows(offsets: torch.Tensor) -> tuple[list, int]:
    """``[(e, rows of expert e)]`` for every expert with rows (slices of the plan's rows), and
    where the dropped ids' rows start. Reads the offsets on the host (a sync): only the fallback
    path and the ``expert_linear`` ops do."""
    bounds = offsets.tolist()
    return ([(e, slice(lo, hi)) for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo],
            bounds[-1])


def _per_expert_linear(x, w, offsets):
    out = x.new_empty((x.shape[0], w.shape[-1]))
    experts, dropped = _expert_rows(offsets)
    for e, rows in experts:
        out[rows] = x[rows] @ w[e]
    out[dropped:] = 0  # rows of dropped ids: their gradient must not reach a real row
    return out


def _masked_expert_linear(x, w, plan):
    """``_per_expert_linear`` without reading the offsets on the host, for a CUDA graph capture:
    every expert's GEMM over all the rows, each row keeping its own expert's (E times the work;
    rows of dropped ids are 0)."""
    row_expert = _row_experts(plan, x.shape[0])[:, None]
    out = x.new_zeros((x.shape[0], w.shape[-1]))
    for e in range(w.shape[0]):
        out = torch.where(row_expert == e, x @ w[e], out)
    return out


# The ops read the offsets on the host: tagged, inductor keeps them out of the CUDA graphs it
# captures (mode="reduce-overhead"), where this torch has the tag.
_HOST_READ = ({"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe")
              else {})


@torch.library.custom_op("moe_route::expert_linear", mutates_args=(), **_HOST_READ)
def expert_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e]:offsets[e + 1]`` of ``x [rows, in]`` times ``w[e] [in, out]``, one GEMM
    per expert in ``x``'s dtype (``w`` cast by the caller); the rows past ``offsets[E]`` (dropped
    ids) are 0. ``_per_expert_linear`` as an op, for compiled code: its loop reads the offsets on
    the host, which a graph cannot (a graph break and a sync per layer, or no ``fullgraph``); as
    an op the graph holds one call and the host read happens when it runs. Differentiable in
    ``x`` and ``w``."""
    return _per_expert_linear(x, w, offsets)


@expert_linear.register_fake
def _expert_linear_fake(x, w, offsets):
    return x.new_empty((x.shape[0], w.shape[-1]))


@torch.library.custom_op("moe_route::expert_linear_weight_grad", mutates_args=(), **_HOST_READ)
def _expert_linear_weight_grad(x: torch.Tensor, grad: torch.Tensor,
                               offsets: torch.Tensor) -> torch.Tensor:
    """The gradient of ``expert_linear``'s ``w [E, in, out]``: expert e's rows of ``x`` times
    theirs of ``grad``; zero for an expert with no row."""
    out = x.new_zeros((offsets.shape[0] - 1, x.shape[1], grad.shape[1]))
    for e, rows in _expert_rows(offsets)[0]:
        out[e] = x[rows].transpose(0, 1) @ grad[rows]
    return out


@_expert_linear_weight_grad.register_fake
def _expert_linear_weight_grad_fake(x, grad, offsets):
    return x.new_empty((offsets.shape[0] - 1, x.shape[1], grad.shape[1]))


def _expert_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_linear_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = expert_linear(grad, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _expert_linear_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


expert_linear.register_autograd(_expert_linear_backward, setup_context=_expert_linear_setup)


def _row_experts(plan: DispatchPlan, rows: int) -> torch.Tensor:
    """Expert of each row; E for the unused tail (rows of dropped ids), which is never read."""
    r = torch.arange(rows, device=plan.expert_offsets.device)
    return torch.searchsorted(plan.expert_offsets[1:], r, right=True)


# The attributes transformers' @use_experts_implementation gives an experts instance, which
# experts_forward reads.
_LAYOUT = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "config")


def enable(model: torch.nn.Module) -> list:
    """Run every experts module of a transformers ``model`` through ``"moe_route"``; returns
    their module paths. Raises ValueError, leaving the model as it was, where a module named
    ``experts`` lacks ``@use_experts_implementation`` (it would keep its own forward) or where
    the model has no experts module."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        ALL_EXPERTS_FUNCTIONS = {}
    if NAME not in ALL_EXPERTS_FUNCTIONS.keys():
        raise ValueError("moe_route.nn.experts.enable: transformers is not installed, or its "
                         "ExpertsInterface has no 'moe_route' (import moe_route.nn registers it)")
    ready, other = [], []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in _LAYOUT):
            ready.append((name, module))
        elif name.rpartition(".")[2] == "experts":
            other.append(f"{name} ({type(module).__name__})")
    where = f"moe_route.nn.experts.enable: {type(model).__name__}"
    if other:
        listed = f"{other[:3]}{' ...' if len(other) > 3 else ''}"
        raise ValueError(f"{where} has experts modules {listed} without transformers' "
                         f"@use_experts_implementation; they would keep their own forward "
                         f"(transformers ignores the setting there)")
    if not ready:
        raise ValueError(f"{where} has no experts module with transformers' "
                         f"@use_experts_implementation")
    model.set_experts_implementation(NAME)
    for _, module in ready:  # per-layer config copies (Dots3-Note vision) are not reached
        if module.config._experts_implementation != NAME:
            module.config._experts_implementation = NAME
    return [name for name, _ in ready]


def register() -> bool:
    """Register ``"moe_route"`` with transformers' ExpertsInterface; False without transformers."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, experts_forward)
    return True


# The module of transformers' ExpertsInterface. Importing it imports transformers: about 2.5 s, more
# than the rest of ``import moe_route``.
_INTERFACE = "transformers.integrations.moe"


def register_on_import() -> None:
    """``register`` now if transformers' ExpertsInterface is imported already, else right after
    it is (``import moe_route.nn`` does this, and need not import transformers)."""
    if _INTERFACE in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds no module itself. For transformers' ExpertsInterface module it returns the spec the
    other finders give, with the loader told to ``register`` right after the module has run; it
    then leaves ``sys.meta_path``. A spec asked for and not loaded changes nothing."""

    def find_spec(self, name, path, target=None):
        if name != _INTERFACE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        loader.exec_module = exec_module  # this module's loader only: a finder makes one per spec
        return spec
