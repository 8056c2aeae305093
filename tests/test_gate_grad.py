"""moe_route.topk_gate is differentiable in the logits: the kernels choose the ids and accumulate
the statistics, and the weights of those ids carry the gradient of the reference formula."""
from __future__ import annotations

import pytest
import torch

import moe_route
from conftest import random_bias, random_logits
from moe_route import SteerSpec, reference as R

T, E = 40, 16

SPECS = {
    "softmax": (dict(), None),
    "softmax_renorm_scaled": (dict(renormalize=True, scale=2.5), None),
    "topk_softmax": (dict(select_on="logits"), None),
    "sigmoid_bias_groups": (dict(score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                                 renormalize=True, renorm_eps=1e-20, scale=2.5), "bias"),
    "sqrtsoftplus_renorm": (dict(score="sqrtsoftplus", renormalize=True), "bias"),
    "none": (dict(score="none"), None),
}
STEERS = {
    "no_steer": None,
    "std": SteerSpec(std={3: 0.5, 7: -0.5}, add={1: 0.25}),
    "abs_select_only": SteerSpec(abs={2: 0.5}, add={5: 1.0}, select_only=True),
    "force": SteerSpec(force={0: 1, 9: -1}),
}


def _grad_of(fn, logits):
    x = logits.detach().clone().requires_grad_()
    w, ids = fn(x)
    c = torch.linspace(-1, 1, w.numel(), device=w.device).view_as(w)
    (w * c).sum().backward()
    return w, ids, x.grad


@pytest.mark.parametrize("steer", list(STEERS))
@pytest.mark.parametrize("spec", list(SPECS))
def test_gradient_matches_reference(device, spec, steer):
    knobs, bias = SPECS[spec]
    bias = random_bias(E, device=device) if bias else None
    k = 4
    steer = STEERS[steer]
    logits = random_logits(T, E, device=device)
    w, ids, grad = _grad_of(lambda x: moe_route.topk_gate(x, k, selection_bias=bias, steer=steer,
                                                          **knobs), logits)
    table = steer.table(E, device) if steer is not None else None
    rw, rids, rgrad = _grad_of(lambda x: R.topk_gate(
        x, k, selection_bias=bias, steer=table,
        steer_select_only=steer is not None and steer.select_only, **knobs), logits)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw)
    torch.testing.assert_close(grad, rgrad)
    # the routing is the kernel's, with or without a gradient
    w_ng, ids_ng = moe_route.topk_gate(logits, k, selection_bias=bias, steer=steer, **knobs)
    assert torch.equal(ids, ids_ng)
    torch.testing.assert_close(w, w_ng)


def test_replayed_ids_get_their_gradient(device):
    logits = random_logits(T, E, device=device)
    replay = torch.randperm(E, generator=torch.Generator().manual_seed(0))[:3].repeat(T, 1)
    replay[::3] = -1  # these rows select
    replay = replay.to(device)
    w, ids, grad = _grad_of(lambda x: moe_route.topk_gate(x, 3, renormalize=True, replay=replay),
                            logits)
    rw, rids, rgrad = _grad_of(lambda x: R.topk_gate(x, 3, renormalize=True, replay=replay),
                               logits)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(grad, rgrad)


