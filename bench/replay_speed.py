"""Router replay in the fused gate against the PyTorch a user writes for it, in one run.

    python bench/replay_speed.py [--device cpu|cuda] [--min-time 0.3] [--json PATH]

Per case (the semantics of ``moe_route.benchmark``: softmax-top-k as OLMoE/Qwen3, top-k-softmax
as GPT-OSS, DeepSeek-V3's sigmoid with renormalisation and scale), every row of ``ids`` replayed:

    gate            topk_gate selecting (for scale: what replay replaces)
    gate+replay     topk_gate(replay=ids): weights of the given ids, no selection
    torch           the PyTorch replay composition: scores, gather at ids, softmax over the k or
                    renormalisation and scale
    gate+replay+st  the same with per-group statistics (tokens, counts, weight, prob, entropy
                    sums) fused in
    torch+st        the composition plus the same statistics in PyTorch (benchmark.baseline_stats)

Ratios: torch / gate+replay and torch+st / gate+replay+st. Timing as ``moe-route bench``
(``benchmark.time_fn``; on CUDA graph replay or events with the L2 flushed, picked per case).
"""
from __future__ import annotations

import argparse
import json

import torch

import moe_route
from moe_route import benchmark
from moe_route.ops import GateStats

CASES = [("softmax_topk", T, 64, 8) for T in (1, 64, 1024, 8192)] + \
        [("topk_softmax", T, 64, 4) for T in (1, 8192)] + \
        [("deepseek_v3", T, 256, 8) for T in (1, 8192)]


def callables(semantics: str, T: int, E: int, k: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(device)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(device)
    ids32 = ids.int()
    kw = {}
    spec = benchmark.router_spec(semantics)
    if semantics == "deepseek_v3":
        kw["selection_bias"] = (torch.randn(E, generator=g) * 0.1).to(device)

        def torch_replay():
            w = logits.float().sigmoid().gather(1, ids)
            return w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5

        def dense():
            s = logits.float().sigmoid()
            return s / s.sum(-1, keepdim=True)
    elif semantics == "topk_softmax":
        def torch_replay():
            return torch.softmax(logits.gather(1, ids), dim=-1, dtype=torch.float32)

        dense = lambda: torch.softmax(logits, dim=-1, dtype=torch.float32)  # noqa: E731
    else:
        def torch_replay():
            return torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids)

        dense = lambda: torch.softmax(logits, dim=-1, dtype=torch.float32)  # noqa: E731
    stats_t, stats_g = (GateStats.zeros(1, E, device=device) for _ in range(2))

    def torch_stats():
        w = torch_replay()
        benchmark.baseline_stats(dense(), w, ids, stats_t)
        return w, ids, stats_t

    def gate_stats():
        w, i = moe_route.topk_gate(logits, k, spec, replay=ids32, stats=stats_g, **kw)
        return w, i, stats_g

    return {
        "gate": lambda: moe_route.topk_gate(logits, k, spec, **kw),
        "gate+replay": lambda: moe_route.topk_gate(logits, k, spec, replay=ids32, **kw),
        "torch": lambda: (torch_replay(), ids),
        "gate+replay+st": gate_stats,
        "torch+st": torch_stats,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    min_time = args.min_time or (0.05 if device.type == "cuda" else 0.3)
    meta = benchmark.run_meta(device)
    print(benchmark.format_meta(meta))
    names = ["gate", "gate+replay", "torch", "gate+replay+st", "torch+st"]
    print("| case | " + " | ".join(names) + " | torch / replay | with stats | method |")
    print("|---|" + "---:|" * (len(names) + 2) + "---|")
    rows = []
    for semantics, T, E, k in CASES:
        fns = callables(semantics, T, E, k, device)
        method, _ = benchmark.pick_method(fns["gate+replay"], device)
        times = {n: benchmark.time_fn(fns[n], device, min_time=min_time, method=method)
                 ["median_us"] for n in names}
        row = dict(case=f"{semantics} T={T} E={E} k={k} fp32", method=method, **times,
                   speedup=times["torch"] / times["gate+replay"],
                   speedup_stats=times["torch+st"] / times["gate+replay+st"])
        rows.append(row)
        print(f"| {row['case']} | " + " | ".join(f"{times[n]:.2f} µs" for n in names) +
              f" | {row['speedup']:.2f}× | {row['speedup_stats']:.2f}× | {method} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
