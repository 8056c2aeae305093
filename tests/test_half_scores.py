"""Rounded scores (``RouterSpec.round_scores``): routers that score in their logits' half
precision. LFM2-MoE (sigmoid), DeepSeek-V4 (sigmoid or sqrt(softplus)) and Zaya (softmax) add an
fp32 bias to fp16/bf16 scores and take the top-k; Mistral-4 sums the top-2 of bf16 probabilities
per group. With fp32 scores the gate chose other experts than those routers for up to 12% of the
tokens (bf16 sigmoid plus a bias at 384 experts); rounding as the routers' ops round, it chooses
theirs except where their own values tie exactly.
"""
import pytest
import torch
import torch.nn.functional as F

import moe_route
from moe_route import RouterSpec
from moe_route import reference as R

from conftest import HAS_CPU_KERNEL
from tiny_models import build, inputs, router_modules

HALF = [torch.bfloat16, torch.float16]


def _sorted_ids(ids):
    return ids.long().sort(-1).values


def _logits(T, E, dtype, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * spread).to(dtype), torch.randn(E, generator=g) * 0.05


# What each router computes, from its half-precision logits z and fp32 bias b: the values it ranks.
BIASED = {
    "sigmoid": lambda z, b: z.sigmoid() + b,                               # LFM2, DeepSeek-V4
    "sqrtsoftplus": lambda z, b: F.softplus(z).sqrt() + b,                 # DeepSeek-V4
    "softmax": lambda z, b: torch.softmax(z, dim=-1).float() + b / 50,     # Zaya
}


def _mistral4_ids(z, n_group, topk_group, k):
    """Mistral4TopkRouter's choice, and the rows where its own values tie at a boundary (a group's
    top-2 sum at the topk_group-th place, a probability at the k-th)."""
    T, E = z.shape
    scores = z.softmax(-1)
    group_scores = scores.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
    keep = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, keep, 1).bool()
    masked = scores.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), 0.0)
    ids = torch.topk(masked, k, dim=-1, sorted=False)[1]
    g = group_scores.float().sort(-1, descending=True).values
    m = masked.float().sort(-1, descending=True).values
    tied = (g[:, topk_group - 1] == g[:, topk_group]) | (m[:, k - 1] == m[:, k])
    return ids, tied


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("score", sorted(BIASED))
@pytest.mark.parametrize("E,k", [(32, 4), (384, 6)])
def test_reference_picks_the_experts_of_a_half_precision_router(score, dtype, E, k):
    """Known answer: the router's own top-k of its half-precision scores plus the fp32 bias, for
    every token; fp32 scores pick others for some (the test can fail)."""
    z, b = _logits(20000, E, dtype)
    bias = b / 50 if score == "softmax" else b
    want = _sorted_ids(torch.topk(BIASED[score](z, b), k, dim=-1).indices)
    _, ids = R.topk_gate(z, k, score=score, selection_bias=bias, round_scores=True)
    assert torch.equal(_sorted_ids(ids), want)
    _, fp32 = R.topk_gate(z, k, score=score, selection_bias=bias)
    assert (_sorted_ids(fp32) != want).any(-1).sum() > 0


@pytest.mark.parametrize("dtype", HALF)
def test_reference_picks_the_experts_of_mistral4(dtype):
    """Mistral-4's half-precision group sums: every token whose choice is not a tie in the
    router's own values routes as it does (fp32 sums pick other groups for a few)."""
    z, _ = _logits(20000, 128, dtype)
    want, tied = _mistral4_ids(z, 8, 4, 4)
    kw = dict(score="softmax", n_group=8, topk_group=4, group_score="top2_sum")
    _, ids = R.topk_gate(z, 4, round_scores=True, **kw)
    differ = (_sorted_ids(ids) != _sorted_ids(want)).any(-1)
    assert not (differ & ~tied).any()
    _, fp32 = R.topk_gate(z, 4, **kw)
    assert ((_sorted_ids(fp32) != _sorted_ids(want)).any(-1) & ~tied).any()


def test_rounding_known_values():
    """r(x): nearest even in the dtype; fp16 steps of 2^-24 below 2^-14 and +-FLT_MAX past 65504;
    sqrt(softplus) rounds twice, its sqrt correctly rounded (1 - 2^-11 in fp16: the fp32 sqrt is
    the rounding midpoint, the exact one is below it)."""
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 3e-8, 70000.0, -70000.0, 2 ** -25])
    assert R.round_to(x, torch.bfloat16).tolist() == [1.0, 1 + 2 ** -6, x[2].bfloat16().item(),
                                                      x[3].bfloat16().item(),
                                                      x[4].bfloat16().item(), 2 ** -25]
    fp16 = R.round_to(x, torch.float16)
    assert fp16[:3].tolist() == [1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 ** -24 * round(3e-8 / 2 ** -24)]
    assert fp16[3:5].tolist() == [R.FLT_MAX, -R.FLT_MAX] and fp16[5].item() == 0.0
    z = torch.tensor([[0.54052734375]], dtype=torch.float16)   # softplus(z) rounds to 1 - 2^-11
    v = R.selection_values(R.sanitize(z), "sqrtsoftplus", "scores", None,
                           round_dtype=torch.float16)
    assert v.item() == 1 - 2 ** -11 == F.softplus(z).sqrt().item()


