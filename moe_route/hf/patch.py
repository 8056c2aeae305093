"""``patch(model)``: run a transformers MoE model's routers through the fused gate.

Patching replaces each router *instance*'s ``forward`` (the class, the module tree, parameters,
buffers and ``state_dict`` are untouched, so transformers' ``isinstance``-based router-logit
capture keeps working) with a forward that computes the family's logits, then ids, weights and
optional statistics in one ``topk_gate`` call, with optional steering. Two families are patched
on the block instead: DBRX's ``route_tokens_to_experts`` (its router returns only logits) and
GPT-OSS's MXFP4 MLP forward (which skips the router's forward); Doge's MoE block, which routes
inside its own forward, is patched as its own router (``adapters.ROUTING_BLOCKS``). Where
accelerate has wrapped a forward (``device_map``, offloading), the patch goes under its hook
(``_old_forward``), so weights are still moved in and outputs out. ``unpatch`` puts back
whatever instance attributes were there before, restoring the original behaviour bit for bit.

Two modes:
    * fast (default): the fused gate picks the ids and computes the weights. Ids are those of the
      unpatched model; weights agree to fp32 rounding (families whose top-k is unsorted, such as
      DeepSeek-V3, get their k ids in descending order instead).
    * ``exact=True``: unsteered routers run their own forward (bit-identical model outputs); the
      gate only accumulates statistics when recording, replaying the ids the router chose (so
      they count torch.topk's choice among exact ties; ``Adapter.ids_at``). Steered routers use
      the fused gate.
"""
from __future__ import annotations

import functools
import numbers
import re
import threading
import types
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence
from typing import Callable, Optional

import torch
from torch import nn

from moe_route.hf.adapters import (BLOCK_FORWARDS, ROUTING_BLOCKS, UNSUPPORTED, Adapter,
                                   UnsupportedModelError, adapter_for, check_block, lookup,
                                   unsupported_reason)
from moe_route.hf.model_calls import watch
from moe_route import reference
from moe_route.nn.router import route
from moe_route.ops import GateStats, SteerSpec, topk_gate

__all__ = ["patch", "unpatch", "PatchHandle", "RouterState", "find_routers", "layer_positions",
           "names_layer", "sites_by_key", "split_site"]

