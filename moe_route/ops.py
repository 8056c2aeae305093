"""Public ops: ``topk_gate`` and the descriptions later layers pass around.

``RouterSpec`` says how a model routes (score function, selection, groups, renormalisation,
scale), ``SteerSpec`` how to steer it, ``GateStats`` holds the statistics buffers the gate
accumulates into. The numerics are those of ``moe_route.reference`` (its module docstring).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import operator
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as _forward_ad

from moe_route import _loader, reference
from moe_route._checks import check_bool, check_int, is_int
from moe_route._device import cacheable

__all__ = ["topk_gate", "RouterSpec", "SteerSpec", "GateStats"]


@dataclass(frozen=True)
class RouterSpec:
    """How a router turns logits into (weights, ids); every transformers family is one of these.

    Attributes:
        score: ``"softmax"`` over the E experts, ``"sigmoid"``, ``"sqrtsoftplus"``
            (sqrt(softplus(z)), DeepSeek-V4) or ``"none"`` (the logits themselves).
        select_on: ``"scores"`` (top-k of the scores plus selection bias; weights are the
            chosen scores) or ``"logits"`` (top-k of the logits; weights are the softmax over the
            k chosen logits for score softmax, else the score of each: GPT-OSS, Granite, JetMoE).
        n_group, topk_group, group_score: group-limited selection (DeepSeek-V2 ``"max"``,
            DeepSeek-V3 ``"top2_sum"``); ``n_group=1`` disables it.
        renormalize: divide the k weights by their sum plus ``renorm_eps``.
        scale: multiply the weights last (``routed_scaling_factor``).
        round_scores: the router computes its scores in its logits' dtype (PyTorch ops on fp16 or
            bf16 logits: LFM2, DeepSeek-V4, Zaya, Mistral-4): with half-precision logits the
            selection ranks the scores rounded as those ops round them, so that it picks the
            experts the router picks (``reference``, "Rounded scores"). Weights stay fp32.
    """

    score: str = "softmax"
    select_on: str = "scores"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    renormalize: bool = False
    renorm_eps: float = 0.0
    scale: float = 1.0
    round_scores: bool = False
    _configs: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _plain: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name, allowed in (("score", reference.SCORES), ("select_on", reference.SELECT_ON),
                              ("group_score", reference.GROUP_SCORES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RouterSpec: {name}={getattr(self, name)!r} must be one of "
                                 f"{allowed}")
        n_group = check_int("RouterSpec", "n_group", self.n_group, 1)
        topk_group = check_int("RouterSpec", "topk_group", self.topk_group, 1, n_group,
                               means=f"groups kept of n_group={n_group}")
        object.__setattr__(self, "n_group", n_group)
        object.__setattr__(self, "topk_group", topk_group)
        for name in ("n_group", "topk_group"):
            if not -2 ** 63 <= getattr(self, name) < 2 ** 63:
                raise ValueError(f"RouterSpec: {name}={getattr(self, name)!r} must fit in int64")
        check_bool("RouterSpec", "renormalize", self.renormalize)
        check_bool("RouterSpec", "round_scores", self.round_scores)
        for name in ("renorm_eps", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"RouterSpec: {name} must be a real number, got "
                                f"{type(value).__name__}")
        # Both are used as fp32: beyond FLT_MAX they would be inf there.
        if not (0 <= self.renorm_eps <= reference.FLT_MAX):
            raise ValueError(f"RouterSpec: renorm_eps={self.renorm_eps!r} must be finite in "
                             "float32 and >= 0")
        if not abs(self.scale) <= reference.FLT_MAX:
            raise ValueError(f"RouterSpec: scale={self.scale!r} must be finite in float32")
        # The unsteered native config, used by every plain eager call. Not while torch.compile
        # traces a spec built inside the compiled code: the native object is opaque to it, and
        # compiled calls never use it (topk_gate builds it on first eager use then).
        if _loader.native is not None and not torch.compiler.is_compiling():
            self._native_config(False, False)

    def replace(self, **changes) -> "RouterSpec":
        return dataclasses.replace(self, **changes)

    def op_kwargs(self) -> dict:
        """The spec as keyword arguments of ``torch.ops.moe_route.topk_gate``."""
        return dict(score=self.score, select_on=self.select_on, n_group=self.n_group,
                    topk_group=self.topk_group, group_score=self.group_score,
                    renormalize=self.renormalize, renorm_eps=float(self.renorm_eps),
                    scale=float(self.scale), round_scores=self.round_scores)

    def _native_config(self, select_only: bool, std_unbiased: bool):
        key = (select_only, std_unbiased)  # SteerSpec._config_key
        config = self._configs.get(key)
        if config is None:
            kw = self.op_kwargs()
            config = _loader.native.GateConfig(steer_select_only=select_only,
                                               std_unbiased=std_unbiased, **kw)
            self._configs[key] = config
            if key == (False, False):
                object.__setattr__(self, "_plain", config)
        return config


ExpertValues = Union[torch.Tensor, Sequence[float], Mapping[int, float], None]


@dataclass(frozen=True)
class SteerSpec:
    """Per-expert steering of one router's logits, applied before scoring and selection.

    Each field is None, an ``[E]`` tensor/sequence, or ``{expert: value}``:
        add:   z_e += add_e (constant logit bias)
        std:   z_e += std_e * std(z) (the token's std over the E logits; the paper's soft steering
               uses 0.5 on the chosen experts; population std unless ``std_unbiased``)
        abs:   z_e += abs_e * |z_e| (multiplicative)
        force: > 0 forces the expert into every token's top-k (ranked first, logit set to the
               row max; a group-limited router keeps topk_group groups, those with forced
               experts first), < 0 forces it out (ranked last, logit set to the row min)
    ``select_only``: steering changes which experts are chosen, weights come from the unsteered
    logits (DeepSeek-style bias semantics).

    A SteerSpec is immutable (values are copied at construction), so its device tables can be
    cached; derive variants with ``dataclasses.replace``.
    """

    add: ExpertValues = None
    std: ExpertValues = None
    abs: ExpertValues = None
    force: ExpertValues = None
    select_only: bool = False
    std_unbiased: bool = False
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # The table table() gave last, for topk_gate's fast path (the native call returns None if its
    # E or device is not the logits'), and the key of RouterSpec._native_config for this spec.
    _last: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    _config_key: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in reference.STEER_ROWS:
            object.__setattr__(self, name, _frozen_values(getattr(self, name), name))
        for name in ("select_only", "std_unbiased"):
            check_bool("SteerSpec", name, getattr(self, name))
        object.__setattr__(self, "_config_key", (self.select_only, self.std_unbiased))

    def table(self, num_experts: int, device=None) -> torch.Tensor:
        """The ``[4, E]`` fp32 table the op takes (rows add, std, abs, force); cached per device."""
        device = torch.device(device if device is not None else "cpu")
        key = (num_experts, device)
        cached = self._tables.get(key)
        if cached is None:
            # Never an inference tensor: a table first built under inference_mode is reused
            # outside it, where the differentiable gate saves it for backward.
            with torch.inference_mode(False):
                rows = [_expert_vector(getattr(self, name), num_experts, name)
                        for name in reference.STEER_ROWS]
                cached = torch.stack(rows).to(device)
            if not cacheable(cached):
                return cached
            self._tables[key] = cached
        object.__setattr__(self, "_last", cached)
        return cached

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [T, E]`` as the gate steers them (``reference.steer_logits`` of the sanitised
        logits): fp32, differentiable. ``select_only`` is the caller's to consult."""
        return reference.steer_logits(reference.sanitize(logits),
                                      self.table(logits.shape[-1], logits.device),
                                      self.std_unbiased)[0]


