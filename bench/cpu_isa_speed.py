"""The CPU kernels' instruction-set variants against each other, in one run.

    python bench/cpu_isa_speed.py [--min-time 0.3] [--threads N] [--json PATH]

Every case runs under each variant this CPU supports (``base``, ``avx2``, ``avx512``;
csrc/cpu/isa.h), timed in alternation by ``benchmark.time_interleaved`` on the same inputs; the
variants compute the same bits (tests/test_cpu_isa.py), so only the time differs. Cases: the gate
(``moe_route.benchmark`` semantics, plain, with statistics, and replaying every row) and
unpermute at a mid-size MoE shape. Ratios are per round (``benchmark.paired_ratio``) against the
next variant down: what the wider instructions buy on this CPU, and whether the default (the
widest) is the right one.
"""
from __future__ import annotations

import argparse
import json

import torch

from moe_route import _loader, benchmark, dispatch_plan, unpermute
from moe_route.ops import topk_gate

GATE_CASES = [("softmax_topk", T, E, 8, dt) for T, E, dt in
              [(1, 64, torch.float32), (64, 64, torch.float32), (8192, 64, torch.float32),
               (8192, 64, torch.bfloat16), (8192, 256, torch.float32)]] + \
             [("topk_softmax", 8192, 64, 4, torch.float32),
              ("deepseek_v3", 8192, 256, 8, torch.float32)]
UNPERMUTE_CASES = [(8192, 8, 64, 1024, dt) for dt in (torch.float32, torch.bfloat16)]


def gate_callables(semantics, T, E, k, dtype) -> dict:
    """{kind: fn} for the gate plain, with statistics and replaying every row."""
    case = benchmark.Case(semantics, T, E, k, dtype)
    fns = benchmark.gate_and_baseline(case, "cpu")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=g).to(dtype)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].int()
    spec = benchmark.router_spec(semantics)
    kw = {"selection_bias": torch.randn(E, generator=g)} if semantics == "deepseek_v3" else {}
    return {"gate": fns["gate"], "gate+stats": fns["gate_stats"],
            "replay": lambda: topk_gate(logits, k, spec, replay=ids, **kw)}


def unpermute_callable(T, k, E, H, dtype):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, E, (T, k), generator=g)
    plan = dispatch_plan(ids, E)
    y = torch.randn(plan.row_slot.numel(), H, generator=g).to(dtype)
    w = torch.rand(T, k, generator=g).to(dtype)
    return lambda: unpermute(y, plan, w)


def time_variants(fn, isas, min_time) -> dict:
    """{variant: timing summary} of fn under each variant, in alternation; the CPU kernels are
    left on the variant they ran before."""
    before = _loader.native.cpu_isa()
    fns = {isa: fn for isa in isas}
    setup = {isa: (lambda isa=isa: _loader.native.set_cpu_isa(isa)) for isa in isas}
    try:
        return benchmark.time_interleaved(fns, "cpu", setup=setup, min_time=min_time)
    finally:
        _loader.native.set_cpu_isa(before)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if _loader.native is None:
        raise SystemExit(f"moe_route: no native extension ({_loader.load_error})")
    if args.threads:
        torch.set_num_threads(args.threads)
    isas = _loader.native.cpu_isas()
    print(benchmark.format_meta(benchmark.run_meta("cpu")))
    print(f"variants: {', '.join(isas)} (running by default here: {_loader.native.cpu_isa()})")
    ratio_names = [f"{b}/{a}" for a, b in zip(isas[1:], isas)]
    print("| case | " + " | ".join(isas) + " | " + " | ".join(ratio_names) + " |")
    print("|---|" + "---:|" * (len(isas) + len(ratio_names)))
    rows = []
    jobs = [(f"{benchmark.Case(s, T, E, k, dt).label} {kind}", fn)
            for s, T, E, k, dt in GATE_CASES
            for kind, fn in gate_callables(s, T, E, k, dt).items()]
    jobs += [(f"unpermute T={T} k={k} H={H} {str(dt).removeprefix('torch.')}",
              unpermute_callable(T, k, E, H, dt)) for T, k, E, H, dt in UNPERMUTE_CASES]
    for label, fn in jobs:
        times = time_variants(fn, isas, args.min_time)
        ratios = {f"{b}/{a}": benchmark.paired_ratio(times[b], times[a])
                  for a, b in zip(isas[1:], isas)}
        rows.append({"case": label, **{i: times[i]["median_us"] for i in isas}, **ratios})
        print(f"| {label} | " + " | ".join(f"{times[i]['median_us']:.1f} µs" for i in isas) +
              " | " + " | ".join(f"{r:.2f}×" for r in ratios.values()) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": benchmark.run_meta("cpu"), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