_STATE = "_moe_route_state"
_HANDLE = "_moe_route_patch"
_LOCK = threading.Lock()
_ROUTER_NAME = re.compile(r"(Router|Gate|Gating)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_MISSING = object()
PASS = "@pass"  # a loop layer's pass p is routing site "<router path>@pass<p>"
_SITE = re.compile(r"(.+)@pass(0|[1-9][0-9]*)")


@dataclass(eq=False)
class RouterState:
    """Everything a patched router needs; lives on the router instance until ``unpatch``.

    A router whose layer the model runs several times per forward (``passes`` > 1: a loop layer)
    routes once per *pass*; ``calls`` counts this forward's calls so far (the patch's hook on
    the model zeroes it before each forward). There ``steer``, ``stats`` and ``replay`` may be
    one setting for every pass or a tuple of ``passes`` settings, one per pass, and ``trace`` is
    given the pass's site name (``site``).
    """

    name: str
    index: Optional[int]
    adapter: Adapter
    block: Optional[nn.Module]
    original: Callable
    num_experts: int
    top_k: int
    spec: object
    exact: bool = False
    passes: int = 1
    calls: int = 0
    steer: Optional[SteerSpec] = None
    stats: Optional[GateStats] = None
    groups: Optional[Callable[[int, torch.device], Optional[torch.Tensor]]] = None
    trace: Optional[Callable] = None      # trace(site name, logits, weights, ids, groups)
    # replay(T, device): the [T, k] ids to route this call's tokens to (rows of -1 select as
    # usual), or None
    replay: Optional[Callable[[int, torch.device], Optional[torch.Tensor]]] = None
    steer_stack: list = field(default_factory=list)
    replay_stack: list = field(default_factory=list)

    def __deepcopy__(self, memo):
        raise _not_copied(self.name)

    def __reduce_ex__(self, protocol):
        raise _not_copied(self.name)

    def site(self, p: int) -> str:
        """The name of pass ``p``'s routing: the router's module path, with ``@pass<p>`` for a
        loop layer's router (``model.layers.7.mlp.gate@pass1``)."""
        return self.name if self.passes == 1 else f"{self.name}{PASS}{p}"

    def __call__(self, router, hidden_states, args, kwargs):
        ad = self.adapter
        # activation checkpointing re-runs the router inside backward: route it (steered,
        # replayed) as in the forward, but do not count its tokens a second time
        backward = in_backward()
        p = self._next_pass(backward)
        stats, trace = (None, None) if backward else (self._of(self.stats, p, "stats"), self.trace)
        steer = self._of(self.steer, p, "steering")
        replay = self._of(self.replay, p, "replay")
        if ad.fixed_choice:  # the router's own choice (hash routing), recorded as it is
            refused = "steered" if steer is not None else "replayed" if replay is not None else None
            return self._record_own(hidden_states, args, kwargs, stats, trace, p, refused)
        if self.exact and steer is None and replay is None:
            recording = stats is not None or trace is not None
            drawn = _rng_state(hidden_states.device) if recording and ad.logits_at is None else None
            out = self.original(hidden_states, *args, **kwargs)
            if recording:  # statistics only: the model's output stays the router's own
                z = self._checked(
                    self._own_logits(router, hidden_states, args, kwargs, out, drawn).detach())
                groups = self._groups(z)
                w, ids = topk_gate(z, self.top_k, self._spec_for(z),
                                   selection_bias=ad.selection_bias_of(router, self.block, args),
                                   stats=stats, groups=groups, replay=self._own_ids(out, z))
                if trace is not None:
                    trace(self.site(p), z, w, ids, groups)
            return out
        z = self._checked(ad.logits(router, hidden_states, args, kwargs))
        groups = self._groups(z) if stats is not None or trace is not None else None
        chosen = replay(z.shape[0], z.device) if replay is not None else None
        w, ids = route(z, self.top_k, self._spec_for(z),
                       selection_bias=ad.selection_bias_of(router, self.block, args),
                       steer=steer, stats=stats, groups=groups, replay=chosen,
                       weights_dtype=ad.weights_out_dtype(z, hidden_states))
        if trace is not None:
            trace(self.site(p), z, w, ids, groups)
        if ad.returns is None:
            return z, w, ids
        if ad.weighs_logits:  # a family whose own weights are of the (steered) logits
            kwargs = {**kwargs, "zw": _steered(z, steer)}
        return ad.returns(router, self.block, hidden_states, z, w, ids, *args, **kwargs)

    def _checked(self, z: torch.Tensor) -> torch.Tensor:
        if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{self.name}: the router's logits are {z.dtype}; moe_route routes "
                            f"float32, float16 or bfloat16 logits (convert the model, e.g. "
                            f"model.float(), or run it unpatched)")
        return z

    def _spec_for(self, z: torch.Tensor):
        """The spec for logits ``z``. A router that scores in its logits' dtype (round_scores)
        does so under autocast only where autocast leaves its score op alone: on CUDA it runs
        softmax and softplus in fp32, so the scores are not rounded there."""
        spec = self.spec
        if (spec.round_scores and z.dtype in (torch.float16, torch.bfloat16)
                and torch.is_autocast_enabled(z.device.type)):
            device = z.device.type
            key = (spec.score, device, z.dtype, torch.get_autocast_dtype(device))
            in_fp32 = _AUTOCAST_FP32.get(key)
            if in_fp32 is None:  # asked once: the answer is autocast's op list for the device
                in_fp32 = _AUTOCAST_FP32[key] = \
                    _SCORE_OPS[spec.score](z[:1, :1]).dtype == torch.float32
            if in_fp32:
                return _unrounded(spec)
        return spec

    def _next_pass(self, backward: bool) -> Optional[int]:
        """The pass this call routes: 0 for a router that runs once per forward; None inside a
        backward (activation checkpointing recomputes the passes in another order)."""
        if self.passes == 1:
            return 0
        if backward:
            return None
        p = self.calls % self.passes  # the modulo keeps a forward of a submodel in step too
        self.calls += 1
        return p

    def _of(self, setting, p: Optional[int], what: str):
        """Pass ``p``'s entry of a per-pass setting (a tuple), or the setting itself."""
        if not isinstance(setting, tuple):
            return setting
        if p is not None:
            return setting[p]
        if all(s is setting[0] for s in setting):
            return setting[0]
        raise RuntimeError(f"{self.name}: a loop layer whose passes have different {what} is "
                           f"being recomputed inside backward (activation checkpointing), where "
                           f"which pass a call belongs to is unknown; turn checkpointing off or "
                           f"give every pass the same {what}")

    def _own_logits(self, router, hidden_states, args, kwargs, out, drawn):
        """The logits the router's own forward routed on (exact mode): from its output, else
        recomputed from the RNG state ``drawn`` it started from (a router that jitters its input,
        Switch, draws again on a recompute), putting the RNG back where the router left it."""
        at = self.adapter.logits_at
        if at is not None:
            z = out[at]
            return z.reshape(-1, z.shape[-1])
        device = hidden_states.device
        after = _rng_state(device)
        _set_rng_state(device, drawn)
        try:
            return self.adapter.logits(router, hidden_states, args, kwargs)
        finally:
            _set_rng_state(device, after)

    def _own_ids(self, out, z: torch.Tensor) -> Optional[torch.Tensor]:
        """The ``[T, k]`` ids the router's own forward routed with (exact mode), for the gate to
        replay; None where its output holds none (``Adapter.ids_at``)."""
        at = self.adapter.ids_at
        ids = out[at] if at is not None and isinstance(out, tuple) and len(out) > at else None
        if (not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64)
                or ids.numel() != z.shape[0] * self.top_k):  # the dtypes replay takes
            return None
        return ids.detach().reshape(z.shape[0], self.top_k)

    def _record_own(self, hidden_states, args, kwargs, stats, trace, p, refused):
        if refused is not None:
            raise UnsupportedModelError(f"{self.name} ({self.adapter.name}) does not choose its "
                                        f"experts by score; it cannot be {refused}")
        out = self.original(hidden_states, *args, **kwargs)
        if stats is not None or trace is not None:
            z, w, ids = out[0].reshape(-1, self.num_experts), out[1], out[2]
            groups = self._groups(z)
            if stats is not None:
                reference.accumulate_stats(z.detach().float(), self.spec.score,
                                           w.detach().float(), ids, groups, *stats.buffers())
            if trace is not None:
                trace(self.site(p), z, w, ids, groups)
        return out

    def _groups(self, z):
        if self.groups is None:
            return None
        return self.groups(z.shape[0], z.device)


