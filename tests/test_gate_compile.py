"""torch.library / torch.compile integration: opcheck (schema, fake kernel, autograd registration,
AOT dispatch), fullgraph and dynamic-shape compilation matching eager."""
from __future__ import annotations

import pytest
import torch

import moe_route
from conftest import (OP, assert_same_stats, random_bias, random_logits, requires_native,
                      steer_table, zero_stats)

pytestmark = requires_native


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _samples(device):
    T, E = 33, 16
    x = random_logits(T, E, device=device)
    stats = zero_stats(3, E, device=device)
    groups = torch.randint(-1, 3, (T,), generator=torch.Generator().manual_seed(0)).to(device)
    wide = random_logits(2 * T, E + 7, device=device)
    return {
        "normal": ((x, 4), dict(score="sigmoid", selection_bias=random_bias(E, device=device),
                                n_group=4, topk_group=2, group_score="top2_sum", renormalize=True,
                                renorm_eps=1e-20, scale=2.5,
                                steer=steer_table("mixed", E, device=device)[0])),
        "empty": ((random_logits(0, E, device=device), 4), dict(select_on="logits")),
        "strided": ((wide[::2, 3:3 + E], 3), dict(score="sqrtsoftplus")),
        "bf16": ((x.bfloat16(), 2), dict()),
        "with_stats": ((x, 4), dict(groups=groups, **stats)),
        "with_some_stats": ((x, 4), dict(counts=stats["counts"].clone(),
                                         entropy_sum=stats["entropy_sum"].clone())),
    }


@pytest.mark.parametrize("sample", ["normal", "empty", "strided", "bf16", "with_stats",
                                    "with_some_stats"])
def test_opcheck(device, sample):
    args, kwargs = _samples(device)[sample]
    torch.library.opcheck(OP.default, args, kwargs)


def test_meta_shapes():
    x = torch.empty(7, 64, device="meta", dtype=torch.bfloat16)
    w, ids = OP(x, 6, score="sigmoid", n_group=8, topk_group=3)
    assert (w.shape, w.dtype, ids.shape, ids.dtype) == ((7, 6), torch.float32, (7, 6),
                                                        torch.int32)
    assert w.device.type == "meta"


def _assert_same(a, b):
    (wa, ia), (wb, ib) = a, b
    assert torch.equal(ia, ib)
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)


