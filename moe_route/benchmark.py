"""Gate benchmarks: the fused op against the PyTorch composition transformers itself runs.

Each case times, in one run and on one device, the baseline (eager, optionally ``torch.compile``d)
and the fused gate without and with statistics, and reports medians, spread and ratios. CPU timings
use ``time.perf_counter`` over repeated calls; CUDA timings replay a CUDA graph of many calls, so
microsecond kernels are not hidden behind launch overhead.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from moe_route import ops
from moe_route.ops import GateStats, RouterSpec

# Baselines: what the transformers routers compute (research/transformers_moe_map.md §3).


def baseline_softmax_topk(logits, k, renormalize=False):
    """S1 (OLMoE, Qwen3-MoE; Mixtral/Qwen3 with renormalize): softmax(fp32) -> topk [-> renorm]."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def baseline_topk_softmax(logits, k):
    """S2 (GPT-OSS, Granite): topk on the logits, softmax over the k chosen."""
    top, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=torch.float32), ids


def baseline_deepseek_v3(logits, k, bias, n_group, topk_group, scale=2.5):
    """S3 (DeepSeek-V3 noaux_tc): sigmoid + correction bias, top-2-sum groups, renorm, scale."""
    scores = logits.float().sigmoid()
    biased = scores + bias
    T, E = biased.shape
    group_scores = biased.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
    keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
    mask = mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    ids = biased.masked_fill(mask == 0, 0.0).topk(k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def baseline_stats(logits, weights, ids, stats: GateStats):
    """What a user writes in PyTorch for the same statistics (one group)."""
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    stats.tokens.add_(logits.shape[0])
    stats.counts[0] += torch.bincount(ids.reshape(-1), minlength=E)
    stats.weight_sum[0].index_add_(0, ids.reshape(-1), weights.reshape(-1).float())
    stats.prob_sum[0] += probs.sum(0)
    stats.entropy_sum[0] += torch.special.entr(probs).sum()


@dataclasses.dataclass(frozen=True)
class Case:
    semantics: str  # "softmax_topk", "softmax_topk_renorm", "topk_softmax", "deepseek_v3"
    T: int
    E: int
    k: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return (f"{self.semantics} T={self.T} E={self.E} k={self.k} "
                f"{str(self.dtype).replace('torch.', '')}")


def gate_and_baseline(case: Case, device) -> tuple[Callable, Callable, Callable, Callable]:
    """(baseline, fused gate, baseline + stats, fused gate + stats) closures for one case."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(case.T, case.E, generator=g).to(device=device, dtype=case.dtype)
    k = case.k
    stats = GateStats.zeros(1, case.E, device=device)
    if case.semantics == "deepseek_v3":
        n_group, topk_group = 8, 4
        bias = (torch.randn(case.E, generator=g) * 0.1).to(device)
        spec = RouterSpec(score="sigmoid", n_group=n_group, topk_group=topk_group,
                          group_score="top2_sum", renormalize=True, renorm_eps=1e-20, scale=2.5)
        base = lambda: baseline_deepseek_v3(logits, k, bias, n_group, topk_group)  # noqa: E731
        gate = lambda: ops.topk_gate(logits, k, spec, selection_bias=bias)  # noqa: E731
        gate_s = lambda: ops.topk_gate(logits, k, spec, selection_bias=bias, stats=stats)  # noqa: E731
    else:
        if case.semantics == "topk_softmax":
            spec = RouterSpec(select_on="logits")
            base = lambda: baseline_topk_softmax(logits, k)  # noqa: E731
        else:
            renorm = case.semantics == "softmax_topk_renorm"
            spec = RouterSpec(renormalize=renorm)
            base = lambda: baseline_softmax_topk(logits, k, renorm)  # noqa: E731
        gate = lambda: ops.topk_gate(logits, k, spec)  # noqa: E731
        gate_s = lambda: ops.topk_gate(logits, k, spec, stats=stats)  # noqa: E731

    def base_s():
        w, i = base()
        baseline_stats(logits, w, i, stats)

    return base, gate, base_s, gate_s


def time_fn(fn: Callable, device, *, min_time: float = 0.2, max_reps: int = 2000) -> dict:
    """Median and interquartile range (microseconds) of one call."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, min_time)
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max_reps, max(5, min_time / once)))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    return _summary(samples)


def _time_cuda(fn: Callable, min_time: float) -> dict:
    # Replay a graph of `inner` calls: per-call time without launch overhead.
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    inner = 20
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(inner):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples, spent = [], 0.0
    while spent < min_time * 1e3 or len(samples) < 10:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        spent += ms
        samples.append(ms * 1e3 / inner)
    return _summary(samples)


def _summary(samples: list) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), 0, max(samples)]
    return {"median_us": statistics.median(samples), "q1_us": q[0], "q3_us": q[2],
            "reps": len(samples)}


def default_cases(full: bool = False) -> list[Case]:
    """The issue's grid (``full``) or a quick one that still covers the targets."""
    Ts = (1, 64, 1024, 8192)
    Es = (8, 64, 128, 256) if full else (64, 256)
    ks = (2, 8)
    dtypes = (torch.float32, torch.bfloat16) if full else (torch.float32,)
    cases = [Case("softmax_topk", T, E, k, dt) for dt in dtypes for E in Es for k in ks
             for T in Ts if k <= E]
    extra_T = Ts if full else (1, 8192)
    for T in extra_T:
        cases.append(Case("softmax_topk_renorm", T, 64, 8, torch.float32))
        cases.append(Case("topk_softmax", T, 64, 4, torch.float32))
        cases.append(Case("deepseek_v3", T, 256, 8, torch.float32))
    return cases