# The first op of each score, as a family applies it to its logits (sqrt(softplus) rounds after
# softplus already), for _spec_for's look at what autocast makes of it.
_SCORE_OPS = {"softmax": lambda x: torch.softmax(x, dim=-1), "sigmoid": torch.sigmoid,
              "sqrtsoftplus": torch.nn.functional.softplus, "none": lambda x: x}
# {(score, device type, logits dtype, autocast dtype): whether autocast runs the score op in fp32}
_AUTOCAST_FP32: dict = {}


@functools.lru_cache(maxsize=64)
def _unrounded(spec):
    return spec.replace(round_scores=False)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread (activation
    checkpointing recomputes a layer's forward there: in CheckpointFunction.backward with
    use_reentrant=True, in a saved-tensor unpack hook without). torch.compile traces no Python
    backward, so a compiled call is never inside one."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _rng_state(device: torch.device) -> tuple:
    """The CPU generator's state and that of ``device``'s generator (a CUDA device's)."""
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__}: a model with loop layers but no "
                                    f"config saying which layers loop and how many times")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _new_forward(looped: list) -> None:
    """Before a forward of the model: its loop layers start again at pass 0."""
    for state in looped:
        state.calls = 0


def _steered(z: torch.Tensor, steer: Optional[SteerSpec]) -> torch.Tensor:
    """The logits a family's own weights are of (``Adapter.weighs_logits``): ``z`` steered as the
    gate steers it, in its dtype, unless unsteered or ``select_only``; an expert the plan does not
    steer keeps its logit as given."""
    if steer is None or steer.select_only:
        return z
    steered = steer.table(z.shape[-1], z.device).ne(0).any(0)
    return torch.where(steered, steer.apply(z), z).to(z.dtype)


