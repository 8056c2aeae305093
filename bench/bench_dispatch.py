"""pytest-benchmark suite for dispatch and the MoE block: moe_route against transformers, per case.

    python -m pytest bench -q                              # timings (pytest-benchmark table)
    python -m pytest bench -q --benchmark-disable          # smoke: each callable once, checked
    moe-route bench --op dispatch|block [--full]           # the ratio tables, one run

Small shapes only, so that the smoke run stays fast; the issue's shapes are in ``moe-route bench``.
Every compared pair is also checked to compute the same result (else the ratio means nothing).
"""
import functools

import pytest
import torch

from moe_route import benchmark as moe_bench

DISPATCH = [moe_bench.DispatchCase(T, k, 256, E, dt) for dt in (torch.float32, torch.bfloat16)
            for (T, k, E) in ((1, 8, 64), (64, 2, 8), (512, 8, 64))]
DISPATCH_KINDS = {"baseline": moe_bench.baseline_dispatch, "fused": moe_bench.fused_dispatch}


def _ids(cases):
    return [c.label.replace(" ", "-") for c in cases]


@pytest.mark.parametrize("case", DISPATCH, ids=_ids(DISPATCH))
@pytest.mark.parametrize("kind", DISPATCH_KINDS)
def test_dispatch(benchmark, case, kind):
    x, ids, w = moe_bench.dispatch_inputs(case)
    benchmark.group = case.label
    benchmark(DISPATCH_KINDS[kind], x, ids, w, case.E)


@pytest.mark.parametrize("case", DISPATCH, ids=_ids(DISPATCH))
def test_dispatch_matches_baseline(case):
    x, ids, w = moe_bench.dispatch_inputs(case)
    base, base_offsets = moe_bench.baseline_dispatch(x, ids, w, case.E)
    ours, offsets = moe_bench.fused_dispatch(x, ids, w, case.E)
    assert ours.dtype == base.dtype == x.dtype
    # bf16: transformers weighs the rows in bf16, unpermute in fp32 (a rounding or two apart)
    tol = dict(rtol=2e-2, atol=2e-2) if x.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, base, **tol)
    assert torch.equal(offsets[1:].int(), base_offsets)


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
