"""pytest-benchmark suite for topk_gate: fused gate vs the transformers composition, per case.

    python -m pytest bench -q                              # timings (pytest-benchmark table)
    python -m pytest bench -q --benchmark-disable          # smoke: each callable once, checked
    moe-route bench [--full] [--compile]                   # the ratio table, one run

Ratios in one run are what `moe-route bench` prints; pytest-benchmark groups each case's
callables together so they can be compared in its table.
"""
import pytest
import torch

from moe_route import benchmark

CASES = benchmark.default_cases(full=False)
KINDS = ("baseline", "gate", "baseline_stats", "gate_stats")


@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_gate(benchmark_fixture, case, kind):
    fns = dict(zip(KINDS, benchmark.gate_and_baseline(case, "cpu")))
    benchmark_fixture.group = case.label
    benchmark_fixture(fns[kind])


@pytest.mark.parametrize("case", [c for c in CASES if c.T <= 1024], ids=lambda c: c.label)
def test_gate_matches_baseline(case):
    """The benchmarked pair computes the same routing (else the ratio means nothing)."""
    base, gate, _, _ = benchmark.gate_and_baseline(case, "cpu")
    bw, bi = base()
    gw, gi = gate()
    bw, bi = _sorted(bw, bi)
    gw, gi = _sorted(gw, gi.long())
    assert torch.equal(bi, gi)
    torch.testing.assert_close(gw, bw.float(), rtol=1e-5, atol=1e-6)


def _sorted(w, i):
    # DeepSeek's baseline returns unsorted ids; compare as sets ordered by expert index.
    order = i.argsort(dim=-1)
    return w.gather(1, order), i.gather(1, order)


@pytest.fixture
def benchmark_fixture(benchmark):
    return benchmark
