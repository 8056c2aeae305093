"""The CPU kernels' variants (csrc/cpu/isa.h) compute the same bits.

The rest of the suite runs the variant the CPU picks (the best it supports); here every gate path
(scores, selection on logits, groups, selection bias, steering, replay, statistics, k above the
insertion limit, half-precision logits and scores rounded to them, NaN/inf) and unpermute run
under each instruction-set variant the CPU supports, and their outputs and statistics must be
bit-identical to the baseline's. So must the gate's two paths for few experts: eight tokens at
a time (the default for E <= 128) and token by token.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moe_route
from moe_route import _loader
from conftest import requires_native, steer_table, zero_stats

pytestmark = requires_native

ISAS = _loader.native.cpu_isas() if _loader.native else []


@pytest.fixture
def restore_isa():
    before = _loader.native.cpu_isa()
    yield
    _loader.native.set_cpu_isa(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (so -0.0 differs from 0.0 and NaNs compare)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def logits_with_specials(T, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g) * 3
    if T > 4 and E > 3:
        x[1, 0], x[2, 1], x[3, 2] = float("nan"), float("inf"), -float("inf")
        x[4] = x[4, 0]  # a row of ties
    return x.to(dtype)


# (name, E, k, gate kwargs); steering, statistics, replay and dtype vary on top of these.
GATES = [
    ("softmax", 64, 8, {}),
    ("softmax_renorm", 60, 4, dict(renormalize=True)),
    ("softmax_k20", 130, 20, {}),
    ("topk_softmax", 32, 4, dict(select_on="logits")),
    ("sigmoid_groups", 256, 8, dict(score="sigmoid", n_group=8, topk_group=4,
                                    group_score="top2_sum", renormalize=True, renorm_eps=1e-20,
                                    scale=2.5, selection_bias=True)),
    ("groups_max", 64, 6, dict(n_group=8, topk_group=3, group_score="max", scale=1.5)),
    ("sqrtsoftplus", 72, 8, dict(score="sqrtsoftplus", renormalize=True, selection_bias=True)),
    ("none", 16, 2, dict(score="none")),
    # round_scores: scores rounded to the half-precision logits' dtype (plain fp32 otherwise)
    ("rounded_sigmoid", 384, 6, dict(score="sigmoid", selection_bias=True, round_scores=True)),
    ("rounded_sqrtsoftplus", 64, 4, dict(score="sqrtsoftplus", selection_bias=True,
                                         round_scores=True)),
    ("rounded_groups", 128, 4, dict(n_group=8, topk_group=4, group_score="top2_sum",
                                    round_scores=True)),
]


def gate_call(E, k, kw, *, steer, stats, replay, dtype, T=300, seed=0):
    """Runs one gate call on fresh inputs; returns every output and statistic."""
    kw = dict(kw)
    if kw.pop("selection_bias", False):
        kw["selection_bias"] = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1))
    logits = logits_with_specials(T, E, dtype, seed)
    if steer != "none":
        kw["steer"], kw["steer_select_only"], kw["std_unbiased"] = steer_table(steer, E)
    buffers = {}
    if stats:
        G = 3
        buffers = zero_stats(G, E)
        kw["groups"] = (torch.arange(T) % (G + 1) - 1).int()  # -1 (skipped) to G - 1
    if replay:
        ids = torch.rand(T, E, generator=torch.Generator().manual_seed(seed + 2)).argsort(1)[:, :k]
        ids[::3] = -1  # every third row selects as usual
        kw["replay"] = ids.int()
    w, ids = torch.ops.moe_route.topk_gate(logits, k, **kw, **buffers)
    return {"weights": w, "ids": ids, **buffers}


CALLS = [(g, steer, stats, replay, dtype)
         for g in GATES
         for steer, stats, replay, dtype in [("none", False, False, torch.float32),
                                             ("none", True, False, torch.bfloat16),
                                             ("mixed", True, False, torch.float32),
                                             ("std_unbiased", False, True, torch.float16),
                                             ("none", True, True, torch.float32)]]


@pytest.mark.skipif(len(ISAS) < 2, reason=f"this CPU runs one variant only ({ISAS})")
@pytest.mark.parametrize("gate,steer,stats,replay,dtype", CALLS,
                         ids=[f"{c[0][0]}-{c[1]}-{'stats' if c[2] else 'plain'}"
                              f"{'-replay' if c[3] else ''}-{str(c[4])[6:]}" for c in CALLS])
def test_gate_variants_are_bit_identical(restore_isa, gate, steer, stats, replay, dtype):
    _, E, k, kw = gate
    results = {}
    for isa in ISAS:
        _loader.native.set_cpu_isa(isa)
        results[isa] = gate_call(E, k, kw, steer=steer, stats=stats, replay=replay, dtype=dtype)
    base = results[ISAS[0]]
    for isa in ISAS[1:]:
        for key, ref in base.items():
            got = results[isa][key]
            assert torch.equal(bits(got), bits(ref)), (
                f"{isa} differs from {ISAS[0]} in {key}: "
                f"{(bits(got) != bits(ref)).nonzero()[:5].tolist()}")


@pytest.mark.skipif(len(ISAS) < 2, reason=f"this CPU runs one variant only ({ISAS})")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [77, 96])
def test_unpermute_variants_are_bit_identical(restore_isa, dtype, H):
    g = torch.Generator().manual_seed(3)
    T, E, k = 50, 16, 4
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].int()
    ids[5, 1] = -1  # a dropped slot
    weights = torch.rand(T, k, generator=g)
    plan = moe_route.dispatch_plan(ids, num_experts=E)
    y = (torch.randn(plan.row_slot.numel(), H, generator=g) * 4).to(dtype)
    outs = {}
    for isa in ISAS:
        _loader.native.set_cpu_isa(isa)
        outs[isa] = moe_route.unpermute(y, plan, weights)
    for isa in ISAS[1:]:
        assert torch.equal(bits(outs[isa]), bits(outs[ISAS[0]])), f"{isa} != {ISAS[0]}"


def test_variants_listed_and_set(restore_isa):
    assert ISAS[0] == "base" and set(ISAS) <= {"base", "avx2", "avx512"}
    assert moe_route.info()["cpu_isas"] == ISAS
    for isa in ISAS:
        _loader.native.set_cpu_isa(isa)
        assert _loader.native.cpu_isa() == isa == moe_route.info()["cpu_isa"]
    with pytest.raises(ValueError, match=r"cpu_isa: 'sse9' must be one this CPU runs \(base"):
        _loader.native.set_cpu_isa("sse9")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_env_variable_picks_the_variant():
    out = run_python("import moe_route; print(moe_route.info()['cpu_isa'])",
                     MOE_ROUTE_CPU_ISA="base")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "base"


def test_env_variable_the_cpu_cannot_run_warns_and_keeps_the_best():
    out = run_python("import moe_route; print(moe_route.info()['cpu_isa'])",
                     MOE_ROUTE_CPU_ISA="sse9")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ISAS[-1]
    assert "MOE_ROUTE_CPU_ISA ignored" in out.stderr and "'sse9' must be one" in out.stderr


@pytest.mark.parametrize("case", ["softmax_replay_renorm", "sqrtsoftplus_renorm"])
def test_exp_underflow_gives_the_references_weights(restore_isa, case):
    """exp below -87.3 is a denormal, not 0, in every variant: renormalised among the chosen
    experts such scores are the weight (the kernel gave all-zero weights where the reference
    gave 0.92 and 0.08), and prob_sum counts them."""
    if case == "softmax_replay_renorm":  # replayed experts 90 and 92 logits below the best
        x = torch.tensor([[100.0, 10.0, 8.0, 0.0], [0.0, -92.0, -103.0, -90.0]])
        kw = dict(renormalize=True, replay=torch.tensor([[1, 2], [3, 1]]))
    else:                                # DeepSeek-V4's scores of logits -90 and -95
        x = torch.tensor([[-90.0, -95.0, -120.0, -130.0], [-100.0, -88.0, -60.0, -103.0]])
        kw = dict(score="sqrtsoftplus", renormalize=True)
    want_w, want_ids = moe_route.reference.topk_gate(x, 2, **kw)
    want_p = torch.zeros(1, 4)
    moe_route.reference.topk_gate(x, 2, prob_sum=want_p, **kw)
    for isa in ISAS:
        _loader.native.set_cpu_isa(isa)
        stats = moe_route.GateStats(prob_sum=torch.zeros(1, 4))
        w, ids = moe_route.topk_gate(x, 2, stats=stats, **kw)
        assert torch.equal(ids, want_ids), isa
        assert w.sum(-1).gt(0.99).all(), (isa, w)
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=0, msg=isa)
        torch.testing.assert_close(stats.prob_sum, want_p, rtol=1e-6, atol=1e-45, msg=isa)


@pytest.mark.parametrize("kw", [dict(select_on="logits"), dict(renormalize=True)])
def test_long_sums_stay_accurate(restore_isa, kw):
    """Softmax over 3000 integer logits (many equal exps) taking all 3000: the weights within
    3e-7 of the fp64 values in every variant. A running fp32 sum per lane was 4.5e-5 off."""
    E = 3000
    x = (torch.randn(8, E, generator=torch.Generator().manual_seed(0)) * 5).round()
    _, ids = moe_route.reference.topk_gate(x, E, **kw)
    exact = moe_route.reference.gate_weights(x.double(), ids.long(), "softmax", **kw)
    for isa in ISAS:
        _loader.native.set_cpu_isa(isa)
        w, got = moe_route.topk_gate(x, E, **kw)
        assert torch.equal(got, ids), isa
        assert ((w.double() - exact).abs() / exact).max() < 3e-7, isa


@pytest.fixture
def restore_lanes():
    before = _loader.native.cpu_gate_lanes()
    yield
    _loader.native.set_cpu_gate_lanes(before)


# (name, E, k, gate kwargs) with E <= 128, the gates the eight-tokens-at-a-time path runs.
FEW_EXPERTS = [
    ("softmax", 8, 2, {}),
    ("softmax_renorm", 12, 3, dict(renormalize=True)),
    ("topk_softmax", 16, 4, dict(select_on="logits")),
    ("softmax_32", 32, 8, {}),
    ("topk_softmax_20", 20, 4, dict(select_on="logits")),
    # E > 16 but not a multiple of 4: the selection's four runs end in padding experts
    ("topk_softmax_31", 31, 5, dict(select_on="logits")),
    ("sigmoid_17", 17, 3, dict(score="sigmoid", renormalize=True, selection_bias=True)),
    ("sigmoid", 9, 8, dict(score="sigmoid", renormalize=True, renorm_eps=1e-20, scale=2.5,
                           selection_bias=True)),
    ("sqrtsoftplus", 16, 6, dict(score="sqrtsoftplus", renormalize=True, selection_bias=True)),
    ("topk_sigmoid", 16, 1, dict(score="sigmoid", select_on="logits")),   # Llama 4's
    ("none", 12, 2, dict(score="none", renormalize=True)),
    ("biased_softmax", 8, 2, dict(selection_bias=True)),
    ("rounded_sigmoid", 24, 6, dict(score="sigmoid", selection_bias=True, round_scores=True)),
    ("rounded_softmax", 13, 4, dict(round_scores=True)),
    ("rounded_sqrtsoftplus", 40, 6, dict(score="sqrtsoftplus", renormalize=True,
                                         selection_bias=True, round_scores=True)),
    ("all_chosen", 3, 3, {}),
    ("one_expert", 1, 1, {}),
    ("softmax_64", 64, 8, {}),  # OLMoE's
    ("topk_softmax_45", 45, 4, dict(select_on="logits")),
    ("renorm_100", 100, 6, dict(renormalize=True)),
    ("sigmoid_128", 128, 8, dict(score="sigmoid", renormalize=True, selection_bias=True)),
    # past 64 experts with k <= 4: in lanes in every build (the baseline's limits, lanes_pay)
    ("topk_sigmoid_128", 128, 1, dict(score="sigmoid", select_on="logits")),  # Llama 4 Maverick's
    ("topk_softmax_128", 128, 4, dict(select_on="logits")),  # GPT-OSS-120b's
    # sigmoid scores ranked as they are: the weights are the selection's values
    ("sigmoid_unbiased", 40, 4, dict(score="sigmoid")),
]
STEERS = ["none", "add", "std", "std_unbiased", "abs", "force", "force_many", "mixed",
          "mixed_select_only"]


def tied_logits(T, E, seed):
    """Logits in {-1, -0.0, 0, 1} with some +-3e38 and NaN: ties everywhere, signed zeros, and
    in odd rows no positive value, so that a row's maximum is often +0 or -0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (T, E), generator=g).float()
    for value, share in [(-0.0, 0.3), (3e38, 0.05), (-3e38, 0.05), (float("nan"), 0.05)]:
        x[torch.rand(T, E, generator=g) < share] = value
    x[1::2] = torch.where(x[1::2] > 0, -1.0, x[1::2])
    return x