def _frozen_values(values: ExpertValues, name: str):
    """An immutable copy: a tuple of floats, or a tuple of (expert, value) pairs for a mapping."""
    if values is None:
        return None
    if isinstance(values, Mapping):  # {} steers no expert: the same as None
        return _frozen_pairs(values.items(), name) or None
    if isinstance(values, tuple) and values and all(isinstance(v, tuple) for v in values):
        return _frozen_pairs(values, name)  # pairs (what dataclasses.replace passes on)
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"SteerSpec.{name}: expected real numbers, one per expert (a tensor or a "
                        f"sequence), or {{expert: value}}, got {values!r:.80}")
    t = t.to(torch.float32)   # beyond FLT_MAX becomes inf here
    if t.dim() != 1:
        raise ValueError(f"SteerSpec.{name}: expected one value per expert (1-D), got shape "
                         f"{tuple(t.shape)}")
    out = tuple(t.tolist())
    _check_finite(enumerate(out), name)
    return out


def _frozen_pairs(items, name: str) -> tuple:
    """``(expert, value)`` pairs sorted by expert: int experts (a bool is refused: as a tensor
    index it would select every expert), each once, real values."""
    pairs = {}
    for item in items:
        if len(item) != 2:
            raise ValueError(f"SteerSpec.{name}: expected (expert, value) pairs, got {item!r}")
        expert, value = item
        if not is_int(expert):
            raise TypeError(f"SteerSpec.{name}: expert keys must be ints, got {expert!r} "
                            f"({type(expert).__name__})")
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"SteerSpec.{name}: expert {int(expert)}: value must be a number, "
                            f"got {value!r} ({type(value).__name__})")
        if int(expert) in pairs:
            raise ValueError(f"SteerSpec.{name}: expert {int(expert)} is given twice")
        pairs[int(expert)] = float(value)
    out = tuple(sorted(pairs.items()))
    _check_finite(out, name)
    return out


