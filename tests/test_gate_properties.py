"""Property-based tests (hypothesis): random shapes, knobs, ties and non-finite values.

Every example is compared with the reference (ids exactly or up to rare near-ties, weights to fp32
rounding, statistics when the selections agree) and checked for invariants that hold whatever the
reference says. Profiles: ``ci`` (40 examples, derandomised) and ``dev`` (see conftest).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from conftest import (HAS_CPU_KERNEL, W_ATOL, W_RTOL, assert_same_selection, assert_stats_equal,
                      clone_stats, exact_selection_expected, run_op, run_ref, selection_keys,
                      zero_stats)

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="native extension not loaded")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STEER_KINDS = ("none", "add", "std", "abs", "force_on", "force_off", "mixed")
NICE_E = (1, 2, 3, 7, 8, 60, 64, 96, 128, 160, 255, 256, 384, 512)


@st.composite
def gate_cases(draw):
    E = draw(st.one_of(st.sampled_from(NICE_E), st.integers(1, 512)))
    T = draw(st.one_of(st.integers(0, 8), st.integers(0, 300)))
    k = draw(st.one_of(st.integers(1, min(E, 16)), st.integers(1, E)))
    score = draw(st.sampled_from(("softmax", "sigmoid", "sqrtsoftplus", "none")))
    case = dict(
        T=T, E=E, k=k, seed=draw(st.integers(0, 2 ** 31 - 1)),
        dtype=draw(st.sampled_from(DTYPES)),
        levels=draw(st.one_of(st.none(), st.integers(1, 6))),      # tie density knob
        nonfinite=draw(st.sampled_from((0.0, 0.0, 0.03, 0.3))),
        bias=draw(st.booleans()),
        steer=draw(st.sampled_from(STEER_KINDS)),
        select_only=draw(st.booleans()),
        stats=draw(st.booleans()),
        G=draw(st.integers(1, 4)),
        groups_dtype=draw(st.sampled_from((None, torch.int32, torch.int64))),
        kw=dict(score=score, select_on=draw(st.sampled_from(("scores", "logits"))),
                # renormalising signed "none" scores is ill-conditioned (sums near 0): skipped
                renormalize=score != "none" and draw(st.booleans()),
                renorm_eps=draw(st.sampled_from((0.0, 1e-20, 1e-6))),
                scale=draw(st.sampled_from((1.0, 2.5, 0.5, -1.0))),
                std_unbiased=draw(st.booleans())),
    )
    divisors = [d for d in range(2, E + 1) if E % d == 0]
    if divisors and draw(st.booleans()):
        n_group = draw(st.sampled_from(divisors))
        per = E // n_group
        lo = -(-k // per)
        if lo <= n_group:
            case["kw"].update(n_group=n_group, topk_group=draw(st.integers(lo, n_group)),
                              group_score=draw(st.sampled_from(("max", "top2_sum"))))
    return case


def build(case):
    """Tensors of one case (deterministic in case["seed"]); returns (logits, kw, stats)."""
    T, E = case["T"], case["E"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(T, E, generator=g) * 3
    if case["levels"] is not None:
        x = (x / 3 * case["levels"]).round() / case["levels"]
    kw = dict(case["kw"])
    frac = case["nonfinite"]
    special = [float("nan"), float("inf"), -float("inf")]
    if kw["score"] == "sigmoid" and kw["renormalize"]:
        special = [float("inf")]  # see test_gate_kernel.test_sigmoid_underflow_renormalized
    if frac:
        mask = torch.rand(T, E, generator=g) < frac
        pick = torch.randint(0, len(special), (T, E), generator=g)
        x = torch.where(mask, torch.tensor(special)[pick], x)
    logits = x.to(case["dtype"])
    if case["bias"]:
        kw["selection_bias"] = torch.randn(E, generator=g) * 0.3
    kind = case["steer"]
    if frac and kind in ("std", "mixed"):
        kind = "add"  # sd(z0) of rows holding +-FLT_MAX depends on the summation order
    if kind != "none":
        t = torch.zeros(4, E)
        pick = torch.randperm(E, generator=g)[: max(1, E // 6)]
        row = {"add": 0, "std": 1, "abs": 2, "force_on": 3, "force_off": 3}.get(kind)
        if kind == "mixed":
            t[0] = torch.randn(E, generator=g)
            t[1, pick] = 0.5
            t[2, pick[:1]] = -0.5
            t[3, pick[:1]] = 1.0
        else:
            t[row, pick] = torch.randn(len(pick), generator=g) * 2
            if kind == "force_on":
                t[3, pick] = 1.0
            elif kind == "force_off":
                t[3, pick] = -1.0
        kw.update(steer=t, steer_select_only=case["select_only"])
    stats = None
    if case["stats"]:
        stats = zero_stats(case["G"], E, names=("tokens", "counts", "prob_sum", "weight_sum",
                                                 "entropy_sum", "coact"))
        if case["groups_dtype"] is not None:
            kw["groups"] = torch.randint(-1, case["G"], (T,), generator=g,
                                         dtype=case["groups_dtype"])
    return logits, kw, stats


def check_invariants(w, ids, case, kw, stats):
    T, E, k = case["T"], case["E"], case["k"]
    assert w.shape == (T, k) and ids.shape == (T, k)
    if T == 0:
        return
    assert int(ids.min()) >= 0 and int(ids.max()) < E
    assert bool((ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all()), "repeated id"
    assert bool(torch.isfinite(w).all()) or kw["score"] == "none"
    nonneg = kw["score"] != "none"
    if nonneg:
        signed = w * math.copysign(1.0, kw["scale"])
        assert bool((signed >= 0).all()), "negative weight from a non-negative score"
    if nonneg and kw["renormalize"] and kw["renorm_eps"] == 0.0:
        s = w.sum(1)
        ok = torch.isclose(s, torch.tensor(kw["scale"]), rtol=1e-5) | (s == 0)
        assert bool(ok.all()), f"renormalised rows sum to {s[~ok][:5].tolist()}"
    if kw.get("n_group", 1) > 1:  # at most topk_group distinct groups per row
        per = E // kw["n_group"]
        gid = (ids.long() // per).sort(1).values
        distinct = 1 + (gid[:, 1:] != gid[:, :-1]).sum(1)
        assert int(distinct.max()) <= kw["topk_group"]
    if stats is not None:
        g = kw.get("groups")
        n = T if g is None else int((g >= 0).sum())
        assert int(stats["tokens"].sum()) == n
        assert int(stats["counts"].sum()) == n * k
        assert int(stats["coact"].sum()) == n * k * k
        assert torch.equal(stats["coact"].diag(), stats["counts"].sum(0))
        if bool(torch.isfinite(stats["prob_sum"]).all()):
            torch.testing.assert_close(stats["prob_sum"].sum(1), stats["tokens"].float(),
                                       rtol=1e-4, atol=1e-4)


@given(gate_cases())
def test_matches_reference(case):
    check_matches_reference(case)


@pytest.mark.slow
@settings(max_examples=2000)
@given(gate_cases())
def test_matches_reference_extended(case):
    check_matches_reference(case)


def check_matches_reference(case):
    logits, kw, stats = build(case)
    knobs = {n: v for n, v in kw.items() if not isinstance(v, torch.Tensor)}
    note(f"logits {tuple(logits.shape)} {logits.dtype}; knobs {knobs}")
    k = case["k"]
    ref_stats = clone_stats(stats) if stats else None
    w, ids = run_op(logits, k, stats, **kw)
    check_invariants(w, ids, case, kw, stats)
    if case["T"] == 0 and kw.get("n_group", 1) > 1:
        return  # the reference crashes there: test_gate_reference.test_reference_empty_with_groups
    rw, rids = run_ref(logits, k, ref_stats, **kw)
    if exact_selection_expected(**kw):
        assert torch.equal(ids, rids)
        same = torch.ones(case["T"], dtype=torch.bool)
    else:
        v, tiers, gs = selection_keys(logits, k, **kw)
        same = assert_same_selection(ids, rids, v, tiers=tiers, group_scores=gs,
                                     topk_group=kw.get("topk_group", 1))
    torch.testing.assert_close(w[same], rw[same], rtol=W_RTOL, atol=W_ATOL, equal_nan=True)
    if stats is not None and bool(same.all()):
        if kw["score"] == "none" and case["nonfinite"]:
            # weights of +-FLT_MAX: the reference sums in fp64, the kernel in fp32 (overflow)
            stats = {n: b for n, b in stats.items() if b.dtype == torch.int64}
        assert_stats_equal(stats, ref_stats, rtol=1e-4, atol=1e-3)


@given(gate_cases())
def test_rows_are_independent(case):
    """Permuting tokens permutes the outputs bit for bit; a split batch gives the same rows."""
    logits, kw, _ = build(case)
    kw = {n: v for n, v in kw.items() if n != "groups"}
    T, k = case["T"], case["k"]
    w, ids = run_op(logits, k, **kw)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(case["seed"] % 1000))
    pw, pids = run_op(logits[perm], k, **kw)
    assert torch.equal(pids, ids[perm])
    assert torch.equal(pw.view(torch.int32), w[perm].view(torch.int32))
    cut = T // 3
    parts = [run_op(logits[:cut], k, **kw), run_op(logits[cut:], k, **kw)]
    assert torch.equal(torch.cat([p[1] for p in parts]), ids)
    assert torch.equal(torch.cat([p[0] for p in parts]).view(torch.int32), w.view(torch.int32))


@given(gate_cases())
def test_half_inputs_are_read_as_fp32(case):
    """fp16/bf16 logits give bit-identical results to the same values upcast to fp32."""
    logits, kw, _ = build(case)
    kw = {n: v for n, v in kw.items() if n != "groups"}
    w, ids = run_op(logits, case["k"], **kw)
    w32, ids32 = run_op(logits.float(), case["k"], **kw)
    assert torch.equal(ids, ids32)
    assert torch.equal(w.view(torch.int32), w32.view(torch.int32))


# --------------------------------------------------------------------------------------------
# the comparison helper itself must be able to fail
# --------------------------------------------------------------------------------------------

def _values():
    return torch.tensor([[0.9, 0.5, 0.5 + 1e-8, 0.1]] * 4)


def test_helper_accepts_identical_and_near_ties():
    v = _values()
    ref = torch.tensor([[0, 2, 1]] * 4)
    assert bool(assert_same_selection(ref.clone(), ref, v).all())
    got = ref.clone()
    got[1] = torch.tensor([0, 1, 2])  # swap of a near-tie
    same = assert_same_selection(got, ref, v)
    assert same.tolist() == [True, False, True, True]
    got = torch.tensor([[0, 2]] * 4)
    got[2] = torch.tensor([0, 1])  # near-tie at the k-th boundary
    assert assert_same_selection(got, torch.tensor([[0, 2]] * 4), v).tolist() == \
        [True, True, False, True]


@pytest.mark.parametrize("got,kw", [
    ([[0, 3, 1]] * 4, {}),                              # a real difference
    ([[0, 0, 1]] + [[0, 2, 1]] * 3, {}),                # repeated id
    ([[0, 1, 2]] * 4, dict(max_exceptions=2)),          # near-ties, but too many
    ([[0, 1, 2]] + [[0, 2, 1]] * 3,
     dict(tiers=torch.tensor([[1, 2, 1, 1]] * 4))),     # a swap across tiers
], ids=["different", "repeated", "too_many", "tiers"])
def test_helper_rejects(got, kw):
    with pytest.raises(AssertionError):
        assert_same_selection(torch.tensor(got), torch.tensor([[0, 2, 1]] * 4), _values(), **kw)
