"""Recording a ``torch.compile``d model over many groups: graphs compiled and time taken.

    python bench/record_compile.py [TREE ...] [--groups 16] [--backend inductor] [--trace]
                                   [--fullgraph]

A tiny Qwen3-MoE (2 layers, 16 experts, top 4) is compiled (``torch.compile(model)``, not
``fullgraph`` unless ``--fullgraph``: a frame that reaches Dynamo's recompile limit runs eagerly
from then on, where under ``fullgraph`` it fails) and
recorded over ``--groups`` batches of [4, 64] tokens, each in a new ``group()``, then over as
many batches with 4 new per-sequence groups each (``per_sequence``). For each phase it reports
the graphs Dynamo compiled, the wall time of the phase (compilation included) and the median
time of its last 4 calls, beside that of an eager run; and whether the statistics equal the
eager run's. ``--trace`` records with ``trace=True``, and the traces must equal too.

With no TREE it measures the installed ``moe_route``. Given source trees with the extension
built in place, each runs in its own process (one round: compilation dominates) and prints its
figures. Inductor's caches are off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``), so that every
graph is compiled in the run that counts it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

B, S = 4, 64


def measure(groups: int, backend: str, trace: bool, fullgraph: bool) -> dict:
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # time each compilation
    import torch
    import transformers
    from torch._dynamo.utils import counters

    import moe_route

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=16,
        num_experts_per_tok=4, decoder_sparse_step=1, max_position_embeddings=128)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    batches = [torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(b))
               for b in range(groups)]

    def run(forward, phases: dict) -> "moe_route.Recorder":
        with moe_route.record(model, trace=trace) as rec, torch.no_grad():
            for phase in ("group", "per_sequence"):
                graphs, times = counters["stats"]["unique_graphs"], []
                start = time.perf_counter()
                for b, ids in enumerate(batches):
                    t0 = time.perf_counter()
                    if phase == "group":
                        with rec.group(f"g{b}"):
                            forward(ids)
                    else:
                        rec.per_sequence([f"s{B * b + i}" for i in range(B)])
                        forward(ids)
                    times.append(time.perf_counter() - t0)
                phases[phase] = {
                    "graphs": counters["stats"]["unique_graphs"] - graphs,
                    "wall_s": time.perf_counter() - start,
                    "last_calls_ms": statistics.median(times[-4:]) * 1e3}
        return rec

    eager_phases: dict = {}
    eager = run(model, eager_phases)
    phases: dict = {}
    compiled = run(torch.compile(model, backend=backend, fullgraph=fullgraph), phases)
    for phase, f in phases.items():
        f["eager_last_calls_ms"] = eager_phases[phase]["last_calls_ms"]
    same = eager.stats.group_names == compiled.stats.group_names and all(
        torch.equal(a.counts, b.counts) for a, b in zip(eager.stats, compiled.stats))
    if trace:
        same = same and all(
            torch.equal(layer["ids"], compiled.trace[name]["ids"])
            and layer["group"] == compiled.trace[name]["group"]
            for name, layer in eager.trace.items())
    return {"phases": phases, "same_as_eager": same, "module": moe_route.__file__,
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="*", help="source trees with moe_route built in place")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--trace", action="store_true", help="record with trace=True")
    p.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child or not args.trees:
        found = measure(args.groups, args.backend, args.trace, args.fullgraph)
        if args.child:
            print(json.dumps(found))
            return
        results = {"installed": found}
    else:
        results = {}
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                  "--groups", str(args.groups), "--backend", args.backend]
                                 + ["--trace"] * args.trace + ["--fullgraph"] * args.fullgraph,
                                 env=env, cwd=tree, capture_output=True, text=True, check=True)
            found = json.loads(run.stdout.splitlines()[-1])
            if not found["module"].startswith(os.path.abspath(tree) + os.sep):
                raise SystemExit(f"{tree}: the child imported another moe_route")
            results[tree] = found
    print(f"{args.groups} batches per phase, [{B}, {S}] tokens, backend {args.backend}"
          + (", trace=True" if args.trace else "") + (", fullgraph=True" if args.fullgraph else ""))
    print("tree".ljust(26) + "phase".ljust(14) + "graphs".rjust(8) + "wall".rjust(10)
          + "last calls".rjust(12) + "eager".rjust(10) + "   same as eager")
    for tree, found in results.items():
        for phase, f in found["phases"].items():
            print(tree[-24:].ljust(26) + phase.ljust(14) + f"{f['graphs']:8d}"
                  + f"{f['wall_s']:9.2f}s" + f"{f['last_calls_ms']:10.2f}ms"
                  + f"{f['eager_last_calls_ms']:8.2f}ms   {found['same_as_eager']}")


if __name__ == "__main__":
    main()