def _check_finite(pairs, name: str) -> None:
    """Steering values are fp32 table entries: a NaN or inf would steer silently (the sanitised
    logit ranks last or clamps), and a mapping value beyond FLT_MAX cannot be stored."""
    for expert, value in pairs:
        if not abs(value) <= reference.FLT_MAX:
            raise ValueError(f"SteerSpec.{name}: expert {expert}: value {value!r} must be finite "
                             f"in float32")


def _expert_vector(values, num_experts: int, name: str) -> torch.Tensor:
    out = torch.zeros(num_experts, dtype=torch.float32)
    if values is None:
        return out
    if values and isinstance(values[0], tuple):
        for expert, value in values:
            if not isinstance(expert, int) or not 0 <= expert < num_experts:
                raise ValueError(f"SteerSpec.{name}: expert {expert!r} must be an int in "
                                 f"[0, {num_experts})")
            out[expert] = value
        return out
    if len(values) != num_experts:
        raise ValueError(f"SteerSpec.{name}: expected {num_experts} values (one per expert), "
                         f"got {len(values)}")
    return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class GateStats:
    """Statistics buffers the gate accumulates into, in place, for G groups and E experts.

    tokens [G] int64, counts [G,E] int64 (tokens whose top-k holds e), prob_sum [G,E] fp32 (sum of
    the dense routing distribution), weight_sum [G,E] fp32 (sum of routed weights),
    entropy_sum [G] fp32 (sum of the dense distribution's entropy, nats), coact [E,E] int64
    (pairs within a token's top-k, over all groups). Any buffer may be None (not accumulated).
    Integer counts are exact. Float sums are bit-reproducible on the CPU (fixed chunking, fixed
    merge order); on CUDA they use float atomics, so the last bits may vary from run to run.
    """

    tokens: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    prob_sum: Optional[torch.Tensor] = None
    weight_sum: Optional[torch.Tensor] = None
    entropy_sum: Optional[torch.Tensor] = None
    coact: Optional[torch.Tensor] = None

    _buffers: tuple = field(default=(), init=False, repr=False, compare=False)

    NAMES = ("tokens", "counts", "prob_sum", "weight_sum", "entropy_sum", "coact")

    def __post_init__(self):
        buffers = tuple(getattr(self, n) for n in self.NAMES)
        for name, b in zip(self.NAMES, buffers):
            if b is not None and not isinstance(b, torch.Tensor):
                raise TypeError(f"GateStats: {name} must be a torch.Tensor or None, got "
                                f"{type(b).__name__}")
        object.__setattr__(self, "_buffers", buffers)

    @classmethod
    def zeros(cls, num_groups: int, num_experts: int, *, device=None, dense: bool = True,
              coact: bool = False) -> "GateStats":
        """Zeroed buffers. ``dense=False`` skips prob_sum/entropy_sum (no E-wide work per token);
        ``coact=True`` adds the [E,E] co-activation counts."""
        G = check_int("GateStats.zeros", "num_groups", num_groups, 1)
        E = check_int("GateStats.zeros", "num_experts", num_experts, 1, reference.MAX_EXPERTS)
        i64 = dict(dtype=torch.int64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            tokens=torch.zeros(G, **i64), counts=torch.zeros(G, E, **i64),
            prob_sum=torch.zeros(G, E, **f32) if dense else None,
            weight_sum=torch.zeros(G, E, **f32),
            entropy_sum=torch.zeros(G, **f32) if dense else None,
            coact=torch.zeros(E, E, **i64) if coact else None)

    def buffers(self) -> tuple:
        """(tokens, counts, prob_sum, weight_sum, entropy_sum, coact), in the op's order."""
        return self._buffers

    def zero_(self) -> "GateStats":
        for b in self.buffers():
            if b is not None:
                b.zero_()
        return self


