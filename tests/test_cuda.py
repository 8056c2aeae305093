"""CUDA-only checks: CPU/CUDA agreement, CUDA-graph capture and replay of the gate (with
statistics and steering), the dispatch ops and a patched MoE block, torch.compile on CUDA, and
patched tiny models of several families on CUDA against the same models unpatched.

Skipped without a CUDA device and the CUDA extension (conftest's `cuda` marker). The per-op tests
with a ``device`` fixture (test_gate_kernel.py, test_dispatch.py, test_gate_compile.py, ...) also
run on CUDA there.
"""
import dataclasses

import pytest
import torch

import moe_route
from moe_route import GateStats, RouterSpec
from moe_route.hf import adapter_for, find_routers

from conftest import STAT_NAMES, assert_stats_equal
from tiny_models import build, inputs, model_type, selected_experts

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


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (128, 8), (256, 8), (512, 8), (1000, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_and_full_kernels_route_alike(name, E, k, dtype):
    """A call without steering, group limit or statistics runs the plain kernel; adding statistics
    (or a zero steering table) runs the full one, replay ids the replay build. Ids and weights
    must not change, bit for bit."""
    spec = SPECS[name]
    x = torch.randn(2000, E, generator=torch.Generator().manual_seed(E)).to("cuda", dtype)
    bias = torch.linspace(-0.01, 0.01, E, device="cuda") if name == "deepseek_v3" else None
    plain_spec = dataclasses.replace(spec, n_group=1, topk_group=1)  # no group limit
    w, ids = moe_route.topk_gate(x, k, plain_spec, selection_bias=bias)
    stats = GateStats.zeros(1, E, device="cuda", coact=True)
    w_stats, ids_stats = moe_route.topk_gate(x, k, plain_spec, selection_bias=bias, stats=stats)
    w_steer, ids_steer = moe_route.topk_gate(x, k, plain_spec, selection_bias=bias,
                                             steer=moe_route.SteerSpec(add={0: 0.0}))
    # replay ids run the replay build; its rows of -1 select like the other two
    w_rep, ids_rep = moe_route.topk_gate(x, k, plain_spec, selection_bias=bias,
                                         replay=torch.full((x.shape[0], k), -1, device="cuda"))
    assert torch.equal(ids, ids_stats) and torch.equal(ids, ids_steer)
    assert torch.equal(w, w_stats) and torch.equal(w, w_steer)
    assert torch.equal(ids, ids_rep) and torch.equal(w, w_rep)
    assert int(stats.tokens.sum()) == x.shape[0]


ROUNDED = {  # round_scores: LFM2 / DeepSeek-V4, Zaya, Mistral-4 (tests/test_half_scores.py)
    "sigmoid_bias": (RouterSpec("sigmoid", round_scores=True), True),
    "sqrtsoftplus_bias": (RouterSpec("sqrtsoftplus", renormalize=True, round_scores=True), True),
    "softmax_bias": (RouterSpec(round_scores=True), True),
    "top2_groups": (RouterSpec(n_group=8, topk_group=4, group_score="top2_sum",
                               round_scores=True), False),
}


@pytest.mark.parametrize("name", ROUNDED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("E,k", [(128, 4), (384, 6), (2048, 8)])
def test_rounded_scores_agree_with_cpu(name, dtype, E, k):
    """Scores rounded to the logits' half precision on CUDA (the full warp kernel, or the CTA
    kernel past 1024 experts) pick the CPU's experts: the rounding absorbs the last-bit
    differences of expf and friends, except at a rounding boundary (rare; a few rows at most)."""
    spec, biased = ROUNDED[name]
    if E > 1024 and spec.n_group > 1:
        pytest.skip("no group limit past 1024 experts on CUDA")
    g = torch.Generator().manual_seed(E)
    x = (torch.randn(3000, E, generator=g) * 2).to(dtype)
    bias = torch.randn(E, generator=g) * 0.05 if biased else None
    w_cpu, i_cpu = moe_route.topk_gate(x, k, spec, selection_bias=bias)
    w_gpu, i_gpu = moe_route.topk_gate(x.cuda(), k, spec,
                                       selection_bias=None if bias is None else bias.cuda())
    same = (i_cpu == i_gpu.cpu()).all(-1)
    assert int((~same).sum()) <= 3
    torch.testing.assert_close(w_gpu.cpu()[same], w_cpu[same], rtol=1e-5, atol=1e-6)


GROUPED = {  # (spec, E, k) of group-limited calls that the grouped kernel takes up to 1024 tokens
    "deepseek_v3": (SPECS["deepseek_v3"], 256, 8),
    "groups of 4, k > 4": (RouterSpec(score="sigmoid", n_group=16, topk_group=8,
                                      group_score="top2_sum"), 64, 10),
    "softmax of the selected logits": (RouterSpec(select_on="logits", n_group=8, topk_group=2,
                                                  renormalize=True), 128, 4),
    "rounded sqrtsoftplus": (RouterSpec(score="sqrtsoftplus", n_group=8, topk_group=3,
                                        group_score="top2_sum", round_scores=True), 160, 6),
}


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_and_warp_kernels_route_alike(name, dtype):
    """Up to 1024 tokens, a group-limited call without steering, statistics or replay runs a CTA
    per token with a warp per group (gate_grouped.cuh); with more tokens it runs the warp kernel.
    The same rows must get the same ids and weights, bit for bit, at T = 1, 64, 1024 and 1025."""
    spec, E, k = GROUPED[name]
    g = torch.Generator().manual_seed(E)
    x = torch.randn(1025, E, generator=g).to("cuda", dtype)
    x[7, :5] = float("nan")
    bias = (torch.randn(E, generator=g) * 0.1).cuda() if spec.score == "sigmoid" else None
    w_warp, ids_warp = moe_route.topk_gate(x, k, spec, selection_bias=bias)
    for rows in (slice(0, 1024), slice(0, 64), slice(7, 8), slice(1000, 1001)):
        w, ids = moe_route.topk_gate(x[rows], k, spec, selection_bias=bias)
        assert torch.equal(ids, ids_warp[rows])
        assert torch.equal(w, w_warp[rows])
    w_cpu, ids_cpu = moe_route.topk_gate(x.cpu(), k, spec,
                                         selection_bias=None if bias is None else bias.cpu())
    same = (ids_warp.cpu() == ids_cpu).all(-1)
    assert int((~same).sum()) <= 3  # scores within an ulp may swap (expf is not the CPU's)
    torch.testing.assert_close(w_warp.cpu()[same], w_cpu[same], rtol=1e-5, atol=1e-6)


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


def _stats_close(gpu, cpu):
    """CUDA statistics against the CPU's: the float sums to accumulation order."""
    assert_stats_equal(*(dict(zip(STAT_NAMES, s.buffers())) for s in (gpu, cpu)), rtol=1e-4,
                       atol=1e-4)


@pytest.mark.parametrize("T", [1, 300])
def test_wide_kernel_agrees_with_cpu_and_graph_replays(T):
    """More than 1024 experts (a CTA per token; Doge's default 16384 product keys, top-64):
    CPU/CUDA agreement with steering and statistics, then graph capture and replay. prob_sum's
    accumulator takes 74,376 bytes of shared memory here, past the 48 KiB default: every launch
    opts the kernel in (cudaFuncSetAttribute), the captured one too."""
    E, k = 16384, 64
    x = _tie_free(T, E, seed=3)
    spec = RouterSpec(renormalize=True)
    steer = moe_route.SteerSpec(std={3: 0.5}, force={7: 1, 9: -1})
    groups = torch.arange(T) % 3 - 1
    cpu_stats = GateStats.zeros(2, E)
    w_cpu, i_cpu = moe_route.topk_gate(x, k, spec, steer=steer, stats=cpu_stats, groups=groups)
    xs, gs = x.cuda(), groups.cuda()
    stats = GateStats.zeros(2, E, device="cuda")
    w, ids = moe_route.topk_gate(xs, k, spec, steer=steer, stats=stats, groups=gs)
    assert torch.equal(ids.cpu(), i_cpu)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=1e-5, atol=1e-6)
    _stats_close(stats, cpu_stats)
    graph = torch.cuda.CUDAGraph()
    stats.zero_()
    with torch.cuda.graph(graph):
        w_g, ids_g = moe_route.topk_gate(xs, k, spec, steer=steer, stats=stats, groups=gs)
    stats.zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ids_g.cpu(), i_cpu)
    assert torch.equal(stats.counts.cpu(), 2 * cpu_stats.counts)
    torch.testing.assert_close(stats.prob_sum.cpu(), 2 * cpu_stats.prob_sum, rtol=1e-4, atol=1e-4)


