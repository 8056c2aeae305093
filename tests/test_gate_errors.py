"""Bad arguments raise ValueError/TypeError naming the argument, identically in the C++ op, the
fake (meta) kernel, the public API and the reference."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import moe_route
from conftest import HAS_CPU_KERNEL, OP, STAT_NAMES
from moe_route import reference as R

NAN, INF = float("nan"), float("inf")
T, E = 5, 8
i64, f32 = torch.int64, torch.float32


def z(*shape, dtype=f32):
    return torch.zeros(shape, dtype=dtype)


def logits():
    return torch.randn(T, E, generator=torch.Generator().manual_seed(0))


# Storage that two arguments of one case share (no case writes them: each call raises first).
_SHARED_TE, _SHARED_1E, _SHARED_2E = z(T, E), z(1, E), z(2, E)
_SHARED_I64 = z(E + 1, E, dtype=i64)
# Two tensors over one numpy array: two storages, one memory.
_NUMPY_I64 = np.zeros(2 * E, dtype=np.int64)

# (id, logits, k, kwargs, exception, regex on the message). kwargs use the flat op signature.
CASES = [
    ("logits_rank1", z(E), 2, {}, ValueError, r"logits must be 2-D"),
    ("logits_rank3", z(2, T, E), 2, {}, ValueError, r"logits must be 2-D"),
    ("logits_int64", z(T, E, dtype=i64), 2, {}, TypeError, r"logits must be float32"),
    ("logits_fp64", z(T, E, dtype=torch.float64), 2, {}, TypeError, r"logits must be float32"),
    ("logits_bool", z(T, E, dtype=torch.bool), 2, {}, TypeError, r"logits must be float32"),
    ("logits_no_experts", z(T, 0), 1, {}, ValueError, r"logits must have at least one expert"),
    ("k_zero", None, 0, {}, ValueError, r"k=0 must be in \[1, num_experts=8\]"),
    ("k_negative", None, -3, {}, ValueError, r"k=-3 must be in"),
    ("k_above_E", None, 9, {}, ValueError, r"k=9 must be in \[1, num_experts=8\]"),
    ("score", None, 2, dict(score="softmax2"), ValueError, r"score='softmax2' must be one of"),
    ("select_on", None, 2, dict(select_on="probs"), ValueError, r"select_on='probs' must be"),
    ("group_score", None, 2, dict(group_score="mean"), ValueError, r"group_score='mean' must"),
    ("n_group_zero", None, 2, dict(n_group=0), ValueError, r"n_group=0 must be (an int )?>= 1"),
    ("n_group_not_dividing", None, 2, dict(n_group=3), ValueError,
     r"n_group=3 must be >= 1 and divide num_experts=8"),
    ("topk_group_zero", None, 2, dict(n_group=2, topk_group=0), ValueError, r"topk_group=0"),
    ("topk_group_above_n_group", None, 2, dict(n_group=2, topk_group=3), ValueError,
     r"topk_group=3 must be (an int )?in \[1, (n_group=)?2\]"),
    ("k_above_eligible", None, 3, dict(n_group=4, topk_group=1), ValueError,
     r"k=3 must be <= topk_group \* experts_per_group = 2"),
    ("renorm_eps_negative", None, 2, dict(renorm_eps=-1.0), ValueError, r"renorm_eps=-1"),
    ("renorm_eps_nan", None, 2, dict(renorm_eps=NAN), ValueError, r"renorm_eps=nan"),
    ("renorm_eps_inf", None, 2, dict(renorm_eps=INF), ValueError, r"renorm_eps=inf"),
    ("scale_inf", None, 2, dict(scale=-INF), ValueError, r"scale=-inf must be finite"),
    ("scale_nan", None, 2, dict(scale=NAN), ValueError, r"scale=nan must be finite"),
    ("bias_shape", None, 2, dict(selection_bias=z(E + 1)), ValueError,
     r"selection_bias must have shape \(8,\), got \(9,\)"),
    ("bias_2d", None, 2, dict(selection_bias=z(1, E)), ValueError, r"selection_bias must have"),
    ("bias_fp16", None, 2, dict(selection_bias=z(E, dtype=torch.float16)), TypeError,
     r"selection_bias must be torch\."),
    ("steer_rows", None, 2, dict(steer=z(3, E)), ValueError,
     r"steer must have shape \(4, 8\), got \(3, 8\)"),
    ("steer_experts", None, 2, dict(steer=z(4, E + 1)), ValueError, r"steer must have shape"),
    ("steer_fp64", None, 2, dict(steer=z(4, E, dtype=torch.float64)), TypeError,
     r"steer must be torch\."),
    ("groups_float", None, 2, dict(groups=z(T)), TypeError,
     r"groups must be torch\.\w+ or torch\."),
    ("groups_int16", None, 2, dict(groups=z(T, dtype=torch.int16)), TypeError, r"groups must be"),
    ("groups_shape", None, 2, dict(groups=z(T + 1, dtype=i64)), ValueError,
     r"groups must have shape \(5,\), got \(6,\)"),
    ("tokens_int32", None, 2, dict(tokens=z(2, dtype=torch.int32)), TypeError,
     r"tokens must be torch\."),
    ("counts_shape", None, 2, dict(counts=z(2, E + 1, dtype=i64)), ValueError,
     r"counts must have shape \(2, 8\), got \(2, 9\)"),
    ("counts_float", None, 2, dict(counts=z(2, E)), TypeError, r"counts must be torch\."),
    ("prob_sum_fp64", None, 2, dict(prob_sum=z(2, E, dtype=torch.float64)), TypeError,
     r"prob_sum must be torch\."),
    ("weight_sum_1d", None, 2, dict(weight_sum=z(E)), ValueError, r"weight_sum must have shape"),
    ("entropy_sum_int", None, 2, dict(entropy_sum=z(2, dtype=i64)), TypeError,
     r"entropy_sum must be torch\."),
    ("coact_shape", None, 2, dict(coact=z(E, E + 1, dtype=i64)), ValueError,
     r"coact must have shape \(8, 8\)"),
    ("coact_int32", None, 2, dict(coact=z(E, E, dtype=torch.int32)), TypeError,
     r"coact must be torch\."),
    ("G_mismatch_counts", None, 2, dict(tokens=z(2, dtype=i64), counts=z(3, E, dtype=i64)),
     ValueError, r"counts must have shape \(2, 8\), got \(3, 8\)"),
    ("G_mismatch_entropy", None, 2, dict(counts=z(2, E, dtype=i64), entropy_sum=z(3)),
     ValueError, r"entropy_sum must have shape \(2,\), got \(3,\)"),
    ("counts_noncontiguous", None, 2, dict(counts=z(E, 2, dtype=i64).t()), ValueError,
     r"counts must be contiguous"),
    ("weight_sum_noncontiguous", None, 2, dict(weight_sum=z(2, 2 * E)[:, ::2]), ValueError,
     r"weight_sum must be contiguous"),
    ("coact_noncontiguous", None, 2, dict(coact=z(E, E, dtype=i64).t()), ValueError,
     r"coact must be contiguous"),
    ("G_zero", None, 2, dict(tokens=z(0, dtype=i64), counts=z(0, E, dtype=i64)), ValueError,
     r"statistics buffers need at least one group, got G=0"),
    ("scale_beyond_fp32", None, 2, dict(scale=1e39), ValueError,
     r"scale=1e\+39 must be finite in float32"),
    ("renorm_eps_beyond_fp32", None, 2, dict(renorm_eps=1e39), ValueError,
     r"renorm_eps=1e\+39 must be finite in float32"),
    # A statistics buffer written in place while it is read as another argument, or while it is
    # written as another buffer, would change what the gate reads or writes.
    ("weight_sum_is_logits", _SHARED_TE, 2, dict(weight_sum=_SHARED_TE), ValueError,
     r"weight_sum shares memory with logits"),
    ("prob_sum_holds_selection_bias", None, 2,
     dict(selection_bias=_SHARED_1E[0], prob_sum=_SHARED_1E), ValueError,
     r"prob_sum shares memory with selection_bias"),
    ("weight_sum_is_prob_sum", None, 2, dict(prob_sum=_SHARED_2E, weight_sum=_SHARED_2E),
     ValueError, r"weight_sum shares memory with prob_sum"),
    ("counts_overlaps_coact", None, 2,
     dict(counts=_SHARED_I64[:2], coact=_SHARED_I64[1:]), ValueError,
     r"coact shares memory with counts"),
    ("counts_over_tokens_memory", None, 2,
     dict(tokens=torch.from_numpy(_NUMPY_I64[:2]), counts=torch.from_numpy(_NUMPY_I64).view(2, E)),
     ValueError, r"counts shares memory with tokens"),
    ("groups_at_G", None, 2, dict(groups=torch.tensor([0, 1, 2, 0, 0]), tokens=z(2, dtype=i64)),
     ValueError, r"groups must be in \[-1, 2\) .*got values in \[0, 2\]"),
    ("groups_below_minus_one", None, 2,
     dict(groups=torch.tensor([0, -2, 1, 0, 0], dtype=torch.int32), counts=z(2, E, dtype=i64)),
     ValueError, r"groups must be in \[-1, 2\) .*got values in \[-2, 1\]"),
]
DATA_DEPENDENT = {"groups_at_G", "groups_below_minus_one", "weight_sum_is_logits",
                  "prob_sum_holds_selection_bias", "weight_sum_is_prob_sum",
                  "counts_overlaps_coact", "counts_over_tokens_memory"}


def _case_params():
    return [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _call(impl, x, k, kw):
    x = logits() if x is None else x
    if impl == "reference":
        return R.topk_gate(x, k, **kw)
    if impl == "op":
        return OP(x, k, **kw)
    if impl == "meta":
        def to_meta(t):  # keeps the strides (Tensor.to would make a strided view dense)
            if not isinstance(t, torch.Tensor):
                return t
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return OP(to_meta(x), k, **{n: to_meta(v) for n, v in kw.items()})
    # the public API: knobs as keywords, statistics as a GateStats
    stats = {n: kw.pop(n) for n in STAT_NAMES if n in kw}
    gs = moe_route.GateStats(**stats) if stats else None
    if "steer" in kw:
        pytest.skip("the public API takes a SteerSpec (tested below)")
    if impl == "steered_api":
        # The same call steered by a SteerSpec whose table and native config a good call has
        # cached: topk_gate then hands it to the kernel without its own checks.
        moe_route.topk_gate(torch.randn(T, max(x.shape[-1] if x.dim() else E, 2)), 1, steer=_STEER)
        return moe_route.topk_gate(x, k, stats=gs, steer=_STEER, **kw)
    return moe_route.topk_gate(x, k, stats=gs, **kw)


_STEER = moe_route.SteerSpec(add={0: 1.0}, force={1: -1.0})


IMPLS = ["reference", pytest.param("op", marks=pytest.mark.skipif(not HAS_CPU_KERNEL,
                                                                    reason="no extension")),
         pytest.param("meta", marks=pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no extension")),
         "api", "steered_api"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x,k,kw,exc,msg", _case_params())
def test_bad_arguments(impl, x, k, kw, exc, msg, request):
    if impl == "meta" and request.node.callspec.id.split("-")[0] in DATA_DEPENDENT:
        pytest.skip("fake tensors have no data to range-check")
    with pytest.raises(exc, match=msg):
        _call(impl, x, k, dict(kw))


DTYPE_CASES = [c for c in CASES if c[4] is TypeError]


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no extension")
@pytest.mark.parametrize("x,k,kw", [pytest.param(*c[1:4], id=c[0]) for c in DTYPE_CASES])
def test_dtype_messages_use_python_names(x, k, kw):
    with pytest.raises(TypeError) as ref:
        _call("reference", x, k, dict(kw))
    with pytest.raises(TypeError) as got:
        _call("op", x, k, dict(kw))
    assert str(got.value) == str(ref.value)


def test_buffers_untouched_by_a_failed_call():
    """A call that fails validation must not have written any statistic."""
    stats = dict(tokens=z(2, dtype=i64), counts=z(2, E, dtype=i64), weight_sum=z(2, E))
    for fn in [R.topk_gate] + ([OP] if HAS_CPU_KERNEL else []):
        with pytest.raises(ValueError):
            fn(logits(), 2, groups=torch.tensor([0, 0, 0, 0, 5]), **stats)
        with pytest.raises(ValueError):
            fn(logits(), 2, coact=z(E, E + 1, dtype=i64), **stats)
        assert all(int(b.abs().sum()) == 0 for b in stats.values())


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["selection_bias", "steer", "groups", "counts", "coact"])
def test_device_mismatch(name):
    x = logits().cuda()
    shapes = dict(selection_bias=z(E), steer=z(4, E), groups=z(T, dtype=i64),
                  counts=z(1, E, dtype=i64), coact=z(E, E, dtype=i64))
    with pytest.raises(ValueError, match=rf"{name} must be on the logits' device"):
        OP(x, 2, **{name: shapes[name]})


# --------------------------------------------------------------------------------------------
# RouterSpec, SteerSpec, GateStats and the public wrapper's own checks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,name", [
    (dict(score="softmax2"), "score"), (dict(select_on="probs"), "select_on"),
    (dict(group_score="sum"), "group_score"), (dict(n_group=0), "n_group"),
    (dict(n_group=4, topk_group=5), "topk_group"), (dict(n_group=4, topk_group=0), "topk_group"),
    (dict(renorm_eps=-1e-9), "renorm_eps"), (dict(renorm_eps=NAN), "renorm_eps"),
    (dict(renorm_eps=INF), "renorm_eps"), (dict(scale=INF), "scale"), (dict(scale=NAN), "scale"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{a}={b}" for a, b in v.items()))
def test_router_spec_invalid(fields, name):
    with pytest.raises(ValueError, match=rf"RouterSpec: {name}="):
        moe_route.RouterSpec(**fields)
    with pytest.raises(ValueError, match=rf"RouterSpec: {name}="):
        moe_route.RouterSpec().replace(**fields)
    with pytest.raises(ValueError, match=rf"RouterSpec: {name}="):
        moe_route.topk_gate(logits(), 2, **fields)


@pytest.mark.parametrize("fields,name", [
    (dict(scale=1e39), "scale"), (dict(renorm_eps=1e39), "renorm_eps"),
    (dict(n_group=2 ** 70), "n_group"),
], ids=["scale_fp32", "renorm_eps_fp32", "n_group_int64"])
def test_router_spec_out_of_range(fields, name):
    """Values the op could not take as fp32 or int64 fail when the spec is built."""
    with pytest.raises(ValueError, match=rf"RouterSpec: {name}="):
        moe_route.RouterSpec(**fields)
    with pytest.raises(ValueError, match=rf"RouterSpec: {name}="):
        moe_route.topk_gate(logits(), 2, **fields)


@pytest.mark.parametrize("fields,msg", [
    (dict(renormalize="yes"), r"RouterSpec: renormalize='yes' must be a bool, got str"),
    (dict(renormalize=1), r"RouterSpec: renormalize=1 must be a bool, got int"),
    (dict(scale="2"), r"RouterSpec: scale must be a real number, got str"),
    (dict(scale=True), r"RouterSpec: scale must be a real number, got bool"),
    (dict(renorm_eps=None), r"RouterSpec: renorm_eps must be a real number, got NoneType"),
    # numpy's bool is named in full: "must be a bool, got bool" puzzled
    (dict(renormalize=np.bool_(True)), r"RouterSpec: renormalize=np.True_ must be a bool, got "
                                       r"numpy.bool_?$"),
])
def test_router_spec_types(fields, msg):
    with pytest.raises(TypeError, match=msg):
        moe_route.RouterSpec(**fields)


@pytest.mark.parametrize("spec", ["sigmoid", {"score": "sigmoid"}, 1])
def test_spec_must_be_a_router_spec(spec):
    with pytest.raises(TypeError, match=r"topk_gate: spec must be a RouterSpec or None, got "):
        moe_route.topk_gate(logits(), 2, spec)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_group=True), r"n_group=True must be an int >= 1, got bool"),
    (dict(n_group=2.0), r"n_group=2.0 must be an int >= 1, got float"),
    (dict(n_group=2, topk_group=True), r"topk_group=True must be an int in \[1, 2\] .*, got bool"),
    (dict(topk_group=1.0), r"topk_group=1.0 must be an int in \[1, 1\] .*, got float")])
def test_router_spec_group_sizes_are_ints(kw, msg):
    with pytest.raises(TypeError, match=rf"RouterSpec: {msg}"):
        moe_route.RouterSpec(**kw)
    with pytest.raises(TypeError, match=rf"RouterSpec: {msg}"):
        moe_route.RouterSpec().replace(**kw)
    with pytest.raises(TypeError, match=rf"RouterSpec: {msg}"):
        moe_route.topk_gate(logits(), 2, **kw)


@pytest.mark.parametrize("k", [True, 2.0, "2", None, torch.tensor(True), torch.tensor([2])],
                         ids=["bool", "float", "str", "None", "bool_tensor", "1d_tensor"])
def test_k_must_be_an_int(k):
    with pytest.raises(TypeError, match=r"topk_gate: k must be an int, got "):
        moe_route.topk_gate(logits(), k)


def test_k_takes_integer_like_values():
    want = moe_route.topk_gate(logits(), 2)
    for k in (np.int64(2), torch.tensor(2)):
        got = moe_route.topk_gate(logits(), k)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_inference_buffers_refused_outside_inference_mode():
    """Buffers made under inference_mode cannot be updated in place outside it: the call is
    refused before the kernel writes, so the statistics stay as they were."""
    with torch.inference_mode():
        stats = moe_route.GateStats.zeros(1, E)
    with pytest.raises(ValueError, match=r"topk_gate: tokens is an inference tensor"):
        moe_route.topk_gate(logits(), 2, stats=stats)
    assert all(int(b.abs().sum()) == 0 for b in stats.buffers() if b is not None)
    with torch.inference_mode():
        moe_route.topk_gate(logits(), 2, stats=stats)
    assert stats.tokens.tolist() == [T]


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_buffers_that_require_grad_are_refused(backend):
    """The kernel added into a leaf that requires grad, unseen by autograd; the reference raised
    torch's RuntimeError about in-place operations. Both refuse it before writing anything."""
    if backend == "kernel" and not HAS_CPU_KERNEL:
        pytest.skip("no extension")
    prob_sum = torch.zeros(1, E, requires_grad=True)
    gate = moe_route.topk_gate if backend == "kernel" else R.topk_gate
    with pytest.raises(ValueError, match=r"topk_gate: prob_sum requires grad and is written in "
                                         r"place"):
        if backend == "kernel":
            gate(logits(), 2, stats=moe_route.GateStats(prob_sum=prob_sum))
        else:
            gate(logits(), 2, prob_sum=prob_sum)
    assert int(prob_sum.detach().abs().sum()) == 0


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no extension")
@pytest.mark.parametrize("which", ["logits", "selection_bias"])
def test_raw_op_refuses_to_differentiate(which):
    """The registered op computes no gradient; asked for one it says so instead of returning
    weights whose backward yields nothing (moe_route.topk_gate differentiates, test_gate_grad)."""
    x, bias = logits(), z(E)
    (x if which == "logits" else bias).requires_grad_()
    with pytest.raises(ValueError, match=r"torch.ops.moe_route.topk_gate has no backward"):
        OP(x, 2, selection_bias=bias)
    with torch.no_grad():
        OP(x, 2, selection_bias=bias)


