"""The reference (the spec) against independent formulations and known answers.

* transformers-style compositions of every routing family the op claims to cover
  (research/transformers_moe_map.md section 3), written out by hand, and the real transformers
  router modules where they can be instantiated standalone;
* known answers for ties, the NaN/inf policy, steering, renormalisation and scaling;
* statistics against a from-scratch count written with plain Python loops.

Known-answer tests also run the native op (``impl`` fixture), since the answers hold for every
backend.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import moe_route
from conftest import (HAS_CPU_KERNEL, OP, STAT_NAMES, random_bias, tie_free_logits, zero_stats)
from moe_route import reference as R

NAN, INF = float("nan"), float("inf")
FLT_MAX = torch.finfo(torch.float32).max


@pytest.fixture(params=["reference", pytest.param("op", marks=pytest.mark.skipif(
    not HAS_CPU_KERNEL, reason="native extension not loaded"))])
def impl(request):
    """The flat-signature gate under test: the reference or torch.ops.moe_route.topk_gate."""
    return R.topk_gate if request.param == "reference" else OP


def by_expert(w, ids):
    """Weights and ids reordered by expert id: compares unsorted (sorted=False) top-k results."""
    ids = ids.long()
    order = ids.argsort(dim=1)
    return w.gather(1, order), ids.gather(1, order)


def assert_routes_equal(got, want, *, ordered=True, rtol=1.3e-6, atol=1e-6):
    (w, ids), (ww, wids) = got, want
    if not ordered:
        (w, ids), (ww, wids) = by_expert(w, ids), by_expert(ww, wids)
    assert torch.equal(ids.long(), wids.long()), (ids, wids)
    torch.testing.assert_close(w.float(), ww.float(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# hand-written compositions, one per routing family (transformers_moe_map.md section 3)
# --------------------------------------------------------------------------------------------

def s1_softmax_topk(lg, k, renorm):
    """S1a/S1b (OLMoE, Qwen3-MoE, Mixtral): softmax over E -> top-k -> optional renorm."""
    p = torch.softmax(lg.float(), dim=-1)
    w, idx = torch.topk(p, k)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def s2_topk_logits_softmax(lg, k):
    """S2 (GPT-OSS, Granite, JetMoE): top-k on logits -> softmax over the k chosen."""
    tl, idx = torch.topk(lg, k)
    return torch.softmax(tl, dim=-1), idx


def s2_topk_logits_sigmoid(lg, k, renorm):
    """S2 Cohere2 "sigmoid": top-k on logits -> sigmoid of the chosen -> optional renorm."""
    tl, idx = torch.topk(lg, k)
    w = torch.sigmoid(tl)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def s3_deepseek_v3(lg, k, bias, n_group, topk_group, norm, scale):
    """S3 noaux_tc: sigmoid + e_score_correction_bias, groups by top-2 sum, renorm + 1e-20."""
    N, E = lg.shape
    s = torch.sigmoid(lg)
    sc = s + bias
    gs = sc.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
    keep = torch.topk(gs, topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(gs).scatter_(1, keep, 1).bool()
    mask = mask.unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, E)
    idx = torch.topk(sc.masked_fill(~mask, -INF), k, dim=-1, sorted=False).indices
    w = s.gather(1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, idx


def s4_score_bias_renorm(lg, k, bias, score_fn, eps, scale):
    """S4 (MiniMax-M2, DeepSeek-V4, LFM2, AFMoE): score + bias selects, renorm (+eps), scale."""
    s = score_fn(lg)
    idx = torch.topk(s + bias, k, dim=-1, sorted=False).indices
    w = s.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + eps)
    return w * scale, idx


def s4_kolibri(lg, k, bias):
    """Kolibri1: top-k of logits + bias, weights sigmoid of the chosen logits."""
    idx = torch.topk(lg + bias, k, dim=-1).indices
    return torch.sigmoid(lg.gather(1, idx)), idx


def s5_longcat(lg, k, bias, scale):
    """S5 LongCat-Flash: softmax + bias selects, w = p[idx] * scale, no renorm."""
    p = torch.softmax(lg, dim=-1)
    idx = torch.topk(p + bias, k, dim=-1).indices
    return p.gather(1, idx) * scale, idx


def s6_group_softmax(lg, k, n_group, topk_group, group_score, norm, scale):
    """S6a DeepSeek-V2 group_limited_greedy (max, masked 0, no renorm) and S6b Mistral-4
    (top-2 sum, renorm)."""
    N, E = lg.shape
    p = torch.softmax(lg, dim=-1)
    gv = p.view(N, n_group, E // n_group)
    gs = gv.max(-1).values if group_score == "max" else gv.topk(2, dim=-1).values.sum(-1)
    keep = torch.topk(gs, topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(gs).scatter_(1, keep, 1).bool()
    mask = mask.unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, E)
    w, idx = torch.topk(p.masked_fill(~mask, 0.0), k, dim=-1, sorted=False)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, idx


def sqrtsoftplus(x):
    return F.softplus(x).sqrt()


SHAPES = [(8, 2), (64, 6), (160, 8)]


@pytest.mark.parametrize("E,k", SHAPES)
@pytest.mark.parametrize("renorm", [False, True], ids=["S1a", "S1b"])
def test_s1_softmax_topk_renorm(E, k, renorm):
    lg = tie_free_logits(50, E, seed=E)
    assert_routes_equal(R.topk_gate(lg, k, renormalize=renorm), s1_softmax_topk(lg, k, renorm))


@pytest.mark.parametrize("E,k", SHAPES)
def test_s2_gpt_oss(E, k):
    lg = tie_free_logits(50, E, seed=E + 1)
    assert_routes_equal(R.topk_gate(lg, k, select_on="logits"), s2_topk_logits_softmax(lg, k))
    # S2 equals renormalised S1 (same ids, same weights up to rounding)
    assert_routes_equal(R.topk_gate(lg, k, select_on="logits"),
                        R.topk_gate(lg, k, renormalize=True), rtol=1e-5)


@pytest.mark.parametrize("renorm", [False, True])
def test_s2_cohere2_sigmoid(renorm):
    lg = tie_free_logits(50, 64, seed=3)
    assert_routes_equal(R.topk_gate(lg, 6, select_on="logits", score="sigmoid",
                                    renormalize=renorm), s2_topk_logits_sigmoid(lg, 6, renorm))


@pytest.mark.parametrize("E,n_group,topk_group,k", [(16, 4, 2, 4), (64, 8, 4, 8), (256, 8, 4, 8),
                                                    (160, 5, 2, 6)])
@pytest.mark.parametrize("norm", [False, True])
def test_s3_deepseek_v3(E, n_group, topk_group, k, norm):
    lg = tie_free_logits(60, E, seed=E + 2)
    bias = random_bias(E, seed=E, scale=0.3)
    got = R.topk_gate(lg, k, score="sigmoid", selection_bias=bias, n_group=n_group,
                      topk_group=topk_group, group_score="top2_sum", renormalize=norm,
                      renorm_eps=1e-20, scale=2.5)
    want = s3_deepseek_v3(lg, k, bias, n_group, topk_group, norm, 2.5)
    assert_routes_equal(got, want, ordered=False)


@pytest.mark.parametrize("score,score_fn,eps,scale", [
    ("sigmoid", torch.sigmoid, 0.0, 1.0),          # MiniMax-M2
    ("sigmoid", torch.sigmoid, 1e-6, 2.5),         # LFM2-MoE
    ("sqrtsoftplus", sqrtsoftplus, 1e-20, 1.5),    # DeepSeek-V4
], ids=["minimax_m2", "lfm2", "deepseek_v4"])
def test_s4_score_bias_renorm(score, score_fn, eps, scale):
    E, k = 64, 6
    lg = tie_free_logits(60, E, seed=5)
    bias = random_bias(E, seed=6, scale=0.2)
    got = R.topk_gate(lg, k, score=score, selection_bias=bias, renormalize=True, renorm_eps=eps,
                      scale=scale)
    assert_routes_equal(got, s4_score_bias_renorm(lg, k, bias, score_fn, eps, scale),
                        ordered=False)


def test_s4_kolibri_bias_on_logits():
    E, k = 64, 4
    lg = tie_free_logits(60, E, seed=7)
    bias = random_bias(E, seed=8)
    got = R.topk_gate(lg, k, select_on="logits", score="sigmoid", selection_bias=bias)
    assert_routes_equal(got, s4_kolibri(lg, k, bias))


def test_s5_longcat_softmax_bias_scale():
    E, k = 64, 6
    lg = tie_free_logits(60, E, seed=9)
    bias = random_bias(E, seed=10, scale=0.01)
    got = R.topk_gate(lg, k, selection_bias=bias, scale=6.0)
    assert_routes_equal(got, s5_longcat(lg, k, bias, 6.0))


@pytest.mark.parametrize("group_score,norm,scale", [
    ("max", False, 16.0), ("top2_sum", True, 1.5)],
    ids=["S6a_deepseek_v2", "S6b_mistral4"])
@pytest.mark.parametrize("E,n_group,topk_group,k", [(16, 4, 2, 4), (160, 8, 3, 6)])
def test_s6_group_limited_softmax(E, n_group, topk_group, k, group_score, norm, scale):
    lg = tie_free_logits(60, E, seed=E + 11)
    got = R.topk_gate(lg, k, n_group=n_group, topk_group=topk_group, group_score=group_score,
                      renormalize=norm, scale=scale)
    want = s6_group_softmax(lg, k, n_group, topk_group, group_score, norm, scale)
    assert_routes_equal(got, want, ordered=False)


def test_softmax_top2_sum_groups_sum_probabilities(impl):
    lg = torch.tensor([[2.0, -10.0, 1.0, 0.9]])
    w, ids = impl(lg, 2, n_group=2, topk_group=1, group_score="top2_sum")
    assert ids[0].tolist() == [0, 1]  # p = [.58, 0, .21, .19]: group 0 sums .58, group 1 .40


# --------------------------------------------------------------------------------------------
# the real transformers router modules (weight = identity, so router logits == our logits)
# --------------------------------------------------------------------------------------------

E_HF, K_HF = 32, 4


def _hf_router(family):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=E_HF, num_attention_heads=2, num_key_value_heads=2,
                  num_experts_per_tok=K_HF)
    bias = None
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as cls
        cfg = transformers.Qwen3MoeConfig(num_experts=E_HF, norm_topk_prob=True, **common)
        kw = dict(renormalize=True)
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as cls
        cfg = transformers.MixtralConfig(num_local_experts=E_HF, **common)
        kw = dict(renormalize=True)
    elif family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter as cls
        cfg = transformers.GptOssConfig(num_local_experts=E_HF, **common)
        kw = dict(select_on="logits")
    elif family == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import \
            DeepseekV2TopkRouter as cls
        cfg = transformers.DeepseekV2Config(n_routed_experts=E_HF, n_group=4, topk_group=2,
                                            topk_method="group_limited_greedy",
                                            routed_scaling_factor=16.0, **common)
        kw = dict(n_group=4, topk_group=2, group_score="max", scale=16.0)
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import \
            DeepseekV3TopkRouter as cls
        cfg = transformers.DeepseekV3Config(n_routed_experts=E_HF, n_group=4, topk_group=2,
                                            norm_topk_prob=True, routed_scaling_factor=2.5,
                                            **common)
        bias = random_bias(E_HF, seed=12, scale=0.3)
        kw = dict(score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                  renormalize=True, renorm_eps=1e-20, scale=2.5)
    elif family == "deepseek_v4":
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import \
            DeepseekV4TopKRouter as cls
        cfg = transformers.DeepseekV4Config(n_routed_experts=E_HF, scoring_func="sqrtsoftplus",
                                            routed_scaling_factor=1.5, **common)
        bias = random_bias(E_HF, seed=13, scale=0.3)
        kw = dict(score="sqrtsoftplus", renormalize=True, renorm_eps=1e-20, scale=1.5)
    elif family == "minimax_m2":
        from transformers.models.minimax_m2.modeling_minimax_m2 import \
            MiniMaxM2TopKRouter as cls
        cfg = transformers.MiniMaxM2Config(num_local_experts=E_HF, **common)
        bias = random_bias(E_HF, seed=14, scale=0.3)
        kw = dict(score="sigmoid", renormalize=True)
    router = cls(cfg).float()
    with torch.no_grad():
        router.weight.copy_(torch.eye(E_HF))
        if getattr(router, "bias", None) is not None:
            router.bias.zero_()
        if bias is not None and hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(bias)
    return router, bias, kw


HF_FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3", "deepseek_v4",
               "minimax_m2"]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_router(family):
    router, bias, kw = _hf_router(family)
    lg = tie_free_logits(40, E_HF, seed=len(family))
    with torch.no_grad():
        out = router(lg, bias) if family == "minimax_m2" else router(lg)
    logits, w, idx = out
    assert torch.equal(logits, lg), "identity router weight must reproduce the logits"
    got = moe_route.topk_gate(lg, K_HF, selection_bias=bias, **kw)
    assert_routes_equal(R.topk_gate(lg, K_HF, selection_bias=bias, **kw), (w, idx),
                        ordered=False, rtol=1e-5)
    assert_routes_equal(got, (w, idx), ordered=False, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# known answers: ties, non-finite values, weights
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", R.SCORES)
@pytest.mark.parametrize("select_on", R.SELECT_ON)
@pytest.mark.parametrize("groups", [(1, 1, "max"), (4, 2, "max"), (4, 3, "top2_sum")],
                         ids=["nogroups", "max", "top2_sum"])
def test_all_equal_rows_pick_lowest_indices(impl, score, select_on, groups):
    n_group, topk_group, group_score = groups
    E = 16
    for value in (0.0, -3.5, 7.0, NAN, INF):
        lg = torch.full((3, E), value)
        for k in (1, 4, 8):
            w, ids = impl(lg, k, score=score, select_on=select_on, n_group=n_group,
                          topk_group=topk_group, group_score=group_score)
            assert ids.tolist() == [list(range(k))] * 3, (value, k)
            assert torch.equal(w, w[:1].expand_as(w)), "equal logits must give equal weights"


@pytest.mark.parametrize("row,k,want", [
    ([1, 3, 3, NAN, 2], 5, [1, 2, 4, 0, 3]),            # the spec's example
    ([NAN, -INF, 0, -INF, NAN], 5, [2, 0, 1, 3, 4]),     # NaN and -inf tie at -FLT_MAX
    ([INF, -1e38, FLT_MAX, NAN, -FLT_MAX], 5, [0, 2, 1, 3, 4]),  # inf == FLT_MAX
    ([-0.0, 0.0, -0.0, 0.0], 4, [0, 1, 2, 3]),          # -0.0 == +0.0
    ([0.0, -0.0, -1.0, -0.0], 3, [0, 1, 3]),
    ([2, 1, 2, 1, 2, 1], 4, [0, 2, 4, 1]),
], ids=["spec_example", "nan_eq_neg_inf", "inf_eq_flt_max", "signed_zero", "signed_zero_2",
        "ties"])
@pytest.mark.parametrize("select_on", R.SELECT_ON)
@pytest.mark.parametrize("score", R.SCORES)
def test_known_order(impl, row, k, want, score, select_on):
    w, ids = impl(torch.tensor([row], dtype=torch.float32), k, score=score, select_on=select_on)
    assert ids[0].tolist() == want
    assert bool(torch.isfinite(w).all())


def test_all_nan_row_routes_uniformly(impl):
    w, ids = impl(torch.full((2, 8), NAN), 8)
    assert ids[0].tolist() == list(range(8))
    torch.testing.assert_close(w, torch.full((2, 8), 1 / 8))


def test_infinite_experts_share_the_mass(impl):
    w, ids = impl(torch.tensor([[INF, 0.0, INF, INF, 5.0]]), 4)
    assert ids[0].tolist() == [0, 2, 3, 4]
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))
    w, ids = impl(torch.tensor([[INF, 0.0, INF]]), 2, select_on="logits")
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))


def test_nonfinite_selection_bias(impl):
    lg = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    bias = torch.tensor([NAN, 0.0, INF, -INF, 0.0])
    for score in ("sigmoid", "none", "softmax"):
        w, ids = impl(lg, 5, score=score, selection_bias=bias)
        assert ids[0].tolist() == [2, 1, 4, 0, 3], score  # +inf first, NaN/-inf last (lower idx)
        torch.testing.assert_close(w, R.score_fn(lg, score)[:, [2, 1, 4, 0, 3]])


def test_bias_changes_selection_not_weights(impl):
    lg = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.9])
    w, ids = impl(lg, 2, score="sigmoid", selection_bias=bias)
    assert ids[0].tolist() == [3, 0]  # sigmoid(0)+0.9 = 1.4 > sigmoid(3) = 0.95
    torch.testing.assert_close(w[0], torch.sigmoid(torch.tensor([0.0, 3.0])))
    # softmax scores with a bias select on probabilities + bias (not on logits + bias)
    w, ids = impl(lg, 2, selection_bias=torch.tensor([0.0, 0.0, 0.0, 0.6]))
    p = torch.softmax(lg[0], 0)  # [0.644, 0.237, 0.087, 0.032]: 0.032 + 0.6 beats 0.237 only
    assert ids[0].tolist() == [0, 3]  # (on logits + bias it would be [0, 1])
    torch.testing.assert_close(w[0], p[[0, 3]])


def test_renormalize_eps_and_scale(impl):
    lg = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    s = torch.sigmoid(lg[0, [1, 3]])
    for eps, scale in ((0.0, 1.0), (0.25, 1.0), (0.25, -3.0), (1e-20, 2.5)):
        w, ids = impl(lg, 2, score="sigmoid", renormalize=True, renorm_eps=eps, scale=scale)
        assert ids[0].tolist() == [1, 3]
        torch.testing.assert_close(w[0], s / (s.sum() + eps) * scale)
    w, _ = impl(lg, 2, score="sigmoid", scale=-3.0)
    torch.testing.assert_close(w[0], s * -3.0)


def test_renormalize_zero_sum_left_as_is(impl):
    lg = torch.tensor([[0.0, 0.0, -1.0], [1.0, -1.0, 0.0]])
    w, ids = impl(lg, 2, score="none", renormalize=True)
    assert w[0].tolist() == [0.0, 0.0]  # sum 0: left as is, no NaN
    assert w[1].tolist() == [1.0, 0.0]  # 1 / (1 + 0)
    w, _ = impl(lg, 3, score="none", renormalize=True)
    assert w[1].tolist() == [1.0, 0.0, -1.0]  # the sum is 0 again


def test_weights_follow_selection_order(impl):
    lg = tie_free_logits(20, 32, seed=1)
    for kw in (dict(), dict(select_on="logits"), dict(score="sigmoid"),
               dict(score="sqrtsoftplus", select_on="logits")):
        w, _ = impl(lg, 6, **kw)
        assert bool((w[:, :-1] >= w[:, 1:]).all()), kw


def test_reference_empty_with_groups():
    w, ids = R.topk_gate(torch.zeros(0, 8), 2, n_group=2, topk_group=1)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


# --------------------------------------------------------------------------------------------
# steering
# --------------------------------------------------------------------------------------------

def table(E, **rows):
    t = torch.zeros(4, E)
    for name, values in rows.items():
        for e, val in values.items():
            t[R.STEER_ROWS.index(name), e] = val
    return t


def test_steer_add_moves_expert_in(impl):
    lg = tie_free_logits(30, 16, seed=2)
    e = int(lg[0].argmin())
    w, ids = impl(lg, 2, steer=table(16, add={e: 100.0}))
    assert bool((ids[:, 0] == e).all())
    w, ids = impl(lg, 2, steer=table(16, add={e: -100.0}))
    assert not bool((ids == e).any())


@pytest.mark.parametrize("unbiased,want_ids,want_z0", [(False, [3, 0], 2.5 * math.sqrt(1.25)),
                                                      (True, [0, 3], 2.5 * math.sqrt(5 / 3))],
                         ids=["population", "unbiased"])
def test_steer_std(impl, unbiased, want_ids, want_z0):
    """z_e += lambda_e * sd(z0): population std by default, E - 1 with std_unbiased."""
    lg = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w, ids = impl(lg, 2, score="none", steer=table(4, std={0: 2.5}), std_unbiased=unbiased)
    assert ids[0].tolist() == want_ids
    got = dict(zip(ids[0].tolist(), w[0].tolist()))
    assert got[3] == 3.0
    assert got[0] == pytest.approx(want_z0, rel=1e-6)


def test_steer_std_single_expert_unbiased(impl):
    w, ids = impl(torch.tensor([[1.5], [NAN]]), 1, score="none", steer=table(1, std={0: 3.0}),
                  std_unbiased=True)
    assert w[:, 0].tolist() == [1.5, -FLT_MAX]  # E = 1: sd is 0


def test_steer_abs(impl):
    lg = torch.tensor([[-2.0, 1.0, 0.5]])
    w, ids = impl(lg, 1, score="none", steer=table(3, abs={0: 2.0}))
    assert ids[0].tolist() == [0] and w[0].tolist() == [2.0]  # -2 + 2 * |-2|
    w, ids = impl(lg, 3, score="none", steer=table(3, abs={0: -1.0, 1: 0.5}))
    assert ids[0].tolist() == [1, 2, 0] and w[0].tolist() == [1.5, 0.5, -4.0]


def test_steer_formula(impl):
    """z = z0 + add + std * sd(z0) + abs * |z0|, checked element by element (score "none")."""
    T, E = 6, 8
    lg = tie_free_logits(T, E, seed=4)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, E, generator=g)
    t[1, ::2] = 0.0
    t[3] = 0.0
    w, ids = impl(lg, E, score="none", steer=t)
    for row in range(T):
        z0 = lg[row].tolist()
        mean = sum(z0) / E
        sd = math.sqrt(sum((x - mean) ** 2 for x in z0) / E)
        z = [z0[e] + float(t[0, e]) + float(t[1, e]) * sd + float(t[2, e]) * abs(z0[e])
             for e in range(E)]
        want = sorted(range(E), key=lambda e: -z[e])
        assert ids[row].tolist() == want
        assert w[row].tolist() == pytest.approx([z[e] for e in want], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kw", [dict(),
                                dict(score="sigmoid", selection_bias=torch.full((16,), 0.1)),
                                dict(select_on="logits"),
                                dict(n_group=4, topk_group=2, group_score="top2_sum",
                                     score="sigmoid")],
                         ids=["softmax", "sigmoid_bias", "logits", "groups"])
def test_force_on_is_first_in_every_row(impl, kw):
    T, E = 40, 16
    lg = tie_free_logits(T, E, seed=5)
    lg[:, 13] = torch.where(torch.arange(T) % 2 == 0, torch.tensor(NAN), -50.0)
    kw = dict(kw)
    if "selection_bias" in kw:
        kw["selection_bias"] = kw["selection_bias"].clone()
        kw["selection_bias"][13] = -10.0  # a bias against it does not matter
    w, ids = impl(lg, 3, steer=table(E, force={13: 1.0, 6: 2.0}), **kw)
    assert ids[:, :2].tolist() == [[6, 13]] * T  # equal forced values: lower index first
    w1, ids1 = impl(lg, 3, score="none", steer=table(E, force={13: 1.0}))
    assert torch.equal(w1[:, 0], R.sanitize(lg).max(1).values)  # forced logit = row max


@pytest.mark.parametrize("kw", [dict(), dict(score="sigmoid"),
                                dict(n_group=4, topk_group=2, group_score="max")],
                         ids=["softmax", "sigmoid", "groups"])
def test_force_off_never_chosen_unless_needed(impl, kw):
    T, E = 40, 16
    lg = tie_free_logits(T, E, seed=6)
    lg[:, 2] = 100.0  # the best expert of every row ...
    steer = table(E, force={2: -1.0, 9: -5.0})
    k = 6 if kw.get("n_group") else 14  # never more than the normal experts available
    w, ids = impl(lg, k, steer=steer, **kw)
    assert not bool(((ids == 2) | (ids == 9)).any())  # ... is never chosen
    w, ids = impl(lg, E, steer=steer, score="none")
    assert ids[:, -2:].tolist() == [[2, 9]] * T  # k = E: forced-off experts last
    torch.testing.assert_close(w[:, -1], R.sanitize(lg).min(1).values)  # logit = row min


def test_force_on_keeps_its_group(impl):
    E = 16
    lg = torch.arange(E, dtype=torch.float32).flip(0)[None].repeat(2, 1)  # group 0 is best
    w, ids = impl(lg, 2, score="sigmoid", n_group=4, topk_group=1, group_score="top2_sum",
                  steer=table(E, force={14: 1.0}))
    assert ids[0].tolist() == [14, 12]  # group 3 stays eligible, its best other expert next


def test_select_only_weights_from_unsteered_logits(impl):
    T, E, k = 30, 16, 4
    lg = tie_free_logits(T, E, seed=8)
    steer = table(E, add={3: 4.0, 7: -4.0}, std={5: 1.0}, force={11: 1.0})
    for kw in (dict(), dict(score="sigmoid"), dict(select_on="logits"),
               dict(select_on="logits", score="sigmoid")):
        w_s, ids_s = impl(lg, k, steer=steer, **kw)
        w_o, ids_o = impl(lg, k, steer=steer, steer_select_only=True, **kw)
        assert torch.equal(ids_o, ids_s), kw
        idx = ids_o.long()
        score = kw.get("score", "softmax")
        if kw.get("select_on") == "logits":
            want = (torch.softmax(lg.gather(1, idx), -1) if score == "softmax"
                    else R.score_fn(lg.gather(1, idx), score))
        else:
            want = R.score_fn(lg, score).gather(1, idx)
        torch.testing.assert_close(w_o, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(w_o, w_s), "steering should have changed the weights"


def test_steer_spec_table_forms():
    E = 5
    s = moe_route.SteerSpec(add={1: 2.0}, std=[0, 0, 0.5, 0, 0], abs=torch.ones(E),
                            force={4: -1})
    t = s.table(E)
    assert t.shape == (4, E) and t.dtype == torch.float32
    assert t.tolist() == [[0, 2, 0, 0, 0], [0, 0, 0.5, 0, 0], [1] * 5, [0, 0, 0, 0, -1]]
    assert moe_route.SteerSpec().table(3).tolist() == [[0.0] * 3] * 4
    lg = tie_free_logits(4, E, seed=1)
    w, ids = moe_route.topk_gate(lg, 2, steer=s)
    w2, ids2 = R.topk_gate(lg, 2, steer=t)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w, w2)


def test_steer_spec_is_immutable():
    """Tables are cached per (E, device), so a SteerSpec must not change after construction."""
    values = {0: 5.0}
    s = moe_route.SteerSpec(add=values)
    assert s.table(4)[0].tolist() == [5, 0, 0, 0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.add = {1: 5.0}
    values[1] = 7.0  # the caller's dict was copied
    assert s.table(4)[0].tolist() == [5, 0, 0, 0]
    assert dataclasses.replace(s, add={1: 5.0}).table(4)[0].tolist() == [0, 5, 0, 0]


# --------------------------------------------------------------------------------------------
# statistics against plain loops
# --------------------------------------------------------------------------------------------

def _dense_q(z, score):
    E = len(z)
    if score in ("softmax", "none"):
        m = max(z)
        ex = [math.exp(x - m) for x in z]
        total = sum(ex)
        return [x / total for x in ex]
    if score == "sigmoid":
        s = [1 / (1 + math.exp(-x)) if x > -700 else 0.0 for x in z]
    else:
        s = [math.sqrt(math.log1p(math.exp(x)) if x < 20 else x) for x in z]
    total = sum(s)
    return [x / total for x in s] if total > 0 else [1 / E] * E


def loop_statistics(ids, w, zw, groups, G, score):
    """tokens, counts, weight_sum, prob_sum, entropy_sum, coact with plain Python loops."""
    T, k = ids.shape
    E = zw.shape[1]
    tokens, entropy = [0] * G, [0.0] * G
    counts = [[0] * E for _ in range(G)]
    wsum = [[0.0] * E for _ in range(G)]
    psum = [[0.0] * E for _ in range(G)]
    coact = [[0] * E for _ in range(E)]
    for t in range(T):
        g = 0 if groups is None else int(groups[t])
        if g < 0:
            continue
        tokens[g] += 1
        row = ids[t].tolist()
        for j, e in enumerate(row):
            counts[g][e] += 1
            wsum[g][e] += float(w[t, j])
            for f in row:
                coact[e][f] += 1
        q = _dense_q(zw[t].tolist(), score)
        for e in range(E):
            psum[g][e] += q[e]
        entropy[g] -= sum(x * math.log(x) for x in q if x > 0)
    i64 = dict(dtype=torch.int64)
    return dict(tokens=torch.tensor(tokens, **i64), counts=torch.tensor(counts, **i64),
                prob_sum=torch.tensor(psum), weight_sum=torch.tensor(wsum),
                entropy_sum=torch.tensor(entropy), coact=torch.tensor(coact, **i64))


@pytest.mark.parametrize("groups_dtype", [None, torch.int32, torch.int64],
                         ids=["nogroups", "int32", "int64"])
@pytest.mark.parametrize("steer_kind", ["none", "add", "add_select_only"])
@pytest.mark.parametrize("score,select_on", [("softmax", "scores"), ("softmax", "logits"),
                                             ("sigmoid", "scores"), ("sqrtsoftplus", "scores"),
                                             ("none", "logits")])
def test_statistics_against_loops(impl, score, select_on, steer_kind, groups_dtype):
    T, E, k, G = 40, 8, 3, 3
    lg = tie_free_logits(T, E, seed=3, lo=-3, hi=3)
    lg[5, 2] = NAN
    steer = None if steer_kind == "none" else table(E, add={1: 1.5, 4: -2.0})
    g = None
    if groups_dtype is not None:
        g = torch.randint(-1, G, (T,), generator=torch.Generator().manual_seed(1),
                          dtype=groups_dtype)
    stats = zero_stats(G, E)
    w, ids = impl(lg, k, score=score, select_on=select_on, renormalize=True, steer=steer,
                  steer_select_only=steer_kind == "add_select_only", groups=g, **stats)
    zw = R.sanitize(lg)
    if steer_kind == "add":
        zw = zw + steer[0]
    want = loop_statistics(ids.long(), w, zw, g, G, score)
    for name in STAT_NAMES:
        if want[name].dtype == torch.int64:
            assert torch.equal(stats[name], want[name]), name
        else:
            torch.testing.assert_close(stats[name], want[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(stats["coact"].diag(), stats["counts"].sum(0))
    assert int(stats["tokens"].sum()) == (T if g is None else int((g >= 0).sum()))