_DEFAULT_SPEC = RouterSpec()
_NO_STATS = (None,) * 6
# Asked once here: under torch.compile the dispatcher query would break the graph.
_CPU_KERNEL = _loader.has_kernel("topk_gate", "cpu")
_CUDA_KERNEL = _loader.has_kernel("topk_gate", "cuda")
_fast = _loader.native.topk_gate_fast if _loader.native is not None else None
_Tensor = torch.Tensor
_compiling = torch.compiler.is_compiling


def topk_gate(logits: torch.Tensor, k: int, spec: Optional[RouterSpec] = None, *,
              selection_bias: Optional[torch.Tensor] = None, steer: Optional[SteerSpec] = None,
              stats: Optional[GateStats] = None, groups: Optional[torch.Tensor] = None,
              replay: Optional[torch.Tensor] = None, **knobs):
    """Fused top-k gate: ``(weights [T,k] fp32, ids [T,k] int32)``, statistics updated in place.

    Args:
        logits: ``[T, E]`` router logits, fp32/fp16/bf16, any row stride.
        k: experts per token, 1 <= k <= E.
        spec: a ``RouterSpec``; keyword knobs (``score="sigmoid"``, ``n_group=8``, ...) build or
            override one. No spec: softmax over E, top-k of the probabilities, no renormalisation
            (OLMoE / Qwen3-MoE default).
        selection_bias: ``[E]`` fp32 added to the selection values only (DeepSeek-V3
            ``e_score_correction_bias``); never enters the weights.
        steer: a ``SteerSpec``.
        stats: a ``GateStats`` to accumulate into; ``groups`` ``[T]`` int32/int64 assigns each
            token to a group row (-1 skips it; default: all in group 0).
        replay: ``[T, k]`` int32/int64 expert ids (router replay). A row of k distinct ids in
            [0, E) is that token's selection, in that order; its weights and statistics are
            computed from the logits as for a selected row. A row of -1 selects as usual. Any
            other row raises ValueError on the CPU; the CUDA kernel (which cannot raise without
            a host sync) selects it as usual.

    Numerics (details in ``moe_route.reference``): fp32 math; NaN logits rank last (as -FLT_MAX),
    +-inf clamp to +-FLT_MAX; output in descending selection order, equal values to the lower
    expert index, identically on every backend. Weights match the reference to fp32 rounding.

    Gradients: when ``logits`` requires grad (and grad mode is on) or carries a forward-mode
    tangent, the kernel chooses the ids
    and accumulates the statistics, and the weights of those ids are recomputed with
    differentiable PyTorch ops (``reference.gate_weights`` of the sanitised, steered logits), so
    they carry the logits' gradient; they equal the kernel's weights to fp32 rounding. The ids
    and the selection bias get no gradient. ``torch.ops.moe_route.topk_gate`` itself has no
    backward and raises when one would be needed.
    """
    if knobs:
        if spec is not None:
            _check_spec(spec)
        spec = _spec_with_knobs(spec or _DEFAULT_SPEC, knobs)
    elif spec is None:
        spec = _DEFAULT_SPEC
    # _fast itself returns None for a k that is not an int, a device without a kernel, and
    # logits that autograd needs a gradient from: the checked path below handles those.
    if (_fast is not None and type(logits) is _Tensor and _forward_ad._current_level < 0
            and not _compiling()):
        cached = None
        try:
            if steer is None and stats is None:
                out = _fast(logits, k, spec._plain, selection_bias, None, groups, replay, None)
                if out is not None:
                    return out
            else:
                cached = _cached_native(spec, steer, stats)
                if cached is not None:
                    out = _fast(logits, k, cached[0], selection_bias, cached[1], groups, replay,
                                cached[2])
                    if out is not None:
                        return out
        except (TypeError, AttributeError):  # pybind's "incompatible function arguments"
            _check_spec(spec)
            if cached is not None or spec._plain is not None:
                _, steer_table, buffers = cached or (None, None, None)
                _explain_bad_call(logits, k, spec, selection_bias, steer_table, groups,
                                  buffers or _NO_STATS, replay)
                raise
            # a spec built while torch.compile traced has no native config yet: built below
        except ValueError:
            if not getattr(selection_bias, "requires_grad", False):
                raise
            # the kernel refuses a bias that requires grad; below it is detached
    if type(spec) is not RouterSpec:  # type() tests first: these calls take microseconds
        _check_spec(spec)
    if type(k) is not int:
        k = _check_k(k)
    if getattr(selection_bias, "requires_grad", False):
        selection_bias = selection_bias.detach()    # it only selects: it gets no gradient
    if (getattr(logits, "requires_grad", False) and torch.is_grad_enabled()) or \
            (_forward_ad._current_level >= 0 and _has_tangent(logits)):  # no call when off
        return _differentiable_gate(logits, k, spec, selection_bias, steer, stats, groups, replay)
    steer_table, select_only, unbiased = None, False, False
    if steer is not None:
        if not isinstance(steer, SteerSpec):
            raise TypeError(f"topk_gate: steer must be a SteerSpec or None, got "
                            f"{type(steer).__name__}")
        reference.check_logits_shape(logits)  # the table needs E
        steer_table = steer.table(logits.shape[1], logits.device)
        select_only, unbiased = steer.select_only, steer.std_unbiased
    if stats is not None and not isinstance(stats, GateStats):
        raise TypeError(f"topk_gate: stats must be a GateStats or None, got {type(stats).__name__}")
    buffers = stats._buffers if stats is not None else _NO_STATS
    if _eager_native(logits):
        try:
            out = _fast(logits, k, spec._native_config(select_only, unbiased), selection_bias,
                        steer_table, groups, replay, buffers if stats is not None else None)
        except TypeError:
            _explain_bad_call(logits, k, spec, selection_bias, steer_table, groups, buffers,
                              replay)
            raise
        if out is not None:  # None: a call _fast leaves to the dispatcher, not one seen here
            return out
    return _topk_gate_op(logits, k, spec, selection_bias, steer_table, select_only, unbiased,
                         groups, buffers, replay)


