"""Router replay in the gate (``topk_gate(..., replay=ids)``): a row of k distinct ids is the
token's selection, a row of -1 selects as usual, anything else is an error on the CPU.

Known answers: replaying the gate's own ids is the plain gate (weights and statistics); replayed
weights are ``reference.gate_weights`` of the (steered) logits at the given ids, in the given
order. The native op (CPU, and CUDA on a GPU machine) is compared with the reference.
"""
from __future__ import annotations

import pytest
import torch

import moe_route
from moe_route import reference as R
from conftest import (OP, STAT_NAMES, assert_gate_matches, assert_same_stats, clone_stats,
                      random_bias, random_logits, requires_native, run_op, run_ref, steer_table,
                      tie_free_logits, zero_stats)

CONFIGS = {
    "softmax": dict(),
    "softmax-renorm": dict(renormalize=True),
    "logits-softmax": dict(select_on="logits"),
    "deepseek-v3": dict(score="sigmoid", bias=True, n_group=8, topk_group=3,
                        group_score="top2_sum", renormalize=True, renorm_eps=1e-20, scale=2.5),
    "sqrtsoftplus": dict(score="sqrtsoftplus", bias=True, renormalize=True),
    "steered": dict(steer="mixed"),
    "steered-select-only": dict(steer="mixed_select_only", bias=True),
}


def _kwargs(name, E, device="cpu"):
    cfg = dict(CONFIGS[name])
    bias = random_bias(E, seed=3, device=device) if cfg.pop("bias", False) else None
    table, select_only, unbiased = steer_table(cfg.pop("steer", "none"), E, seed=4, device=device)
    return dict(cfg, selection_bias=bias, steer=table, steer_select_only=select_only,
                std_unbiased=unbiased)


def _replay(T, E, k, *, seed=0, skip_every=3, dtype=torch.int32, device="cpu"):
    """Random distinct ids per row; every ``skip_every``-th row is -1 (selected as usual)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k]
    if skip_every:
        rows[::skip_every] = -1
    return rows.to(dtype).to(device)


@pytest.fixture(params=["reference", pytest.param("op", marks=requires_native)])
def gate(request):
    return R.topk_gate if request.param == "reference" else OP


@pytest.mark.parametrize("name", CONFIGS)
def test_replaying_own_selection_is_the_plain_gate(gate, name):
    T, E, k = 97, 64, 6
    x = random_logits(T, E, seed=1)
    kw = _kwargs(name, E)
    groups = torch.randint(-1, 3, (T,), generator=torch.Generator().manual_seed(2))
    plain_stats, replay_stats = zero_stats(3, E), zero_stats(3, E)
    w, ids = gate(x, k, groups=groups, **kw, **plain_stats)
    rw, rids = gate(x, k, groups=groups, replay=ids, **kw, **replay_stats)
    assert torch.equal(rids, ids)
    torch.testing.assert_close(rw, w, rtol=1e-6, atol=1e-7)
    for n in STAT_NAMES:
        torch.testing.assert_close(replay_stats[n], plain_stats[n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_replayed_rows_known_answer(gate, name):
    """Replayed rows: the given ids in the given order, weights from the weight-side logits by
    the family's rule; rows of -1: the plain selection."""
    T, E, k = 60, 64, 6
    x = random_logits(T, E, seed=5)
    kw = _kwargs(name, E)
    replay = _replay(T, E, k, seed=6)
    w, ids = gate(x, k, replay=replay, **kw)
    pw, pids = gate(x, k, **kw)
    own = replay[:, 0] == -1
    assert torch.equal(ids[~own], replay[~own])
    assert torch.equal(ids[own], pids[own])
    torch.testing.assert_close(w[own], pw[own])
    z0 = R.sanitize(x)
    zw = z0 if kw["steer_select_only"] or kw["steer"] is None else \
        R.steer_logits(z0, kw["steer"], kw["std_unbiased"])[0]
    want = R.gate_weights(zw[~own], replay[~own].long(), kw.get("score", "softmax"),
                          kw.get("select_on", "scores"), kw.get("renormalize", False),
                          kw.get("renorm_eps", 0.0), kw.get("scale", 1.0))
    torch.testing.assert_close(w[~own], want, rtol=1e-5, atol=1e-7)


