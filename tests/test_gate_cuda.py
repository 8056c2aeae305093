"""CUDA-only checks of topk_gate: CUDA-graph capture and replay, CPU/CUDA agreement.

Skipped without a CUDA device and the CUDA extension (conftest's `cuda` marker).
"""
import pytest
import torch

import moe_route
from moe_route import GateStats, RouterSpec

pytestmark = pytest.mark.cuda

SPECS = {
    "softmax": RouterSpec(),
    "logits": RouterSpec(select_on="logits"),
    "deepseek_v3": RouterSpec(score="sigmoid", n_group=8, topk_group=4, group_score="top2_sum",
                              renormalize=True, renorm_eps=1e-20, scale=2.5),
}


def _tie_free(T, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() / 8


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("T,E,k", [(1, 64, 8), (64, 128, 8), (4096, 256, 8)])
def test_cpu_and_cuda_agree(name, T, E, k):
    x = _tie_free(T, E)
    bias = torch.linspace(-0.01, 0.01, E) if name == "deepseek_v3" else None
    w_cpu, i_cpu = moe_route.topk_gate(x, k, SPECS[name], selection_bias=bias)
    w_gpu, i_gpu = moe_route.topk_gate(x.cuda(), k, SPECS[name],
                                       selection_bias=None if bias is None else bias.cuda())
    assert torch.equal(i_cpu, i_gpu.cpu())
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-5, atol=1e-6)


def test_graph_capture_and_replay_with_stats():
    T, E, k = 256, 64, 8
    x = torch.randn(T, E, device="cuda")
    groups = torch.randint(-1, 4, (T,), device="cuda", dtype=torch.int32)
    stats = GateStats.zeros(4, E, device="cuda", coact=True)
    steer = moe_route.SteerSpec(std={3: 0.5}, force={7: 1})
    spec = RouterSpec(renormalize=True)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # warm-up outside the graph
        moe_route.topk_gate(x, k, spec, steer=steer, stats=stats, groups=groups)
    torch.cuda.synchronize()
    stats.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        w, ids = moe_route.topk_gate(x, k, spec, steer=steer, stats=stats, groups=groups)
    stats.zero_()
    replays = 3
    for _ in range(replays):
        x.copy_(torch.randn(T, E, device="cuda"))
        graph.replay()
    torch.cuda.synchronize()
    want_w, want_ids = moe_route.topk_gate(x, k, spec, steer=steer)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w)
    valid = int((groups >= 0).sum())
    assert int(stats.tokens.sum()) == replays * valid
    assert int(stats.counts.sum()) == replays * valid * k
    assert bool((ids[:, 0] == 7).all())  # forced on


def test_out_of_range_groups_are_skipped_on_cuda():
    """The CUDA kernel cannot raise without a host sync: such tokens count nowhere."""
    x = torch.randn(8, 16, device="cuda")
    groups = torch.tensor([0, 1, 5, -1, -3, 1, 0, 2], device="cuda")
    stats = GateStats.zeros(2, 16, device="cuda")
    moe_route.topk_gate(x, 2, stats=stats, groups=groups)
    assert stats.tokens.tolist() == [2, 2]


def test_more_than_1024_experts_is_rejected_on_cuda():
    with pytest.raises(ValueError, match="num_experts=2048 must be <= 1024 on CUDA"):
        moe_route.topk_gate(torch.randn(2, 2048, device="cuda"), 2)