def _spec_with_knobs(spec: RouterSpec, knobs: dict) -> RouterSpec:
    """``spec`` with the keyword knobs over it, built once per distinct call: a RouterSpec takes
    about 6 us to build (its checks and native config), more than a decode-sized gate."""
    if not _compiling():  # torch.compile traces the spec's construction instead
        key = tuple((name, type(value), value) for name, value in sorted(knobs.items()))
        try:
            return _cached_spec(spec, key)
        except TypeError:
            pass  # an unhashable value or an unknown knob: built uncached below, for its error
    try:
        return spec.replace(**knobs)
    except TypeError as exc:
        if any(name not in _KNOBS for name in knobs):
            raise TypeError(f"topk_gate: unknown router knob ({exc}); RouterSpec fields are "
                            f"{sorted(_KNOBS)}") from None
        raise


@functools.lru_cache(maxsize=256)
def _cached_spec(spec: RouterSpec, key: tuple) -> RouterSpec:
    # the key holds each value's type: renormalize=1 must not reuse renormalize=True's spec
    return spec.replace(**{name: value for name, _, value in key})


_KNOBS = {f.name for f in dataclasses.fields(RouterSpec) if f.init}


def _check_spec(spec) -> None:
    if not isinstance(spec, RouterSpec):
        raise TypeError(f"topk_gate: spec must be a RouterSpec or None, got {type(spec).__name__}"
                        " (router knobs go in as keywords: topk_gate(logits, k, score=...))")