def _patched_forward(self, hidden_states, *args, **kwargs):
    return getattr(self, _STATE)(self, hidden_states, args, kwargs)


class _BlockRoute:
    """The patched routing method of a block whose router returns only logits (DBRX)."""

    def __init__(self, router: nn.Module):
        self.router = router

    def __call__(self, logits, *args, **kwargs):
        return getattr(self.router, _STATE)(self.router, logits, args, kwargs)


def layer_index(name: str) -> Optional[int]:
    """The decoder-layer index in a module path (``model.layers.12.mlp.gate`` -> 12)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def layer_path(name: str) -> str:
    """The path of the layer that holds a router, up to its index (``model.layers.12.mlp.gate``
    -> ``model.layers.12``); the name itself where it holds no index."""
    m = _LAYER_INDEX.search(name)
    return name[:m.end(1)] if m else name


def split_site(name: str) -> tuple[str, Optional[int]]:
    """A routing site's name as (module path, pass): ``"m.gate@pass1"`` -> ``("m.gate", 1)``,
    ``"m.gate"`` -> ``("m.gate", None)`` (``RouterState.site``)."""
    one_pass = _SITE.fullmatch(name)
    return (one_pass.group(1), int(one_pass.group(2))) if one_pass else (name, None)


def names_layer(key, name: Optional[str], index: Optional[int]) -> bool:
    """Whether the layer key ``key`` names the routing site called ``name`` in decoder layer
    ``index``, the rule every ``layers=`` argument follows: an int names every site of that
    decoder layer (each pass of a loop layer's router, an encoder's and a decoder's alike); a str
    names a site by its own name (``m.gate@pass1``), its router's module path (``m.gate``: every
    pass) or its MoE block's path (``m``). A site known only by its index (``name`` None:
    statistics keyed 0..L-1) is named by a str in its decoder layer."""
    if not isinstance(key, str):
        return key == index
    if name is None:
        return index is not None and layer_index(key) == index
    path = split_site(name)[0]
    return key in (name, path, path.rpartition(".")[0])


def layer_positions(names: Sequence[str], layers, where: str, arg: str = "layers", *,
                    indices: Optional[Sequence[Optional[int]]] = None) -> list:
    """Positions in ``names`` (a statistics' or trace's layer names, in order) of the layers that
    ``layers`` names, in the order named. An int is a decoder-layer index (``12`` takes
    ``model.layers.12.mlp.gate``, and every pass of a loop layer's router; ``indices``: each
    layer's, default ``layer_index`` of its name); a str is a layer's name, its router's module
    path (every pass) or its MoE block's path. Unknown layers, an index shared by two routers (an
    encoder's and a decoder's: name one) and a layer named twice raise ValueError starting with
    ``where``; other keys TypeError."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{where}: {arg} must be an iterable of layer keys (decoder-layer indices "
                        f"or module paths), got {layers!r}")
    indices = [layer_index(name) for name in names] if indices is None else list(indices)
    out: list = []
    for key in layers:
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            key = int(key)
        elif not isinstance(key, str):
            raise TypeError(f"{where}: {arg} must hold layer keys, ints (decoder-layer indices) "
                            f"or str (module paths), got {key!r} ({type(key).__name__})")
        hits = [p for p, (name, index) in enumerate(zip(names, indices))
                if names_layer(key, name, index)]
        if isinstance(key, int):
            routers = sorted({split_site(names[p])[0] for p in hits})
            if len(routers) > 1:
                raise ValueError(f"{where}: {arg} holds layer {key}, which is ambiguous "
                                 f"({routers}); name one by its module path")
        if not hits:
            known = sorted({i for i in indices if i is not None})
            raise ValueError(f"{where}: {arg} holds {key!r}, which is not a layer here; the "
                             f"layers are decoder layers {known}, named {list(names[:2])}"
                             f"{' ...' if len(names) > 2 else ''}")
        twice = [p for p in hits if p in out]
        if twice:
            raise ValueError(f"{where}: {arg} names layer {names[twice[0]]!r} twice")
        out.extend(hits)
    return out