def test_router_spec_valid_and_frozen():
    spec = moe_route.RouterSpec(score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                                renormalize=True, renorm_eps=1e-20, scale=2.5)
    assert spec.op_kwargs() == dict(score="sigmoid", select_on="scores", n_group=4, topk_group=2,
                                    group_score="top2_sum", renormalize=True, renorm_eps=1e-20,
                                    scale=2.5, round_scores=False)
    with pytest.raises(Exception):
        spec.score = "softmax"
    assert spec.replace(scale=1.0).scale == 1.0 and spec.scale == 2.5


def test_unknown_knob():
    with pytest.raises(TypeError, match=r"unknown router knob.*top_k"):
        moe_route.topk_gate(logits(), 2, top_k=2)


def test_knob_specs_are_built_once_and_still_checked():
    """Keyword knobs build their RouterSpec once per distinct set (building one costs more than
    a decode-sized gate); a cached spec never stands in for a value its checks refuse
    (renormalize=1 equals True as a dict key, but is not a bool)."""
    from moe_route import ops
    x = logits()
    ops._cached_spec.cache_clear()
    a = moe_route.topk_gate(x, 2, score="sigmoid", renormalize=True)
    b = moe_route.topk_gate(x, 2, renormalize=True, score="sigmoid")
    info = ops._cached_spec.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    spec = moe_route.RouterSpec("sigmoid", renormalize=True)
    for got, want in zip((a, b), [moe_route.topk_gate(x, 2, spec)] * 2):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(TypeError, match="RouterSpec: renormalize=1 must be a bool, got int"):
        moe_route.topk_gate(x, 2, score="sigmoid", renormalize=1)
    with pytest.raises(ValueError, match=r"RouterSpec: score=\['x'\] must be one of"):
        moe_route.topk_gate(x, 2, score=["x"])                 # unhashable: checked uncached


