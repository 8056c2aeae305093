"""pytest-benchmark suite for topk_gate: fused gate vs the transformers composition, per case.

    python -m pytest bench -q                              # timings (pytest-benchmark table)
    python -m pytest bench -q --benchmark-disable          # smoke: each callable once, checked
    moe-route bench [--full] [--compile]                   # the ratio table, one run

Ratios in one run are what `moe-route bench` prints; pytest-benchmark groups each case's
callables together so they can be compared in its table. The smoke tests also check that every
compared pair computes the same routing and statistics, and run the timing, target and report
code of `moe-route bench` on tiny shapes; the CUDA timing paths where a GPU is present
(`python -m pytest -q bench -k cuda` before a GPU benchmark run).
"""
import itertools
import json
import time

import pytest
import torch

from moe_route import benchmark

CASES = benchmark.default_cases(full=False)
# Every semantics in both dtypes (bf16 logits tie often), at sizes the smoke run can afford.
CHECKED = [benchmark.Case(semantics, T, E, k, dtype)
           for semantics, E, k in (("softmax_topk", 64, 8), ("softmax_topk_renorm", 128, 8),
                                   ("topk_softmax", 128, 4), ("deepseek_v3", 256, 8),
                                   ("deepseek_v4", 384, 6))
           for T in (1, 333) for dtype in (torch.float32, torch.bfloat16)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ids(cases):
    return [c.label.replace(" ", "-") for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("kind", benchmark.GATE_KINDS)
def test_gate(benchmark_fixture, case, kind):
    fns = benchmark.gate_and_baseline(case, "cpu")
    benchmark_fixture.group = case.label
    benchmark_fixture(fns[kind])


@pytest.mark.parametrize("case", CHECKED, ids=_ids(CHECKED))
@pytest.mark.parametrize("variant", ["", "_steer"])
def test_gate_matches_baseline(case, variant):
    """The benchmarked pair computes the same routing (else the ratio means nothing). Where bf16
    logits tie, torch.topk may pick another of the tied experts than the gate (the lower index):
    there the weights are compared as sorted values."""
    fns = benchmark.gate_and_baseline(case, "cpu")
    bw, bi = fns["baseline" + variant]()
    gw, gi = fns["gate" + variant]()
    if case.dtype == torch.float32 or case.semantics == "deepseek_v4":
        # DeepSeek-V4's bf16 scores plus a bias do not tie: the gate ranks them rounded alike
        # (its weights are fp32, the router's bf16)
        bw, bi = _sorted(bw, bi)
        gw, gi = _sorted(gw, gi.long())
        assert torch.equal(bi, gi)
        tol = dict(rtol=1e-5, atol=1e-6) if case.dtype == torch.float32 else \
            dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(gw, bw.float(), **tol)
    else:
        torch.testing.assert_close(gw.sort(-1).values, bw.float().sort(-1).values, rtol=1e-5,
                                   atol=1e-6)
    if variant:  # bench_steer forces the last expert into every token's top-k
        assert (gi == case.E - 1).any(-1).all()


@pytest.mark.parametrize("case", CHECKED, ids=_ids(CHECKED))
def test_gate_stats_match_baseline(case):
    """Both sides accumulate the same statistics; with bf16 ties only the totals of the
    selection-dependent ones agree."""
    fns = benchmark.gate_and_baseline(case, "cpu")
    _, _, base = fns["baseline_stats"]()
    _, _, gate = fns["gate_stats"]()
    assert torch.equal(base.tokens, gate.tokens)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gate.prob_sum, base.prob_sum, **tol)
    torch.testing.assert_close(gate.entropy_sum, base.entropy_sum, **tol)
    if case.dtype == torch.float32:
        assert torch.equal(base.counts, gate.counts)
        torch.testing.assert_close(gate.weight_sum, base.weight_sum, **tol)
    else:
        assert base.counts.sum() == gate.counts.sum() == case.T * case.k
        torch.testing.assert_close(gate.weight_sum.sum(), base.weight_sum.sum(), **tol)


def _sorted(w, i):
    # DeepSeek's baseline returns unsorted ids; compare as sets ordered by expert index.
    order = i.argsort(dim=-1)
    return w.gather(1, order), i.gather(1, order)


def test_gpu_cases_are_the_issue_grid():
    cases = benchmark.gpu_cases()
    Ts = (1, 64, 1024, 16384)
    dtypes = (torch.float32, torch.bfloat16)
    plain = {(c.T, c.E, c.k, c.dtype) for c in cases if c.semantics == "softmax_topk"}
    assert plain == set(itertools.product(Ts, (64, 128, 256, 512), (4, 8), dtypes))
    deepseek = {(c.T, c.E, c.k, c.dtype) for c in cases if c.semantics == "deepseek_v3"}
    assert deepseek == set(itertools.product(Ts, (256,), (8,), dtypes))
    v4 = {(c.T, c.E, c.k, c.dtype) for c in cases if c.semantics == "deepseek_v4"}
    assert v4 == set(itertools.product(Ts, (384,), (6,), (torch.bfloat16,)))
    for semantics in ("softmax_topk_renorm", "topk_softmax"):
        assert {c.T for c in cases if c.semantics == semantics and c.E == 128} == set(Ts)
    doge = {(c.T, c.E, c.k, c.dtype) for c in cases if c.E > 1024}  # the CTA-per-token kernel
    assert doge == set(itertools.product((1, 64, 1024, 4096), (16384,), (64,), (torch.bfloat16,)))
    compiled = [c for c in cases if c.compile]
    assert len(compiled) == 12
    assert all(c.dtype == torch.bfloat16 and c.k == 8 and c.E in (128, 256) for c in compiled)
    assert len(set(cases)) == len(cases)


def test_run_reports_every_variant(tmp_path):
    """``run`` on a tiny case: every callable timed by one method, ratios, the compiled baseline
    (dynamo with the eager backend: no inductor build in a smoke test) and the JSON report."""
    case = benchmark.Case("deepseek_v3", 4, 256, 8, torch.float32)
    seen = []
    rows = benchmark.run([case], "cpu", compile_baseline=True, compile_backend="eager",
                         min_time=0.001, on_row=seen.append)
    assert seen == rows and len(rows) == 1
    row = rows[0]
    assert row["method"] == "perf_counter" and row["probe_us"] is None
    for kind in benchmark.GATE_KINDS + ("baseline_compiled",):
        assert row[kind]["method"] == "perf_counter"
        assert 0 < row[kind]["q1_us"] <= row[kind]["median_us"] <= row[kind]["q3_us"]
        assert row[kind]["reps"] >= 10
    assert row["compile_s"] > 0
    med = {kind: row[kind]["median_us"] for kind in benchmark.GATE_KINDS}
    assert row["stats_ratio"] == pytest.approx(med["gate_stats"] / med["gate"])
    assert row["steer_ratio"] == pytest.approx(med["gate_steer"] / med["gate"])
    assert row["speedup_steer"] == pytest.approx(med["baseline_steer"] / med["gate_steer"])
    compiled_cells = benchmark.format_row(row, compile_baseline=True).split()[-3:-1]
    assert compiled_cells[0].endswith("us") and compiled_cells[1].endswith("x")

    path = tmp_path / "gate.json"
    targets = benchmark.gate_targets(rows)
    benchmark.save_report(str(path), op="gate", meta=benchmark.run_meta("cpu"), rows=rows,
                          targets=targets)
    report = json.loads(path.read_text())
    assert report["format"] == "moe_route.bench" and report["op"] == "gate"
    meta = report["meta"]
    assert {"date", "device", "device_name", "torch", "torch_cuda", "git"} <= set(meta)
    assert "cpu" in meta["moe_route"]["kernels"]["topk_gate"]
    assert report["rows"][0]["case"] == case.label
    assert [t["target"] for t in report["targets"]] == [t["target"] for t in targets]


def test_compile_past_the_deadline_is_skipped():
    case = benchmark.Case("softmax_topk", 4, 64, 2, torch.float32)
    row = benchmark.run([case], "cpu", compile_baseline=True, min_time=0.001,
                        deadline=time.monotonic() - 1)[0]
    assert "baseline_compiled" not in row and row["compile_skipped"] == "time budget spent"
    assert benchmark.format_row(row, compile_baseline=True).split()[-3:-1] == ["-", "-"]


def _row(T, E, k, gate_us, speedup=20.0, stats_ratio=1.1, method="cuda_graph",
         semantics="softmax_topk", dtype="bfloat16"):
    return {"case": f"{semantics} T={T} E={E} k={k} {dtype}", "semantics": semantics, "T": T,
            "E": E, "k": k, "dtype": dtype, "method": method, "gate": {"median_us": gate_us},
            "speedup": speedup, "stats_ratio": stats_ratio}


def test_gate_targets():
    good = [_row(1, 256, 8, 2.5), _row(64, 64, 4, 2.9), _row(16384, 128, 8, 11.0),
            _row(16384, 256, 8, 19.0), _row(16384, 512, 8, 40.0, stats_ratio=1.29)]
    targets = benchmark.gate_targets(good)
    assert [t["passed"] for t in targets] == [True] * 6
    assert targets[-1]["measured"] == 1.29 and targets[-1]["case"] == good[-1]["case"]

    bad = [_row(1, 256, 8, 3.1), _row(16384, 128, 8, 13.0, speedup=9.0),
           _row(64, 128, 8, 2.0, method="cuda_events_l2", stats_ratio=1.4)]
    verdict = {t["target"]: t["passed"] for t in benchmark.gate_targets(bad)}
    assert verdict == {
        "gate T<=64 E<=256 k<=8, graph replay (worst case)": False,
        "gate T=16384 E=128 k=8 bfloat16": False,
        "gate T=16384 E=128 k=8 bfloat16 vs eager": False,
        "gate T=16384 E=256 k=8": None,
        "gate T=16384 E=256 k=8 vs eager": None,
        "gate+stats / gate (worst case)": False}
    fast_but_host_timed = [_row(1, 64, 8, 1.0, method="perf_counter")]
    assert benchmark.gate_targets(fast_but_host_timed)[0]["passed"] is False
    assert "MISS" in benchmark.format_targets(benchmark.gate_targets(bad))


def test_time_fn_methods():
    assert benchmark.pick_method(lambda: None, "cpu") == ("perf_counter", None)
    summary = benchmark.time_fn(lambda: sum(range(100)), "cpu", min_time=0.001)
    assert summary["method"] == "perf_counter" and summary["reps"] >= 10
    with pytest.raises(ValueError, match="method='events'"):
        benchmark.time_fn(lambda: None, "cpu", method="events")


@cuda
def test_cuda_timing_methods():
    """Graph replay for a microsecond op, events with the L2 flushed for a long one; a function
    that reads back to the host cannot be captured and falls back to events, after which graphs
    still capture."""
    x = torch.randn(1024, device="cuda")
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    assert benchmark.pick_method(lambda: x.mul(2), "cuda")[0] == "cuda_graph"
    method, probe = benchmark.pick_method(lambda: big.clone(), "cuda")
    assert method == "cuda_events_l2" and probe >= benchmark.EVENTS_FROM_US
    small = benchmark.time_fn(lambda: x.mul(2), "cuda", min_time=0.01, method="cuda_graph")
    assert small["method"] == "cuda_graph" and small["median_us"] < 20
    large = benchmark.time_fn(lambda: big.clone(), "cuda", min_time=0.01, method="cuda_events_l2")
    assert large["method"] == "cuda_events_l2" and large["median_us"] > small["median_us"]
    synced = benchmark.time_fn(lambda: x.sum().item(), "cuda", min_time=0.01, method="cuda_graph")
    assert synced["method"] == "cuda_events_l2" and synced["graph_error"]
    again = benchmark.time_fn(lambda: x.mul(2), "cuda", min_time=0.01, method="cuda_graph")
    assert again["method"] == "cuda_graph" and "graph_error" not in again
    copy = benchmark.copy_bandwidth("cuda", nbytes=64 << 20, min_time=0.01)
    assert copy["timing"]["method"] == "cuda_events_l2" and copy["gbps"] > 100


@cuda
def test_cuda_gate_run():
    """The GPU grid's code path on two small cases: every callable, the compiled baseline
    included (dynamo's eager backend, for speed), captured in a CUDA graph."""
    cases = [benchmark.Case("softmax_topk", 64, 128, 8, torch.bfloat16),
             benchmark.Case("deepseek_v3", 1024, 256, 8, torch.float32)]
    rows = benchmark.run(cases, "cuda", compile_baseline=True, compile_backend="eager",
                         min_time=0.01)
    for row in rows:
        assert row["method"] == "cuda_graph"
        for kind in benchmark.GATE_KINDS + ("baseline_compiled",):
            assert "graph_error" not in row[kind], (row["case"], kind, row[kind]["graph_error"])
    meta = benchmark.run_meta("cuda")
    assert meta["device_name"] and "cuda" in meta["moe_route"]["kernels"]["topk_gate"]


@pytest.fixture
def benchmark_fixture(benchmark):
    return benchmark