def test_wide_kernel_opts_in_while_captured():
    """A build's first call past 48 KiB of shared memory (prob_sum over 8192 experts at k=128,
    fp16 logits: 50,248 bytes; no earlier test runs that build) made inside a graph capture: the
    opt-in (cudaFuncSetAttribute) must not break the capture, and the replays count right."""
    T, E, k = 40, 8192, 128
    g = torch.Generator().manual_seed(5)  # distinct fp16 values: the bit patterns from 1.0 on
    x = (torch.stack([torch.randperm(E, generator=g) for _ in range(T)]) + 0x3C00)
    x = x.to(torch.int16).view(torch.float16)
    cpu_stats = GateStats.zeros(1, E)
    w_cpu, i_cpu = moe_route.topk_gate(x, k, stats=cpu_stats)
    xs = x.cuda()
    stats = GateStats.zeros(1, E, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = moe_route.topk_gate(xs, k, stats=stats)
    stats.zero_()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ids.cpu(), i_cpu)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.counts.cpu(), 3 * cpu_stats.counts)
    torch.testing.assert_close(stats.prob_sum.cpu(), 3 * cpu_stats.prob_sum, rtol=1e-4, atol=1e-4)


def _replay_rows(T, E, k, seed=0):
    """Distinct random ids; every 4th row -1, every 9th row invalid (a duplicate id)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(T, E, generator=g).argsort(-1)[:, :k].int()
    rows[::4] = -1
    rows[1::9, -1] = rows[1::9, 0]
    return rows


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("T,E,k", [(1, 64, 8), (64, 128, 8), (4096, 256, 8), (300, 1000, 40)])
def test_replay_cpu_and_cuda_agree(name, T, E, k):
    """Replayed rows give the CPU's ids and weights; a row the CPU would refuse (a duplicate id)
    is selected as usual on CUDA, like a row of -1 (the kernel cannot raise)."""
    x = _tie_free(T, E, seed=1)
    spec = SPECS[name] if not (name == "deepseek_v3" and E % 8) else RouterSpec(score="sigmoid")
    rows = _replay_rows(T, E, k, seed=2)
    bad = rows[:, 1:].eq(rows[:, :1]).any(-1) & (rows[:, 0] >= 0)
    stats = GateStats.zeros(1, E, device="cuda", coact=True)
    w_gpu, i_gpu = moe_route.topk_gate(x.cuda(), k, spec, replay=rows.cuda(), stats=stats)
    cpu_rows = torch.where(bad[:, None], -1, rows)
    cpu_stats = GateStats.zeros(1, E, coact=True)
    w_cpu, i_cpu = moe_route.topk_gate(x, k, spec, replay=cpu_rows, stats=cpu_stats)
    assert torch.equal(i_gpu.cpu(), i_cpu)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-5, atol=1e-6)
    _stats_close(stats, cpu_stats)


def test_replay_graph_capture_follows_the_ids_buffer():
    T, E, k = 128, 64, 6
    x = torch.randn(T, E, device="cuda")
    rows = _replay_rows(T, E, k, seed=3)
    rows[rows[:, 1:].eq(rows[:, :1]).any(-1)] = -1
    buf = rows.cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        moe_route.topk_gate(x, k, replay=buf)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        w, ids = moe_route.topk_gate(x, k, replay=buf)
    for seed in (4, 5):
        new = _replay_rows(T, E, k, seed=seed)
        new[new[:, 1:].eq(new[:, :1]).any(-1)] = -1
        buf.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        want_w, want_ids = moe_route.topk_gate(x.cpu(), k, replay=new)
        assert torch.equal(ids.cpu(), want_ids)
        torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

def _dispatch_inputs(T, k, E, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[::7, -1] = -1  # dropped slots (expert-parallel sentinels)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.rand(T, k, generator=g)
    return ids, x, w


def _combine(x, ids, w, E, block_size=1):
    plan = moe_route.dispatch_plan(ids, E, block_size)
    rows = moe_route.permute(x, plan)
    return plan, rows, moe_route.unpermute(rows * 2, plan, w)


# T*k <= 2048 with R <= 32768 runs the one-launch plan (one CTA), the rest the three-launch one.
@pytest.mark.parametrize("T,k,E,H,block", [(1, 8, 256, 7168, 1), (333, 2, 8, 72, 16),
                                           (64, 8, 256, 64, 64), (64, 8, 4096, 64, 1),
                                           (256, 8, 128, 32, 1), (257, 8, 128, 32, 1),
                                           (4096, 8, 256, 2048, 1), (2048, 8, 4096, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_cpu_and_cuda_agree(T, k, E, H, block, dtype):
    ids, x, w = _dispatch_inputs(T, k, E, H, dtype)
    p_cpu, rows_cpu, out_cpu = _combine(x, ids, w, E, block)
    p_gpu, rows_gpu, out_gpu = _combine(x.cuda(), ids.cuda(), w.cuda(), E, block)
    for a, b in zip(p_cpu[:4], p_gpu[:4]):
        assert torch.equal(a, b.cpu())  # the plan is a pure function of the ids
    assert torch.equal(rows_cpu, rows_gpu.cpu())
    # the same fp32 products and sums in slot order on both devices
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [512, 4096])  # the one-launch and the three-launch plan
def test_dispatch_graph_capture_and_replay(T):
    k, E, H = 4, 32, 96
    ids, x, w = (t.cuda() for t in _dispatch_inputs(T, k, E, H, torch.bfloat16))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # warm-up outside the graph
        _combine(x, ids, w, E, 8)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        plan, rows, out = _combine(x, ids, w, E, 8)
    for seed in (1, 2, 3):  # new inputs in the captured buffers
        new_ids, new_x, new_w = _dispatch_inputs(T, k, E, H, torch.bfloat16, seed)
        ids.copy_(new_ids)
        x.copy_(new_x)
        w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        want_plan, want_rows, want_out = _combine(x, ids, w, E, 8)
        for a, b in zip(plan[:4], want_plan[:4]):
            assert torch.equal(a, b)
        assert torch.equal(rows, want_rows)
        assert torch.equal(out, want_out)  # deterministic: no atomics



@pytest.mark.parametrize("T", [1, 64, 4096])
def test_each_kernel_reads_what_the_kernel_before_it_wrote(T):
    """Each moe_route kernel is a programmatic dependent launch on sm_90+ (csrc/cuda/pdl.cuh): it
    may start while the kernel before it in the stream still runs. Here the gate reads logits
    that a GEMM writes right before it, and the dispatch ops follow one another, each reading
    the one before's output; every round into the same buffers, eagerly and in a replayed graph.
    A kernel that did not wait would read the round before's values. Each round must match the
    same ops on the CPU."""
    E, k, H, D = 256, 8, 256, 2048
    g = torch.Generator().manual_seed(T)
    router = (torch.randn(D, E, generator=g) / 32).cuda()
    proj = (torch.randn(D, H, generator=g) / 32).cuda()
    bias = torch.linspace(-0.01, 0.01, E, device="cuda")
    h = torch.empty(T, D, device="cuda")
    logits = torch.empty(T, E, device="cuda")
    x = torch.empty(T, H, device="cuda")

    def step():
        torch.matmul(h, proj, out=x)
        torch.matmul(h, router, out=logits)
        w, ids = moe_route.topk_gate(logits, k, SPECS["deepseek_v3"], selection_bias=bias)
        plan, rows, out = _combine(x, ids, w, E, 16)
        return w, ids, plan, rows, out

    def check(got):
        want = [moe_route.topk_gate(logits.cpu(), k, SPECS["deepseek_v3"],
                                    selection_bias=bias.cpu())]
        want += _combine(x.cpu(), want[0][1], want[0][0], E, 16)
        (w, ids), plan, rows, out = got[:2], got[2], got[3], got[4]
        assert torch.equal(ids.cpu(), want[0][1])
        torch.testing.assert_close(w.cpu(), want[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(plan[:4], want[1][:4]):
            assert torch.equal(a.cpu(), b)
        assert torch.equal(rows.cpu(), want[2])
        torch.testing.assert_close(out.cpu(), want[3], rtol=1e-5, atol=1e-5)

    for seed in range(4):  # eagerly: the ops' outputs are new tensors each round
        h.copy_(torch.randn(T, D, generator=g))
        got = step()
        torch.cuda.synchronize()
        check(got)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up off the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        got = step()
    for seed in range(4):  # in the graph: the same buffers every round
        h.copy_(torch.randn(T, D, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        check(got)

@pytest.mark.parametrize("T,block", [(1, 64), (64, 64), (2048, 128)])
def test_permute_leaves_the_unused_tail_unwritten(T, block):
    """zero_tail=False writes the rows in use only. The caching allocator hands the output the
    block of a NaN-filled tensor of the same size just freed (after empty_cache it is the only
    free block of the large pool; 1-10 MB here): the tail must still hold NaN."""
    k, E, H = 8, 256, 64
    ids, x, _ = (t.cuda() for t in _dispatch_inputs(T, k, E, H, torch.bfloat16))
    plan = moe_route.dispatch_plan(ids, E, block)
    used, R = int(plan.expert_offsets[-1]), plan.row_slot.numel()
    torch.cuda.empty_cache()
    nan = torch.full((R, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    address = nan.data_ptr()
    del nan
    rows = moe_route.permute(x, plan, zero_tail=False)
    assert rows.data_ptr() == address, "the allocator did not reuse the NaN block"
    assert torch.equal(rows[:used], moe_route.permute(x, plan)[:used])
    assert used < R and rows[used:].isnan().all()


def test_dispatch_compile_fullgraph_on_cuda():
    ids, x, w = (t.cuda() for t in _dispatch_inputs(300, 2, 8, 64, torch.float32))
    fn = lambda x, ids, w: _combine(x, ids, w, 8)[2]  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, ids, w), fn(x, ids, w))


def test_dispatch_arguments_on_another_device_are_refused():
    y = torch.zeros(4, 3, device="cuda")
    with pytest.raises(ValueError, match="slot_row must be on the device of the first argument"):
        torch.ops.moe_route.unpermute(y, torch.zeros(4, dtype=torch.long),
                                      torch.zeros(2, 2, device="cuda"))
    with pytest.raises(ValueError, match="num_experts=5000 must be <= 4096 on CUDA"):
        moe_route.dispatch_plan(torch.zeros(2, 2, dtype=torch.long, device="cuda"), 5000)


# ---------------------------------------------------------------------------------------------
# patched models
# ---------------------------------------------------------------------------------------------

FAMILIES = ["olmoe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "granitemoe", "jamba",
            "llama4", "ernie4_5_moe", "phimoe"]


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed)).cuda()


def _first_router_ids(model, family, ids):
    """(ids chosen by the first router, model output) of one forward."""
    _, router, block = find_routers(model)[0]
    k = adapter_for(router).k(router, block)
    seen = []
    hook = router.register_forward_hook(
        lambda mod, args, out: seen.append(selected_experts(model_type(family), out, k)))
    try:
        with torch.no_grad():
            out = model(**inputs(family, ids, model))
    finally:
        hook.remove()
    out = getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out[0]
    return seen[0].reshape(-1, k).sort(-1).values, out.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_on_cuda_matches_unpatched(family):
    model = build(family).cuda()
    ids = _ids()
    ref_ids, ref = _first_router_ids(model, family, ids)
    with moe_route.patch(model):
        our_ids, ours = _first_router_ids(model, family, ids)
    assert torch.equal(our_ids, ref_ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_record_and_steer_on_cuda_match_cpu(family):
    """Statistics recorded on CUDA equal those recorded on the CPU (exact mode keeps the model's
    own routing), and forcing an expert on puts it in every token's choice on CUDA."""
    from moe_route import SteeringPlan

    model = build(family)
    ids = _ids().cpu()
    stats = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        with moe_route.patch(model, exact=True), moe_route.record(model) as rec, torch.no_grad():
            model(**inputs(family, ids.to(device), model))
        stats[device] = rec.stats
    for a, b in zip(stats["cpu"], stats["cuda"]):
        assert torch.equal(a.counts, b.counts.cpu())
        torch.testing.assert_close(b.weight_sum.cpu(), a.weight_sum, rtol=1e-4, atol=1e-5)
    last = stats["cuda"][-1].index
    rare = int(stats["cuda"][-1].counts[0].argmin())
    with moe_route.record(model) as rec, moe_route.steer(model, SteeringPlan.force(last, rare)):
        with torch.no_grad():
            model(**inputs(family, ids.cuda(), model))
    assert int(rec.stats[-1].counts[0][rare]) == ids.numel()