KERNEL_CASES = [
    dict(score="sigmoid", bias=True),
    dict(score="sqrtsoftplus", bias=True, renormalize=True, scale=1.5),
    dict(score="softmax", bias=True),
    dict(score="softmax"),                                        # rounded probabilities tie
    dict(score="none", bias=True),
    dict(score="softmax", n_group=8, topk_group=3, group_score="top2_sum", renormalize=True),
    dict(score="sigmoid", bias=True, n_group=8, topk_group=4, group_score="top2_sum"),
    dict(score="softmax", n_group=4, topk_group=2, group_score="max"),
]


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="native extension not loaded")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("steered", [False, True])
@pytest.mark.parametrize("case", KERNEL_CASES,
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_matches_the_reference(case, steered, dtype):
    """The CPU kernel against the reference, with statistics and crowded logits (many rounded
    ties, broken to the lower index): the same ids and, to fp32 rounding, the same weights and
    statistics."""
    case = dict(case)
    E, k = 128, 6
    z, b = _logits(500, E, dtype, seed=3, spread=0.3)
    bias = b if case.pop("bias", False) else None
    steer = moe_route.SteerSpec(std={3: 0.5, 40: 0.5}, add={7: 0.25}, force={9: 1}) \
        if steered else None
    spec = RouterSpec(**case, round_scores=True)
    groups = torch.arange(500) % 3
    stats = moe_route.GateStats.zeros(3, E, coact=True)
    w, ids = moe_route.topk_gate(z, k, spec, selection_bias=bias, steer=steer, stats=stats,
                                 groups=groups)
    ref_stats = moe_route.GateStats.zeros(3, E, coact=True)
    table = steer.table(E) if steer else None
    rw, rids = R.topk_gate(z, k, **spec.op_kwargs(), selection_bias=bias, steer=table,
                           groups=groups, **dict(zip(moe_route.GateStats.NAMES,
                                                     ref_stats.buffers())))
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)
    for name, got, want in zip(moe_route.GateStats.NAMES, stats.buffers(), ref_stats.buffers()):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nothing_to_round(impl):
    """fp32 logits, and select_on="logits" (logits are not scores), are not rounded: the outputs
    are bit-identical to round_scores=False."""
    if impl == "kernel" and not HAS_CPU_KERNEL:
        pytest.skip("native extension not loaded")
    gate = moe_route.topk_gate if impl == "kernel" else \
        (lambda z, k, spec, **kw: R.topk_gate(z, k, **spec.op_kwargs(), **kw))
    for dtype, spec in [(torch.float32, RouterSpec("sigmoid")),
                        (torch.bfloat16, RouterSpec("softmax", select_on="logits")),
                        (torch.float16, RouterSpec("sigmoid", select_on="logits"))]:
        z, b = _logits(300, 64, dtype, seed=5)
        a = gate(z, 4, spec.replace(round_scores=True), selection_bias=b)
        c = gate(z, 4, spec, selection_bias=b)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_round_scores_must_be_a_bool():
    with pytest.raises(TypeError, match="RouterSpec: round_scores=1 must be a bool, got int"):
        RouterSpec(round_scores=1)
    with pytest.raises(TypeError, match="topk_gate: round_scores must be a bool"):
        R.topk_gate(torch.zeros(2, 4), 1, round_scores="yes")


# -- the families ------------------------------------------------------------------------------

FAMILY_CONFIGS = {
    "lfm2_moe": dict(num_experts=64, num_experts_per_tok=4, use_expert_bias=True),
    "deepseek_v4": dict(num_local_experts=384, num_experts_per_tok=6),
    "zaya": dict(num_experts=64),
    "mistral4": dict(n_routed_experts=128, num_experts_per_tok=4, n_group=8, topk_group=4),
}


def _router_calls(model, family, ids):
    """(router, args, kwargs) of every router call of one forward, then each call's (logits, ids)
    unpatched and patched on that same input (in a patched forward the later layers' inputs would
    differ: the patched weights are fp32)."""
    calls = []
    hooks = [r.register_forward_pre_hook(
        lambda m, a, kw: calls.append((m, tuple(x.clone() if torch.is_tensor(x) else x
                                                for x in a), dict(kw))), with_kwargs=True)
        for _, r in router_modules(model, family)]
    try:
        with torch.no_grad():
            model(**inputs(family, ids, model))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        ref = [m(*a, **kw) for m, a, kw in calls]
        with moe_route.patch(model):
            ours = [m(*a, **kw) for m, a, kw in calls]
    return [(r[0].float(), r[2], o[2]) for r, o in zip(ref, ours)]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_bf16_families_route_as_their_routers(family, monkeypatch):
    """bf16 models of the families that score in their dtype, each router called unpatched and
    patched on the same input: the family's experts for every token (up to Mistral-4's own ties,
    whose order torch.topk does not fix). Without round_scores in their adapters, LFM2 (64
    experts), DeepSeek-V4 (384) and Zaya (64) pick others here (17, 16 and 1 of 768 tokens);
    Mistral-4's differences were ties (the reference test above shows the rest)."""
    import tiny_models
    config_class, model_class, tiny = tiny_models.ALL_FAMILIES[family]
    monkeypatch.setitem(tiny_models.ALL_FAMILIES, family,
                        (config_class, model_class, {**tiny, **FAMILY_CONFIGS[family]}))
    model = build(family, torch.bfloat16)
    ids = torch.randint(0, 96, (8, 48), generator=torch.Generator().manual_seed(0))
    routed = _router_calls(model, family, ids)
    assert routed
    for z, want, got in routed:
        differ = (_sorted_ids(got) != _sorted_ids(want)).any(-1)
        if family == "mistral4":
            router = router_modules(model, family)[0][1]
            _, tied = _mistral4_ids(z.bfloat16(), router.num_group, router.topk_group,
                                    router.top_k)
            differ &= ~tied
        assert not differ.any(), f"{family}: {int(differ.sum())} tokens route differently"
