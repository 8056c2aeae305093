"""Benchmarks of the moe_route ops against what transformers itself runs, each in one run.

* gate: the fused ``topk_gate`` against the PyTorch router composition, plain, with statistics
  and with steering, and (``compile``) against ``torch.compile`` of the plain composition;
* dispatch: ``dispatch_plan``, ``permute``, ``unpermute`` and the three together, each against the
  index work of transformers' ``"grouped_mm"`` experts, eager and (the three ops) compiled;
  permute and unpermute also as bytes per second against the copy bandwidth of the device,
  measured in the same run; and ``permute64``, permute of a plan padded to blocks of 64 rows,
  with its unused tail left (``zero_tail=False``) against zeroed (the default);
* block: a whole sparse MoE block of a real architecture with the ``"moe_route"`` experts
  implementation against ``"grouped_mm"`` and ``"eager"``.

Every case reports medians, spread and the ratio to the baseline measured in the same run, and
every timing names its method:

* ``perf_counter`` (CPU): wall time around each call from Python, per-call overhead included.
  Dispatch and block alternate the compared callables (``time_interleaved``).
* ``cuda_graph``: a CUDA graph of 20 back-to-back calls, replayed; per call = replay time / 20
  from CUDA events. No launch overhead, inputs warm in L2 (as router logits are, fresh from the
  router GEMM). For microsecond kernels, which host launches would hide.
* ``cuda_events_l2``: CUDA events around one call, after overwriting a buffer larger than L2
  (256 MiB), so that the call reads its inputs from HBM. For kernels of 20 µs and more, whose
  measure is the bytes they move.
* ``cuda_sync`` (block): host wall time, the device synchronised around each call.

On CUDA the compared callables of a case share one method, picked from our op by ``pick_method``:
one call timed with events (``probe_us``), graph replay under 20 µs, else events with the L2
flushed. A callable whose graph cannot be captured (it reads back to the host) falls back to
events with the L2 flushed; its summary says so (``graph_error``).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from moe_route import ops
from moe_route.dispatch import dispatch_plan, permute, unpermute
from moe_route.ops import GateStats, RouterSpec, SteerSpec

# Baselines: what the transformers routers compute (research/transformers_moe_map.md §3). With
# ``forced=(on, off)`` (boolean [E] masks), forced-on experts are selected before all others and
# forced-off ones after all others, as the gate's forcing tiers do (moe_route.reference).


def baseline_softmax_topk(logits, k, renormalize=False, forced=None):
    """S1 (OLMoE, Qwen3-MoE; Mixtral/Qwen3 with renormalize): softmax(fp32) -> topk [-> renorm]."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if forced is None:
        weights, ids = torch.topk(probs, k, dim=-1)
    else:
        ids = torch.topk(_tiered(probs, forced), k, dim=-1).indices
        weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def baseline_topk_softmax(logits, k, forced=None):
    """S2 (GPT-OSS, Granite): topk on the logits, softmax over the k chosen."""
    if forced is None:
        top, ids = torch.topk(logits, k, dim=-1)
    else:
        ids = torch.topk(_tiered(logits, forced), k, dim=-1).indices
        top = logits.gather(1, ids)
    return torch.softmax(top, dim=-1, dtype=torch.float32), ids


