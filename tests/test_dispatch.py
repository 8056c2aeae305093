"""dispatch_plan / permute / unpermute: kernels against the reference, errors, compile."""
import numpy as np
import pytest
import torch

import moe_route
from moe_route import reference as R

from conftest import requires_native

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


def test_row_token_known_answer():
    ids = torch.tensor([[2, 0], [0, 3], [2, 9], [-1, 2]])
    plan = moe_route.dispatch_plan(ids, 4, block_size=2)  # row_slot as in test_plan_known_answer
    assert plan.row_token.tolist() == [0, 1, 0, 2, 3, -1, 1, -1, -1, -1, -1, -1]


@pytest.mark.parametrize("T,k,E,block", SHAPES)
def test_row_token_gathers_what_permute_copies(device, T, k, E, block):
    """x[row_token] (zero rows at -1) is permute(x): a GEMM that gathers by itself needs no copy."""
    ids = _ids(T, k, E, seed=14).to(device)
    plan = moe_route.dispatch_plan(ids, E, block)
    rt = plan.row_token
    assert rt.dtype == torch.int64 and rt.shape == plan.row_slot.shape and rt.device == ids.device
    assert torch.equal(rt < 0, plan.row_slot < 0)
    assert bool(((rt >= -1) & (rt < max(T, 1))).all())
    x = torch.randn(T, 24, device=device).to(torch.bfloat16)
    gathered = torch.where((rt >= 0)[:, None], x[rt.clamp(min=0)], torch.zeros((), dtype=x.dtype,
                                                                                  device=device))
    assert torch.equal(gathered, moe_route.permute(x, plan))


def test_row_token_experts_without_permuted_copy():
    """Per-expert GEMMs on rows gathered through row_token, combined by unpermute, give the
    permute path's result (the index-only use the issue asks for; a BLAS may round a row
    differently for a different row count, hence the tolerance)."""
    T, k, E, H, O = 90, 3, 6, 16, 12
    ids = _ids(T, k, E, seed=15)
    plan = moe_route.dispatch_plan(ids, E, block_size=4)
    g = torch.Generator().manual_seed(16)
    x, W = torch.randn(T, H, generator=g), torch.randn(E, H, O, generator=g)
    w = torch.rand(T, k, generator=g)
    bounds = plan.expert_offsets.tolist()
    copied, indexed = moe_route.permute(x, plan), plan.row_token
    y_copy = torch.zeros(plan.row_slot.shape[0], O)
    y_index = torch.zeros(plan.row_slot.shape[0], O)
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        y_copy[lo:hi] = copied[lo:hi] @ W[e]
        rows = indexed[lo:hi]
        real = rows >= 0
        y_index[lo:hi][real] = x[rows[real]] @ W[e]
    torch.testing.assert_close(moe_route.unpermute(y_index, plan, w),
                               moe_route.unpermute(y_copy, plan, w), rtol=1e-6, atol=1e-6)


def test_row_token_compiles():
    def gather(x, ids):
        plan = moe_route.dispatch_plan(ids, 8)
        return x[plan.row_token.clamp(min=0)]

    ids = _ids(40, 2, 8, sentinels=False)
    x = torch.randn(40, 16)
    torch.testing.assert_close(torch.compile(gather, fullgraph=True)(x, ids), gather(x, ids))


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


@pytest.mark.parametrize("T,k,E,block", SHAPES)
def test_permute_without_tail_matches_reference_before_it(device, T, k, E, block):
    """zero_tail=False: the rows in use (before expert_offsets[E]) are the reference's, padding
    rows among them zeros; the tail after them is not part of the result."""
    ids = _ids(T, k, E, seed=2).to(device)
    plan = moe_route.dispatch_plan(ids, E, block)
    x = torch.randn(T, 40, device=device).to(torch.bfloat16)
    rows = moe_route.permute(x, plan, zero_tail=False)
    used = int(plan.expert_offsets[-1])
    assert rows.shape == (plan.row_slot.numel(), 40) and rows.dtype == x.dtype
    assert torch.equal(rows[:used], R.permute(x, plan.row_slot, k)[:used])