@pytest.mark.parametrize("stage", [1, 1 << 30])
def test_trace_on_cuda_comes_to_the_host_as_on_the_cpu(monkeypatch, stage):
    """A trace recorded on CUDA, its rows brought over at every router call (a 1-byte stage) or
    once at the read, is the trace recorded on the CPU: ids, tokens and groups equal, weights and
    logits within fp16 rounding of a device's last bits; every tensor of it on the host."""
    from moe_route import recording

    monkeypatch.setattr(recording, "TRACE_STAGE_BYTES", stage)
    model = build("qwen3_moe")
    ids = _ids().cpu()
    traces = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        with moe_route.patch(model, exact=True), \
                moe_route.record(model, trace=True, trace_logits=True) as rec, torch.no_grad():
            with rec.group("first"):
                model(ids.to(device))
            with rec.group("second"):
                model(ids[:1].to(device))
        traces[device] = rec.trace
    assert list(traces["cuda"]) == list(traces["cpu"])
    for name, layer in traces["cpu"].items():
        got = traces["cuda"][name]
        assert got["group"] == layer["group"] and got["experts"] == layer["experts"]
        for key in ("ids", "tokens", "weights", "logits"):
            assert got[key].device.type == "cpu" and got[key].dtype == layer[key].dtype, key
        assert torch.equal(got["ids"], layer["ids"]) and torch.equal(got["tokens"], layer["tokens"])
        for key in ("weights", "logits"):
            torch.testing.assert_close(got[key], layer[key], rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_trace_of_a_model_compiled_on_cuda_is_the_eager_trace(mode):
    """A model compiled with inductor and fullgraph=True, with CUDA graphs too
    (``mode="reduce-overhead"``, which must leave the trace op, an op on the host, out of
    them), traces every call as the eager model does, batch after batch and group after
    group. The experts run as "moe_route": transformers' own grouped GEMM reads its offsets on
    the host in fp32, which a CUDA graph cannot hold, where ours is an op inductor leaves out."""
    import moe_route.nn  # noqa: F401  (registers the "moe_route" experts implementation)

    model = build("qwen3_moe").cuda()
    model.set_experts_implementation("moe_route")
    batches = [_ids(70 + b, (3, 5)) for b in range(4)]
    traces = []
    torch._dynamo.reset()
    for forward in (model, torch.compile(model, fullgraph=True, mode=mode)):
        with moe_route.record(model, trace=True, trace_logits=True) as rec, torch.no_grad():
            for b, ids in enumerate(batches):
                with rec.group(f"g{b}"):
                    forward(ids)
        traces.append(rec.trace)
    torch._dynamo.reset()
    eager, compiled = traces
    assert list(compiled) == list(eager)
    for name, layer in eager.items():
        got = compiled[name]
        assert got["group"] == layer["group"] == [f"g{b}" for b in range(4) for _ in range(15)]
        assert torch.equal(got["ids"], layer["ids"]) and torch.equal(got["tokens"], layer["tokens"])
        for key in ("weights", "logits"):
            torch.testing.assert_close(got[key], layer[key], rtol=2e-3, atol=1e-3)


def test_trace_refuses_a_cuda_graph_capture():
    """A router call's trace step inside a CUDA graph capture is refused: the graph's replays
    would route without tracing."""
    model = build("qwen3_moe").cuda()
    z = torch.randn(4, 8, device="cuda")
    w, ids = torch.topk(z, 2)
    with moe_route.record(model, trace=True) as rec:
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            with torch.cuda.graph(graph):
                rec._trace_call("", "model.layers.0.mlp.gate", z, w, ids, None)


def test_evaluation_on_cuda_matches_cpu():
    """The planted task asked as multiple-choice questions of the model on CUDA, patched and
    steered, answers as on the CPU (the scores are gathered on the device)."""
    from moe_route.analysis.evaluation import choice_accuracy
    from moe_route.testing import planted_model

    pm = planted_model()
    questions = pm.choice_items()
    plan = moe_route.SteeringPlan.promote(layers=list(pm.truth.middle_layers),
                                          experts=list(pm.truth.task_experts[2]), std=0.5)
    results = {}
    for device in ("cpu", "cuda"):
        pm.model.to(device)
        with moe_route.patch(pm.model):
            plain = choice_accuracy(pm.model, questions, batch_size=128)
            with moe_route.steer(pm.model, plan):
                results[device] = (plain, choice_accuracy(pm.model, questions, batch_size=128))
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert cuda.predictions == cpu.predictions
    assert results["cuda"][0].accuracy() == pm.accuracy_by_language()   # the model on CUDA


def test_patched_block_graph_capture_and_replay_with_record():
    """A patched MoE block (fused gate with statistics, "moe_route" experts) captured in a CUDA
    graph: each replay routes its new input like an eager call and adds its statistics."""
    import moe_route.nn  # noqa: F401  (registers the "moe_route" experts implementation)

    model = build("qwen3_moe").cuda()
    model.set_experts_implementation("moe_route")
    block = model.model.layers[0].mlp
    H = model.config.hidden_size
    xs = [torch.randn(1, 64, H, generator=torch.Generator().manual_seed(i)).cuda()
          for i in range(3)]
    x = xs[0].clone()
    with moe_route.record(model) as rec, torch.no_grad():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            block(x)  # warm-up outside the graph: recorded like any call
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):  # capturing runs no kernel: nothing recorded
            out = block(x)
        for xi in xs[1:]:
            x.copy_(xi)
            graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
    with moe_route.record(model) as eager, torch.no_grad():
        for xi in xs:
            want = block(xi)
    torch.testing.assert_close(replayed, want)
    for a, b in zip(rec.stats, eager.stats):
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)