def sites_by_key(keys, routers: dict, where: str) -> dict:
    """``{key: (RouterState, pass)}`` for layer keys of a patched model's ``{module path:
    RouterState}``; pass None means every pass of the router.

    An int key is a decoder-layer index (``model.layers.12...`` -> 12); a str key is a router's
    module path or its MoE block's, optionally followed by ``@pass<p>`` for one pass of a loop
    layer's router (``RouterState.site``). Unknown or ambiguous keys and a router (or pass)
    named twice raise ValueError starting with ``where``.
    """
    by_index: dict[int, list] = {}
    for name, state in routers.items():
        if state.index is not None:
            by_index.setdefault(state.index, []).append(name)
    out, seen = {}, {}
    for key in keys:
        p = None
        if isinstance(key, bool) or not isinstance(key, (numbers.Integral, str)):
            raise TypeError(f"{where}: layer keys must be ints (decoder-layer indices) or str "
                            f"(module paths), got {key!r} ({type(key).__name__})")
        if isinstance(key, numbers.Integral):
            names = by_index.get(int(key), [])
            if len(names) > 1:
                raise ValueError(f"{where}: layer {key} is ambiguous ({names}); use a module path")
        else:   # a router's name is its module path: a pass in the key is resolved below
            key_path, p = split_site(key)
            names = [n for n in routers if names_layer(key_path, n, None)]
        if not names:
            raise ValueError(f"{where}: layer {key!r} is not an MoE layer of the model; MoE "
                             f"layers are {sorted(by_index)} (or module paths "
                             f"{list(routers)[:3]}...)")
        name = names[0]
        state = routers[name]
        if p is not None and (state.passes == 1 or p >= state.passes):
            runs = (f"runs {state.passes} passes per forward (@pass0..@pass{state.passes - 1})"
                    if state.passes > 1 else "is not a loop layer: it routes once per forward, "
                    "so its key has no @pass")
            raise ValueError(f"{where}: layer key {key!r} names pass {p}, but {name} {runs}")
        for other in (p, None) if p is not None else [None, *range(state.passes)]:
            if (name, other) in seen:
                raise ValueError(f"{where}: layer keys {seen[name, other]!r} and {key!r} name "
                                 f"the same router {name}"
                                 + ("" if state.passes == 1 else " (or the same pass of it)"))
        seen[name, p] = key
        out[key] = (state, p)
    return out


def _over(state: RouterState, before, values: dict):
    """``before`` with the passes ``values`` names replaced (None: every pass)."""
    if None in values:
        return values[None]
    per = list(before) if isinstance(before, tuple) else [before] * state.passes
    for p, v in values.items():
        per[p] = v
    return tuple(per)