def test_statistics_counted_once_and_selection_bias_gets_no_gradient(device):
    logits = random_logits(T, E, device=device).requires_grad_()
    bias = random_bias(E, device=device).requires_grad_()
    stats = moe_route.GateStats.zeros(2, E, device=device)
    groups = (torch.arange(T, device=device) % 2)
    w, ids = moe_route.topk_gate(logits, 4, score="sigmoid", selection_bias=bias, stats=stats,
                                 groups=groups)
    w.sum().backward()
    assert stats.tokens.tolist() == [T // 2, T // 2]
    assert logits.grad is not None and bias.grad is None
    ref = moe_route.GateStats.zeros(2, E, device=device)
    moe_route.topk_gate(logits.detach(), 4, score="sigmoid", selection_bias=bias.detach(),
                        stats=ref, groups=groups)
    assert torch.equal(stats.counts, ref.counts)


@pytest.mark.parametrize("spec", ["softmax_renorm_scaled", "sigmoid_bias_groups"])
def test_forward_mode_derivatives_match_reverse_mode(device, spec):
    """Forward-mode AD (torch.func.jvp and jacfwd, forward_ad's dual tensors) gets the weights'
    tangent, with the statistics counted once; the kernel, called outside the dispatcher, dropped
    the tangent and gave zero derivatives. The dispatch ops go through the dispatcher."""
    from torch.autograd import forward_ad

    knobs, bias = SPECS[spec]
    bias = random_bias(E, device=device) if bias else None
    steer = STEERS["std"]
    logits = random_logits(T, E, device=device)
    tangent = random_logits(T, E, seed=5, device=device)

    def gate(x):
        return moe_route.topk_gate(x, 4, selection_bias=bias, steer=steer, **knobs)[0]

    def ref(x):
        return R.topk_gate(x, 4, selection_bias=bias, steer=steer.table(E, device), **knobs)[0]

    want = torch.func.jvp(ref, (logits,), (tangent,))[1]
    assert want.abs().sum() > 0
    torch.testing.assert_close(torch.func.jvp(gate, (logits,), (tangent,))[1], want)
    torch.testing.assert_close(torch.func.jacfwd(gate)(logits[:3]),
                               torch.func.jacrev(ref)(logits[:3]))
    stats = moe_route.GateStats.zeros(1, E, device=device)
    with forward_ad.dual_level():
        w, ids = moe_route.topk_gate(forward_ad.make_dual(logits, tangent), 4,
                                     selection_bias=bias, steer=steer, stats=stats, **knobs)
        torch.testing.assert_close(forward_ad.unpack_dual(w).tangent, want)
    assert torch.equal(ids, R.topk_gate(logits, 4, selection_bias=bias,
                                        steer=steer.table(E, device), **knobs)[1])
    assert stats.tokens.tolist() == [T]


def test_no_gradient_under_no_grad(device):
    logits = random_logits(T, E, device=device).requires_grad_()
    with torch.no_grad():
        w, _ = moe_route.topk_gate(logits, 4)
    assert not w.requires_grad


def test_compiled_training_step_matches_eager():
    def loss(x):
        w, _ = moe_route.topk_gate(x, 4, score="sigmoid", renormalize=True, scale=2.0)
        return (w * w).sum()

    logits = random_logits(T, E)
    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        x = logits.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_vmap_routes_each_sample_and_gives_per_sample_router_gradients():
    """torch.func.vmap over the gate, per sample: ids and weights are each sample's own
    (the reference's), groups and replay may be batched, statistics add up over the samples, and
    vmap(grad) gives each sample's gradient. A per-sample statistics buffer is refused."""
    B, T, E, k = 3, 5, 8, 2
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(0))
    groups = torch.randint(0, 2, (B, T), generator=torch.Generator().manual_seed(1))
    replay = torch.full((B, T, k), -1)
    replay[1, 2] = torch.tensor([0, 7])
    stats = moe_route.GateStats.zeros(2, E)
    w, ids = torch.func.vmap(
        lambda a, g, r: moe_route.topk_gate(a, k, score="sigmoid", renormalize=True,
                                            steer=SteerSpec(add={3: 1.0}), groups=g, stats=stats,
                                            replay=r))(x, groups, replay)
    want = moe_route.GateStats.zeros(2, E)
    for b in range(B):
        wb, ib = moe_route.topk_gate(x[b], k, score="sigmoid", renormalize=True,
                                     steer=SteerSpec(add={3: 1.0}), groups=groups[b], stats=want,
                                     replay=replay[b])
        assert torch.equal(ids[b], ib) and torch.equal(w[b], wb)
    assert ids[1, 2].tolist() == [0, 7]
    assert torch.equal(stats.counts, want.counts) and torch.equal(stats.tokens, want.tokens)

    def loss(a):
        return moe_route.topk_gate(a, k, score="sigmoid")[0].square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(x)
    for b in range(B):
        torch.testing.assert_close(per_sample[b], torch.func.grad(loss)(x[b]))
    own = [moe_route.GateStats.zeros(1, E) for _ in range(B)]
    counts = torch.stack([s.counts for s in own])
    with pytest.raises(ValueError, match="topk_gate under vmap: counts must be the same for "
                                         "every sample"):
        torch.func.vmap(lambda a, c: torch.ops.moe_route.topk_gate(a, k, counts=c))(x, counts)