def test_compile_patched_model_on_cuda():
    model = build("qwen3_moe").cuda()
    ids = _ids(5)
    _, ref = _first_router_ids(model, "qwen3_moe", ids)
    with moe_route.patch(model):
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            out = compiled(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_replay_by_position_on_cuda_matches_cpu(family):
    """A tiny model replaying random per-position routing: CUDA and CPU route the same ids and
    give the same logits."""
    model = build(family)
    ids = _ids().cpu()
    B, S = ids.shape
    g = torch.Generator().manual_seed(6)
    routing = {name: torch.rand(B, S, adapter_for(r).experts(r), generator=g).argsort(-1)
               [..., :adapter_for(r).k(r, block)]
               for name, r, block in find_routers(model)}
    outs, traces = {}, {}
    for device in ("cpu", "cuda"):
        model.to(device)
        with moe_route.replay(model, routing), moe_route.record(model, trace=True) as rec, \
                torch.no_grad():
            outs[device] = model(ids.to(device)).logits.float().cpu()
        traces[device] = rec.trace
    for name in routing:
        assert torch.equal(traces["cuda"][name]["ids"], traces["cpu"][name]["ids"])
        assert torch.equal(traces["cuda"][name]["ids"].long(),
                           routing[name].reshape(B * S, -1))
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-4, atol=1e-4)