def test_steering_tables_made_while_tracing_are_not_kept_for_eager_calls():
    """A SteerSpec's table first made under fake tensors (torch.export non-strict, FakeTensorMode)
    was kept: every later eager call with that SteerSpec returned FakeTensors, without values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    table = torch.zeros(4, 8)
    table[0, 3] = 20.0
    _, want = moe_route.reference.topk_gate(x, 2, steer=table)
    spec = moe_route.SteerSpec(add={3: 20.0})
    with FakeTensorMode() as mode:
        moe_route.topk_gate(mode.from_tensor(x), 2, steer=spec)
    _, ids = moe_route.topk_gate(x, 2, steer=spec)
    assert type(ids) is torch.Tensor and torch.equal(ids, want)

    class Gate(torch.nn.Module):
        def forward(self, logits):
            return moe_route.topk_gate(logits, 2, steer=spec)

    spec = moe_route.SteerSpec(add={3: 20.0})
    exported = torch.export.export(Gate(), (x,))
    assert torch.equal(exported.module()(x)[1], want)
    _, ids = Gate()(x)
    assert type(ids) is torch.Tensor and torch.equal(ids, want)


def test_compile_op_fullgraph(device):
    E = 32
    bias = random_bias(E, device=device)

    def fn(x, stats):
        w, ids = OP(x, 4, score="sigmoid", selection_bias=bias, n_group=4, topk_group=2,
                    group_score="top2_sum", renormalize=True, scale=2.5, **stats)
        return w * 2, ids

    x = random_logits(50, E, device=device)
    s_eager, s_comp = zero_stats(1, E, device=device), zero_stats(1, E, device=device)
    compiled = torch.compile(fn, fullgraph=True)
    _assert_same(compiled(x, s_comp), fn(x, s_eager))
    _assert_same(compiled(x, s_comp), fn(x, s_eager))  # accumulates a second time
    assert_same_stats(s_comp, s_eager)
    assert int(s_comp["tokens"][0]) == 100


def test_compile_dynamic_tokens(device):
    E = 24
    spec = moe_route.RouterSpec(score="sigmoid", renormalize=True)

    def fn(x):
        return OP(x, 3, **spec.op_kwargs())

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (9, 40, 7):
            x = random_logits(T, E, seed=T, device=device)
            _assert_same(compiled(x), fn(x))


def test_compile_public_api_with_graph_breaks(device):
    """Without fullgraph the public wrapper compiles (it may break the graph) and matches eager."""
    E = 32
    spec = moe_route.RouterSpec(score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                                renormalize=True, scale=2.5)
    bias = random_bias(E, device=device)

    def fn(x, stats):
        return moe_route.topk_gate(x, 4, spec, selection_bias=bias, stats=stats)

    x = random_logits(50, E, device=device)
    s_eager = moe_route.GateStats.zeros(1, E, device=device, coact=True)
    s_comp = moe_route.GateStats.zeros(1, E, device=device, coact=True)
    _assert_same(torch.compile(fn)(x, s_comp), fn(x, s_eager))
    assert_same_stats(s_comp, s_eager)


def test_compile_public_api_fullgraph_spec(device):
    E = 32
    spec = moe_route.RouterSpec(score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                                renormalize=True, scale=2.5)

    def fn(x):
        return moe_route.topk_gate(x, 4, spec)

    x = random_logits(50, E, device=device)
    _assert_same(torch.compile(fn, fullgraph=True)(x), fn(x))


def test_compile_spec_built_inside(device):
    """A RouterSpec made inside the compiled code (here by router knobs) traces: its native
    config is built on first eager use instead."""
    def fn(x):
        spec = moe_route.RouterSpec(score="sigmoid", renormalize=True)
        return moe_route.topk_gate(x, 4, score="sigmoid", n_group=4, topk_group=2), \
            moe_route.topk_gate(x, 3, spec)

    x = random_logits(50, 32, device=device)
    got, want = torch.compile(fn, fullgraph=True)(x), fn(x)
    _assert_same(got[0], want[0])
    _assert_same(got[1], want[1])


@pytest.mark.parametrize("call", ["plain", "steered", "recording"])
def test_a_spec_built_while_tracing_serves_eager_calls(monkeypatch, device, call):
    """A spec built while torch.compile traced has no native config: the first eager call of
    each kind builds it and routes as a spec built eagerly."""
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        traced = moe_route.RouterSpec(score="sigmoid", renormalize=True)
    assert traced._plain is None
    x, E = random_logits(20, 32, device=device), 32
    outs = []
    for spec in (traced, moe_route.RouterSpec(score="sigmoid", renormalize=True)):
        kw = {"steered": dict(steer=moe_route.SteerSpec(add={3: 2.0}, force={5: 1.0})),
              "recording": dict(stats=moe_route.GateStats.zeros(1, E, device=device))}.get(call, {})
        outs.append((moe_route.topk_gate(x, 4, spec, **kw), kw.get("stats")))
    (got, got_stats), (want, want_stats) = outs
    _assert_same(got, want)
    if call == "recording":
        assert_same_stats(got_stats, want_stats)


def test_compile_public_api_fullgraph_stats(device):
    E = 32

    def fn(x, stats):
        return moe_route.topk_gate(x, 4, stats=stats)

    x = random_logits(50, E, device=device)
    s_eager = moe_route.GateStats.zeros(1, E, device=device, coact=True)
    s_comp = moe_route.GateStats.zeros(1, E, device=device, coact=True)
    _assert_same(torch.compile(fn, fullgraph=True)(x, s_comp), fn(x, s_eager))
    assert_same_stats(s_comp, s_eager)
