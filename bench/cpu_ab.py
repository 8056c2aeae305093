"""A/B of the CPU gate between two source trees, each with its extension built in place.

    python bench/cpu_ab.py OLD_TREE NEW_TREE [--rounds 5] [--min-time 0.15] [--threads N]
                           [--match REGEX] [--stat median|min] [--json PATH]

e.g. for the commit before a change:
    git worktree add /tmp/old HEAD~1
    (cd /tmp/old && MOE_ROUTE_SKIP_CUDA=1 python setup.py build_ext --inplace)
    python bench/cpu_ab.py /tmp/old .

Each tree runs in its own process (both build ``moe_route._C``, so they cannot share one), the
trees alternate for ``--rounds`` rounds, and a case's time is its best median over the rounds: a
slow phase of a shared machine then hits neither tree's figure. Where slow phases outlast the
rounds, ``--stat min`` takes each round's fastest call instead of its median: a neighbour's load
only ever adds time. First both trees compute every
case once and their outputs (weights, ids, statistics) must be bit-identical, else the run stops:
a speed-up that changes results is not an A/B of the same thing. A change meant to move the last
bits (a more accurate sum) takes ``--rtol``: float outputs may then differ by that much. Cases:
OLMoE/Qwen3 softmax top-k (E 64 and 256, and 16 with k=2 as Jamba's), the renormalised one
(E=64, k=8, and Mixtral's E=8, k=2), GPT-OSS's top-k softmax (E=32 and 64, k=4), Granite's
top-8 softmax of 40, Llama 4 Scout's and Maverick's sigmoid of the top logit (E=16 and 128,
k=1), a renormalised sigmoid top-4 of 32 (no family's;
the lanes' sigmoid selection) and top-8 of 128 (GLM-4.5's without its bias and scale; the
per-token sigmoid), DeepSeek-V3's grouped sigmoid, and on bf16 logits the scores that round to
them: DeepSeek-V4's sqrt-softplus (E=384, k=6, and E=64 in the lanes) and LFM2's sigmoid (E=32,
k=4), each with a selection bias, and past k=16: Doge's top-k softmax of 16384 product keys
(k=64, up to T=1024) and a softmax top-32 of 1024, at T 1 to
8192, plain, with statistics, replaying every row, and both; with statistics per sequence of 5
tokens (``groups=``); and steered (three constant biases, one std-scaled, one expert forced on
and one forced off), with and without statistics, and steered by the biases alone (``steer/bias``:
the paper's intervention, no forcing). ``--match`` keeps the cases whose label
matches a regular expression (e.g. ``"E=(8|16|32) "``); ``--threads`` sets torch's thread
count in both trees (one thread gives steadier figures on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

SEMANTICS = [("softmax_topk", 64, 8), ("softmax_topk", 256, 8), ("renorm", 64, 8),
             ("topk_softmax", 64, 4), ("deepseek_v3", 256, 8),
             ("renorm", 8, 2), ("softmax_topk", 16, 2), ("topk_softmax", 32, 4),
             ("topk_sigmoid", 16, 1), ("sigmoid_renorm", 32, 4), ("sigmoid_renorm", 128, 8),
             ("topk_sigmoid", 128, 1), ("topk_softmax", 40, 8),
             ("deepseek_v4", 384, 6), ("deepseek_v4", 64, 6), ("lfm2", 32, 4),
             ("topk_softmax", 16384, 64), ("softmax_topk", 1024, 32)]
MAX_VALUES = 1 << 24  # T * E at most: Doge's 16384 experts run up to T=1024
ROUNDED = ("deepseek_v4", "lfm2")  # on bf16 logits, scores rounded to bf16 (round_scores)
TS = (1, 64, 1024, 8192)
SEQ = 5  # tokens per sequence of the per-sequence statistics: most blocks of 8 span two


def cases(match: str | None = None):
    every = [(s, T, E, k, stats, replay, steer) for T in TS for s, E, k in SEMANTICS
             if T * E <= MAX_VALUES for stats in (False, True, "seq")
             for replay, steer in ((False, False), (True, False), (False, True), (False, "bias"))
             if stats != "seq" or not (replay or steer)]
    return [c for c in every if match is None or re.search(match, label(c))]


def label(case) -> str:
    s, T, E, k, stats, replay, steer = case
    per = f" +stats/{SEQ}-token groups" if stats == "seq" else ""
    return (f"{s} T={T} E={E} k={k}{per or (' +stats' if stats else '')}"
            f"{' replay' if replay else ''}{' steer/bias' if steer == 'bias' else ''}"
            f"{' steer' if steer is True else ''}")


def gate_call(case):
    """The case as a callable of the tree this process imports, and its statistics buffers.
    Built from the public API only (not ``benchmark.router_spec``), so that older trees run it."""
    import torch

    import moe_route
    from moe_route.ops import GateStats, RouterSpec

    s, T, E, k, stats, replay, steer = case
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(T * 7 + E))
    if s in ROUNDED:
        x = x.bfloat16()
    spec = {"softmax_topk": RouterSpec(), "renorm": RouterSpec(renormalize=True),
            "topk_softmax": RouterSpec(select_on="logits"),
            "topk_sigmoid": RouterSpec(score="sigmoid", select_on="logits"),
            "sigmoid_renorm": RouterSpec(score="sigmoid", renormalize=True),
            "deepseek_v3": RouterSpec(score="sigmoid", n_group=8, topk_group=4,
                                      group_score="top2_sum", renormalize=True,
                                      renorm_eps=1e-20, scale=2.5),
            "deepseek_v4": RouterSpec(score="sqrtsoftplus", renormalize=True, renorm_eps=1e-20,
                                      scale=1.5, round_scores=True),
            "lfm2": RouterSpec(score="sigmoid", renormalize=True, renorm_eps=1e-6,
                               round_scores=True)}[s]
    kw = {}
    if s in ("deepseek_v3",) + ROUNDED:
        kw["selection_bias"] = torch.randn(E, generator=torch.Generator().manual_seed(1))
    if stats is True:
        kw["stats"] = GateStats.zeros(1, E)
    elif stats == "seq":
        kw["stats"] = GateStats.zeros(-(-T // SEQ), E)
        kw["groups"] = torch.arange(T, dtype=torch.int32) // SEQ
    if replay:
        g = torch.Generator().manual_seed(2)
        kw["replay"] = torch.rand(T, E, generator=g).argsort(1)[:, :k].int()
    if steer:
        table = torch.zeros(4, E)
        a, b, c, d, on, off = (1, 5, 9, 3, 11, 12) if E > 12 else (1, 5, 6, 3, 7, 2)
        table[0, [a, b, c]] = 0.5
        table[1, d] = 0.5
        if steer is True:
            table[3, on], table[3, off] = 1.0, -1.0
        kw["steer"] = moe_route.SteerSpec(*table)
    return (lambda: moe_route.topk_gate(x, k, spec, **kw)), kw.get("stats")


def worker(mode: str, out: str, min_time: float, match: str | None, threads: int | None,
           stat: str = "median") -> None:
    """In one tree: the outputs of every case (mode "outputs") or their times ("time"), the
    median or the fastest of the calls (``stat``)."""
    import statistics
    import time

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    results = {}
    for case in cases(match):
        fn, stats = gate_call(case)
        if mode == "outputs":
            w, ids = fn()
            results[label(case)] = [w, ids] + ([b for b in stats.buffers() if b is not None]
                                               if stats is not None else [])
            continue
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        fn()
        reps = max(5, int(min_time / max(time.perf_counter() - t0, 1e-7)))
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        results[label(case)] = (min(samples) if stat == "min" else statistics.median(samples)) * 1e6
    if mode == "outputs":
        torch.save(results, out)
    else:
        with open(out, "w") as f:
            json.dump(results, f)


def run_in(tree: str, mode: str, out: str, args) -> None:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import cpu_ab; cpu_ab.worker({mode!r}, {out!r}, {args.min_time!r}, "
            f"{args.match!r}, {args.threads!r}, {args.stat!r})")
    # Run from the temporary directory, so no file of the caller's directory shadows a module.
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=os.path.dirname(out))


def bits(t):
    import torch
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def relative_difference(a, b) -> float:
    """0 for equal tensors; inf where integers (ids, counts) differ at all."""
    import torch
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = torch.maximum(a.abs(), b.abs()).clamp(min=torch.finfo(torch.float32).tiny)
    return float(((a - b).abs() / scale).max()) if a.numel() else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.15)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads in both trees")
    p.add_argument("--match", default=None, help="only the cases whose label matches this regex")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="a round's figure for a case: the median call or the fastest")
    p.add_argument("--rtol", type=float, default=None,
                   help="for a change meant to move the last bits: float outputs may differ by "
                        "this much, relative (ids and integer statistics must still be equal)")
    args = p.parse_args()
    import torch

    trees = {"old": args.old, "new": args.new}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for name, tree in trees.items():
            path = os.path.join(tmp, f"{name}.pt")
            run_in(tree, "outputs", path, args)
            outs[name] = torch.load(path)
        differ = [key for key in outs["old"]
                  if not all(torch.equal(bits(a), bits(b))
                             for a, b in zip(outs["old"][key], outs["new"][key]))]
        if differ and args.rtol is None:
            raise SystemExit(f"the trees compute different outputs in {len(differ)} cases, e.g. "
                             f"{differ[:3]}: not an A/B of the same results")
        if differ:
            worst = max(relative_difference(a, b) for key in differ
                        for a, b in zip(outs["old"][key], outs["new"][key]))
            if worst > args.rtol:
                raise SystemExit(f"outputs differ by {worst:.2g} relative (--rtol {args.rtol}) "
                                 f"in some of {differ[:3]}: not an A/B of the same results")
            print(f"outputs differ in the last bits in {len(differ)} of {len(outs['old'])} "
                  f"cases (at most {worst:.2g} relative), bit-identical in the others")
        else:
            print(f"outputs bit-identical in all {len(outs['old'])} cases")
        best = {}
        for rnd in range(args.rounds):
            for name, tree in trees.items():
                path = os.path.join(tmp, f"{name}_{rnd}.json")
                run_in(tree, "time", path, args)
                with open(path) as f:
                    for key, us in json.load(f).items():
                        best[name, key] = min(best.get((name, key), float("inf")), us)
    print(f"best of {args.rounds} alternating rounds, {args.stat} µs per call; ratio = old / new")
    print("| case | old | new | old / new |\n|---|---:|---:|---:|")
    rows = []
    for case in cases(args.match):
        key = label(case)
        old, new = best["old", key], best["new", key]
        rows.append({"case": key, "old_us": old, "new_us": new, "ratio": old / new})
        print(f"| {key} | {old:.1f} | {new:.1f} | {old / new:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"old": args.old, "new": args.new, "rounds": args.rounds,
                       "threads": args.threads, "match": args.match, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
