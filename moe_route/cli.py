"""``moe-route``: command-line entry point (``info``, ``bench``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _info(args) -> int:
    from moe_route._info import format_info, info

    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def _bench(args) -> int:
    from moe_route import benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("moe-route bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.op == "dispatch":
        print(f"moe_route plan+permute+unpermute vs transformers' grouped_mm index path; device "
              f"{device}, torch {torch.__version__}")
        print(f"{'case':<44} {'baseline':>12} {'fused':>12} {'ratio':>7}")
        rows = benchmark.run_dispatch(benchmark.dispatch_cases(args.full), device,
                                      min_time=args.min_time, progress=print)
        if args.json:
            benchmark.save(rows, args.json)
        return 0
    cases = benchmark.default_cases(full=args.full)
    if args.semantics:
        cases = [c for c in cases if c.semantics in args.semantics]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"moe_route topk_gate vs the transformers PyTorch composition; device {device} ({where}), "
          f"torch {torch.__version__}")
    print("baseline/gate: median per call; ratio = baseline / gate (same run); "
          "stats+ = cost of fused statistics over the plain gate")
    print(benchmark.format_header(args.compile))
    rows = benchmark.run(cases, device, compile_baseline=args.compile, min_time=args.min_time,
                         progress=print)
    if args.json:
        benchmark.save(rows, args.json)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-route", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build and runtime information (for bug reports)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="benchmark the fused gate against the PyTorch composition")
    p.add_argument("--op", default="gate", choices=["gate", "dispatch"], help="what to time")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--full", action="store_true",
                   help="the full grid (T 1..8192, E 8..256, k 2/8, fp32+bf16)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd baselines")
    p.add_argument("--semantics", nargs="*",
                   choices=["softmax_topk", "softmax_topk_renorm", "topk_softmax", "deepseek_v3"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
