"""The native ``torch.ops.moe_route.topk_gate`` (and ``moe_route.topk_gate``) against the reference.

Ids must be identical (bit-exact wherever the selection values are computed exactly, otherwise up
to rare near-ties, see ``conftest.assert_same_selection``), weights equal to fp32 rounding, integer
statistics identical and float statistics equal to fp32 rounding.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import moe_route
from conftest import (INT_STATS, STAT_NAMES, assert_gate_matches, assert_same_selection,
                      assert_same_stats, assert_stats_equal, clone_stats, group_config,
                      random_bias, random_logits, requires_native, run_op, run_ref,
                      selection_keys, steer_table, tie_free_logits, zero_stats)

pytestmark = requires_native

SCORES = ("softmax", "sigmoid", "sqrtsoftplus", "none")
SELECT_ON = ("scores", "logits")
GROUPS = ("none", "max", "top2_sum")
POST = {
    "plain": {},
    "renorm": dict(renormalize=True),
    "renorm_eps_scale": dict(renormalize=True, renorm_eps=1e-20, scale=2.5),
}
STEERS = ("none", "add", "std", "std_unbiased", "abs", "force", "mixed_select_only")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPERTS = (1, 2, 8, 60, 64, 128, 160, 256, 384, 512)
E_K = [(E, k) for E in EXPERTS for k in sorted({1, 2, 8, 16, 32, E}) if k <= E]


def gate_kwargs(E, k, *, score="softmax", select_on="scores", bias=False, groups="none",
                post="plain", steer="none", device="cpu", seed=0):
    """Flat op keyword arguments for one named configuration (None if E/k cannot host it)."""
    grp = group_config(E, k, groups)
    if grp is None:
        return None
    n_group, topk_group, group_score = grp
    table, select_only, unbiased = steer_table(steer, E, seed=seed + 2, device=device)
    return dict(score=score, select_on=select_on,
                selection_bias=random_bias(E, seed=seed + 1, device=device) if bias else None,
                n_group=n_group, topk_group=topk_group, group_score=group_score,
                steer=table, steer_select_only=select_only, std_unbiased=unbiased,
                **POST[post])


def check(logits, k, kw, stats=None, exact=None):
    ref_stats = clone_stats(stats) if stats else None
    out = run_op(logits, k, stats, **kw)
    ref = run_ref(logits, k, ref_stats, **kw)
    assert_gate_matches(out, ref, logits, k, exact=exact, stats=stats, ref_stats=ref_stats, **kw)
    return out


# --------------------------------------------------------------------------------------------
# the knob grid
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steer", STEERS)
@pytest.mark.parametrize("post", POST)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("select_on", SELECT_ON)
@pytest.mark.parametrize("score", SCORES)
def test_knob_grid(device, score, select_on, bias, groups, post, steer):
    T, E, k = 67, 64, 6
    kw = gate_kwargs(E, k, score=score, select_on=select_on, bias=bias, groups=groups,
                     post=post, steer=steer, device=device)
    seed = zlib.crc32(f"{score}{groups}{steer}".encode()) % 1000
    check(random_logits(T, E, seed=seed, device=device), k, kw)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("E,k", E_K, ids=[f"E{E}-k{k}" for E, k in E_K])
def test_shapes_and_dtypes(device, E, k, dtype):
    logits = random_logits(23, E, seed=E * 31 + k, dtype=dtype, device=device)
    configs = [
        dict(),                                                        # S1 (OLMoE, Qwen3-MoE)
        dict(select_on="logits"),                                      # S2 (GPT-OSS)
        dict(score="sigmoid", bias=True, groups="top2_sum", post="renorm_eps_scale"),  # S3
        dict(score="softmax", groups="max", post="renorm_eps_scale"),  # S6a
        dict(score="sqrtsoftplus", bias=True, post="renorm"),          # S4 (DeepSeek-V4)
    ]
    tested = 0
    for cfg in configs:
        kw = gate_kwargs(E, k, device=device, **cfg)
        if kw is not None:
            check(logits, k, kw)
            tested += 1
    assert tested >= 3


@pytest.mark.parametrize("T", [0, 1, 7, 129, 1000])
@pytest.mark.parametrize("cfg", [
    dict(),
    dict(select_on="logits", score="sigmoid", post="renorm"),
    dict(score="sigmoid", bias=True, groups="top2_sum", post="renorm_eps_scale", steer="mixed"),
], ids=["softmax", "logits-sigmoid", "deepseek-v3-steered"])
def test_token_counts(device, T, cfg):
    E, k = 160, 8
    kw = gate_kwargs(E, k, device=device, **cfg)
    stats = zero_stats(3, E, device=device)
    groups = torch.randint(-1, 3, (T,), generator=torch.Generator().manual_seed(T)).to(device)
    logits = tie_free_logits(T, E, seed=T, device=device)
    if T == 0:  # the reference cannot run T=0 with groups (test_reference_empty_with_groups)
        w, ids = run_op(logits, k, stats, **kw, groups=groups)
        assert all(int(b.abs().sum()) == 0 for b in stats.values())
    else:
        w, ids = check(logits, k, dict(kw, groups=groups), stats)
    assert w.shape == (T, k) and ids.shape == (T, k)


def test_public_api_is_the_op(device):
    """moe_route.topk_gate with RouterSpec/SteerSpec/GateStats == torch.ops, bit for bit."""
    T, E, k = 300, 64, 6
    logits = random_logits(T, E, seed=5, device=device)
    bias = random_bias(E, device=device)
    table, _, _ = steer_table("mixed", E, device=device)
    spec = moe_route.RouterSpec(score="sigmoid", n_group=8, topk_group=3, group_score="top2_sum",
                                renormalize=True, renorm_eps=1e-20, scale=2.5)
    steer = moe_route.SteerSpec(add=table[0].cpu(), std=table[1].cpu().tolist(),
                                abs={int(e): float(table[2, e]) for e in table[2].nonzero()},
                                force=table[3].cpu(), select_only=True, std_unbiased=True)
    groups = torch.randint(-1, 2, (T,), generator=torch.Generator().manual_seed(1)).to(device)
    stats = moe_route.GateStats.zeros(2, E, device=device, coact=True)
    w, ids = moe_route.topk_gate(logits, k, spec, selection_bias=bias, steer=steer, stats=stats,
                                 groups=groups)
    flat = zero_stats(2, E, device=device)
    w2, ids2 = run_op(logits, k, flat, **spec.op_kwargs(), selection_bias=bias, steer=table,
                      steer_select_only=True, std_unbiased=True, groups=groups)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)
    got = dict(zip(STAT_NAMES, stats.buffers()))
    if device == "cpu":  # CUDA float statistics are reproducible to rounding only
        assert all(torch.equal(got[n], flat[n]) for n in STAT_NAMES)
    assert_stats_equal(got, flat)
    # keyword knobs build the same spec
    w3, ids3 = moe_route.topk_gate(logits, k, selection_bias=bias, steer=steer, **spec.op_kwargs())
    assert torch.equal(ids3, ids) and torch.equal(w3, w)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("select_on", SELECT_ON)
@pytest.mark.parametrize("score", SCORES)
def test_public_api_grid(device, score, select_on, groups):
    """moe_route.topk_gate (RouterSpec, SteerSpec, GateStats) against the reference."""
    T, E, k, G = 150, 64, 6, 2
    kw = gate_kwargs(E, k, score=score, select_on=select_on, bias=True, groups=groups,
                     post="renorm_eps_scale", steer="mixed_select_only", device=device)
    table = kw.pop("steer")
    steer = moe_route.SteerSpec(add=table[0], std=table[1], abs=table[2], force=table[3],
                                select_only=kw.pop("steer_select_only"),
                                std_unbiased=kw.pop("std_unbiased"))
    bias = kw.pop("selection_bias")
    spec = moe_route.RouterSpec(**kw)
    g = torch.randint(-1, G, (T,), generator=torch.Generator().manual_seed(8)).to(device)
    logits = tie_free_logits(T, E, seed=3, device=device)
    stats = moe_route.GateStats.zeros(G, E, device=device, coact=True)
    out = moe_route.topk_gate(logits, k, spec, selection_bias=bias, steer=steer, stats=stats,
                              groups=g)
    flat = dict(spec.op_kwargs(), selection_bias=bias, steer=steer.table(E, device),
                steer_select_only=True, std_unbiased=False, groups=g)
    ref_stats = zero_stats(G, E, device=device)
    ref = run_ref(logits, k, ref_stats, **flat)
    assert_gate_matches(out, ref, logits, k, stats=dict(zip(STAT_NAMES, stats.buffers())),
                        ref_stats=ref_stats, **flat)


def test_many_experts_in_groups(device):
    """E above the CUDA warp kernel's register budget with a group limit: the CPU kernel has no
    such limit; the CUDA kernel for more experts takes no group limit and says so."""
    T, E, k = 20, 2048, 8
    logits = random_logits(T, E, seed=1, device=device)
    kw = dict(score="sigmoid", selection_bias=random_bias(E, device=device), n_group=8,
              topk_group=4, group_score="top2_sum", renormalize=True)
    if device == "cuda":
        with pytest.raises(ValueError, match=r"group limit \(n_group=8, topk_group=4\) needs "
                                             r"num_experts <= 1024 on CUDA, got num_experts=2048"):
            run_op(logits, k, **kw)
        return
    check(logits, k, kw)


@pytest.mark.parametrize("E,k", [(1025, 8), (4096, 64), (16384, 64), (3000, 256)])
@pytest.mark.parametrize("kw", [dict(renormalize=True),
                                dict(score="sigmoid", renormalize=True, scale=2.5),
                                dict(select_on="logits")], ids=["softmax", "sigmoid", "logits"])
def test_more_than_1024_experts(device, E, k, kw):
    """Past 1024 experts CUDA runs a CTA per token (Doge's 16384 product keys): the same ids and
    weights as the reference, plain and with a bias, steering and statistics."""
    T = 24
    logits = random_logits(T, E, seed=E, device=device)
    check(logits, k, kw)
    steer = torch.zeros(4, E)
    steer[0, 7], steer[1, E - 1], steer[2, 3], steer[3, 5], steer[3, 0] = 0.5, 0.25, -0.1, 1, -1
    groups = torch.tensor([0, 0, 1, -1] * (T // 4), device=device)
    names = [n for n in STAT_NAMES if n != "coact" or E <= 4096]  # coact is [E, E] int64
    check(logits, k, dict(kw, steer=steer.to(device), groups=groups,
                          selection_bias=random_bias(E, device=device)),
          stats=zero_stats(2, E, device=device, names=names))


@pytest.mark.parametrize("E,k", [(16384, 64), (5000, 200)])
def test_more_than_1024_experts_led_by_one_thread(device, E, k):
    """The CTA kernel's selection caches each thread's best few keys and rescans when they run
    out: rows whose leaders all sit in one thread (experts e % 512 == 5, +8) make that thread
    rescan again and again; tied logits (a coarse grid) must still give the lower index."""
    T = 6
    logits = random_logits(T, E, seed=7, device=device)
    logits[:, 5::512] += 8
    check(logits, k, dict(renormalize=True))
    check((logits * 2).round() / 2, k, dict(score="sigmoid"))


def test_cuda_expert_limits(device):
    """Past 1024 experts, CUDA takes up to 16384 experts and k <= 256 (the CPU has no limit)."""
    if device != "cuda":
        pytest.skip("CUDA limits")
    with pytest.raises(ValueError, match=r"num_experts=16385 must be <= 16384 on CUDA"):
        run_op(torch.randn(2, 16385, device=device), 2)
    with pytest.raises(ValueError, match=r"k=257 must be <= 256 on CUDA when num_experts > 1024"):
        run_op(torch.randn(2, 2048, device=device), 257)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "forced"])
@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("topk_group,k", [(1, 8), (17, 8), (40, 32), (64, 64)])
def test_many_groups(device, topk_group, k, group_score, force):
    """n_group and topk_group above the kernel's insertion-sort limit (16)."""
    T, E, n_group = 60, 512, 64
    kw = dict(score="sigmoid", selection_bias=random_bias(E, device=device), n_group=n_group,
              topk_group=topk_group, group_score=group_score, renormalize=True)
    if force:
        kw["steer"] = steer_table("force", E, device=device)[0]
    check(random_logits(T, E, seed=topk_group, device=device), k, kw)


# Forced experts rank by tier: forced-on first, then the rest, then forced-off. Patterns where the
# forced experts outnumber k, or leave fewer than k others (in all of E or in the chosen groups).
FORCED = {"on_5": [1, 1, 1, 1, 1, 0, 0, 0],
          "off_all_but_2": [0, -1, -1, -1, 0, -1, -1, -1],
          "on_2_off_rest": [-1, 1, -1, -1, -1, 1, -1, -1],
          "all_forced": [1, -1, 1, -1, -1, 1, -1, 1],
          "one_each": [0, 0, 1, 0, 0, 0, -1, 0]}


# (E, k): E=16 is the pattern twice, groups "max" 4 groups of 4 with the best 2 chosen. Past
# k = 16 the CPU ranks the forced experts apart and the rest from a threshold: E=256 (past the
# lanes) is the pattern 32 times, so that 160 are forced on with "on_5" and 64 left free with
# "off_all_but_2"; groups "max" are 8 groups of 32, the best 4.
TIER_SHAPES = [(16, k) for k in (1, 3, 4, 7, 8)] + [(256, k) for k in (17, 24, 40, 100)]


@pytest.mark.parametrize("groups", ["none", "max"])
@pytest.mark.parametrize("E,k", TIER_SHAPES)
@pytest.mark.parametrize("pattern", list(FORCED))
def test_forced_tiers(device, pattern, E, k, groups):
    """Ids and weights as in the reference however many experts are forced on or off."""
    T = 50 if E == 16 else 40
    kw = dict(score="softmax", selection_bias=random_bias(E, device=device))
    if groups == "max":
        kw.update(n_group=E // 4 if E == 16 else 8, topk_group=2 if E == 16 else 4,
                  group_score="max")
    steer = torch.zeros(4, E, device=device)
    steer[3] = torch.tensor(FORCED[pattern] * (E // 8), dtype=torch.float32, device=device)
    steer[0] = torch.linspace(-1, 1, E, device=device)  # steered values differ from the logits
    kw["steer"] = steer
    w, ids = check(tie_free_logits(T, E, seed=k, device=device), k, kw)
    force = steer[3].cpu()
    tiers = torch.where(force > 0, 2, torch.where(force < 0, 0, 1))[ids.cpu().long()]
    assert bool((tiers[:, :-1] >= tiers[:, 1:]).all()), "a lower tier ranked above a higher one"


@pytest.mark.parametrize("E,k", [(13, 2), (300, 8), (1003, 24)])
def test_stats_stay_in_their_rows(device, E, k):
    """Per-group counts and weight sums stay in their group's row: buffers that are the first G
    rows of a larger tensor (E not a multiple of 8, so that the CPU's last block of eight experts
    would run past a row) leave the row after them at -0.0 (+0.0 added would turn it to +0.0),
    and the sums match the reference."""
    T, G = 203, 3
    logits = random_logits(T, E, seed=E, device=device)
    groups = torch.arange(T, device=device) // 7 % G  # runs of 7 tokens, the last group's too
    counts = torch.full((G + 1, E), 5, dtype=torch.int64, device=device)
    weight = torch.full((G + 1, E), -0.0, device=device)
    stats = moe_route.GateStats(counts=counts[:G], weight_sum=weight[:G])
    w, ids = moe_route.topk_gate(logits, k, stats=stats, groups=groups)
    assert bool((counts[G] == 5).all()) and bool(torch.signbit(weight[G]).all()), "wrote past G rows"
    ref = zero_stats(G, E, device=device, names=("counts", "weight_sum"))
    run_ref(logits, k, ref, groups=groups)
    assert torch.equal(counts[:G] - 5, ref["counts"])
    torch.testing.assert_close(weight[:G], ref["weight_sum"], rtol=1e-5, atol=1e-6)


def test_public_api_lean_stats(device):
    """GateStats with absent buffers (dense=False) go through the fast path as None."""
    T, E, k = 200, 32, 4
    logits = tie_free_logits(T, E, seed=2, device=device)
    stats = moe_route.GateStats.zeros(1, E, device=device, dense=False)
    w, ids = moe_route.topk_gate(logits, k, score="sigmoid", stats=stats)
    ref_stats = zero_stats(1, E, device=device, names=("tokens", "counts", "weight_sum"))
    ref = run_ref(logits, k, ref_stats, score="sigmoid")
    assert_gate_matches((w, ids), ref, logits, k, score="sigmoid",
                        stats=dict(tokens=stats.tokens, counts=stats.counts,
                                   weight_sum=stats.weight_sum), ref_stats=ref_stats)


def test_concurrent_python_threads(device):
    """Calls from several Python threads at once (the fast path releases the GIL) give the
    single-threaded results, statistics included."""
    import concurrent.futures

    E, k = 64, 6
    inputs = [random_logits(300, E, seed=s, device=device) for s in range(8)]
    kw = dict(score="sigmoid", selection_bias=random_bias(E, device=device), n_group=8,
              topk_group=4, group_score="top2_sum", renormalize=True)
    spec = moe_route.RouterSpec(**{n: v for n, v in kw.items() if n != "selection_bias"})

    def work(i):
        stats = moe_route.GateStats.zeros(1, E, device=device, coact=True)
        outs = [moe_route.topk_gate(inputs[i], k, spec, selection_bias=kw["selection_bias"],
                                    stats=stats) for _ in range(5)]
        return outs, stats

    serial = [work(i) for i in range(len(inputs))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(work, range(len(inputs))))
    for (outs_a, st_a), (outs_b, st_b) in zip(serial, parallel):
        for (wa, ia), (wb, ib) in zip(outs_a, outs_b):
            assert torch.equal(ia, ib) and torch.equal(wa, wb)
        assert_same_stats(st_a, st_b, rtol=1.3e-6, atol=1e-5)  # assert_close's fp32 bounds


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------

def _layouts(T, E, dtype, device):
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(T, E + 13, generator=g).to(dtype).to(device)
    tall = torch.randn(3 * T, E, generator=g).to(dtype).to(device)
    tr = torch.randn(E, T, generator=g).to(dtype).to(device)
    return {
        "column_slice": wide[:, 5:5 + E],
        "row_strided": tall[::3],
        "transposed": tr.t(),
        "expanded": tall[:1].expand(T, E),
        "offset_rows": tall[T + 1:2 * T + 1],
        "single_row_slice": wide[2:3, 1:1 + E],
        "single_column_of_transposed": tr.t()[:, 4:5],
    }


LAYOUTS = list(_layouts(2, 2, torch.float32, "cpu"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous_logits(device, layout, dtype):
    T, E = 45, 24
    logits = _layouts(T, E, dtype, device)[layout]
    E = logits.shape[1]
    k = min(4, E)
    for cfg in (dict(), dict(score="sigmoid", bias=True, groups="top2_sum", post="renorm")):
        kw = gate_kwargs(E, k, device=device, **cfg)
        if kw is None:
            continue
        out = check(logits, k, kw)
        dense = run_op(logits.contiguous(), k, **kw)
        assert torch.equal(out[1], dense[1]) and torch.equal(out[0], dense[0])


@pytest.mark.parametrize("which", ["selection_bias", "steer", "groups"])
def test_noncontiguous_side_inputs(device, which):
    T, E, k = 20, 16, 3
    logits = random_logits(T, E, device=device)
    kw = dict(selection_bias=random_bias(E, device=device), score="sigmoid",
              steer=steer_table("add", E, device=device)[0],
              groups=torch.zeros(T, dtype=torch.int64, device=device))
    wide = {"selection_bias": lambda t: torch.stack([t, t], 1)[:, 0],
            "steer": lambda t: t.t().contiguous().t(),
            "groups": lambda t: torch.stack([t, t], 1)[:, 1]}
    kw[which] = wide[which](kw[which])
    assert not kw[which].is_contiguous()
    check(logits, k, kw, zero_stats(1, E, device=device))


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups_dtype", [None, torch.int32, torch.int64],
                         ids=["nogroups", "int32", "int64"])
@pytest.mark.parametrize("steer", ["none", "add", "mixed_select_only"])
@pytest.mark.parametrize("score,select_on", [
    ("softmax", "scores"), ("softmax", "logits"), ("sigmoid", "scores"),
    ("sqrtsoftplus", "scores"), ("none", "scores"), ("none", "logits")])
def test_statistics_match_reference(device, score, select_on, steer, groups_dtype):
    T, E, k, G = 300, 60, 4, 3
    logits = tie_free_logits(T, E, seed=7, device=device)
    kw = gate_kwargs(E, k, score=score, select_on=select_on, steer=steer, post="renorm",
                     device=device)
    if groups_dtype is not None:
        g = torch.randint(-1, G, (T,), generator=torch.Generator().manual_seed(3))
        kw["groups"] = g.to(groups_dtype).to(device)
    check(logits, k, kw, zero_stats(G, E, device=device))


def ascending_groups(lengths, skip_every=0):
    """Sequence ids that never decrease, as ``record`` gives them: sequence i of lengths[i]
    tokens gets id 2i (ids 2i + 1 are never used), and with ``skip_every`` every that-many-th
    token is skipped (-1)."""
    g = torch.cat([torch.full((n,), 2 * i) for i, n in enumerate(lengths)])
    if skip_every:
        g[skip_every - 1::skip_every] = -1
    return g


# Sequences short and long across the CPU gate's chunks of 128 tokens (T >= 1024): 2-token to
# 300-token ones, one a chunk long, and runs that start and end at chunk edges.
SEQ_LENGTHS = [5, 1, 3, 200, 7, 121, 2, 130, 9, 1, 60, 128, 4, 300, 5, 5, 5, 40]


@pytest.mark.parametrize("E,k,score", [(60, 4, "softmax"), (300, 8, "softmax"),
                                       (300, 8, "sigmoid"), (1200, 20, "softmax")])
def test_statistics_of_ascending_groups(device, E, k, score):
    """Statistics by sequence when the ids never decrease: the CPU gate then adds a run that is
    not its chunk's first to the buffers at once. The sums must be the bits that ids in another
    order give (the order of the additions depends on the tokens' positions only), and match the
    reference. The buffers start non-zero, so that the order of two runs' additions shows."""
    groups = ascending_groups(SEQ_LENGTHS, skip_every=37)
    T, G = groups.numel(), 2 * len(SEQ_LENGTHS)
    logits = tie_free_logits(T, E, seed=E + k, device=device)
    start = zero_stats(G, E, device=device)
    gen = torch.Generator().manual_seed(5)
    for name, buf in start.items():
        if not buf.dtype.is_floating_point:
            buf.copy_(torch.randint(0, 50, buf.shape, generator=gen))
        else:
            buf.copy_(torch.rand(buf.shape, generator=gen) * 40)
    kw = dict(score=score, renormalize=True)
    stats = clone_stats(start)
    check(logits, k, dict(kw, groups=groups.to(device)), stats)
    if device != "cpu":
        return  # the CUDA kernels add with atomics: their order is not fixed
    # The same sequences under ids in a shuffled order, their rows shuffled alike.
    perm = torch.randperm(G, generator=gen)
    moved = {n: (b if n == "coact" else b[perm.argsort()].clone()) for n, b in start.items()}
    shuffled = torch.where(groups >= 0, perm[groups.clamp(min=0)], groups)
    assert not bool((shuffled[shuffled >= 0].diff() >= 0).all())
    run_op(logits, k, moved, **kw, groups=shuffled)
    for name, buf in stats.items():
        back = buf if name == "coact" else moved[name][perm]
        assert torch.equal(back, buf), f"{name}: ids in another order changed the sums' bits"


@pytest.mark.parametrize("names", [("counts",), ("coact",), ("tokens", "entropy_sum"),
                                   ("prob_sum",), ("weight_sum", "coact"), ("entropy_sum",)],
                         ids=lambda n: "+".join(n))
def test_statistics_subsets(device, names):
    """Any subset of buffers; G comes from the first per-group buffer present."""
    T, E, k, G = 150, 32, 3, 4
    logits = tie_free_logits(T, E, seed=9, device=device)
    groups = torch.randint(-1, G if any(n != "coact" for n in names) else 1, (T,),
                           generator=torch.Generator().manual_seed(4)).to(device)
    stats = zero_stats(G, E, device=device, names=names)
    check(logits, k, dict(score="sigmoid", groups=groups), stats)


def test_coact_only_accepts_any_group_ids(device):
    T, E, k = 10, 8, 2
    logits = tie_free_logits(T, E, device=device)
    groups = torch.tensor([0, 3, 1, -1, 2, 0, 5, 1, 1, 0], device=device)
    check(logits, k, dict(groups=groups), zero_stats(1, E, device=device, names=("coact",)))


def _full_stats_call(device, threads=None, T=1000, E=64, k=6):
    if threads is not None:
        torch.set_num_threads(threads)
    logits = random_logits(T, E, seed=21, device=device)
    groups = torch.randint(-1, 5, (T,), generator=torch.Generator().manual_seed(2)).to(device)
    stats = zero_stats(5, E, device=device)
    w, ids = run_op(logits, k, stats, score="sigmoid", selection_bias=random_bias(E, device=device),
                    n_group=8, topk_group=4, group_score="top2_sum", renormalize=True,
                    steer=steer_table("mixed", E, device=device)[0], groups=groups)
    return w, ids, stats


def _assert_bit_identical(a, b, float_stats=True):
    (wa, ia, sa), (wb, ib, sb) = a, b
    assert torch.equal(ia, ib)
    assert torch.equal(wa.view(torch.int32), wb.view(torch.int32))
    for name in STAT_NAMES:
        x, y = sa[name], sb[name]
        if x.dtype == torch.float32:
            if not float_stats:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
                continue
            x, y = x.view(torch.int32), y.view(torch.int32)
        assert torch.equal(x, y), name


def test_determinism_repeat(device):
    # CUDA float statistics use float atomics: documented as reproducible to rounding only
    _assert_bit_identical(_full_stats_call(device), _full_stats_call(device),
                          float_stats=device == "cpu")


def test_determinism_thread_count():
    """The CPU kernel promises results independent of the thread count, float stats included."""
    _assert_bit_identical(_full_stats_call("cpu", threads=1), _full_stats_call("cpu", threads=2))


def test_statistics_accumulate(device):
    T, E, k, G = 260, 40, 5, 2
    logits = tie_free_logits(T, E, seed=13, device=device)
    groups = torch.randint(0, G, (T,), generator=torch.Generator().manual_seed(5)).to(device)
    kw = dict(score="sigmoid", renormalize=True, groups=groups)
    g = torch.Generator().manual_seed(6)
    init = zero_stats(G, E, device=device)
    for name, buf in init.items():
        buf.copy_(torch.randint(0, 50, buf.shape, generator=g) if name in INT_STATS
                  else torch.rand(buf.shape, generator=g) * 10)
    stats, ref_stats, fresh = clone_stats(init), clone_stats(init), zero_stats(G, E, device=device)
    for _ in range(2):
        run_op(logits, k, stats, **kw)
        run_ref(logits, k, ref_stats, **kw)
    run_op(logits, k, fresh, **kw)
    assert_stats_equal(stats, ref_stats)
    for name in STAT_NAMES:
        want = init[name] + 2 * fresh[name]
        if name in INT_STATS:
            assert torch.equal(stats[name], want), name
        else:
            torch.testing.assert_close(stats[name], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("bad", [3, -2, 2 ** 31 - 1], ids=["G", "minus2", "huge"])
def test_out_of_range_groups(device, bad, groups_dtype):
    T, E, G = 300, 16, 3
    groups = torch.zeros(T, dtype=groups_dtype)
    groups[T - 1] = bad
    stats = zero_stats(G, E, device=device)
    logits = random_logits(T, E, device=device)
    with pytest.raises(ValueError, match=r"groups must be in \[-1, 3\)"):
        run_ref(logits.cpu(), 2, zero_stats(G, E), groups=groups)
    if device == "cuda":
        # documented: the CUDA kernel cannot raise (no host sync) and skips such tokens
        run_op(logits, 2, stats, groups=groups.to(device))
        want = zero_stats(G, E)
        run_ref(logits.cpu(), 2, want, groups=torch.where(groups == bad, -1, groups))
        assert_stats_equal(stats, want)
        return
    with pytest.raises(ValueError, match=r"groups must be in \[-1, 3\)"):
        run_op(logits, 2, stats, groups=groups.to(device))
    assert all(int(b.abs().sum()) == 0 for b in stats.values()), "buffers written on error"


def test_groups_without_statistics_are_ignored(device):
    """Without statistics buffers `groups` has no group count and is not range-checked."""
    T, E, k = 5, 8, 2
    logits = tie_free_logits(T, E, device=device)
    groups = torch.tensor([7, -5, 0, 1, 2], device=device)
    check(logits, k, dict(groups=groups))


def test_large_batch(device):
    T, E, k = 4096, 256, 8
    logits = random_logits(T, E, seed=99, device=device)
    kw = gate_kwargs(E, k, score="sigmoid", bias=True, groups="top2_sum",
                     post="renorm_eps_scale", device=device)
    assert kw["n_group"] == 8
    stats = zero_stats(1, E, device=device, names=("tokens", "counts", "coact"))
    w, ids = run_op(logits, k, stats, **kw)
    ref = run_ref(logits, k, **kw)
    v, tiers, gs = selection_keys(logits, k, **kw)
    same = assert_same_selection(ids, ref[1], v, tiers=tiers, group_scores=gs,
                                 topk_group=kw["topk_group"])
    torch.testing.assert_close(w[same.to(device)], ref[0][same.to(device)], rtol=1e-5, atol=1e-6)
    # the statistics count exactly the ids the kernel returned
    flat = ids.long().cpu().flatten()
    assert int(stats["tokens"]) == T
    assert torch.equal(stats["counts"][0].cpu(), torch.bincount(flat, minlength=E))
    assert torch.equal(stats["coact"].diag().cpu(), stats["counts"][0].cpu())
    assert int(stats["coact"].sum()) == T * k * k


@pytest.mark.slow
def test_very_large_batch_statistics(device):
    T, E, k, G = 65536, 256, 8, 4
    logits = random_logits(T, E, seed=98, device=device)
    groups = torch.randint(-1, G, (T,), generator=torch.Generator().manual_seed(9)).to(device)
    check(logits, k, dict(groups=groups, renormalize=True), zero_stats(G, E, device=device))


def test_selection_on_logits_is_bit_exact_with_ties(device):
    """Heavy exact ties (quantised logits) in every dtype: lower index wins, identically."""
    T, E, k = 200, 96, 12
    for dtype in DTYPES.values():
        logits = (random_logits(T, E, seed=4, dtype=torch.float32) * 2).round().clamp(-3, 3)
        logits = logits.to(dtype).to(device)
        for kw in (dict(), dict(select_on="logits", score="sigmoid"),
                   dict(score="none", n_group=8, topk_group=3, group_score="top2_sum"),
                   dict(score="sigmoid", select_on="logits", n_group=4, topk_group=2)):
            check(logits, k, kw)


@pytest.mark.parametrize("score", SCORES)
def test_nonfinite_rows(device, score):
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([
        [nan] * 8,
        [inf] * 8,
        [-inf] * 8,
        [inf, 0, inf, 1, nan, -inf, 2, inf],
        [nan, -inf, 0, 0, nan, 3, -inf, 1],
        [1e38, -1e38, 3e38, -3e38, 0, nan, 1, -1],
        [-0.0, 0.0, -0.0, 0.0, nan, -inf, 5, 5],
    ])
    for dtype in (torch.float32, torch.bfloat16):
        logits = rows.to(dtype).to(device)
        for select_on in SELECT_ON:
            for kw in (dict(), dict(renormalize=True), dict(selection_bias=torch.tensor(
                    [0.0, nan, inf, -inf, 1.0, -1.0, 0.5, 0.0], device=device))):
                if score == "sigmoid" and kw.get("renormalize"):
                    continue  # test_sigmoid_underflow_renormalized
                for k in (1, 3, 8):
                    check(logits, k, dict(kw, score=score, select_on=select_on))


@pytest.mark.parametrize("row", [[float("nan")] * 4, [-float("inf")] * 4,
                                 [-100.0, -95.0, -90.0, -120.0]],
                         ids=["nan", "neg_inf", "very_negative"])
def test_sigmoid_underflow_renormalized(device, row):
    logits = torch.tensor([row], device=device)
    check(logits, 2, dict(score="sigmoid", renormalize=True), exact=True)


@pytest.mark.parametrize("score", ["sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("E", [13, 33, 70])
def test_equal_logits_score_equally_wherever_they_stand(device, score, E):
    """A tensor of equal logits routes every token to experts 0, 1, 2 (ties to the lower index),
    at every value: the reference's elementwise scores must not round the vectorised part of the
    tensor differently from its tail (torch's own sigmoid and softplus do, at some values)."""
    values = torch.cat([torch.linspace(-30, 30, 301),
                        torch.tensor([2.2930943965911865, -29.459999084472656])])
    for v in values.tolist():
        logits = torch.full((7, E), v, device=device)
        _, ids = check(logits, 3, dict(score=score), exact=True)
        assert ids.tolist() == [[0, 1, 2]] * 7, v


@pytest.mark.parametrize("std_unbiased", [False, True])
def test_std_steering_of_rows_at_the_float_limits(device, std_unbiased):
    """Rows holding +-inf (clamped to +-FLT_MAX) overflow the std term's sums, to inf or NaN
    depending on the order of the additions; sd is then +inf on every backend, so a positive
    std entry lifts its expert to FLT_MAX and a negative one sinks it."""
    INF = float("inf")
    rows = [[INF, INF, -INF, -INF, 0.0, 0.0, 0.0, 0.0],
            [-INF, 0.0, INF, 0.0, -INF, 0.0, INF, 0.0],
            [INF] * 8, [3e38, 3e38, 1.0, 2.0, -3e38, 0.5, 0.0, 0.0],
            [0.0] * 7 + [INF]]
    logits = torch.tensor(rows, device=device)
    steer = torch.zeros(4, 8, device=device)
    steer[1, 4], steer[1, 5] = 0.5, -0.5
    check(logits, 3, dict(steer=steer, std_unbiased=std_unbiased), exact=True)
    _, ids = run_op(logits, 3, steer=steer, std_unbiased=std_unbiased)
    assert ids[0].tolist() == [0, 1, 4]  # expert 4 joins the +inf experts at FLT_MAX


def test_nan_in_force_row_forces_nothing(device):
    """A NaN force entry is neither > 0 nor < 0: the expert keeps its normal rank (as in the
    reference), it is not forced off."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]], device=device)
    steer = torch.zeros(4, 4, device=device)
    steer[3, 0] = float("nan")
    w, ids = check(logits, 1, dict(steer=steer), exact=True)
    assert ids.tolist() == [[0]]