def put(state: RouterState, setting: str, owner, values: dict) -> None:
    """Give a router ``owner``'s ``setting`` ("steer" or "replay"): ``values`` maps a pass to
    its value, None to the value for every pass (``sites_by_key``); passes it does not name keep
    what they had. ``<setting>_stack`` keeps (owner, setting before it, values) for
    ``withdraw``."""
    before = getattr(state, setting)
    getattr(state, f"{setting}_stack").append((owner, before, values))
    setattr(state, setting, _over(state, before, values))


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module, Optional[nn.Module]]]:
    """``(name, router, block)`` for every MoE router in ``model``, in module order.

    A router is a module whose class has an adapter; an MoE block whose router class has none
    (a block with an ``experts`` child and a ``gate``/``router`` child) raises
    ``UnsupportedModelError``, and so does a model with no MoE router at all.
    """
    found, unknown = [], []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        cls = type(module)
        parent = modules.get(name.rpartition(".")[0]) if "." in name else model
        is_router = _ROUTER_NAME.search(cls.__name__) is not None or \
            cls.__name__ in ROUTING_BLOCKS or (
            parent is not None and hasattr(parent, "experts")
            and module in (getattr(parent, "gate", None), getattr(parent, "router", None)))
        if not is_router or cls is nn.Linear:
            continue
        if lookup(cls) is not None:
            found.append((name, module, parent))
        elif hasattr(parent, "experts") or cls.__name__ in UNSUPPORTED:
            reason = unsupported_reason(cls.__name__)
            unknown.append(f"{name} ({cls.__name__}: {reason})")
    if unknown:
        raise UnsupportedModelError(
            f"{type(model).__name__}: unsupported MoE routers: {', '.join(unknown[:4])}"
            f"{' ...' if len(unknown) > 4 else ''}; see moe_route.supported()")
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no MoE router found (see moe_route.supported() for the "
            f"supported families)")
    return found


@dataclass(frozen=True)
class _Before:
    """What one ``patch()`` call changed: whether it created the patch, and else whether the
    patch was explicit and each router's mode before it."""

    created: bool
    explicit: bool = False
    exact: Optional[dict] = None


def _not_copied(name: str) -> TypeError:
    """A patched router holds the patch's state, which refers to the original model: a copy
    would route through it, so the patched model is not copied or pickled at all."""
    return TypeError(f"moe_route: the model is patched ({name}, by patch() or an open record, "
                     f"steer or replay context) and cannot be copied or pickled; copy it before "
                     f"patching or after moe_route.unpatch(model) (save_pretrained works while "
                     f"patched)")


