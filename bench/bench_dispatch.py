"""pytest-benchmark suite for dispatch and the MoE block: moe_route against transformers, per case.

    python -m pytest bench -q                              # timings (pytest-benchmark table)
    python -m pytest bench -q --benchmark-disable          # smoke: each callable once, checked
    moe-route bench --op dispatch|block [--full]           # the ratio tables, one run

Small shapes only, so that the smoke run stays fast; the issue's shapes are in ``moe-route bench``.
Every compared pair is also checked to compute the same result (else the ratio means nothing), and
the per-op rows, bandwidths and targets of ``moe-route bench --op dispatch`` are built on tiny
shapes (on CUDA too where a GPU is present).
"""
import functools

import pytest
import torch

from moe_route import benchmark as moe_bench

DISPATCH = [moe_bench.DispatchCase(T, k, 256, E, dt) for dt in (torch.float32, torch.bfloat16)
            for (T, k, E) in ((1, 8, 64), (64, 2, 8), (512, 8, 64))]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ids(cases):
    return [c.label.replace(" ", "-") for c in cases]


@pytest.mark.parametrize("case", DISPATCH, ids=_ids(DISPATCH))
@pytest.mark.parametrize("op", moe_bench.DISPATCH_OPS)
@pytest.mark.parametrize("kind", ["baseline", "fused"])
def test_dispatch(benchmark, case, op, kind):
    base, args, fused = moe_bench.dispatch_callables(case)[op]
    benchmark.group = f"{case.label} {op}"
    if kind == "baseline":
        benchmark(base, *args)
    else:
        benchmark(fused)


@pytest.mark.parametrize("case", DISPATCH, ids=_ids(DISPATCH))
def test_dispatch_matches_baseline(case):
    x, ids, w = moe_bench.dispatch_inputs(case)
    base, base_offsets = moe_bench.baseline_dispatch(x, ids, w, case.E)
    ours, offsets = moe_bench.fused_dispatch(x, ids, w, case.E)
    assert ours.dtype == base.dtype == x.dtype
    torch.testing.assert_close(ours, base, **_tolerance(x.dtype))
    assert torch.equal(offsets[1:].int(), base_offsets)


@pytest.mark.parametrize("case", DISPATCH, ids=_ids(DISPATCH))
def test_dispatch_ops_match_baselines(case):
    _check_ops(case, "cpu")


def _check_ops(case, device):
    """Each timed op against its baseline, on the inputs the timings use."""
    calls = moe_bench.dispatch_callables(case, device)
    out = {op: (base(*args), fused()) for op, (base, args, fused) in calls.items()}
    (perm, offsets, counts, inverse), plan = out["plan"]
    assert torch.equal(perm, plan.row_slot)
    assert torch.equal(inverse, plan.slot_row)
    assert torch.equal(counts.long(), plan.counts)
    assert torch.equal(offsets.long(), plan.expert_offsets[1:])
    base, ours = out["permute"]
    assert torch.equal(base, ours)
    base, ours = out["unpermute"]
    assert ours.dtype == base.dtype == case.dtype
    torch.testing.assert_close(ours, base, **_tolerance(case.dtype))
    base, ours = out["permute64"]  # equal up to the unused tail, which only the baseline zeroes
    _, padded = calls["permute64"][1]  # the baseline's arguments: (x, the block-64 plan)
    used = int(padded.expert_offsets[-1])
    assert base.shape == ours.shape and torch.equal(base[:used], ours[:used])
    assert not base[used:].any()


def _tolerance(dtype):
    # bf16: transformers weighs the rows in bf16, unpermute in fp32 (a rounding or two apart)
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def test_gpu_dispatch_cases_are_the_anchor_shapes():
    shapes = {(c.T, c.k, c.H) for c in moe_bench.gpu_dispatch_cases()}
    assert shapes == ({(T, 8, 7168) for T in (1, 64, 1024, 4096, 16384)}
                      | {(16384, 8, 4096), (1024, 8, 2048), (16384, 8, 2048), (16384, 2, 4096)})
    assert all(c.dtype == torch.bfloat16 and c.compile for c in moe_bench.gpu_dispatch_cases())


def test_moved_bytes():
    case = moe_bench.DispatchCase(4096, 8, 7168, 256, torch.bfloat16)
    assert moe_bench.moved_bytes(case, "permute") == 4096 * 7168 * 2 * 9  # 528 MB, as in §7.2
    assert moe_bench.moved_bytes(case, "unpermute") == moe_bench.moved_bytes(case, "permute")
    assert moe_bench.moved_bytes(case, "pipeline") == 2 * moe_bench.moved_bytes(case, "permute")
    assert moe_bench.moved_bytes(case, "permute64") == moe_bench.moved_bytes(case, "permute")
    assert moe_bench.moved_bytes(case, "plan") is None


