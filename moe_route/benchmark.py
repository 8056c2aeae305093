"""Benchmarks of the moe_route ops against what transformers itself runs, each in one run.

* gate: the fused ``topk_gate`` against the PyTorch router composition (eager, optionally
  ``torch.compile``d), without and with statistics;
* dispatch: ``dispatch_plan`` + ``permute`` + ``unpermute`` against the index work of
  transformers' ``"grouped_mm"`` experts;
* block: a whole sparse MoE block of a real architecture with the ``"moe_route"`` experts
  implementation against ``"grouped_mm"`` and ``"eager"``.

Every case reports medians, spread and the ratio to the baseline measured in the same run. CPU
timings use ``time.perf_counter`` around each call (dispatch and block: the compared callables
alternate, see ``time_interleaved``); CUDA timings replay a CUDA graph of many calls, so
microsecond kernels are not hidden behind launch overhead (block: synchronised host timing, as the
eager experts read back to the host).
"""
from __future__ import annotations

import dataclasses
import functools
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
    """transformers' ``grouped_mm_experts_forward`` minus the GEMMs: ``(out [T, H], offsets)``.

    As there, the routing weights multiply the rows in their own dtype (bf16 for OLMoE/Qwen3-MoE
    bf16 routers) and the result is cast back to ``x.dtype``.
    """
    T, k = ids.shape
    expert_ids, perm = torch.sort(ids.reshape(-1))
    rows = x[perm // k]
    counts = torch.histc(expert_ids.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    weighted = rows * weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inverse].view(T, k, -1).sum(dim=1).to(x.dtype), offsets


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
        return f"dispatch T={self.T} k={self.k} H={self.H} E={self.E} {_dtype_name(self.dtype)}"


def dispatch_cases(full: bool = False) -> list[DispatchCase]:
    if not full:
        return [DispatchCase(T, 8, 1024, 64, torch.float32) for T in (1, 64, 1024, 8192)]
    return [DispatchCase(T, k, H, E, dt) for dt in (torch.float32, torch.bfloat16)
            for H in (1024, 4096) for E in (8, 64, 256) for k in (2, 8)
            for T in (1, 64, 1024, 8192)]


def dispatch_inputs(case: DispatchCase, device="cpu"):
    """(x [T, H], ids [T, k] int64, weights [T, k]) with weights in x's dtype, as the OLMoE and
    Qwen3-MoE routers return them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.T, case.H, generator=g).to(device=device, dtype=case.dtype)
    ids = torch.randint(0, case.E, (case.T, case.k), generator=g).to(device)
    w = torch.rand(case.T, case.k, generator=g).to(device=device, dtype=case.dtype)
    return x, ids, w


def run_dispatch(cases, device="cpu", *, min_time=0.2, progress=None) -> list[dict]:
    """Baseline and fused dispatch of each case, timed interleaved (``time_interleaved``)."""
    rows = []
    for case in cases:
        x, ids, w = dispatch_inputs(case, device)
        row = {"case": case.label, "T": case.T, "k": case.k, "H": case.H, "E": case.E,
               "dtype": _dtype_name(case.dtype), "device": str(device)}
        row.update(time_interleaved({"baseline": lambda: baseline_dispatch(x, ids, w, case.E),
                                     "fused": lambda: fused_dispatch(x, ids, w, case.E)},
                                    device, min_time=min_time))
        row["speedup"] = paired_ratio(row["baseline"], row["fused"])
        row["speedup_of_medians"] = row["baseline"]["median_us"] / row["fused"]["median_us"]
        rows.append(row)
        del x, ids, w
        if progress:
            progress(format_dispatch_row(row))
    return rows


def format_dispatch_header() -> str:
    cols = f"{'case':<44} {'baseline':>18} {'fused':>18} {'ratio':>7}"
    return cols + "\n" + "-" * len(cols)


def format_dispatch_row(row: dict) -> str:
    return (f"{row['case']:<44} {_med_spread(row['baseline']):>18} {_med_spread(row['fused']):>18} "
            f"{row['speedup']:>6.2f}x")


def time_interleaved(fns: dict, device, *, setup: Optional[dict] = None, min_time: float = 0.2,
                     min_reps: int = 5, max_reps: int = 2000, burst: int = 3,
                     cuda_graph: bool = True) -> dict:
    """``{name: summary}`` of several callables timed in alternation.

    Every round calls each function ``burst`` times in a row, in an order of functions that
    rotates from round to round, so slow phases of a shared machine hit all of them alike; rounds
    continue until every function has run ``min_time`` seconds and ``min_reps`` rounds.
    ``setup[name]``, if given, runs untimed before each call of ``fns[name]``. Each summary keeps
    its samples (``samples_us``, round by round) for ``paired_ratio``.

    Bursts keep the steady state of back-to-back calls (a model's consecutive layers) in the
    samples: with one call per round, seconds can pass between two calls of one function, and
    memory it freed may have gone back to the OS, or, in a VM, to the host (free page reporting
    after 2 s), to be faulted in again. The medians are over all calls, the first of each burst
    included.

    On CUDA each function is timed by ``time_fn`` (CUDA-graph replay) in turn, or, with
    ``cuda_graph=False`` (code that syncs with the host), alternated like on the CPU with a device
    synchronisation around each call.
    """
    setup = setup or {}
    cuda = torch.device(device).type == "cuda"
    if cuda and cuda_graph:
        out = {}
        for name, fn in fns.items():
            setup.get(name, _nothing)()
            out[name] = time_fn(fn, device, min_time=min_time)
        return out
    sync = torch.cuda.synchronize if cuda else _nothing
    names = list(fns)

    def timed(name):
        setup.get(name, _nothing)()
        sync()
        t0 = time.perf_counter()
        fns[name]()
        sync()
        return time.perf_counter() - t0

    for name in names:  # warm-up: first-call allocations, oneDNN primitive creation
        timed(name)
    once = max(min(timed(name) for name in names), 1e-7)
    rounds = int(min(max_reps, max(min_reps, min_time / (once * burst))))
    samples = {name: [] for name in names}
    for rnd in range(rounds):
        for i in range(len(names)):
            name = names[(rnd + i) % len(names)]
            samples[name].extend(timed(name) * 1e6 for _ in range(burst))
    return {name: {**_summary(s), "samples_us": s, "burst": burst} for name, s in samples.items()}


def paired_ratio(baseline: dict, ours: dict) -> float:
    """Median over rounds of baseline time / our time in the same round (``time_interleaved``
    summaries; each side's median within the round's burst); without per-round samples (CUDA
    graphs), the ratio of the medians.

    On a machine shared with other jobs a slow phase stretches a whole round, so the per-round
    ratio is steadier than the ratio of the two medians."""
    a, b = baseline.get("samples_us"), ours.get("samples_us")
    burst = baseline.get("burst", 1)
    if not a or not b or len(a) != len(b) or burst != ours.get("burst", 1):
        return baseline["median_us"] / ours["median_us"]
    per_round = lambda s: [statistics.median(s[i:i + burst]) for i in range(0, len(s), burst)]  # noqa: E731
    return statistics.median(x / y for x, y in zip(per_round(a), per_round(b)))


def _nothing():
    pass


def _med_spread(summary: dict) -> str:
    """``median (IQR as % of the median)``, in µs below 10 ms, else ms."""
    med = summary["median_us"]
    iqr = (summary["q3_us"] - summary["q1_us"]) / med * 100 if med > 0 else 0.0
    value = f"{med:.1f}us" if med < 1e4 else f"{med / 1e3:.1f}ms"
    return f"{value} ({iqr:.0f}%)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# MoE block: the sparse MoE block of a real transformers architecture (router + experts), built
# from its config class with one decoder layer and random weights, timed with each experts
# implementation of the same model ("moe_route" vs transformers' "grouped_mm" and "eager"),
# switched with ``set_experts_implementation``. The router is transformers' own on all three.

BLOCK_IMPLS = ("moe_route", "grouped_mm", "eager")

# family: (config class, model class, config fields for (hidden, experts, top_k, intermediate))
BLOCK_FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              lambda H, E, k, I: dict(intermediate_size=I, num_experts=E, num_experts_per_tok=k)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  lambda H, E, k, I: dict(intermediate_size=2 * I, moe_intermediate_size=I,
                                          num_experts=E, num_experts_per_tok=k,
                                          norm_topk_prob=True, head_dim=H // 8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                lambda H, E, k, I: dict(intermediate_size=I, num_local_experts=E,
                                        num_experts_per_tok=k)),
}

# size: (hidden, experts, top_k, expert intermediate). "tiny" is the test suite's scale; "mid" has
# OLMoE's expert count, top-k and intermediate size at a quarter of its hidden size.
BLOCK_SIZES = {"tiny": (32, 8, 2, 16), "mid": (1024, 64, 8, 512)}


@dataclasses.dataclass(frozen=True)
class BlockCase:
    family: str
    size: str
    T: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        H, E, k, I = BLOCK_SIZES[self.size]
        return (f"{self.family} {self.size} H={H} E={E} k={k} I={I} T={self.T} "
                f"{_dtype_name(self.dtype)}")


def block_cases(full: bool = False, families=None) -> list[BlockCase]:
    """Every family and size at T 1..1024 (``full``: also 4096), fp32 and bf16."""
    Ts = (1, 64, 1024, 4096) if full else (1, 64, 1024)
    return [BlockCase(f, size, T, dt) for f in (families or BLOCK_FAMILIES)
            for size in BLOCK_SIZES for dt in (torch.float32, torch.bfloat16) for T in Ts]


def build_block_model(family: str, size: str, dtype=torch.float32, seed: int = 0):
    """(one-layer causal LM, its sparse MoE block). Router weights are redrawn from a normal
    distribution with std 0.5 * sqrt(32 / hidden) (0.5 at hidden 32), so that logits have the same
    spread at every size and tokens spread over all experts."""
    import transformers

    import moe_route.nn  # noqa: F401  (registers the "moe_route" experts implementation)

    config_name, model_name, fields = BLOCK_FAMILIES[family]
    H, E, k, I = BLOCK_SIZES[size]
    config = getattr(transformers, config_name)(
        vocab_size=128, hidden_size=H, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=64, eos_token_id=None, pad_token_id=None,
        bos_token_id=None, tie_word_embeddings=False, **fields(H, E, k, I))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval().to(dtype)
    block = next(m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.5 * (32 / H) ** 0.5)
    return model, block


# Agreement required before timing, as max |out - grouped_mm| / max |grouped_mm|: fp32 GEMMs are
# the same; in bf16 the combine differs (moe_route weighs in fp32, transformers in bf16) and eager
# runs per-expert F.linear.
BLOCK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def block_outputs_agree(model, block, x) -> dict:
    """Max relative deviation of each implementation's output from "grouped_mm"'s; raises
    AssertionError beyond ``BLOCK_TOLERANCE``."""
    outs = {}
    with torch.no_grad():
        for impl in BLOCK_IMPLS:
            model.set_experts_implementation(impl)
            outs[impl] = block(x).float()
    ref = outs["grouped_mm"]
    scale = max(ref.abs().max().item(), 1e-30)
    dev = {impl: (out - ref).abs().max().item() / scale for impl, out in outs.items()}
    tol = BLOCK_TOLERANCE[x.dtype]
    bad = {impl: d for impl, d in dev.items() if not d <= tol}
    assert not bad, f"MoE block outputs disagree with grouped_mm beyond {tol:g}: {bad}"
    return dev


def run_block(cases, device="cpu", *, min_time=0.2, progress=None) -> list[dict]:
    """Forward time of each case's MoE block under every experts implementation, interleaved."""
    rows = []
    built = {}
    for case in cases:
        key = (case.family, case.size, case.dtype)
        if key not in built:
            built.clear()  # one model at a time: the mid-size experts are 400 MB in fp32
            built[key] = build_block_model(case.family, case.size, case.dtype)
            built[key][0].to(device)
        model, block = built[key]
        H = BLOCK_SIZES[case.size][0]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, case.T, H, generator=g).to(device=device, dtype=case.dtype)
        row = {"case": case.label, "family": case.family, "size": case.size, "T": case.T,
               "dtype": _dtype_name(case.dtype), "device": str(device)}
        row["max_rel_dev"] = block_outputs_agree(model, block, x)

        def forward():
            with torch.no_grad():
                return block(x)

        switch = {impl: functools.partial(model.set_experts_implementation, impl)
                  for impl in BLOCK_IMPLS}
        row.update(time_interleaved({impl: forward for impl in BLOCK_IMPLS}, device,
                                    setup=switch, min_time=min_time, cuda_graph=False))
        ours = row["moe_route"]
        row["speedup_vs_grouped_mm"] = paired_ratio(row["grouped_mm"], ours)
        row["speedup_vs_eager"] = paired_ratio(row["eager"], ours)
        row["speedup_of_medians_vs_grouped_mm"] = row["grouped_mm"]["median_us"] / ours["median_us"]
        row["speedup_of_medians_vs_eager"] = row["eager"]["median_us"] / ours["median_us"]
        rows.append(row)
        if progress:
            progress(format_block_row(row))
    return rows


def format_block_header() -> str:
    cols = (f"{'case':<52} {'moe_route':>17} {'grouped_mm':>17} {'eager':>17} "
            f"{'gmm/ours':>8} {'eager/ours':>10}")
    return cols + "\n" + "-" * len(cols)


def format_block_row(row: dict) -> str:
    return (f"{row['case']:<52} {_med_spread(row['moe_route']):>17} "
            f"{_med_spread(row['grouped_mm']):>17} {_med_spread(row['eager']):>17} "
            f"{row['speedup_vs_grouped_mm']:>7.2f}x {row['speedup_vs_eager']:>9.2f}x")