def _check_k(k) -> int:
    """k as an int (numpy and 0-d integer tensors too); bools and floats are refused."""
    if isinstance(k, torch.Tensor) and (k.dim() != 0 or k.dtype == torch.bool):
        raise TypeError(f"topk_gate: k must be an int, got a {k.dtype} tensor of shape "
                        f"{tuple(k.shape)}")
    if not isinstance(k, bool):
        try:
            return operator.index(k)
        except TypeError:
            pass
    raise TypeError(f"topk_gate: k must be an int, got {type(k).__name__}")


def _differentiable_gate(logits, k, spec, selection_bias, steer, stats, groups, replay):
    """The kernels have no backward: they choose the ids and accumulate the statistics, and the
    weights of those ids are recomputed with differentiable PyTorch ops (``reference.gate_weights``
    of the sanitised, steered logits), so they carry the logits' gradient. The selection bias
    (detached by the caller) only selects."""
    _, ids = topk_gate(logits.detach(), k, spec, selection_bias=selection_bias, steer=steer,
                       stats=stats, groups=groups, replay=replay)
    steered = steer is not None and not steer.select_only
    zw = steer.apply(logits) if steered else reference.sanitize(logits)
    w = reference.gate_weights(zw, ids.long(), spec.score, spec.select_on, spec.renormalize,
                               spec.renorm_eps, spec.scale)
    return w, ids


def _has_tangent(logits) -> bool:
    """Inside a forward-mode AD level (``forward_ad.dual_level``, ``torch.func.jvp`` /
    ``jacfwd``), whether it carries a tangent on ``logits``; the kernel, called outside the
    dispatcher, would drop it and give a zero derivative."""
    return (isinstance(logits, torch.Tensor)
            and _forward_ad.unpack_dual(logits).tangent is not None)


def _cached_native(spec, steer, stats):
    """``(config, steer table, statistics buffers)`` for the pybind call when the spec's native
    config and a steering table are already built, else None: topk_gate's checked path then
    builds and caches them. The table is the one the SteerSpec gave last, whatever its E and
    device: the native call returns None for one that does not fit the logits. A decode-sized
    gate takes about 2 us, and the checked path's steps (the table's device and key, the
    config's key, the type checks) add about 0.5 us to it."""
    if steer is None:
        config, table = spec._plain, None
    elif type(steer) is SteerSpec:
        config, table = spec._configs.get(steer._config_key), steer._last
        if table is None:
            return None
    else:
        return None
    if config is None:
        return None
    if stats is None:
        return config, table, None
    return (config, table, stats._buffers) if type(stats) is GateStats else None


def _explain_bad_call(logits, k, spec, selection_bias, steer_table, groups, buffers, replay):
    """Raise the reference's argument error (it names the argument) if it finds one."""
    reference.check_gate_args(logits, k, spec.score, spec.select_on, selection_bias, spec.n_group,
                              spec.topk_group, spec.group_score, spec.renorm_eps, spec.scale,
                              steer_table, groups, dict(zip(GateStats.NAMES, buffers)),
                              check_group_values=False, replay=replay)


