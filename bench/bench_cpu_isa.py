"""Smoke checks of bench/cpu_isa_speed.py (run by CI with the bench suite): every case runs, and
timing the variants leaves the CPU kernels on the variant they ran before."""
import pytest
import torch

import cpu_isa_speed
from moe_route import _loader

pytestmark = pytest.mark.skipif(_loader.native is None, reason="no native extension")


@pytest.mark.parametrize("semantics,E,k", [("softmax_topk", 64, 8), ("topk_softmax", 64, 4),
                                           ("deepseek_v3", 256, 8)])
def test_gate_cases_run(semantics, E, k):
    for kind, fn in cpu_isa_speed.gate_callables(semantics, 17, E, k, torch.float32).items():
        w, ids = fn()[:2]
        assert w.shape == ids.shape == (17, k), kind


def test_time_variants_times_each_and_restores_the_variant():
    isas = _loader.native.cpu_isas()
    before = _loader.native.cpu_isa()
    fn = cpu_isa_speed.unpermute_callable(9, 2, 4, 16, torch.bfloat16)
    try:
        _loader.native.set_cpu_isa(isas[0])
        times = cpu_isa_speed.time_variants(fn, isas, min_time=0.01)
        assert set(times) == set(isas) and all(t["median_us"] > 0 for t in times.values())
        assert _loader.native.cpu_isa() == isas[0]
    finally:
        _loader.native.set_cpu_isa(before)
