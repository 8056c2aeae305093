"""dispatch_plan / permute / unpermute: kernels against the reference, errors, compile."""
import pytest
import torch

import moe_route
from moe_route import reference as R

SHAPES = [(0, 2, 4, 1), (1, 1, 1, 1), (7, 2, 3, 1), (300, 8, 64, 1), (257, 4, 60, 16),
          (50, 3, 7, 4), (1000, 8, 256, 1), (5000, 2, 8, 128)]


def _ids(T, k, E, seed=0, sentinels=True):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-1, E + 2) if sentinels else (0, E)
    return torch.randint(lo, hi, (T, k), generator=g)


@pytest.mark.parametrize("T,k,E,block", SHAPES)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_plan_matches_reference(device, T, k, E, block, ids_dtype):
    ids = _ids(T, k, E).to(device=device, dtype=ids_dtype)
    plan = moe_route.dispatch_plan(ids, E, block)
    want = R.dispatch_plan(ids, E, block)
    for got, ref in zip(plan[:4], want):
        assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert plan.k == k


def test_plan_known_answer():
    ids = torch.tensor([[2, 0], [0, 3], [2, 9], [-1, 2]])
    plan = moe_route.dispatch_plan(ids, 4, block_size=2)
    assert plan.row_slot.tolist() == [1, 2, 0, 4, 7, -1, 3, -1, -1, -1, -1, -1]
    assert plan.expert_offsets.tolist() == [0, 2, 2, 6, 8]
    assert plan.counts.tolist() == [2, 0, 3, 1]
    assert plan.slot_row.tolist() == [2, 0, 1, 6, 3, -1, -1, 4]


@pytest.mark.parametrize("T,k,E,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_permute_unpermute_match_reference(device, T, k, E, block, dtype):
    ids = _ids(T, k, E, seed=1).to(device)
    plan = moe_route.dispatch_plan(ids, E, block)
    x = torch.randn(T, 40, device=device).to(dtype)
    rows = moe_route.permute(x, plan)
    assert rows.dtype == dtype and torch.equal(rows, R.permute(x, plan.row_slot, k))
    y = torch.randn(rows.shape[0], 40, device=device).to(dtype)
    w = torch.rand(T, k, device=device)
    out = moe_route.unpermute(y, plan, w)
    want = R.unpermute(y, plan.slot_row, w)
    if device == "cpu":
        assert torch.equal(out, want)  # same fp32 operations in the same order
    else:
        torch.testing.assert_close(out, want)


def test_roundtrip_is_weighted_sum_of_tokens():
    T, k, E = 64, 4, 8
    ids = _ids(T, k, E, sentinels=False)
    x = torch.randn(T, 16)
    w = torch.rand(T, k)
    plan = moe_route.dispatch_plan(ids, E)
    out = moe_route.unpermute(moe_route.permute(x, plan), plan, w)
    torch.testing.assert_close(out, x * w.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)


def test_plan_is_stable_and_deterministic():
    ids = _ids(3000, 8, 16, seed=3)
    a, b = moe_route.dispatch_plan(ids, 16), moe_route.dispatch_plan(ids, 16)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))
    for e in range(16):  # inside an expert, slots ascend
        lo, hi = a.expert_offsets[e], a.expert_offsets[e] + a.counts[e]
        seg = a.row_slot[lo:hi]
        assert bool((seg[1:] > seg[:-1]).all())


def test_thread_count_does_not_change_results():
    ids = _ids(20000, 4, 32, seed=5)
    x = torch.randn(20000, 8)
    w = torch.rand(20000, 4)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            plan = moe_route.dispatch_plan(ids, 32)
            outs.append((plan, moe_route.unpermute(moe_route.permute(x, plan), plan, w)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(outs[0][0][:4], outs[1][0][:4]))
    assert torch.equal(outs[0][1], outs[1][1])


def test_noncontiguous_x():
    ids = _ids(10, 2, 4, sentinels=False)
    wide = torch.randn(10, 64)
    x = wide[:, 8:40]  # row stride 64
    plan = moe_route.dispatch_plan(ids, 4)
    assert torch.equal(moe_route.permute(x, plan), R.permute(x.contiguous(), plan.row_slot, 2))
    transposed = torch.randn(64, 10).t()  # column-major: stride(1) != 1
    assert torch.equal(moe_route.permute(transposed, plan),
                       R.permute(transposed.contiguous(), plan.row_slot, 2))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: moe_route.dispatch_plan(torch.zeros(4, dtype=torch.long), 4), ValueError, "ids must be 2-D"),
    (lambda: moe_route.dispatch_plan(torch.zeros(2, 2), 4), TypeError, "ids must be torch.int32 or torch.int64"),
    (lambda: moe_route.dispatch_plan(torch.zeros(2, 2, dtype=torch.long), 0), ValueError, "num_experts=0"),
    (lambda: moe_route.dispatch_plan(torch.zeros(2, 2, dtype=torch.long), 4, 0), ValueError, "block_size=0"),
    (lambda: torch.ops.moe_route.permute(torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2),
     TypeError, "x must be float32"),
    (lambda: torch.ops.moe_route.permute(torch.zeros(2, 3), torch.zeros(4, dtype=torch.int32), 2),
     TypeError, "row_slot must be torch.int64"),
    (lambda: torch.ops.moe_route.permute(torch.zeros(2, 3), torch.zeros(4, dtype=torch.long), 0),
     ValueError, "k=0"),
    (lambda: torch.ops.moe_route.unpermute(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), torch.zeros(2, 2)),
     ValueError, "slot_row must be 1-D of length T\\*k=4"),
    (lambda: torch.ops.moe_route.unpermute(torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(2, 2)),
     ValueError, "y must be 2-D"),
])
def test_bad_input_names_the_argument(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_reference_rejects_the_same_inputs():
    with pytest.raises(ValueError, match="ids must be 2-D"):
        R.dispatch_plan(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="ids must be torch.int32 or torch.int64"):
        R.dispatch_plan(torch.zeros(2, 2), 4)


def test_opcheck():
    ids = _ids(33, 3, 8)
    plan = moe_route.dispatch_plan(ids, 8, 4)
    x = torch.randn(33, 16)
    y = torch.randn(plan.row_slot.shape[0], 16)
    w = torch.rand(33, 3)
    torch.library.opcheck(torch.ops.moe_route.dispatch_plan.default, (ids, 8, 4))
    torch.library.opcheck(torch.ops.moe_route.dispatch_plan.default, (ids[:0], 8, 1))
    torch.library.opcheck(torch.ops.moe_route.permute.default, (x, plan.row_slot, 3))
    torch.library.opcheck(torch.ops.moe_route.unpermute.default, (y, plan.slot_row, w))


def test_compile_fullgraph():
    def moe_combine(x, ids, w):
        plan = moe_route.dispatch_plan(ids, 8)
        return moe_route.unpermute(moe_route.permute(x, plan) * 2, plan, w)

    ids = _ids(40, 2, 8, sentinels=False)
    x, w = torch.randn(40, 16), torch.rand(40, 2)
    torch.testing.assert_close(torch.compile(moe_combine, fullgraph=True)(x, ids, w),
                               moe_combine(x, ids, w))