def test_run_dispatch_rows():
    """Per-op rows: every callable by one method, paired ratios, GB/s against the copy bandwidth
    and the compiled baselines (dynamo with the eager backend: no inductor build here)."""
    copy = moe_bench.copy_bandwidth("cpu", nbytes=1 << 20, min_time=0.001)
    assert copy["gbps"] > 0 and copy["timing"]["method"] == "perf_counter"
    case = moe_bench.DispatchCase(32, 4, 64, 8, torch.bfloat16, "tiny")
    seen = []
    rows = moe_bench.run_dispatch([case], "cpu", compile_baseline=True, compile_backend="eager",
                                  min_time=0.001, copy_gbps=copy["gbps"], on_row=seen.append)
    assert seen == rows and [r["op"] for r in rows] == list(moe_bench.DISPATCH_OPS)
    for row in rows:
        assert row["case"] == "tiny T=32 k=4 H=64 E=8 bfloat16" and row["method"] == "perf_counter"
        compiled = row["op"] in moe_bench.COMPILED_DISPATCH_OPS
        names = ("baseline", "fused") + (("baseline_compiled",) if compiled else ())
        assert {name for name in row if isinstance(row[name], dict) and "median_us" in row[name]} \
            == set(names)
        for name in names:
            assert row[name]["method"] == "perf_counter" and row[name]["reps"] >= 5
        assert row["speedup"] > 0
        if compiled:
            assert row["speedup_vs_compiled"] > 0 and row["compile_s"] > 0
        if row["op"] == "plan":
            assert row["bytes"] is None and "gbps" not in row
        else:
            gbps = row["bytes"] / row["fused"]["median_us"] / 1e3
            assert row["gbps"]["fused"] == pytest.approx(gbps)
            assert row["copy_fraction"] == pytest.approx(gbps / copy["gbps"])
        line = moe_bench.format_dispatch_row(row)
        assert line.startswith(row["case"]) and line.endswith("cpu")


def _row(op, T, k, H, fused_gbps, dtype="bfloat16"):
    return {"case": f"x T={T} k={k} H={H} {dtype}", "op": op, "T": T, "k": k, "H": H,
            "dtype": dtype, "gbps": {"fused": fused_gbps}}


def test_dispatch_targets():
    rows = [_row("permute", 4096, 8, 7168, 2200.0), _row("unpermute", 4096, 8, 7168, 2000.0),
            _row("permute", 1024, 8, 7168, 100.0)]
    targets = moe_bench.dispatch_targets(rows, copy_gbps=3000.0, device_name="NVIDIA H100")
    assert [(t["target"].split()[0], t["passed"]) for t in targets] == [("permute", True),
                                                                         ("unpermute", False)]
    assert targets[0]["threshold"] == pytest.approx(2.1) and targets[0]["measured"] == 2.2
    on_h200 = moe_bench.dispatch_targets(rows, copy_gbps=4300.0, device_name="NVIDIA H200")
    assert [t["passed"] for t in on_h200] == [False, False, False, False]
    missing = moe_bench.dispatch_targets([], copy_gbps=3000.0)
    assert [t["passed"] for t in missing] == [None, None]


@cuda
def test_cuda_dispatch_run():
    """The GPU grid's code path: a microsecond case (graph replay) and one whose fused ops move
    enough bytes to be timed with events and the L2 flushed; compiled baselines by dynamo's eager
    backend, for speed. A baseline that cannot be captured in a graph would be timed with its
    launches: the test names it."""
    cases = [moe_bench.DispatchCase(64, 8, 7168, 256, torch.bfloat16, "small"),
             moe_bench.DispatchCase(4096, 8, 2048, 128, torch.bfloat16, "large")]
    for case in cases:
        _check_ops(case, "cuda")
    copy = moe_bench.copy_bandwidth("cuda", min_time=0.01)
    rows = moe_bench.run_dispatch(cases, "cuda", compile_baseline=True, compile_backend="eager",
                                  min_time=0.01, copy_gbps=copy["gbps"])
    methods = {(r["case"].split()[0], r["op"]): r["method"] for r in rows}
    assert methods[("small", "permute")] == "cuda_graph"
    assert methods[("large", "permute")] == "cuda_events_l2"
    for row in rows:
        assert "compile_skipped" not in row, row["compile_skipped"]
        compiled = row["op"] in moe_bench.COMPILED_DISPATCH_OPS
        names = ("baseline", "fused") + (("baseline_compiled",) if compiled else ())
        for name in names:
            assert "graph_error" not in row[name], (row["case"], row["op"], name,
                                                    row[name]["graph_error"])
        if row["op"] in ("permute", "unpermute"):
            assert row["copy_fraction"] > 0
            if row["method"] == "cuda_events_l2":  # from HBM: at most the copy bandwidth, roughly
                assert row["copy_fraction"] < 1.2


BLOCKS = [moe_bench.BlockCase(family, "tiny", 64, dt) for family in moe_bench.BLOCK_FAMILIES
          for dt in (torch.float32, torch.bfloat16)]


@functools.lru_cache(maxsize=1)
def _block(family, dtype):
    pytest.importorskip("transformers")
    return moe_bench.build_block_model(family, "tiny", dtype)


def _block_input(case):
    H = moe_bench.BLOCK_SIZES[case.size][0]
    return torch.randn(1, case.T, H, generator=torch.Generator().manual_seed(1)).to(case.dtype)


@pytest.mark.parametrize("case", BLOCKS, ids=_ids(BLOCKS))
@pytest.mark.parametrize("impl", moe_bench.BLOCK_IMPLS)
def test_block(benchmark, case, impl):
    model, block = _block(case.family, case.dtype)
    x = _block_input(case)
    model.set_experts_implementation(impl)
    benchmark.group = case.label

    @torch.no_grad()
    def forward():
        return block(x)

    benchmark(forward)


@pytest.mark.parametrize("case", BLOCKS, ids=_ids(BLOCKS))
def test_block_implementations_agree(case):
    model, block = _block(case.family, case.dtype)
    deviation = moe_bench.block_outputs_agree(model, block, _block_input(case))
    assert set(deviation) == set(moe_bench.BLOCK_IMPLS)