def test_permute_without_tail_known_answer():
    ids = torch.tensor([[2, 0], [0, 3], [2, 9], [-1, 2]])
    plan = moe_route.dispatch_plan(ids, 4, block_size=2)  # 8 of R = 12 rows in use
    x = torch.arange(1.0, 5.0)[:, None].expand(4, 3)  # token t's row is t + 1; strided
    rows = moe_route.permute(x, plan, zero_tail=False)
    assert rows.shape == (12, 3)
    assert rows[:8, 0].tolist() == [1, 2, 1, 3, 4, 0, 2, 0]


@pytest.mark.parametrize("zero_tail", [None, 0, 1, "no", np.bool_(True)])
def test_zero_tail_must_be_a_bool(zero_tail):
    """None left the tail unwritten as False does; "no" zeroed it as True does."""
    plan = moe_route.dispatch_plan(torch.tensor([[0, 1]]), 4, block_size=64)
    with pytest.raises(TypeError, match=r"permute: zero_tail=.* must be a bool, got "):
        moe_route.permute(torch.ones(1, 8), plan, zero_tail=zero_tail)


def _assert_bits_equal(got, want):
    """Same NaN positions and, elsewhere, the same bits (tells -0.0 from +0.0)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])


# Row lengths around the CPU kernel's 32- and 8-element vector blocks and its scalar tail.
@requires_native
@pytest.mark.parametrize("H", [1, 7, 8, 31, 32, 33, 72, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpermute_row_blocks_bit_exact(H, dtype):
    T, k, E = 37, 3, 5
    ids = _ids(T, k, E, seed=7)  # with dropped (sentinel) slots
    plan = moe_route.dispatch_plan(ids, E)
    g = torch.Generator().manual_seed(8)
    y = (torch.randn(plan.row_slot.shape[0], H, generator=g) * 3).to(dtype)
    y.view(-1)[::11] = -0.0
    y.view(-1)[5::97] = float("nan")
    y.view(-1)[7::89] = float("inf")
    w = torch.rand(T, k, generator=g)
    w[::4, 0] = 0.0  # inf * 0: NaN, as in the reference
    _assert_bits_equal(moe_route.unpermute(y, plan, w), R.unpermute(y, plan.slot_row, w))
    _assert_bits_equal(moe_route.permute(y[:T], plan), R.permute(y[:T], plan.row_slot, k))


@requires_native
def test_unpermute_bf16_rounding_and_weight_dtypes():
    """bf16 outputs round to nearest even like the reference's cast, for any weight dtype."""
    T, k, E, H = 64, 2, 4, 40
    ids = _ids(T, k, E, seed=9, sentinels=False)
    plan = moe_route.dispatch_plan(ids, E)
    g = torch.Generator().manual_seed(10)
    # 1 + j/256 with weights 0.5 and 0.5 lands on bf16 ties (8 fraction bits) half of the time
    y = 1 + torch.randint(0, 256, (plan.row_slot.shape[0], H), generator=g) / 256
    y = y.to(torch.bfloat16)
    for w in (torch.full((T, k), 0.5), torch.rand(T, k, generator=g).to(torch.bfloat16),
              torch.rand(T, k, generator=g).double()):
        _assert_bits_equal(moe_route.unpermute(y, plan, w), R.unpermute(y, plan.slot_row, w))


@requires_native
@pytest.mark.parametrize("no_thp", ["0", "1"])
def test_large_outputs_with_and_without_huge_pages(monkeypatch, no_thp):
    """Outputs of >= 2 huge pages are advised to use transparent huge pages (MOE_ROUTE_NO_THP=1:
    not); either way the rows are the reference's."""
    monkeypatch.setenv("MOE_ROUTE_NO_THP", no_thp)
    T, k, E, H = 2048, 4, 16, 384  # permuted: 12 MiB fp32, output 3 MiB
    ids = _ids(T, k, E, seed=11)
    plan = moe_route.dispatch_plan(ids, E, block_size=8)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T, H, generator=g)
    rows = moe_route.permute(x, plan)
    assert torch.equal(rows, R.permute(x, plan.row_slot, k))
    w = torch.rand(T, k, generator=g)
    assert torch.equal(moe_route.unpermute(rows, plan, w), R.unpermute(rows, plan.slot_row, w))