def test_knobs_beside_a_spec_that_is_not_one():
    """A str spec with knobs was reported as an unknown knob (str.replace's own error)."""
    with pytest.raises(TypeError, match=r"topk_gate: spec must be a RouterSpec or None, got str"):
        moe_route.topk_gate(logits(), 2, "x", score="sigmoid")


def test_a_selection_bias_that_requires_grad_is_detached():
    """The selection bias only selects (it gets no gradient), but one that required grad made
    moe_route.topk_gate raise "call moe_route.topk_gate" when the logits did not."""
    bias = torch.linspace(-1, 1, E).requires_grad_()
    want = moe_route.topk_gate(logits(), 2, selection_bias=bias.detach())
    for kw in ({}, dict(stats=moe_route.GateStats.zeros(1, E))):
        w, ids = moe_route.topk_gate(logits(), 2, selection_bias=bias, **kw)
        assert not w.requires_grad and torch.equal(ids, want[1]) and torch.equal(w, want[0])


@pytest.mark.parametrize("field", ["select_only", "std_unbiased"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_steer_spec_flags_are_bools(field, value):
    """A str select_only failed only inside the gate, with pybind's list of GateConfig
    signatures."""
    with pytest.raises(TypeError, match=rf"SteerSpec: {field}={value!r} must be a bool, got "):
        moe_route.SteerSpec(add={0: 1.0}, **{field: value})


@pytest.mark.parametrize("field,value,msg", [
    ("add", {E: 1.0}, r"SteerSpec.add: expert 8 must be an int in \[0, 8\)"),
    ("std", {-1: 1.0}, r"SteerSpec.std: expert -1"),
    ("force", [1.0] * (E - 1), r"SteerSpec.force: expected 8 values \(one per expert\), got 7"),
])
def test_steer_spec_invalid(field, value, msg):
    """Values that only fail against a known E fail when the table for that E is built."""
    spec = moe_route.SteerSpec(**{field: value})
    with pytest.raises(ValueError, match=msg):
        spec.table(E)
    with pytest.raises(ValueError, match=msg):
        moe_route.topk_gate(logits(), 2, steer=spec)


@pytest.mark.parametrize("value,error,msg", [
    ({"3": 1.0}, TypeError, r"SteerSpec.abs: expert keys must be ints, got '3' \(str\)"),
    # as a tensor index True would select every expert
    ({True: 5.0}, TypeError, r"SteerSpec.abs: expert keys must be ints, got True \(bool\)"),
    ({1: "x"}, TypeError, r"SteerSpec.abs: expert 1: value must be a number, got 'x'"),
    (((1, 0.5), (1, 2.0)), ValueError, r"SteerSpec.abs: expert 1 is given twice"),
    (((1, NAN),), ValueError, r"SteerSpec.abs: expert 1: value nan must be finite"),
    (((0.5,),), ValueError, r"SteerSpec.abs: expected \(expert, value\) pairs, got \(0.5,\)"),
])
def test_steer_spec_bad_pairs_fail_at_construction(value, error, msg):
    with pytest.raises(error, match=msg):
        moe_route.SteerSpec(abs=value)


def test_steer_spec_pairs_take_integer_and_tensor_scalars():
    spec = moe_route.SteerSpec(add={np.int64(2): torch.tensor(0.5), 0: np.float32(1.5)})
    assert spec.add == ((0, 1.5), (2, 0.5))
    assert dataclasses.replace(spec, select_only=True).add == spec.add


@pytest.mark.parametrize("field", ["add", "std", "abs", "force"])
def test_steer_spec_empty_mapping_steers_nothing(field):
    spec = moe_route.SteerSpec(**{field: {}})
    assert getattr(spec, field) is None
    got, want = moe_route.topk_gate(logits(), 2, steer=spec), moe_route.topk_gate(logits(), 2)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("field", ["add", "std", "abs", "force"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF, 1e39])
@pytest.mark.parametrize("form", ["mapping", "list", "tensor"])
def test_steer_spec_refuses_values_not_finite_in_float32(field, bad, form):
    """A NaN used to steer silently: the sanitised logit ranked its expert last (NaN add/std/abs)
    or did nothing (NaN force); inf clamped the logit to +-FLT_MAX; 1e39 in a mapping crashed
    building the table. Each is refused at construction, naming the field and the expert."""
    row = [0.0] * E
    row[3] = bad
    value = {3: bad} if form == "mapping" else row if form == "list" else \
        torch.tensor(row, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"SteerSpec.{field}: expert 3: value .* must be "
                                         rf"finite in float32"):
        moe_route.SteerSpec(**{field: value})
    limit = moe_route.SteerSpec(**{field: {3: R.FLT_MAX}})      # the largest that steers
    table = limit.table(E)
    assert table[R.STEER_ROWS.index(field), 3].item() == R.FLT_MAX
    got = moe_route.topk_gate(logits(), 2, steer=limit)
    want = R.topk_gate(logits(), 2, steer=table)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("value", [torch.full((E,), 1 + 5j), [1 + 5j] * E, ["x"] * E, "abc",
                                   torch.ones(E, dtype=torch.bool), [None] * E])
def test_steer_spec_values_must_be_real_numbers(value):
    """A complex tensor lost its imaginary part with only a warning; strings and None gave
    torch's own errors ("too many dimensions 'str'")."""
    with pytest.raises(TypeError, match=r"SteerSpec.add: expected real numbers, one per expert"):
        moe_route.SteerSpec(add=value)


@pytest.mark.parametrize("field,value", [("add", torch.zeros(2, E)), ("std", 0.5)])
def test_steer_spec_invalid_shape(field, value):
    """Values that are not one number per expert fail at construction."""
    with pytest.raises(ValueError, match=rf"SteerSpec.{field}: expected one value per expert"):
        moe_route.SteerSpec(**{field: value})


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(steer={"add": {0: 1.0}}), TypeError, r"steer must be a SteerSpec"),
    (dict(steer=torch.zeros(4, E)), TypeError, r"steer must be a SteerSpec"),
    (dict(stats=(None,) * 6), TypeError, r"stats must be a GateStats"),
    (dict(stats={"counts": z(1, E, dtype=i64)}), TypeError, r"stats must be a GateStats"),
])
def test_public_wrapper_argument_types(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        moe_route.topk_gate(logits(), 2, **kw)


@pytest.mark.parametrize("x,exc,msg", [
    (z(E), ValueError, r"logits must be 2-D \[T, E\], got shape \(8,\)"),
    (z(T, 0), ValueError, r"logits must have at least one expert column, got E=0"),
    ([[0.0] * E], TypeError, r"logits must be a torch.Tensor, got list")])
def test_steer_with_bad_logits_names_logits(x, exc, msg):
    """The steering table needs E from the logits: what is wrong with them is said first."""
    with pytest.raises(exc, match=msg):
        moe_route.topk_gate(x, 2, steer=moe_route.SteerSpec(add={0: 1.0}))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no extension")
@pytest.mark.parametrize("select_only,unbiased", [(False, False), (True, False), (False, True)])
def test_steered_calls_find_what_the_checked_path_cached(select_only, unbiased):
    """The wrapper's fast path takes the table SteerSpec.table gave last, and looks the native
    config up under the key RouterSpec._native_config caches it by: after one steered call (and
    one with statistics) the next finds both, and routes as the checked path did."""
    from moe_route import ops
    spec = moe_route.RouterSpec(renormalize=True)
    steer = moe_route.SteerSpec(add={2: 1.5}, std={3: 0.5}, select_only=select_only,
                                std_unbiased=unbiased)
    stats = moe_route.GateStats.zeros(1, E)
    assert ops._cached_native(spec, steer, stats) is None  # nothing cached yet
    first = moe_route.topk_gate(logits(), 2, spec, steer=steer, stats=stats)
    cached = ops._cached_native(spec, steer, stats)
    assert cached is not None
    config, table, buffers = cached
    assert table is steer.table(E, logits().device)
    assert config is spec._native_config(select_only, unbiased)
    assert buffers is stats.buffers()
    second = moe_route.topk_gate(logits(), 2, spec, steer=steer, stats=stats)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert int(stats.tokens[0]) == 2 * T


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no extension")
def test_a_table_for_other_logits_is_not_used():
    """The fast path passes the table the SteerSpec gave last, which may be for another E or
    device (one SteerSpec over layers of different widths or devices): the native call leaves
    such a call to the checked path, which builds the right table. Each call routes as the
    reference does."""
    steer = moe_route.SteerSpec(add={0: 3.0}, std={1: 0.5}, force={2: 1.0})
    for width in (E, 2 * E, E, 2 * E):
        x = torch.randn(T, width, generator=torch.Generator().manual_seed(width))
        for _ in range(2):  # the second call takes the fast path
            w, ids = moe_route.topk_gate(x, 2, steer=steer)
            rw, rids = R.topk_gate(x, 2, steer=steer.table(width))
            assert torch.equal(ids, rids) and torch.allclose(w, rw, rtol=1e-6, atol=1e-7)
    # A table on another device, as another GPU's would be: left to the checked path too.
    table = steer.table(E)
    object.__setattr__(steer, "_last", table.to("meta"))
    w, ids = moe_route.topk_gate(logits(), 2, steer=steer)
    assert torch.equal(ids, R.topk_gate(logits(), 2, steer=table)[1])
    assert steer._last is table


@pytest.mark.parametrize("args,kw,name", [
    (([[1.0, 2.0]], 1), {}, "logits"),
    ((None, 1), dict(selection_bias=[0.0] * E), "selection_bias"),
    ((None, 1), dict(groups=[0] * T), "groups"),
], ids=["logits_list", "bias_list", "groups_list"])
def test_public_wrapper_non_tensor_arguments(args, kw, name):
    x, k = args
    x = logits() if x is None else x
    with pytest.raises(TypeError) as ref_info:
        R.topk_gate(x, k, **kw)
    assert name in str(ref_info.value)
    with pytest.raises(TypeError, match=rf"topk_gate: {name} must be"):
        moe_route.topk_gate(x, k, **kw)


@pytest.mark.parametrize("G,E_,msg", [
    (0, 8, r"num_groups=0 must be an int >= 1"), (-1, 8, r"num_groups=-1 must be an int >= 1"),
    (2, 0, r"num_experts=0 must be an int in \[1, 1048576\]"),
    (1, 2**40, r"num_experts=1099511627776 must be an int in \[1, 1048576\]")])
def test_gate_stats_zeros_invalid(G, E_, msg):
    with pytest.raises(ValueError, match=rf"GateStats.zeros: {msg}"):
        moe_route.GateStats.zeros(G, E_)


@pytest.mark.parametrize("G,E_,msg", [(1.5, 8, "num_groups=1.5 must be an int >= 1, got float"),
                                      (None, 8, "num_groups=None must be an int >= 1, got "
                                                "NoneType"),
                                      (2, True, r"num_experts=True must be an int in \[1, "
                                                r"1048576\], got bool")])
def test_gate_stats_zeros_sizes_are_ints(G, E_, msg):
    """1.5 and None gave torch.zeros' and "<" errors."""
    with pytest.raises(TypeError, match=rf"GateStats.zeros: {msg}"):
        moe_route.GateStats.zeros(G, E_)


def test_gate_stats_buffers_are_tensors():
    """A list buffer failed in pybind ("Unable to cast Python instance ... to C++ type '?'")."""
    with pytest.raises(TypeError, match=r"GateStats: tokens must be a torch.Tensor or None, got "
                                        r"list"):
        moe_route.GateStats(tokens=[0])


def test_gate_stats_zeros_layout():
    s = moe_route.GateStats.zeros(3, E, coact=True)
    want = dict(tokens=((3,), i64), counts=((3, E), i64), prob_sum=((3, E), f32),
                weight_sum=((3, E), f32), entropy_sum=((3,), f32), coact=((E, E), i64))
    for name, buf in zip(STAT_NAMES, s.buffers()):
        assert (tuple(buf.shape), buf.dtype) == want[name], name
        assert buf.is_contiguous() and int(buf.abs().sum()) == 0
    lean = moe_route.GateStats.zeros(3, E, dense=False)
    assert lean.prob_sum is None and lean.entropy_sum is None and lean.coact is None
    moe_route.topk_gate(logits(), 2, stats=s)
    assert int(s.tokens[0]) == T
    assert s.zero_() is s and int(s.counts.sum()) == 0 and float(s.prob_sum.sum()) == 0