def run(cases: Iterable[Case], device="cpu", *, compile_baseline: bool = False,
        min_time: float = 0.2, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    rows = []
    for case in cases:
        base, gate, base_s, gate_s = gate_and_baseline(case, device)
        row = {"case": case.label, "semantics": case.semantics, "T": case.T, "E": case.E,
               "k": case.k, "dtype": str(case.dtype).replace("torch.", ""),
               "device": str(device)}
        row["baseline"] = time_fn(base, device, min_time=min_time)
        row["gate"] = time_fn(gate, device, min_time=min_time)
        row["baseline_stats"] = time_fn(base_s, device, min_time=min_time)
        row["gate_stats"] = time_fn(gate_s, device, min_time=min_time)
        if compile_baseline:
            compiled = torch.compile(base, dynamic=False)
            row["baseline_compiled"] = time_fn(compiled, device, min_time=min_time)
        med = {key: row[key]["median_us"] for key in row if isinstance(row[key], dict)}
        row["speedup"] = med["baseline"] / med["gate"]
        row["speedup_stats"] = med["baseline_stats"] / med["gate_stats"]
        row["stats_overhead"] = med["gate_stats"] / med["gate"] - 1.0
        if compile_baseline:
            row["speedup_vs_compiled"] = med["baseline_compiled"] / med["gate"]
        rows.append(row)
        if progress:
            progress(format_row(row))
    return rows


def format_header(compile_baseline: bool = False) -> str:
    cols = (f"{'case':<40} {'baseline':>10} {'gate':>9} {'ratio':>6} {'b+stats':>10} "
            f"{'g+stats':>9} {'ratio':>6} {'stats+':>7}")
    if compile_baseline:
        cols += f" {'compiled':>10} {'ratio':>6}"
    return cols + "\n" + "-" * len(cols)


def format_row(row: dict) -> str:
    def us(key):
        return f"{row[key]['median_us']:>8.1f}us"
    line = (f"{row['case']:<40} {us('baseline'):>10} {us('gate'):>9} {row['speedup']:>5.2f}x "
            f"{us('baseline_stats'):>10} {us('gate_stats'):>9} {row['speedup_stats']:>5.2f}x "
            f"{row['stats_overhead'] * 100:>6.0f}%")
    if "baseline_compiled" in row:
        line += f" {us('baseline_compiled'):>10} {row['speedup_vs_compiled']:>5.2f}x"
    return line


def save(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


# Dispatch: plan + permute + unpermute against the index work of transformers' "grouped_mm"
# experts (sort by expert, gather by perm // k, histc + cumsum offsets, weight, inverse
# permutation, reshape + sum). The experts themselves are the identity on both sides.


def baseline_dispatch(x, ids, weights, num_experts):
    T, k = ids.shape
    expert_ids, perm = torch.sort(ids.reshape(-1))
    rows = x[perm // k]
    counts = torch.histc(expert_ids.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    weighted = rows * weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inverse].view(T, k, -1).sum(dim=1), offsets


def fused_dispatch(x, ids, weights, num_experts):
    from moe_route.dispatch import dispatch_plan, permute, unpermute

    plan = dispatch_plan(ids, num_experts)
    return unpermute(permute(x, plan), plan, weights), plan.expert_offsets


@dataclasses.dataclass(frozen=True)
class DispatchCase:
    T: int
    k: int
    H: int
    E: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"dispatch T={self.T} k={self.k} H={self.H} E={self.E} {str(self.dtype).replace('torch.', '')}"


def dispatch_cases(full: bool = False) -> list[DispatchCase]:
    if not full:
        return [DispatchCase(T, 8, 1024, 64, torch.float32) for T in (1, 64, 1024, 8192)]
    return [DispatchCase(T, k, H, E, dt) for dt in (torch.float32, torch.bfloat16)
            for H in (1024, 4096) for E in (8, 64, 256) for k in (2, 8)
            for T in (1, 64, 1024, 8192)]


def run_dispatch(cases, device="cpu", *, min_time=0.2, progress=None) -> list[dict]:
    rows = []
    for case in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.T, case.H, generator=g).to(device=device, dtype=case.dtype)
        ids = torch.randint(0, case.E, (case.T, case.k), generator=g).to(device)
        w = torch.rand(case.T, case.k, generator=g).to(device)
        row = {"case": case.label, "T": case.T, "k": case.k, "H": case.H, "E": case.E,
               "dtype": str(case.dtype).replace("torch.", ""), "device": str(device)}
        row["baseline"] = time_fn(lambda: baseline_dispatch(x, ids, w, case.E), device,
                                  min_time=min_time)
        row["fused"] = time_fn(lambda: fused_dispatch(x, ids, w, case.E), device,
                               min_time=min_time)
        row["speedup"] = row["baseline"]["median_us"] / row["fused"]["median_us"]
        rows.append(row)
        if progress:
            progress(f"{row['case']:<44} {row['baseline']['median_us']:>10.1f}us "
                     f"{row['fused']['median_us']:>10.1f}us {row['speedup']:>6.2f}x")
    return rows