class PatchHandle:
    """The patch of one model: ``remove()`` restores it; leaving a ``with patch(model):`` block
    undoes what that ``patch()`` call did.

    ``routers`` maps each router's module path to its ``RouterState``. ``patch`` on a patched
    model returns the existing handle; a ``with`` block over it then restores the mode and
    leaves the patch in place (to the earlier ``patch()`` call, or to the record/steer/replay
    contexts that use it, which remove it when the last one ends).
    """

    def __init__(self, model: nn.Module, exact: bool):
        self.model = model
        self.routers: dict[str, RouterState] = {}
        self._owners = 0          # record/steer/replay contexts using the patch
        self._explicit = False    # patch() was called by the user
        self._saved: list = []    # (module, attribute, what was there, what was set)
        self._last_call: Optional[_Before] = None   # what the latest patch() call changed
        self._blocks: list = []   # per open ``with`` block: what its patch() call changed
        self._hooks: list = []    # the loop layers' pass counters' reset (model_calls.watch)
        self._cleanups: list = [] # the open contexts' hooks' removal (acquire), run by remove()
        found = find_routers(model)
        for name, router, block in found:
            if _STATE in router.__dict__:   # two patches over one router: each undoes the other
                raise ValueError(
                    f"moe_route: {type(model).__name__}'s router {name} is already patched "
                    f"through another module that holds it (a parent or a submodule of this "
                    f"one, given to patch, record, steer or replay); use one module of the model "
                    f"for all of them")
            adapter = adapter_for(router)
            if adapter.block_method is not None:
                check_block(block, adapter.block_method)
            if type(block).__name__ in BLOCK_FORWARDS:
                check_block(block, "forward")
            index = layer_index(name)
            self.routers[name] = RouterState(
                name=name, index=index, adapter=adapter, block=block,
                original=None, num_experts=adapter.experts(router),
                top_k=adapter.k(router, block), spec=adapter.spec(router, block), exact=exact,
                passes=1 if adapter.passes is None else adapter.passes(_text_config(model), index))
        blocks = {}
        for name, router, block in found:
            state = self.routers[name]
            self._install(router, _STATE, state)
            if state.adapter.block_method is None:
                state.original = self._install(router, "forward",
                                               types.MethodType(_patched_forward, router))
            else:
                state.original = self._install(block, state.adapter.block_method,
                                               _BlockRoute(router))
            if block is not None and type(block).__name__ in BLOCK_FORWARDS:
                blocks[id(block)] = block
        for block in blocks.values():
            self._install(block, "forward",
                          types.MethodType(BLOCK_FORWARDS[type(block).__name__], block))
        looped = [state for state in self.routers.values() if state.passes > 1]
        if looped:
            self._hooks = watch(model, lambda stack, call: _new_forward(looped))
        object.__setattr__(model, _HANDLE, self)

    def sites(self) -> list:
        """``(site name, RouterState, pass)`` of every routing a forward does, in the order it
        does them: routers in module order, a run of consecutive loop-layer routers once per
        pass (pre-loop layers, the loop layers' pass 0, pass 1, ..., post-loop layers)."""
        out, run = [], []
        for state in [*self.routers.values(), None]:
            if run and (state is None or state.passes != run[0].passes):
                out.extend((s.site(p), s, p) for p in range(run[0].passes) for s in run)
                run = []
            if state is not None and state.passes > 1:
                run.append(state)
            elif state is not None:
                out.append((state.name, state, 0))
        return out

    def _install(self, module: nn.Module, attr: str, value) -> Callable:
        """Set an instance attribute, remembering what was there; returns what the attribute
        resolved to before (the original forward or method). A forward wrapped by an accelerate
        hook (which calls ``_old_forward`` between moving inputs and outputs) is patched under
        the hook."""
        if attr == "forward" and {"_hf_hook", "_old_forward"} <= module.__dict__.keys():
            attr = "_old_forward"
        before = module.__dict__.get(attr, _MISSING)
        self._saved.append((module, attr, before, value))
        original = getattr(module, attr, None)
        object.__setattr__(module, attr, value)
        return original

    @property
    def active(self) -> bool:
        return getattr(self.model, _HANDLE, None) is self

    def set_exact(self, exact: bool) -> None:
        for state in self.routers.values():
            state.exact = exact

    def remove(self) -> None:
        """Restore every router's original forward and remove every attribute the patch added."""
        with _LOCK:
            left_open = self._remove()
        if left_open:   # after the model is restored: a warning raised as an error stops nothing
            warnings.warn(f"moe_route: unpatched {type(self.model).__name__} while {left_open} "
                          f"record/steer/replay context(s) on it were open: they stop recording, "
                          f"steering and replaying now", stacklevel=3)

    def _remove(self) -> int:
        """``remove`` under ``_LOCK``; returns how many contexts were still open."""
        if not self.active:
            return 0
        left_open = self._owners
        replaced = []
        try:
            while self._cleanups:
                self._cleanups.pop()()
        finally:
            while self._hooks:
                self._hooks.pop().remove()
            for module, attr, before, installed in reversed(self._saved):
                if not _restore(module, attr, before, installed):
                    replaced.append(f"{type(module).__name__}.{attr}")
            self._saved.clear()
            self.model.__dict__.pop(_HANDLE, None)
        if replaced:  # after the model is restored: a warning raised as an error stops nothing
            warnings.warn(f"moe_route: the patched {', '.join(replaced)} was replaced while "
                          f"patched; unpatch leaves the replacement as it is", stacklevel=4)
        return left_open

    def __enter__(self):
        self._blocks.append(self._last_call)
        self._last_call = None
        return self

    def __exit__(self, *exc):
        before = self._blocks.pop() if self._blocks else None
        with _LOCK:
            if before is None or before.created:  # the block's patch() call patched the model
                self._explicit = False
                self.set_exact(False)  # what record/steer/replay still using it would have made
            else:
                self._explicit = before.explicit
                for name, state in self.routers.items():
                    state.exact = before.exact[name]
            if self._owners == 0 and not self._explicit:  # under the lock: no acquire between
                self._remove()
        return False

    def __repr__(self):
        state = "active" if self.active else "removed"
        return (f"<moe_route patch of {type(self.model).__name__}: {len(self.routers)} routers, "
                f"{state}>")


_FORWARDS = ("forward", "_old_forward")  # an accelerate hook's wrapper calls _old_forward