@pytest.mark.slow
def test_index_math_beyond_int32(device):
    """A permuted buffer of more than 2**31 elements (bf16, 4.3 GB): rows on both sides of the
    int32 element boundary, and tokens combined from rows past it, match the reference. Only
    sampled rows and tokens are compared, to stay cheap."""
    T, k, E, H = 4100, 64, 64, 8192
    assert T * k * H > 2**31
    g = torch.Generator().manual_seed(13)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, k), generator=g)
    plan = moe_route.dispatch_plan(ids.to(device), E)
    rows = moe_route.permute(x.to(device), plan)
    R_rows = rows.shape[0]
    edge = 2**31 // H  # first row whose elements lie past 2**31
    sample = torch.cat([torch.tensor([0, edge - 1, edge, edge + 1]),
                        torch.randint(0, R_rows, (64,), generator=g),
                        torch.arange(R_rows - 64, R_rows)]).to(device)
    src = plan.row_slot[sample] // k
    assert bool((src >= 0).all())
    assert torch.equal(rows[sample].cpu(), x[src.cpu()])

    w = torch.rand(T, k, generator=g).to(device)
    out = moe_route.unpermute(rows, plan, w)
    tokens = torch.cat([src, torch.randint(0, T, (64,), generator=g).to(device)]).unique()
    slot_rows = plan.slot_row.view(T, k)[tokens]
    assert int(slot_rows.max()) * H > 2**31
    want = R.unpermute(rows, slot_rows.reshape(-1), w[tokens])
    if device == "cpu":
        assert torch.equal(out[tokens], want)
    else:
        torch.testing.assert_close(out[tokens], want)


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