@pytest.mark.parametrize("steer", STEERS)
@pytest.mark.parametrize("gate", FEW_EXPERTS, ids=[g[0] for g in FEW_EXPERTS])
def test_few_experts_eight_at_a_time_is_bit_identical(restore_lanes, restore_isa, gate, steer):
    """Eight at a time under each instruction-set variant against token by token under the
    widest. T=300 runs in chunks of 38 tokens (blocks of 8 and a partial one), T=5 in one partial
    block, T=27 in chunks of 16 and 11 (whose last 3 tokens go one by one); fp16 and bf16
    logits, statistics with every token in another group or groups in runs, replay of two rows
    in three and of every row, and tied logits."""
    _, E, k, kw = gate
    for T, stats, replay, dtype in [(300, True, False, torch.float32),
                                    (5, False, False, torch.bfloat16),
                                    (300, False, True, torch.float16),
                                    (64, True, True, torch.bfloat16),
                                    (27, True, False, torch.float32)]:
        results = {}
        for on, isa in [(False, ISAS[-1])] + [(True, isa) for isa in ISAS]:
            _loader.native.set_cpu_gate_lanes(on)
            _loader.native.set_cpu_isa(isa)
            assert _loader.native.cpu_gate_lanes() == on
            results[on, isa] = gate_call(E, k, kw, steer=steer, stats=stats, replay=replay,
                                    dtype=dtype, T=T)
            if dtype != torch.float32:
                continue
            # groups in runs of 13 tokens (-1: skipped): blocks of one group, of several and of
            # skipped tokens; T=5 has no groups (all in group 0). On tied logits too.
            steer_args = steer_table(steer, E) if steer != "none" else (None, False, False)
            kw_runs = {n: v for n, v in kw.items() if n != "selection_bias"}
            if kw.get("selection_bias"):
                kw_runs["selection_bias"] = torch.tensor([0.0, -0.0, 1.0] * 43)[:E]
            groups = (torch.arange(T) // 13 % 4 - 1).int() if T > 5 else None
            every_row = torch.rand(T, E, generator=torch.Generator().manual_seed(9))
            for name, x, replayed in [
                    ("runs", logits_with_specials(T, E, dtype, seed=7), None),
                    ("tied", tied_logits(T, E, seed=E), None),
                    ("all_replayed", logits_with_specials(T, E, dtype, seed=8),
                     every_row.argsort(1)[:, :k].int())]:
                buffers = zero_stats(3, E)
                w, ids = torch.ops.moe_route.topk_gate(
                    x, k, steer=steer_args[0], steer_select_only=steer_args[1],
                    std_unbiased=steer_args[2], groups=groups, replay=replayed, **kw_runs,
                    **buffers)
                results[on, isa].update({f"{name}_{n}": b for n, b in buffers.items()},
                                        **{f"{name}_weights": w, f"{name}_ids": ids})
        for isa in ISAS:
            for key, ref in results[False, ISAS[-1]].items():
                got = results[True, isa][key]
                assert torch.equal(bits(got), bits(ref)), (
                    f"eight at a time ({isa}) differs from token by token in {key} (T={T}, "
                    f"{dtype}): {(bits(got) != bits(ref)).nonzero()[:5].tolist()}")