def baseline_deepseek_v3(logits, k, bias, n_group, topk_group, scale=2.5, forced=None):
    """S3 (DeepSeek-V3 noaux_tc): sigmoid + correction bias, top-2-sum groups, renorm, scale.

    Forcing keeps a forced-on expert's group (its score +inf) before ranking the experts."""
    scores = logits.float().sigmoid()
    biased = scores + bias
    T, E = biased.shape
    group_scores = biased.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
    if forced is not None:
        group_scores = group_scores.masked_fill(forced[0].view(n_group, -1).any(-1), float("inf"))
        biased = _tiered(biased, forced)
    keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
    mask = mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    ids = biased.masked_fill(mask == 0, 0.0).topk(k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def baseline_deepseek_v4(logits, k, bias, scale=1.5, forced=None, dtype=None):
    """DeepSeek-V4 (S4): sqrt(softplus) scores in the model's ``dtype`` (default the logits';
    bf16 in a bf16 model, each op rounding to it) plus the fp32 correction bias, top-k, the
    chosen scores renormalised (+1e-20) and scaled. Steered logits are fp32: ``dtype`` then
    keeps the model's rounding of the scores."""
    scores = torch.nn.functional.softplus(logits).to(dtype or logits.dtype).sqrt()
    biased = scores + bias
    if forced is not None:
        biased = _tiered(biased, forced)
    ids = biased.topk(k, dim=-1).indices
    weights = scores.gather(1, ids).float()
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def _tiered(values, forced):
    on, off = forced
    inf = torch.full_like(values, float("inf"))
    return torch.where(on, inf, torch.where(off, -inf, values))


def baseline_steer(logits, add, lam, forced):
    """``SteerSpec`` steering in PyTorch: fp32 ``z + add + lam * std(z)`` (population std over
    the E logits), then forced-on experts set to the row max, forced-off ones to the row min."""
    z = logits.float()
    z = z + add + lam * z.std(dim=-1, keepdim=True, correction=0)
    top, bottom = z.amax(-1, keepdim=True), z.amin(-1, keepdim=True)
    on, off = forced
    return torch.where(on, top, torch.where(off, bottom, z))


def bench_steer(num_experts: int) -> SteerSpec:
    """The steering every gate case times: three constant biases, one std-scaled expert (the
    paper's soft steering, 0.5) and one expert forced on."""
    return SteerSpec(add={1: 1.0, 2: -0.5, 3: 0.25}, std={4: 0.5}, force={num_experts - 1: 1})


def baseline_stats(probs, weights, ids, stats: GateStats):
    """What a user writes in PyTorch for the same statistics (one group), from the dense routing
    distribution ``probs``. Counts use ``index_add_``: ``bincount`` reads its largest id back to
    the host on CUDA, which no CUDA graph can capture."""
    flat = ids.reshape(-1)
    stats.tokens.add_(ids.shape[0])
    stats.counts[0].index_add_(0, flat, torch.ones_like(flat))
    stats.weight_sum[0].index_add_(0, flat, weights.reshape(-1).float())
    stats.prob_sum[0] += probs.sum(0)
    stats.entropy_sum[0] += torch.special.entr(probs).sum()


def _softmax_distribution(logits):
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def _sigmoid_distribution(logits):
    scores = logits.float().sigmoid()
    return scores / scores.sum(-1, keepdim=True)


def _sqrtsoftplus_distribution(logits):
    scores = torch.nn.functional.softplus(logits.float()).sqrt()
    return scores / scores.sum(-1, keepdim=True)


@dataclasses.dataclass(frozen=True)
class Case:
    semantics: str  # "softmax_topk", "softmax_topk_renorm", "topk_softmax", "deepseek_v3",
    # "deepseek_v4"
    T: int
    E: int
    k: int
    dtype: torch.dtype
    compile: bool = True  # time torch.compile of the baseline, when compiled baselines are asked

    @property
    def label(self) -> str:
        return f"{self.semantics} T={self.T} E={self.E} k={self.k} {_dtype_name(self.dtype)}"


GATE_KINDS = ("baseline", "gate", "baseline_stats", "gate_stats", "baseline_steer", "gate_steer")
DEEPSEEK_V3_GROUPS = (8, 4)  # n_group, topk_group of the deepseek_v3 cases (V3's own config)


def router_spec(semantics: str) -> RouterSpec:
    """The gate's ``RouterSpec`` for a ``Case.semantics``; deepseek_v3 also takes a selection
    bias (``e_score_correction_bias``), which the caller draws."""
    if semantics == "deepseek_v3":
        n_group, topk_group = DEEPSEEK_V3_GROUPS
        return RouterSpec(score="sigmoid", n_group=n_group, topk_group=topk_group,
                          group_score="top2_sum", renormalize=True, renorm_eps=1e-20, scale=2.5)
    if semantics == "deepseek_v4":  # its scores rounded to bf16 logits, as the router's are
        return RouterSpec(score="sqrtsoftplus", renormalize=True, renorm_eps=1e-20, scale=1.5,
                          round_scores=True)
    if semantics == "topk_softmax":
        return RouterSpec(select_on="logits")
    return RouterSpec(renormalize=semantics == "softmax_topk_renorm")


def gate_and_baseline(case: Case, device) -> dict:
    """The callables of one case, by ``GATE_KINDS``: baseline and fused gate, plain, with
    statistics (each side into its own ``GateStats``, returned as a third value) and with
    ``bench_steer``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(case.T, case.E, generator=g).to(device=device, dtype=case.dtype)
    k = case.k
    steer = bench_steer(case.E)
    add, lam, _, force = steer.table(case.E, device)
    forced = (force > 0, force < 0)
    stats_b, stats_g = (GateStats.zeros(1, case.E, device=device) for _ in range(2))
    spec = router_spec(case.semantics)
    if case.semantics == "deepseek_v3":
        n_group, topk_group = DEEPSEEK_V3_GROUPS
        bias = (torch.randn(case.E, generator=g) * 0.1).to(device)
        gate_kw = dict(selection_bias=bias)
        dense = _sigmoid_distribution
        base = lambda: baseline_deepseek_v3(logits, k, bias, n_group, topk_group)  # noqa: E731
        base_steer = lambda: baseline_deepseek_v3(  # noqa: E731
            baseline_steer(logits, add, lam, forced), k, bias, n_group, topk_group, forced=forced)
    elif case.semantics == "deepseek_v4":
        bias = (torch.randn(case.E, generator=g) * 0.05).to(device)
        gate_kw = dict(selection_bias=bias)
        dense = _sqrtsoftplus_distribution
        base = lambda: baseline_deepseek_v4(logits, k, bias)  # noqa: E731
        base_steer = lambda: baseline_deepseek_v4(  # noqa: E731
            baseline_steer(logits, add, lam, forced), k, bias, forced=forced, dtype=case.dtype)
    elif case.semantics == "topk_softmax":
        gate_kw = {}
        dense = _softmax_distribution
        base = lambda: baseline_topk_softmax(logits, k)  # noqa: E731
        base_steer = lambda: baseline_topk_softmax(  # noqa: E731
            baseline_steer(logits, add, lam, forced), k, forced=forced)
    else:
        renorm = case.semantics == "softmax_topk_renorm"
        gate_kw = {}
        dense = _softmax_distribution
        base = lambda: baseline_softmax_topk(logits, k, renorm)  # noqa: E731
        base_steer = lambda: baseline_softmax_topk(  # noqa: E731
            baseline_steer(logits, add, lam, forced), k, renorm, forced=forced)

    def base_stats():
        w, i = base()
        baseline_stats(dense(logits), w, i, stats_b)
        return w, i, stats_b

    def gate_stats():
        w, i = ops.topk_gate(logits, k, spec, stats=stats_g, **gate_kw)
        return w, i, stats_g

    return {"baseline": base, "gate": lambda: ops.topk_gate(logits, k, spec, **gate_kw),
            "baseline_stats": base_stats, "gate_stats": gate_stats, "baseline_steer": base_steer,
            "gate_steer": lambda: ops.topk_gate(logits, k, spec, steer=steer, **gate_kw)}


def default_cases(full: bool = False) -> list[Case]:
    """The CPU grid of issue 2 (``full``) or a quick one that still covers its targets."""
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
        cases.append(Case("deepseek_v4", T, 384, 6, torch.bfloat16))
    return cases


def gpu_cases() -> list[Case]:
    """Issue 6's grid: softmax-top-k at T 1..16384 x E 64..512 x k 4/8 x fp32/bf16; DeepSeek-V3
    grouped routing (E=256, 8 groups, 4 kept, k=8) at each T in both dtypes; the renormalised
    (Qwen3-MoE, Mixtral) and top-k-softmax (GPT-OSS) semantics at E=128, bf16; DeepSeek-V4
    (sqrt(softplus) scores rounded to bf16 plus a bias: E=384, k=6); Doge's product
    keys (top-k-softmax, E=16384, k=64: the CTA-per-token kernel) at T 1..4096, bf16.

    Compiled baselines cost seconds of compilation per shape, so only the target shapes have
    ``compile``: k=8 at E=128 and 256, and DeepSeek-V3, in bf16 (12 of the 88 cases)."""
    Ts, dtypes, bf16 = (1, 64, 1024, 16384), (torch.float32, torch.bfloat16), torch.bfloat16
    cases = [Case("softmax_topk", T, E, k, dt, compile=k == 8 and E in (128, 256) and dt == bf16)
             for dt in dtypes for E in (64, 128, 256, 512) for k in (4, 8) for T in Ts]
    cases += [Case("deepseek_v3", T, 256, 8, dt, compile=dt == bf16) for dt in dtypes for T in Ts]
    cases += [Case("deepseek_v4", T, 384, 6, bf16, compile=False) for T in Ts]
    for T in Ts:
        cases.append(Case("softmax_topk_renorm", T, 128, 8, bf16, compile=False))
        cases.append(Case("topk_softmax", T, 128, 4, bf16, compile=False))
    cases += [Case("topk_softmax", T, 16384, 64, bf16, compile=False) for T in (1, 64, 1024, 4096)]
    return cases


def run(cases: Iterable[Case], device="cpu", *, compile_baseline: bool = False,
        compile_backend: str = "inductor", min_time: float = 0.2,
        deadline: Optional[float] = None, on_row: Optional[Callable[[dict], None]] = None,
        ) -> list[dict]:
    """One row per case: every ``GATE_KINDS`` callable timed by the method ``pick_method``
    chooses for the plain gate, the ratios baseline/gate, and ``stats_ratio`` and
    ``steer_ratio`` (gate with statistics or steering / plain gate).

    ``compile_baseline``: also time ``torch.compile(baseline, dynamic=False)`` for the cases
    whose ``compile`` is set (``compile_baseline_fn``), unless ``time.monotonic()`` has passed
    ``deadline``. ``on_row`` gets each row when it is done."""
    rows = []
    for case in cases:
        fns = gate_and_baseline(case, device)
        row = {"case": case.label, "semantics": case.semantics, "T": case.T, "E": case.E,
               "k": case.k, "dtype": _dtype_name(case.dtype), "device": str(device)}
        row["method"], row["probe_us"] = pick_method(fns["gate"], device)
        for name, fn in fns.items():
            row[name] = time_fn(fn, device, min_time=min_time, method=row["method"])
        if compile_baseline and case.compile:
            compiled, info = compile_baseline_fn(fns["baseline"], (), device,
                                                 backend=compile_backend, deadline=deadline)
            row.update(info)
            if compiled is not None:
                row["baseline_compiled"] = time_fn(compiled, device, min_time=min_time,
                                                   method=row["method"])
        med = {key: row[key]["median_us"] for key in row if isinstance(row[key], dict)}
        row["speedup"] = med["baseline"] / med["gate"]
        row["speedup_stats"] = med["baseline_stats"] / med["gate_stats"]
        row["speedup_steer"] = med["baseline_steer"] / med["gate_steer"]
        row["stats_ratio"] = med["gate_stats"] / med["gate"]
        row["stats_overhead"] = row["stats_ratio"] - 1.0
        row["steer_ratio"] = med["gate_steer"] / med["gate"]
        if "baseline_compiled" in med:
            row["speedup_vs_compiled"] = med["baseline_compiled"] / med["gate"]
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def format_header(compile_baseline: bool = False) -> str:
    cols = (f"{'case':<46} {'baseline':>9} {'gate':>8} {'ratio':>6} {'b+stats':>9} "
            f"{'g+stats':>8} {'ratio':>6} {'stats':>5} {'b+steer':>9} {'g+steer':>8} "
            f"{'ratio':>6}")
    if compile_baseline:
        cols += f" {'compiled':>9} {'ratio':>6}"
    cols += "  method"
    return _underlined(cols)


def format_row(row: dict, compile_baseline: bool = False) -> str:
    def us(key, width):
        return f"{_us(row[key]['median_us']):>{width}}"

    line = (f"{row['case']:<46} {us('baseline', 9)} {us('gate', 8)} {row['speedup']:>5.2f}x "
            f"{us('baseline_stats', 9)} {us('gate_stats', 8)} {row['speedup_stats']:>5.2f}x "
            f"{row['stats_ratio']:>4.2f}x {us('baseline_steer', 9)} {us('gate_steer', 8)} "
            f"{row['speedup_steer']:>5.2f}x")
    if "baseline_compiled" in row:
        line += f" {us('baseline_compiled', 9)} {row['speedup_vs_compiled']:>5.2f}x"
    elif compile_baseline:
        line += f" {'-':>9} {'-':>6}"
    return line + "  " + _method_cell(row)


# Dispatch: plan, permute and unpermute, each against the index work of transformers'
# "grouped_mm" experts (sort by expert, gather by perm // k, histc + cumsum offsets, inverse
# permutation, weighting, reshape + sum), and the three together. The experts themselves are the
# identity on both sides.


def baseline_plan(ids, num_experts):
    """transformers' grouped_mm index work: ``(perm [T*k], offsets [E] int32, counts [E] float,
    inverse [T*k])``. A stable sort, so that ``perm`` is ``dispatch_plan``'s ``row_slot``."""
    expert_ids, perm = torch.sort(ids.reshape(-1), stable=True)
    counts = torch.histc(expert_ids.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, offsets, counts, inverse


def baseline_permute(x, perm, k):
    """Rows of ``x`` in expert order: ``x[perm // k]``."""
    return x[perm // k]


def baseline_unpermute(y, inverse, weights):
    """Weighted k-way sum back to ``[T, H]``: ``(y[inverse] * weights).sum`` over the k slots,
    with the weights in y's dtype (transformers weighs the rows in the activation dtype)."""
    T, k = weights.shape
    return (y[inverse].view(T, k, -1) * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def baseline_dispatch(x, ids, weights, num_experts):
    """transformers' ``grouped_mm_experts_forward`` minus the GEMMs: ``(out [T, H], offsets)``.

    As there, the routing weights multiply the rows in their own dtype (bf16 for OLMoE/Qwen3-MoE
    bf16 routers) and the result is cast back to ``x.dtype``.
    """
    T, k = ids.shape
    perm, offsets, _, inverse = baseline_plan(ids, num_experts)
    rows = baseline_permute(x, perm, k)
    weighted = rows * weights.reshape(-1)[perm].unsqueeze(-1)
    return weighted[inverse].view(T, k, -1).sum(dim=1).to(x.dtype), offsets


def fused_dispatch(x, ids, weights, num_experts):
    plan = dispatch_plan(ids, num_experts)
    return unpermute(permute(x, plan), plan, weights), plan.expert_offsets


@dataclasses.dataclass(frozen=True)
class DispatchCase:
    T: int
    k: int
    H: int
    E: int
    dtype: torch.dtype
    model: str = ""  # whose shape this is, for the label
    compile: bool = True  # time torch.compile of the baselines, when compiled baselines are asked

    @property
    def label(self) -> str:
        return (f"{self.model or 'dispatch'} T={self.T} k={self.k} H={self.H} E={self.E} "
                f"{_dtype_name(self.dtype)}")


DISPATCH_OPS = ("plan", "permute", "unpermute", "pipeline", "permute64")
PAD_BLOCK = 64  # block_size of the permute64 plan (block-tiled grouped GEMMs use 16 to 128)
# Not the pipeline: with identity experts, inductor fuses gather, weighting, inverse gather and
# sum into one kernel that never writes the expert rows, which no model with real experts can do.
COMPILED_DISPATCH_OPS = ("plan", "permute", "unpermute")


def dispatch_cases(full: bool = False) -> list[DispatchCase]:
    if not full:
        return [DispatchCase(T, 8, 1024, 64, torch.float32) for T in (1, 64, 1024, 8192)]
    return [DispatchCase(T, k, H, E, dt) for dt in (torch.float32, torch.bfloat16)
            for H in (1024, 4096) for E in (8, 64, 256) for k in (2, 8)
            for T in (1, 64, 1024, 8192)]


def gpu_dispatch_cases() -> list[DispatchCase]:
    """The bf16 shapes of the published dispatch kernels' benchmarks: DeepSeek-V3 (H=7168, k=8,
    E=256) at T 64..16384 and at T=1 (decode, the latency end), H=4096 k=8 (Qwen3-235B-A22B,
    E=128) and Qwen3-30B-A3B (H=2048, k=8, E=128) at T=16384 and 1024, Mixtral (H=4096, k=2,
    E=8) at T=16384."""
    bf16 = torch.bfloat16
    deepseek_t = (1, 64, 1024, 4096, 16384)
    return ([DispatchCase(T, 8, 7168, 256, bf16, "deepseek_v3") for T in deepseek_t]
            + [DispatchCase(16384, 8, 4096, 128, bf16, "qwen3_235b_a22b")]
            + [DispatchCase(T, 8, 2048, 128, bf16, "qwen3_30b_a3b") for T in (1024, 16384)]
            + [DispatchCase(16384, 2, 4096, 8, bf16, "mixtral")])


def dispatch_inputs(case: DispatchCase, device="cpu"):
    """(x [T, H], ids [T, k] int64, weights [T, k]) with weights in x's dtype, as the OLMoE and
    Qwen3-MoE routers return them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.T, case.H, generator=g).to(device=device, dtype=case.dtype)
    ids = torch.randint(0, case.E, (case.T, case.k), generator=g).to(device)
    w = torch.rand(case.T, case.k, generator=g).to(device=device, dtype=case.dtype)
    return x, ids, w


def dispatch_callables(case: DispatchCase, device="cpu") -> dict:
    """``{op: (baseline function, its arguments, our call)}`` for ``DISPATCH_OPS`` on one case's
    inputs. What permute and unpermute read (plans, permuted rows) is built here, untimed; both
    unpermutes read our permuted rows, whose order is the baseline's (``baseline_plan``). The
    baseline of ``permute64`` is our own permute with the unused tail zeroed."""
    x, ids, w = dispatch_inputs(case, device)
    E, k = case.E, case.k
    plan, padded = dispatch_plan(ids, E), dispatch_plan(ids, E, PAD_BLOCK)
    perm, _, _, inverse = baseline_plan(ids, E)
    y = permute(x, plan)
    return {"plan": (baseline_plan, (ids, E), lambda: dispatch_plan(ids, E)),
            "permute": (baseline_permute, (x, perm, k), lambda: permute(x, plan)),
            "unpermute": (baseline_unpermute, (y, inverse, w), lambda: unpermute(y, plan, w)),
            "pipeline": (baseline_dispatch, (x, ids, w, E),
                         lambda: fused_dispatch(x, ids, w, E)),
            "permute64": (permute, (x, padded), lambda: permute(x, padded, zero_tail=False))}


def moved_bytes(case: DispatchCase, op: str) -> Optional[int]:
    """Bytes of token rows an op must move at least, indices and weights not counted: permute
    reads T*H elements and writes T*k*H (permute64 the same, its padding rows not counted),
    unpermute the reverse, the pipeline both; None for the plan (index bytes only)."""
    rows = case.T * case.H * case.dtype.itemsize * (case.k + 1)
    return {"permute": rows, "unpermute": rows, "pipeline": 2 * rows, "permute64": rows}.get(op)


def run_dispatch(cases, device="cpu", *, compile_baseline=False, compile_backend="inductor",
                 min_time=0.2, copy_gbps: Optional[float] = None, deadline=None,
                 on_row=None) -> list[dict]:
    """One row per (case, op of ``DISPATCH_OPS``): baseline, fused and compiled baseline
    (``compile_baseline``: for cases whose ``compile`` is set, ops in ``COMPILED_DISPATCH_OPS``,
    until ``deadline``), timed interleaved (``time_interleaved``) by the method ``pick_method``
    chooses for the fused op. Rows of ops that move token rows give ``gbps`` per callable
    (``moved_bytes`` / median time) and, with ``copy_gbps``, ``copy_fraction`` = fused GB/s /
    copy GB/s."""
    rows = []
    for case in cases:
        calls = dispatch_callables(case, device)
        for op in DISPATCH_OPS:
            row = _time_dispatch_op(case, op, *calls[op], device, compile_baseline=compile_baseline,
                                    compile_backend=compile_backend, min_time=min_time,
                                    copy_gbps=copy_gbps, deadline=deadline)
            rows.append(row)
            if on_row:
                on_row(row)
        del calls  # the largest case holds ~2 GB of rows: free them before the next one's
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_dispatch_op(case, op, base, args, fused, device, *, compile_baseline, compile_backend,
                      min_time, copy_gbps, deadline) -> dict:
    row = {"case": case.label, "op": op, "model": case.model, "T": case.T, "k": case.k,
           "H": case.H, "E": case.E, "dtype": _dtype_name(case.dtype), "device": str(device),
           "bytes": moved_bytes(case, op)}
    fns = {"baseline": functools.partial(base, *args), "fused": fused}
    if compile_baseline and case.compile and op in COMPILED_DISPATCH_OPS:
        compiled, info = compile_baseline_fn(base, args, device, backend=compile_backend,
                                             deadline=deadline)
        row.update(info)
        if compiled is not None:
            fns["baseline_compiled"] = compiled
    row["method"], row["probe_us"] = pick_method(fused, device)
    row.update(time_interleaved(fns, device, min_time=min_time, method=row["method"]))
    _speedups(row, "baseline", "fused")
    if "baseline_compiled" in row:
        row["speedup_vs_compiled"] = paired_ratio(row["baseline_compiled"], row["fused"])
    if row["bytes"]:
        row["gbps"] = {name: row["bytes"] / row[name]["median_us"] / 1e3 for name in fns}
        if copy_gbps:
            row["copy_fraction"] = row["gbps"]["fused"] / copy_gbps
    return row


def format_dispatch_header() -> str:
    cols = (f"{'case':<44} {'op':<9} {'baseline':>17} {'compiled':>17} {'fused':>17} "
            f"{'b/f':>6} {'c/f':>6} {'GB/s':>7} {'copy':>5}  method")
    return _underlined(cols)


def format_dispatch_row(row: dict) -> str:
    compiled = row.get("baseline_compiled")
    gbps = row.get("gbps", {}).get("fused")
    fraction = row.get("copy_fraction")
    cells = [f"{row['case']:<44}", f"{row['op']:<9}", f"{_med_spread(row['baseline']):>17}",
             f"{_med_spread(compiled) if compiled else '-':>17}",
             f"{_med_spread(row['fused']):>17}", f"{row['speedup']:>5.2f}x",
             f"{row['speedup_vs_compiled']:>5.2f}x" if compiled else f"{'-':>6}",
             f"{gbps:>7.0f}" if gbps else f"{'-':>7}",
             f"{fraction * 100:>4.0f}%" if fraction else f"{'-':>5}"]
    return " ".join(cells) + "  " + _method_cell(row)


def copy_bandwidth(device, *, nbytes: Optional[int] = None, min_time: float = 0.2) -> dict:
    """Copy bandwidth of ``device``: ``dst.copy_(src)`` of ``nbytes`` (default 1 GiB on CUDA,
    128 MiB on the CPU), counting read and write, ``gbps`` = 2 * nbytes / median time. CUDA:
    events with the L2 flushed (``cuda_events_l2``)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or ((1 << 30) if cuda else (128 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, min_time=min_time,
                     method="cuda_events_l2" if cuda else "perf_counter")
    return {"bytes": nbytes, "timing": timing, "gbps": 2 * nbytes / timing["median_us"] / 1e3}


# Timing (methods: module docstring).

GRAPH_CALLS = 20  # calls per captured CUDA graph
EVENTS_FROM_US = 20.0  # pick_method: ops this slow are timed with events and a flushed L2
L2_FLUSH_BYTES = 256 << 20
_METHOD_SHORT = {"perf_counter": "cpu", "cuda_graph": "graph", "cuda_events_l2": "events+L2",
                 "cuda_sync": "sync"}


def default_method(device) -> str:
    return "cuda_graph" if torch.device(device).type == "cuda" else "perf_counter"


def pick_method(fn: Callable, device) -> tuple:
    """``(method, probe_us)``: on CUDA ``cuda_events_l2`` if one call of ``fn`` (after two
    warm-up calls; the fastest of three) takes at least 20 µs between CUDA events with the L2
    flushed, else ``cuda_graph``; on the CPU ``("perf_counter", None)``."""
    if torch.device(device).type != "cuda":
        return "perf_counter", None
    fn()
    fn()
    flush = _l2_flush_buffer(torch.cuda.current_device())
    probe = min(_event_time(fn, flush) for _ in range(3))
    return ("cuda_events_l2" if probe >= EVENTS_FROM_US else "cuda_graph"), probe


def time_fn(fn: Callable, device, *, min_time: float = 0.2, max_reps: int = 2000,
            method: Optional[str] = None) -> dict:
    """Median and interquartile range (µs) of one call of ``fn``, timed by ``method`` (default
    ``default_method(device)``) for ``min_time`` seconds of wall time and at least 10 samples."""
    method = method or default_method(device)
    if method == "perf_counter":
        sample = _host_sampler(fn, _nothing)
    elif method == "cuda_sync":
        sample = _host_sampler(fn, torch.cuda.synchronize)
    elif method == "cuda_events_l2":
        sample = _events_sampler(fn)
    elif method == "cuda_graph":
        try:
            sample = _graph_sampler(fn)
        except RuntimeError as exc:  # a host read-back during capture; the stream is usable again
            summary = time_fn(fn, device, min_time=min_time, max_reps=max_reps,
                              method="cuda_events_l2")
            return {**summary, "graph_error": str(exc).strip().splitlines()[0][:200]}
    else:
        raise ValueError(f"time_fn: method={method!r} must be one of {sorted(_METHOD_SHORT)}")
    samples = []
    end = time.perf_counter() + min_time
    while len(samples) < max_reps and (len(samples) < 10 or time.perf_counter() < end):
        samples.append(sample())
    return _summary(samples, method)


def _host_sampler(fn, sync):
    for _ in range(3):  # first-call allocations, oneDNN primitive creation
        fn()
    sync()

    def sample():
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e6

    return sample


def _event_time(fn, flush: torch.Tensor) -> float:
    """µs between CUDA events around one call, ``flush`` overwritten just before. Writing the
    flush buffer keeps the device busy for ~0.1 ms, which also hides up to that much of the
    host's time to launch the call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def _events_sampler(fn):
    flush = _l2_flush_buffer(torch.cuda.current_device())
    for _ in range(3):
        fn()
    return functools.partial(_event_time, fn, flush)


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device_index: int) -> torch.Tensor:
    """A buffer of 256 MiB or 4x the L2 size, whichever is larger: writing it evicts L2."""
    l2 = getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0)
    return torch.empty(max(L2_FLUSH_BYTES, 4 * l2), dtype=torch.int8,
                       device=torch.device("cuda", device_index))


@functools.lru_cache(maxsize=None)
def _capture_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device_index)


def _graph_sampler(fn):
    # capture_begin/end, not the torch.cuda.graph context manager: that one runs gc.collect()
    # and empty_cache() per capture, seconds over a grid once torch.compile has been imported.
    stream = _capture_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up off the graph: lazy initialisation, workspaces
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            for _ in range(GRAPH_CALLS):
                fn()
        finally:
            graph.capture_end()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample():
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / GRAPH_CALLS

    return sample


def _summary(samples: list, method: str) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), 0, max(samples)]
    return {"median_us": statistics.median(samples), "q1_us": q[0], "q3_us": q[2],
            "reps": len(samples), "method": method}


def compile_baseline_fn(fn: Callable, args: tuple, device, *, backend: str = "inductor",
                        deadline: Optional[float] = None) -> tuple:
    """``(compiled call or None, info)``: ``torch.compile(fn, dynamic=False)`` bound to ``args``
    and called once; ``info`` holds ``compile_s`` (that first call), or ``compile_skipped`` with
    the reason: past ``deadline`` (``time.monotonic()``), or an error compiling this shape."""
    if deadline is not None and time.monotonic() > deadline:
        return None, {"compile_skipped": "time budget spent"}
    # A fresh cache per shape: past recompile_limit (8) shapes of one function, dynamo runs it
    # eagerly without failing, and the "compiled" timing would be the eager one.
    torch.compiler.reset()
    compiled = functools.partial(torch.compile(fn, dynamic=False, backend=backend), *args)
    t0 = time.perf_counter()
    try:
        compiled()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # one shape the compiler fails on must not end the run
        return None, {"compile_skipped": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    return compiled, {"compile_s": time.perf_counter() - t0}


def time_interleaved(fns: dict, device, *, setup: Optional[dict] = None, min_time: float = 0.2,
                     min_reps: int = 5, max_reps: int = 2000, burst: int = 3,
                     method: Optional[str] = None) -> dict:
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

    On CUDA, ``method`` (default ``cuda_graph``) times each function in turn by ``time_fn``, or,
    ``cuda_sync`` (code that syncs with the host), alternates them like on the CPU with a device
    synchronisation around each call.
    """
    setup = setup or {}
    cuda = torch.device(device).type == "cuda"
    method = method or default_method(device)
    if cuda and method != "cuda_sync":
        out = {}
        for name, fn in fns.items():
            setup.get(name, _nothing)()
            out[name] = time_fn(fn, device, min_time=min_time, method=method)
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
    method = "cuda_sync" if cuda else "perf_counter"
    return {name: {**_summary(s, method), "samples_us": s, "burst": burst}
            for name, s in samples.items()}


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

    def per_round(s):
        return [statistics.median(s[i:i + burst]) for i in range(0, len(s), burst)]
    return statistics.median(x / y for x, y in zip(per_round(a), per_round(b)))


def _underlined(header: str) -> str:
    """A table header and a rule of its width."""
    return header + "\n" + "-" * len(header)


def _speedups(row: dict, baseline: str, ours: str, suffix: str = "") -> None:
    """``row["speedup" + suffix]``: the paired ratio (``paired_ratio``) of the two summaries
    ``row[baseline]`` and ``row[ours]``; ``row["speedup_of_medians" + suffix]``: the ratio of
    their medians."""
    row["speedup" + suffix] = paired_ratio(row[baseline], row[ours])
    row["speedup_of_medians" + suffix] = row[baseline]["median_us"] / row[ours]["median_us"]


def _nothing():
    pass


def _method_cell(row: dict) -> str:
    """The row's timing method, and the callables whose graph capture failed (timed with
    events instead)."""
    failed = [name for name, value in row.items()
              if isinstance(value, dict) and "graph_error" in value]
    note = f" (not captured: {', '.join(failed)})" if failed else ""
    return _METHOD_SHORT[row["method"]] + note


def _us(value: float) -> str:
    if value < 10:
        return f"{value:.2f}us"
    return f"{value:.1f}us" if value < 1e4 else f"{value / 1e3:.1f}ms"


def _med_spread(summary: dict) -> str:
    """``median (IQR as % of the median)``."""
    med = summary["median_us"]
    iqr = (summary["q3_us"] - summary["q1_us"]) / med * 100 if med > 0 else 0.0
    return f"{_us(med)} ({iqr:.0f}%)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Issue 6's targets, each checked against the rows of one run. ``passed`` is None where the run
# lacks the shape. The GPU targets are met or missed on a GPU; on the CPU they are informational.


def _target(name: str, threshold: float, unit: str, row: Optional[dict],
            measured: Optional[float], at_most: bool = True, ok: bool = True) -> dict:
    passed = None
    if measured is not None:
        passed = bool(ok and (measured <= threshold if at_most else measured >= threshold))
    return {"target": name, "case": row["case"] if row else None, "measured": measured,
            "threshold": threshold, "at_most": at_most, "unit": unit, "passed": passed}


def gate_targets(rows: list) -> list[dict]:
    """Graph replay <= 3 µs at T <= 64, E <= 256, k <= 8 (worst case); softmax-top-k at
    T=16384, k=8: <= 12 µs at E=128, <= 20 µs at E=256 and >= 10x eager, per dtype; fused
    statistics <= 1.3x the plain gate (worst case over all rows)."""
    small = [r for r in rows if r["T"] <= 64 and r["E"] <= 256 and r["k"] <= 8]
    worst = max(small, key=lambda r: r["gate"]["median_us"], default=None)
    out = [_target("gate T<=64 E<=256 k<=8, graph replay (worst case)", 3.0, "us", worst,
                   worst and worst["gate"]["median_us"],
                   ok=all(r["method"] == "cuda_graph" for r in small))]
    for E, limit in ((128, 12.0), (256, 20.0)):
        found = [r for r in rows if r["semantics"] == "softmax_topk" and r["T"] == 16384
                 and r["E"] == E and r["k"] == 8]
        for r in found or [None]:
            dtype = f" {r['dtype']}" if r else ""
            out.append(_target(f"gate T=16384 E={E} k=8{dtype}", limit, "us", r,
                               r and r["gate"]["median_us"]))
            out.append(_target(f"gate T=16384 E={E} k=8{dtype} vs eager", 10.0, "x", r,
                               r and r["speedup"], at_most=False))
    worst = max(rows, key=lambda r: r["stats_ratio"], default=None)
    out.append(_target("gate+stats / gate (worst case)", 1.3, "x", worst,
                       worst and worst["stats_ratio"]))
    return out


def dispatch_targets(rows: list, copy_gbps: Optional[float], device_name: str = "") -> list[dict]:
    """Permute and unpermute at T=4096, k=8, H=7168, bf16: >= 70% of the measured copy
    bandwidth, and on an H200 >= 3.0 TB/s."""
    out = []
    for op in ("permute", "unpermute"):
        found = [r for r in rows if r["op"] == op and (r["T"], r["k"], r["H"], r["dtype"])
                 == (4096, 8, 7168, "bfloat16")]
        for r in found or [None]:
            tbps = r["gbps"]["fused"] / 1e3 if r else None
            if copy_gbps:
                out.append(_target(f"{op} T=4096 k=8 H=7168 bf16 >= 70% of copy bandwidth",
                                   0.7 * copy_gbps / 1e3, "TB/s", r, tbps, at_most=False))
            if "H200" in device_name:
                out.append(_target(f"{op} T=4096 k=8 H=7168 bf16 on H200", 3.0, "TB/s", r, tbps,
                                   at_most=False))
    return out


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def format_targets(targets: list) -> str:
    lines = []
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["passed"]]
        bound = f"{'<=' if t['at_most'] else '>='} {_number(t['threshold'])} {t['unit']}"
        measured = ("not measured" if t["measured"] is None
                    else f"{_number(t['measured'])} {t['unit']}")
        where = f"  [{t['case']}]" if t["case"] else ""
        lines.append(f"{verdict}  {t['target']}: {measured} (target {bound}){where}")
    return "\n".join(lines)


# The run's description and its JSON file.


def run_meta(device) -> dict:
    """Date, device, versions, git commit and moe_route's build and kernels (``moe_route.info``)."""
    from moe_route._info import info

    device = torch.device(device)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "git": _git_describe(),
            "cpu_threads": torch.get_num_threads(), "moe_route": info()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30,
                    l2_bytes=getattr(props, "L2_cache_size", None),
                    # csrc/cuda/pdl.cuh's rule, less its test of the build's PTX version
                    pdl=props.major >= 9 and os.environ.get("MOE_ROUTE_PDL", "1")[:1] != "0")
    else:
        meta["device_name"] = platform.processor() or platform.machine()
    return meta


def format_meta(meta: dict) -> str:
    """One line of ``run_meta``, and a warning line if an op would run the PyTorch reference."""
    kind = meta["device"].split(":")[0]
    isa = meta["moe_route"].get("cpu_isa")
    launches = {True: ", PDL launches", False: ", plain launches"}.get(meta.get("pdl"), "")
    line = (f"device {meta['device']} ({meta['device_name']}), torch {meta['torch']}"
            f"{', CUDA ' + meta['torch_cuda'] if meta['torch_cuda'] else ''}, "
            f"{meta['cpu_threads']} CPU threads"
            f"{f', CPU kernels {isa}' if kind == 'cpu' and isa else ''}{launches}, "
            f"moe_route {meta['git'] or 'commit unknown'}, {meta['date']}")
    missing = [op for op, devices in meta["moe_route"]["kernels"].items() if kind not in devices]
    if missing:
        why = meta["moe_route"]["extension_error"] or "see moe-route info"
        line += (f"\nWARNING: no {kind} kernel for {', '.join(missing)}: those ops run the "
                 f"PyTorch reference ({why})")
    return line


def save_report(path: str, *, op: str, meta: dict, rows: list, **extra) -> None:
    """``{"format": "moe_route.bench", "op", "meta", **extra, "rows"}`` as JSON."""
    report = {"format": "moe_route.bench", "op": op, "meta": meta, **extra, "rows": rows}
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


def _git_describe() -> Optional[str]:
    """``git describe --always --dirty`` of the source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


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


def run_block(cases, device="cpu", *, min_time=0.2, on_row=None) -> list[dict]:
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
                                    setup=switch, min_time=min_time, method="cuda_sync"))
        _speedups(row, "grouped_mm", "moe_route", "_vs_grouped_mm")
        _speedups(row, "eager", "moe_route", "_vs_eager")
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def format_block_header() -> str:
    cols = (f"{'case':<52} {'moe_route':>17} {'grouped_mm':>17} {'eager':>17} "
            f"{'gmm/ours':>8} {'eager/ours':>10}")
    return _underlined(cols)


def format_block_row(row: dict) -> str:
    return (f"{row['case']:<52} {_med_spread(row['moe_route']):>17} "
            f"{_med_spread(row['grouped_mm']):>17} {_med_spread(row['eager']):>17} "
            f"{row['speedup_vs_grouped_mm']:>7.2f}x {row['speedup_vs_eager']:>9.2f}x")