def test_replay_statistics_count_replayed_ids(gate):
    """counts/weight_sum/coact follow the replayed ids; tokens, prob_sum and entropy_sum do
    not depend on the selection (known answer: one token, hand-picked ids)."""
    E, k = 8, 2
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    stats = zero_stats(1, E)
    w, ids = gate(x, k, replay=torch.tensor([[7, 4]]), **stats)
    p = torch.softmax(x, -1)[0]
    assert ids.tolist() == [[7, 4]]
    torch.testing.assert_close(w[0], p[[7, 4]])
    want_counts = torch.zeros(1, E, dtype=torch.int64)
    want_counts[0, [4, 7]] = 1
    assert torch.equal(stats["counts"], want_counts)
    torch.testing.assert_close(stats["weight_sum"][0, [7, 4]], p[[7, 4]])
    assert stats["coact"][7, 4] == 1 and stats["coact"][4, 7] == 1 and stats["coact"][0, 1] == 0
    assert int(stats["tokens"][0]) == 1
    torch.testing.assert_close(stats["prob_sum"][0], p)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("name", CONFIGS)
@requires_native
def test_op_matches_reference(device, name, dtype):
    T, E, k = 300, 64, 6
    x = tie_free_logits(T, E, seed=7, device=device)
    kw = dict(_kwargs(name, E, device=device),
              replay=_replay(T, E, k, seed=8, dtype=dtype, device=device),
              groups=torch.randint(-1, 4, (T,), generator=torch.Generator().manual_seed(9)
                                   ).to(device))
    stats = zero_stats(4, E, device=device)
    ref_stats = clone_stats(stats)
    out = run_op(x, k, stats, **kw)
    ref = run_ref(x, k, ref_stats, **kw)
    assert_gate_matches(out, ref, x, k, stats=stats, ref_stats=ref_stats, **kw)


@requires_native
def test_public_api_replay(device):
    """moe_route.topk_gate(replay=...) with a RouterSpec, SteerSpec and GateStats == the op."""
    T, E, k = 200, 32, 4
    x = random_logits(T, E, seed=10, device=device)
    spec = moe_route.RouterSpec(score="sigmoid", renormalize=True)
    steer = moe_route.SteerSpec(std={3: 0.5, 9: 0.5})
    replay = _replay(T, E, k, seed=11, device=device)
    stats = moe_route.GateStats.zeros(1, E, device=device, coact=True)
    w, ids = moe_route.topk_gate(x, k, spec, steer=steer, stats=stats, replay=replay)
    raw = zero_stats(1, E, device=device)
    ow, oids = OP(x, k, **spec.op_kwargs(), steer=steer.table(E, device), replay=replay, **raw)
    assert torch.equal(ids, oids)
    torch.testing.assert_close(w, ow, rtol=0, atol=0)
    assert_same_stats(dict(zip(STAT_NAMES, stats.buffers())), raw)
    # the plain fast path (no steering, no statistics) takes replay too
    w2, ids2 = moe_route.topk_gate(x, k, spec, replay=replay)
    ow2, oids2 = OP(x, k, **spec.op_kwargs(), replay=replay)
    assert torch.equal(ids2, oids2) and torch.equal(w2, ow2)


BAD_ROWS = {
    "duplicate": ([[1, 1, 2]], "row 0 must hold 3 distinct expert ids in [0, 8)"),
    "too large": ([[1, 8, 2]], "got [1, 8, 2]"),
    "negative": ([[1, -2, 2]], "row 0 must hold 3 distinct"),
    "partly -1": ([[-1, -1, 2]], "or be all -1"),
}


@pytest.mark.parametrize("row", BAD_ROWS, ids=BAD_ROWS.keys())
def test_bad_rows_raise(gate, row):
    values, msg = BAD_ROWS[row]
    x = random_logits(2, 8)
    replay = torch.tensor([[0, 1, 2]] + values, dtype=torch.int32)
    with pytest.raises(ValueError) as info:
        gate(x, 3, replay=replay)
    text = str(info.value)
    assert "topk_gate: replay: row 1" in text
    assert msg.replace("row 0", "row 1") in text


