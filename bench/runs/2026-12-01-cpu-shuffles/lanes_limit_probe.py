"""The shapes bench/cpu_ab.py lacks, timed in the tree on PYTHONPATH (one thread, T=1024, best
of the calls), for lanes_pay's limits: run once per build, with every block in lanes (lanes_pay
returning true) and with the limit in force, e.g.
    MOE_ROUTE_CPU_ISA=base PYTHONPATH=<tree> python lanes_limit_probe.py"""
import time

import torch

import moe_route
from moe_route.ops import GateStats, RouterSpec

torch.set_num_threads(1)
SHAPES = [("maverick", 128, 1, RouterSpec(score="sigmoid", select_on="logits")),
          ("qwen1.5", 60, 4, RouterSpec()), ("granite", 40, 8, RouterSpec(select_on="logits")),
          ("gptoss120", 128, 4, RouterSpec(select_on="logits"))] + \
    [(f"softmax E={E} k={k}", E, k, RouterSpec())
     for E, k in ((40, 8), (48, 6), (48, 8), (56, 8), (40, 16), (64, 16), (96, 2), (96, 4),
                  (96, 8), (128, 2), (128, 3), (128, 4), (128, 6), (128, 8))]
res = {}
for name, E, k, spec in SHAPES:
    x = torch.randn(1024, E, generator=torch.Generator().manual_seed(E))
    for st in (None, GateStats.zeros(1, E)):
        def f():
            return moe_route.topk_gate(x, k, spec, stats=st)
        for _ in range(5):
            f()
        best = 1e9
        for _ in range(90):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        res[name + (" +stats" if st is not None else "")] = round(best * 1e6, 1)
print(res)