def _restore(module: nn.Module, attr: str, before, installed) -> bool:
    """Put back what ``attr`` held before the patch set ``installed`` there (``_MISSING``:
    nothing). An accelerate hook added or removed while patched moves the patched forward between
    ``forward`` and ``_old_forward``: the original goes back where it now is. A forward replaced
    by another is left alone: False."""
    held = module.__dict__
    at = attr
    if attr in _FORWARDS and held.get(attr, _MISSING) is not installed:
        at = next((a for a in _FORWARDS if held.get(a, _MISSING) is installed), None)
    if at is None:
        return False
    if at == attr and before is _MISSING:
        held.pop(attr, None)
    elif at == attr:
        object.__setattr__(module, attr, before)
    else:  # moved by a hook added (to _old_forward) or removed (to forward) while patched
        original = before if before is not _MISSING else types.MethodType(
            type(module).forward, module)
        object.__setattr__(module, at, original)
    return True


def patch(model: nn.Module, *, exact: bool = False) -> PatchHandle:
    """Route every MoE router of ``model`` through the fused gate; returns the handle.

    Idempotent: patching a patched model returns its handle (switching its mode to ``exact``).
    Use as a context manager to undo the call on exit: unpatch if it patched the model, else put
    back the mode (and leave the patch to whoever made it: an earlier call, record, steer).
    Raises ``UnsupportedModelError`` for a model with a router moe_route has no adapter for
    (``moe_route.supported()`` lists them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    with _LOCK:
        handle = getattr(model, _HANDLE, None)
        if handle is None:
            handle, before = PatchHandle(model, exact), _Before(created=True)
        else:
            before = _Before(created=False, explicit=handle._explicit,
                             exact={name: s.exact for name, s in handle.routers.items()})
        handle._last_call = before  # what a ``with`` block over this call undoes on exit
        handle.set_exact(exact)
        handle._explicit = True
    return handle


def unpatch(model: nn.Module) -> bool:
    """Undo ``patch(model)``; returns whether the model was patched. Record, steer and replay
    contexts still open on the model (entered and never left) lose their hooks with it, with a
    warning: the model is then as it was before any of them."""
    handle = getattr(model, _HANDLE, None)
    if handle is None:
        return False
    handle.remove()
    return True


def acquire(model: nn.Module, cleanup: Optional[Callable[[], None]] = None) -> PatchHandle:
    """The model's patch for a record/steer/replay context, patching it (fast mode) if needed.
    ``cleanup`` removes what the context put on the model outside the patch (hooks, a wrapped
    ``generate``); ``unpatch`` calls it if the context is still open then."""
    with _LOCK:
        handle = getattr(model, _HANDLE, None) or PatchHandle(model, exact=False)
        handle._owners += 1
        if cleanup is not None:
            handle._cleanups.append(cleanup)
    return handle


def release(handle: PatchHandle, cleanup: Optional[Callable[[], None]] = None) -> None:
    """End a record/steer/replay context's use (``cleanup`` as given to ``acquire``); an
    implicit patch goes when its last user leaves."""
    with _LOCK:
        handle._owners -= 1
        if cleanup in handle._cleanups:   # not after an unpatch() that ran it
            handle._cleanups.remove(cleanup)
        if handle._owners == 0 and not handle._explicit:  # under the lock: no acquire between
            handle._remove()


def withdraw(state: RouterState, setting: str, owner) -> None:
    """Take ``owner``'s ``setting`` ("steer" or "replay") off a router. Contexts may exit out of
    order: the setting becomes the one before the first active context with the values of the
    others still active put over it, in the order they were entered. So a loop layer's pass keeps
    the steering or replay of the latest context still active that names it, and a pass that only
    the leaving context named gets back what it had before."""
    stack = getattr(state, f"{setting}_stack")
    i = next(i for i, (ctx, _, _) in enumerate(stack) if ctx is owner)
    value = base = stack[0][1]  # only the first entry's "before" is read; later ones may be stale
    del stack[i]
    if stack:
        stack[0] = (stack[0][0], base, stack[0][2])
    for _, _, values in stack:
        value = _over(state, value, values)
    setattr(state, setting, value)