@requires_native
@pytest.mark.parametrize("E,k", [(64, 8), (65, 8), (256, 40), (1000, 8)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("repeated", ["low", "highest"])
def test_duplicate_found_among_valid_rows(E, k, dtype, repeated):
    # Every valid row holds ids 0 and E - 1 (the same bits row after row: the check's id set must
    # start empty for each row) and k - 2 others, many sharing a 64-id word; one row repeats an id.
    T, bad = 50, 37
    g = torch.Generator().manual_seed(E + k)
    others = torch.rand(T, E - 2, generator=g).argsort(1)[:, :k - 2] + 1
    replay = torch.cat([torch.full((T, 1), E - 1), others, torch.zeros(T, 1, dtype=torch.long)],
                       1).to(dtype)
    x = random_logits(T, E)
    w, ids = OP(x, k, replay=replay)  # every row valid: routed as given
    assert torch.equal(ids.long(), replay.long())
    dup = 3 if repeated == "low" else E - 1
    replay[bad, 1], replay[bad, -2] = dup, dup
    replay[bad, 0] = E - 2 if repeated == "highest" else E - 1
    with pytest.raises(ValueError, match=f"topk_gate: replay: row {bad} must hold {k} distinct"):
        OP(x, k, replay=replay)


@pytest.mark.parametrize("replay,exc,msg", [
    (torch.zeros(4, 2, dtype=torch.int32), ValueError, "replay must have shape (4, 3)"),
    (torch.zeros(4, 3, dtype=torch.float32), TypeError, "replay must be torch.int32 or "
                                                        "torch.int64, got torch.float32"),
    (torch.zeros(4, 3, dtype=torch.int16), TypeError, "replay must be torch.int32 or "
                                                      "torch.int64, got torch.int16"),
    ("ids", TypeError, "replay must be a torch.Tensor or None"),
])
def test_bad_replay_argument(gate, replay, exc, msg):
    if gate is OP and isinstance(replay, str):
        pytest.skip("the dispatcher rejects a str before the op sees it")
    with pytest.raises(exc) as info:
        gate(random_logits(4, 8), 3, replay=replay)
    assert msg in str(info.value)


def test_public_api_bad_replay_names_it():
    with pytest.raises(TypeError, match="replay"):
        moe_route.topk_gate(random_logits(4, 8), 3, replay=[[0, 1, 2]] * 4)
    with pytest.raises(ValueError, match="replay: row 2"):
        moe_route.topk_gate(random_logits(4, 8), 3,
                            replay=torch.tensor([[0, 1, 2]] * 2 + [[5, 5, 5]] + [[-1] * 3]))


@requires_native
def test_opcheck_and_compile_with_replay(device):
    E, k = 16, 4
    x = random_logits(33, E, device=device)
    replay = _replay(33, E, k, seed=12, device=device)
    stats = zero_stats(2, E, device=device)
    groups = torch.randint(-1, 2, (33,), generator=torch.Generator().manual_seed(0)).to(device)
    torch.library.opcheck(OP.default, (x, k), dict(replay=replay, groups=groups, **stats))
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda a, r: OP(a, k, score="sigmoid", renormalize=True, replay=r),
                           fullgraph=True)
        w, ids = fn(x, replay)
    finally:
        torch._dynamo.reset()
    ew, eids = OP(x, k, score="sigmoid", renormalize=True, replay=replay)
    assert torch.equal(ids, eids)
    torch.testing.assert_close(w, ew, rtol=0, atol=0)


def test_topk_router_forward_replays():
    """The drop-in router takes replay ids too: those experts, with the router's own weights."""
    from moe_route.nn import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2, moe_route.RouterSpec(renormalize=True))
    x = torch.randn(5, 16)
    replay = torch.tensor([[3, 1], [-1, -1], [0, 7], [7, 0], [2, 5]])
    z, w, ids = router(x, replay=replay)
    plain = router(x)[2]
    assert torch.equal(ids[[0, 2, 3, 4]], replay[[0, 2, 3, 4]]) and torch.equal(ids[1], plain[1])
    p = torch.softmax(z, -1).gather(1, ids)
    torch.testing.assert_close(w, p / p.sum(-1, keepdim=True))