_LONG = dict(dtype=torch.long)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda d: moe_route.dispatch_plan(torch.zeros(4, **_LONG, device=d), 4), ValueError,
     "ids must be 2-D"),
    (lambda d: moe_route.dispatch_plan(torch.zeros(2, 2, device=d), 4), TypeError,
     "ids must be torch.int32 or torch.int64"),
    (lambda d: moe_route.dispatch_plan(torch.zeros(2, 2, **_LONG, device=d), 0), ValueError,
     "num_experts=0"),
    (lambda d: moe_route.dispatch_plan(torch.zeros(2, 2, **_LONG, device=d), 4, 0), ValueError,
     r"block_size=0 must be in \[1, 65536\]"),
    # a block that fits int64 but not memory: 4 experts x 2**31 rows of padding
    (lambda d: moe_route.dispatch_plan(torch.zeros(2, 2, **_LONG, device=d), 4, 2**31),
     ValueError, r"block_size=2147483648 must be in \[1, 65536\]"),
    (lambda d: torch.ops.moe_route.dispatch_plan(torch.zeros(2, 2, **_LONG, device=d), 4, 2**62),
     ValueError, "overflows int64"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, **_LONG, device=d),
                                           torch.zeros(4, **_LONG, device=d),
                                           torch.zeros(4, **_LONG, device=d), 2),
     TypeError, "x must be float32"),
    # T*k wraps to 8 = the plan's length: a wrong call that passed the length check
    (lambda d: torch.ops.moe_route.permute(torch.zeros(4, 3, device=d),
                                           torch.zeros(8, **_LONG, device=d),
                                           torch.zeros(8, **_LONG, device=d), 2**62 + 2),
     ValueError, r"permute: T\*k overflows int64 \(T=4, k=4611686018427387906\)"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(4, dtype=torch.int32, device=d),
                                           torch.zeros(4, **_LONG, device=d), 2),
     TypeError, "row_slot must be torch.int64"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(4, **_LONG, device=d),
                                           torch.zeros(4, **_LONG, device=d), 0),
     ValueError, "k=0"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(4, **_LONG, device=d),
                                           torch.zeros(4, dtype=torch.int32, device=d), 2),
     TypeError, "slot_row must be torch.int64"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(4, **_LONG, device=d),
                                           torch.zeros(6, **_LONG, device=d), 2),
     ValueError, "slot_row must be contiguous 1-D of length T\\*k=4"),
    (lambda d: torch.ops.moe_route.unpermute(torch.zeros(4, 3, device=d),
                                             torch.zeros(3, **_LONG, device=d),
                                             torch.zeros(2, 2, device=d)),
     ValueError, "slot_row must be 1-D of length T\\*k=4"),
    (lambda d: torch.ops.moe_route.unpermute(torch.zeros(4, device=d),
                                             torch.zeros(4, **_LONG, device=d),
                                             torch.zeros(2, 2, device=d)),
     ValueError, "y must be 2-D"),
    # expert_offsets (permute's unused tail): x [2, 3], k=2, so T*k = 4
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(4, **_LONG, device=d),
                                           torch.zeros(4, **_LONG, device=d), 2,
                                           torch.zeros(3, dtype=torch.int32, device=d)),
     TypeError, "expert_offsets must be torch.int64, got torch.int32"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(4, **_LONG, device=d),
                                           torch.zeros(4, **_LONG, device=d), 2,
                                           torch.zeros(1, **_LONG, device=d)),
     ValueError, "expert_offsets must be contiguous 1-D \\[E\\+1\\] with E >= 1"),
    (lambda d: torch.ops.moe_route.permute(torch.zeros(2, 3, device=d),
                                           torch.zeros(5, **_LONG, device=d),
                                           torch.zeros(4, **_LONG, device=d), 2,
                                           torch.zeros(4, **_LONG, device=d)),
     ValueError, "row_slot has R=5 rows, but a plan of T\\*k=4 ids over E=3 experts"),
])
def test_bad_input_names_the_argument(device, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(device)


_PLAN_2x2 = dict(ids=torch.tensor([[0, 1], [1, 2]]), num_experts=3)  # T=2, k=2, R=4


@pytest.mark.parametrize("call,exc,msg", [
    (lambda p: moe_route.unpermute(torch.zeros(2, 3), p, torch.ones(2, 2)), ValueError,
     r"unpermute: y must have the plan's R=4 rows .*got shape \(2, 3\)"),
    (lambda p: moe_route.unpermute(torch.zeros(4, 3), p, torch.ones(4, 1)), ValueError,
     r"unpermute: weights must have shape \[T, k\] = \[2, 2\] for this plan, got \(4, 1\)"),
    (lambda p: moe_route.permute(torch.zeros(3, 5), p), ValueError,
     r"permute: x must have the plan's T=2 rows \(one per token\), got shape \(3, 5\)"),
    (lambda p: moe_route.dispatch_plan(_PLAN_2x2["ids"], 3.0), TypeError,
     r"dispatch_plan: num_experts must be an int, got float"),
    (lambda p: moe_route.dispatch_plan(_PLAN_2x2["ids"], 3, block_size=None), TypeError,
     r"dispatch_plan: block_size must be an int, got NoneType"),
    (lambda p: moe_route.dispatch_plan(torch.zeros(2, 0, dtype=torch.int64), 3), ValueError,
     r"dispatch_plan: ids must have k >= 1 columns, got shape \(2, 0\)"),
    (lambda p: torch.ops.moe_route.dispatch_plan(torch.zeros(2, 0, dtype=torch.int64), 3, 1),
     ValueError, r"dispatch_plan: ids must have k >= 1 columns, got shape \(2, 0\)"),
    # The raw op cannot see the plan's R; on the CPU it reads the rows slot_row names.
    (lambda p: torch.ops.moe_route.unpermute(torch.zeros(2, 3), p.slot_row, torch.ones(2, 2)),
     ValueError, r"unpermute: slot_row holds rows in \[0, 3\], but y has 2 rows"),
    # ... and permute copies x's row of the slot each row names (a segfault before the check).
    (lambda p: torch.ops.moe_route.permute(torch.zeros(1, 3), p.row_slot, p.slot_row[:2], 2),
     ValueError, r"permute: row_slot holds slots in \[0, 3\], but x has T=1 rows and k=2, so "
                 r"T\*k=2 slots"),
    (lambda p: moe_route.permute(torch.zeros(2, 3), p._replace(row_slot=p.row_slot * 10**12)),
     ValueError, r"permute: row_slot holds slots in \[0, 3000000000000\]"),
    # the reference (the fallback) refuses them in the same words (it raised IndexError)
    (lambda p: R.unpermute(torch.zeros(2, 3), p.slot_row, torch.ones(2, 2)),
     ValueError, r"unpermute: slot_row holds rows in \[0, 3\], but y has 2 rows"),
    (lambda p: R.permute(torch.zeros(1, 3), p.row_slot, 2),
     ValueError, r"permute: row_slot holds slots in \[0, 3\], but x has T=1 rows and k=2, so "
                 r"T\*k=2 slots"),
    # these failed deep inside: AttributeError, ZeroDivisionError, the dispatcher's schema text,
    # the allocator asking for terabytes, or "x must be 2-D, got shape (0,)" for x=None
    (lambda p: moe_route.permute(torch.zeros(2, 3), None), TypeError,
     r"permute: plan must be a DispatchPlan \(from dispatch_plan\), got NoneType"),
    (lambda p: moe_route.unpermute(torch.zeros(4, 3), tuple(p)[:4], torch.ones(2, 2)), TypeError,
     r"unpermute: plan must be a DispatchPlan .*got tuple"),
    (lambda p: moe_route.permute(torch.zeros(2, 3), p._replace(slot_row=[0, 1, 2, 3])),
     TypeError, r"permute: plan.slot_row must be a torch.Tensor, got list"),
    (lambda p: moe_route.unpermute(torch.zeros(4, 3), p._replace(row_slot=None), torch.ones(2, 2)),
     TypeError, r"unpermute: plan.row_slot must be a torch.Tensor, got NoneType"),
    (lambda p: moe_route.permute(torch.zeros(2, 3), p._replace(k=0)), ValueError,
     r"permute: plan.k=0 must be an int >= 1"),
    (lambda p: moe_route.permute(torch.zeros(2, 3), p._replace(k=2.0)), ValueError,
     r"permute: plan.k=2.0 must be an int >= 1"),
    (lambda p: moe_route.permute(None, p), TypeError,
     r"permute: x must be a torch.Tensor, got NoneType"),
    (lambda p: moe_route.permute([[1.0] * 3] * 2, p), TypeError,
     r"permute: x must be a torch.Tensor, got list"),
    (lambda p: moe_route.unpermute(torch.zeros(4, 3), p, [[1.0, 1.0]] * 2), TypeError,
     r"unpermute: weights must be a torch.Tensor, got list"),
    (lambda p: moe_route.dispatch_plan(_PLAN_2x2["ids"], 2**40), ValueError,
     r"dispatch_plan: num_experts=1099511627776 must be in \[1, 1048576\]"),
    (lambda p: moe_route.dispatch_plan(_PLAN_2x2["ids"], 2**64), ValueError,
     r"dispatch_plan: num_experts=18446744073709551616 must be in \[1, 1048576\]"),
], ids=["unpermute_y_rows", "unpermute_weights_shape", "permute_x_rows", "num_experts_float",
        "block_size_none", "plan_k_zero", "op_plan_k_zero", "op_unpermute_rows_beyond_y",
        "op_permute_slots_beyond_x", "permute_corrupted_plan", "ref_unpermute_rows_beyond_y",
        "ref_permute_slots_beyond_x", "plan_none", "plan_tuple", "plan_slot_row_list",
        "plan_row_slot_none", "plan_k_edited_zero",
        "plan_k_float", "x_none", "x_list", "weights_list", "num_experts_huge",
        "num_experts_past_int64"])
def test_plan_mismatches_name_the_argument(call, exc, msg):
    """Arguments that do not fit the plan are refused before any row is read (an unpermute of x
    instead of the expert outputs used to read past the end of it)."""
    plan = moe_route.dispatch_plan(**_PLAN_2x2)
    with pytest.raises(exc, match=msg):
        call(plan)


@requires_native
def test_eager_calls_take_the_fast_path(monkeypatch):
    """Plain eager calls go through the pybind fast paths (4-8 us less per call than torch.ops and
    the Python autograd kernel); a call that needs a gradient is handed back (None) and gets its
    backward from the checked path."""
    from moe_route import dispatch
    seen = []

    def spy(name, fast):
        def call(*args):
            result = fast(*args)
            seen.append((name, result))
            return result
        return call

    for name in ("_plan_fast", "_permute_fast", "_unpermute_fast"):
        monkeypatch.setattr(dispatch, name, spy(name, getattr(dispatch, name)))
    ids = torch.tensor([[0, 2], [1, 2], [2, 0]])
    x, w = torch.randn(3, 4), torch.rand(3, 2)
    plan = moe_route.dispatch_plan(ids, 3)
    out = moe_route.unpermute(moe_route.permute(x, plan), plan, w)
    assert [name for name, _ in seen] == ["_plan_fast", "_permute_fast", "_unpermute_fast"]
    assert all(result is not None for _, result in seen)
    torch.testing.assert_close(out, R.unpermute(R.permute(x, plan.row_slot, 2), plan.slot_row, w),
                               rtol=0, atol=0)
    seen.clear()
    xg = x.clone().requires_grad_()
    rows = moe_route.permute(xg, plan)
    assert seen == [("_permute_fast", None)] and rows.grad_fn is not None
    rows.sum().backward()
    assert torch.equal(xg.grad, torch.full_like(x, 2.0))  # each token feeds its k = 2 rows


def test_public_ops_on_meta_tensors():
    """Meta tensors run the fake kernels (shapes only), not the reference."""
    ids = torch.empty(5, 2, dtype=torch.int64, device="meta")
    plan = moe_route.dispatch_plan(ids, 8, block_size=4)
    assert plan.row_slot.shape == (10 + 8 * 3,) and plan.slot_row.shape == (10,)
    rows = moe_route.permute(torch.empty(5, 16, device="meta"), plan)
    assert rows.shape == (34, 16) and rows.device.type == "meta"
    out = moe_route.unpermute(rows, plan, torch.empty(5, 2, device="meta"))
    assert out.shape == (5, 16) and out.device.type == "meta"


def test_plan_or_weights_on_another_device_are_refused():
    """A meta plan (or weights) beside CPU rows used to run the shape-only kernel and return
    uninitialised memory."""
    ids = torch.tensor([[0, 1], [1, 2]])
    plan = moe_route.dispatch_plan(ids, 3)
    x = torch.arange(8.0).view(2, 4)
    on_meta = plan._replace(row_slot=plan.row_slot.to("meta"))
    with pytest.raises(ValueError, match="permute: row_slot must be on x's device cpu, got meta"):
        moe_route.permute(x, on_meta)
    with pytest.raises(ValueError, match="permute: row_slot must be on x's device cpu"):
        moe_route.permute(x, moe_route.dispatch_plan(ids.to("meta"), 3))
    rows = moe_route.permute(x, plan)
    with pytest.raises(ValueError, match="unpermute: weights must be on y's device cpu"):
        moe_route.unpermute(rows, plan, torch.ones(2, 2, device="meta"))


def _combine_grads(x, w, W, plan, dispatch):
    """Gradients of sum(c * unpermute(permute(x) @ W, w)) through the given permute/unpermute.
    Only the rows in use go through W, as in a grouped GEMM over the plan's offsets: the unused
    tail of permute(..., zero_tail=False) holds whatever memory held."""
    x, w, W = (t.detach().clone().requires_grad_() for t in (x, w, W))
    rows = dispatch.permute(x, plan)
    used = int(plan.expert_offsets[-1])
    y = torch.cat([rows[:used] @ W, rows.new_zeros(rows.shape[0] - used, W.shape[1])])
    out = dispatch.unpermute(y, plan, w)
    c = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    (out.float() * c.float()).sum().backward()
    return out, x.grad, w.grad, W.grad


class _Reference:
    @staticmethod
    def permute(x, plan):
        return R.permute(x, plan.row_slot, plan.k)

    @staticmethod
    def unpermute(y, plan, w):
        return R.unpermute(y, plan.slot_row, w)


class _Public:
    def __init__(self, zero_tail=True):
        self.zero_tail = zero_tail

    def permute(self, x, plan):
        return moe_route.permute(x, plan, zero_tail=self.zero_tail)

    unpermute = staticmethod(moe_route.unpermute)


@pytest.mark.parametrize("T,k,E,block", [(1, 1, 1, 1), (7, 2, 3, 1), (50, 3, 7, 4),
                                         (300, 8, 64, 1), (257, 4, 60, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_tail", [True, False])
def test_permute_unpermute_gradients_match_reference(device, T, k, E, block, dtype, zero_tail):
    """permute and unpermute carry gradients to x, the expert weights between them and the
    routing weights, as the reference's PyTorch composition does (dropped ids, block padding and
    an unwritten tail included)."""
    g = torch.Generator().manual_seed(T)
    ids = _ids(T, k, E).to(device)
    plan = moe_route.dispatch_plan(ids, E, block)
    x = torch.randn(T, 24, generator=g).to(device, dtype)
    w = torch.rand(T, k, generator=g).to(device)
    W = (torch.randn(24, 24, generator=g) / 5).to(device, dtype)
    got = _combine_grads(x, w, W, plan, _Public(zero_tail))
    want = _combine_grads(x, w, W, plan, _Reference)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_gradients_of_an_empty_batch():
    """T=0 (a rank that got no tokens): the weights' gradient failed to view its 0 rows as
    [0, k, -1] ("cannot reshape tensor of 0 elements")."""
    plan = moe_route.dispatch_plan(torch.zeros(0, 2, dtype=torch.int64), 4)
    x = torch.zeros(0, 3, requires_grad=True)
    w = torch.zeros(0, 2, requires_grad=True)
    out = moe_route.unpermute(moe_route.permute(x, plan) * 2, plan, w)
    out.sum().backward()
    assert out.shape == (0, 3) and x.grad.shape == (0, 3) and w.grad.shape == (0, 2)


def test_unpermute_weight_gradient_known_answer():
    """d out[t] / d w[t, j] is the row of slot (t, j); a dropped slot gets 0."""
    plan = moe_route.dispatch_plan(torch.tensor([[1, -1], [0, 1]]), 2)
    y = torch.arange(12.0).view(4, 3)  # rows 0..2 in use: (1,0) -> row 0, (0,0) -> 1, (1,1) -> 2
    w = torch.ones(2, 2, requires_grad=True)
    moe_route.unpermute(y[:plan.row_slot.shape[0]], plan, w).sum().backward()
    rows = plan.slot_row.view(2, 2)
    want = torch.tensor([[y[rows[0, 0]].sum(), 0.0], [y[rows[1, 0]].sum(), y[rows[1, 1]].sum()]])
    assert torch.equal(w.grad, want)


def test_permute_checks_the_rows_in_use_on_the_cpu():
    plan = moe_route.dispatch_plan(torch.tensor([[0, 1], [1, 2]]), 3, block_size=4)  # R = 13
    bad = plan.expert_offsets.clone()
    bad[-1] = 14  # at most 4 + 3*min(3, 4) = 13 rows can be in use
    with pytest.raises(ValueError,
                       match=r"expert_offsets\[E\]=14 rows in use must be in \[0, 13\]"):
        torch.ops.moe_route.permute(torch.zeros(2, 3), plan.row_slot, plan.slot_row, 2, bad)
    bad[-1] = -1
    with pytest.raises(ValueError, match=r"expert_offsets\[E\]=-1 rows in use"):
        torch.ops.moe_route.permute(torch.zeros(2, 3), plan.row_slot, plan.slot_row, 2, bad)


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
    torch.library.opcheck(torch.ops.moe_route.permute.default,
                          (x, plan.row_slot, plan.slot_row, 3))
    full = moe_route.dispatch_plan(_ids(33, 3, 8, sentinels=False), 8)  # no tail: all rows set
    torch.library.opcheck(torch.ops.moe_route.permute.default,
                          (x, full.row_slot, full.slot_row, 3, full.expert_offsets))
    torch.library.opcheck(torch.ops.moe_route.unpermute.default, (y, plan.slot_row, w))
    # the autograd formulas (registration, traced backward)
    torch.library.opcheck(torch.ops.moe_route.permute.default,
                          (x.clone().requires_grad_(), plan.row_slot, plan.slot_row, 3))
    torch.library.opcheck(torch.ops.moe_route.unpermute.default,
                          (y.clone().requires_grad_(), plan.slot_row, w.clone().requires_grad_()))


def test_permute_without_tail_compiles():
    def rows_in_use(x, ids):
        plan = moe_route.dispatch_plan(ids, 8, block_size=16)
        rows = moe_route.permute(x, plan, zero_tail=False)
        return rows[:plan.expert_offsets[-1]] * 2

    ids, x = _ids(40, 2, 8), torch.randn(40, 16)
    torch.testing.assert_close(torch.compile(rows_in_use)(x, ids), rows_in_use(x, ids))


def test_compile_fullgraph():
    def moe_combine(x, ids, w):
        plan = moe_route.dispatch_plan(ids, 8)
        return moe_route.unpermute(moe_route.permute(x, plan) * 2, plan, w)

    ids = _ids(40, 2, 8, sentinels=False)
    x, w = torch.randn(40, 16), torch.rand(40, 2)
    torch.testing.assert_close(torch.compile(moe_combine, fullgraph=True)(x, ids, w),
                               moe_combine(x, ids, w))