def _eager_native(logits) -> bool:
    """Whether the fast pybind path serves this call: a plain tensor on a device with a kernel,
    outside torch.compile tracing (which must see torch.ops.moe_route.topk_gate)."""
    if _fast is None or type(logits) is not _Tensor or _compiling():
        return False
    return _CPU_KERNEL if logits.is_cpu else logits.is_cuda and _CUDA_KERNEL


def _topk_gate_op(logits, k, spec, selection_bias, steer_table, select_only, unbiased, groups,
                  buffers, replay):
    kwargs = dict(spec.op_kwargs(), selection_bias=selection_bias, steer=steer_table,
                  steer_select_only=select_only, std_unbiased=unbiased, groups=groups,
                  replay=replay, **dict(zip(GateStats.NAMES, buffers)))
    if _loader.native is not None and torch.compiler.is_compiling():
        return torch.ops.moe_route.topk_gate(logits, k, **kwargs)
    if not isinstance(logits, torch.Tensor):
        reference.check_gate_args(logits, k, spec.score, spec.select_on, selection_bias,
                                  spec.n_group, spec.topk_group, spec.group_score,
                                  spec.renorm_eps, spec.scale, steer_table, groups, {},
                                  replay=replay)
    device_type = logits.device.type
    if _loader.has_kernel("topk_gate", device_type):
        return torch.ops.moe_route.topk_gate(logits, k, **kwargs)
    _loader.fallback("topk_gate", device_type)
    return reference.topk_gate(logits, k, **kwargs)


if _loader.native is not None:
    @torch.library.register_fake("moe_route::topk_gate")
    def _topk_gate_fake(logits, k, score="softmax", select_on="scores", selection_bias=None,
                        n_group=1, topk_group=1, group_score="max", renormalize=False,
                        renorm_eps=0.0, scale=1.0, round_scores=False, steer=None,
                        steer_select_only=False, std_unbiased=False, groups=None, replay=None,
                        tokens=None, counts=None, prob_sum=None, weight_sum=None,
                        entropy_sum=None, coact=None):
        stats = dict(tokens=tokens, counts=counts, prob_sum=prob_sum, weight_sum=weight_sum,
                     entropy_sum=entropy_sum, coact=coact)
        reference.check_gate_args(logits, k, score, select_on, selection_bias, n_group,
                                  topk_group, group_score, renorm_eps, scale, steer, groups,
                                  stats, check_group_values=False, replay=replay)
        T = logits.shape[0]
        return (logits.new_empty((T, k), dtype=torch.float32),
                logits.new_empty((T, k), dtype=torch.int32))

    _GATE_ARGS = [a.name for a in torch.ops.moe_route.topk_gate.default._schema.arguments]

    @torch.library.register_vmap("moe_route::topk_gate")
    def _topk_gate_vmap(info, in_dims, *args):
        """``torch.func.vmap``: the samples' tokens routed as one batch of B * T tokens (each
        token is routed on its own), into statistics shared by every sample."""
        given, dims = dict(zip(_GATE_ARGS, args)), dict(zip(_GATE_ARGS, in_dims))
        batched = [name for name in ("selection_bias", "steer", *GateStats.NAMES)
                   if dims.get(name) is not None]
        if batched:
            raise ValueError(f"topk_gate under vmap: {batched[0]} must be the same for every "
                             f"sample (not batched); the statistics of every sample add up in "
                             f"one set of buffers")
        B = info.batch_size
        for name in ("logits", "groups", "replay"):  # [T, ...] per sample -> [B * T, ...]
            t = given.get(name)
            if t is not None:
                t = t.movedim(dims[name], 0) if dims[name] is not None else t.expand(B, *t.shape)
                given[name] = t.reshape(-1, *t.shape[2:])
        k = given["k"]
        w, ids = torch.ops.moe_route.topk_gate(**given)
        return (w.view(B, -1, k), ids.view(B, -1, k)), (0, 0)
