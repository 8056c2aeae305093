"""Host time of ``Recorder.set_groups`` and the per-call lookup of the groups' statistics rows.

    python bench/record_groups_speed.py [TREE ...] [--rounds 5]

Each call of a recorded model with ``set_groups`` ids turns the ids into device rows of the
statistics buffers (``Recorder._batch_rows``) on the host, before any router runs. This times
``set_groups(ids)`` followed by that lookup, 200 times per measurement, for per-sequence ids
(B 8 and 64), per-token ids ([8, 512], 32 groups, and 200 groups with skipped tokens) and
per-sequence document ids named by a corpus-wide table of 100 000 names (``set_groups(ids,
names)``, each call new documents), on a tiny OLMoE (the model only opens ``record``; it is never
called).

With no TREE it times the installed ``moe_route``. Given source trees with their extension built
in place (``git worktree add /tmp/old REV && (cd /tmp/old && MOE_ROUTE_SKIP_CUDA=1 python
setup.py build_ext --inplace)``), each tree runs in its own process, the trees alternate for
``--rounds`` rounds, and a case's figure is its best time over the rounds; the last column is
the first tree's time over each other tree's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {"per-sequence, B=8": ("seq", 8, 8), "per-sequence, B=64 (48 groups)": ("seq", 64, 48),
         "per-token [8, 512], 32 groups": ("tok", 8, 32),
         "per-token [8, 512], 200 groups, skips": ("tok", 8, 200),
         "per-sequence, B=8, ids into 100k names": ("doc", 8, 100_000)}
S, CALLS = 512, 200


def measure() -> dict:
    import torch
    import transformers

    import moe_route

    torch.manual_seed(0)
    config = transformers.OlmoeConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      num_experts=8, num_experts_per_tok=2, vocab_size=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.OlmoeForCausalLM(config)
    out = {}
    with moe_route.record(model, max_groups=256) as rec:
        for name, (kind, B, G) in CASES.items():
            names = [f"doc/{i}" for i in range(G)] if kind == "doc" else None
            ids = [torch.arange(c * B, (c + 1) * B) * 7 % G if kind == "doc" else
                   torch.arange(B) % G if kind == "seq" else
                   torch.randint(0 if G <= 32 else -1, G, (B, S)) for c in range(CALLS)]
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for c in range(CALLS):
                    rec.set_groups(ids[c], names)
                    rec._batch_rows(B, S, torch.device("cpu"))
                best = min(best, (time.perf_counter() - t0) / CALLS * 1e6)
            out[name] = best
    return out | {"module": moe_route.__file__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="*", help="source trees with moe_route built in place")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child or not args.trees:
        times = measure()
        print(json.dumps(times) if args.child else
              "\n".join(f"{n}: {t:.1f} us" for n, t in times.items() if n != "module"))
        return
    best = {tree: {} for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                                 cwd=tree, capture_output=True, text=True, check=True)
            found = json.loads(run.stdout.splitlines()[-1])
            if not found.pop("module").startswith(os.path.abspath(tree) + os.sep):
                raise SystemExit(f"{tree}: the child imported another moe_route")
            for name, t in found.items():
                best[tree][name] = min(best[tree].get(name, float("inf")), t)
    first = args.trees[0]
    print("case".ljust(40) + "".join(t[-24:].rjust(26) for t in args.trees) + "   first / each")
    for name in CASES:
        ratios = "  ".join(f"{best[first][name] / best[t][name]:.2f}x" for t in args.trees[1:])
        print(name.ljust(40) + "".join(f"{best[t][name]:24.1f}us" for t in args.trees)
              + f"   {ratios}")


if __name__ == "__main__":
    main()
