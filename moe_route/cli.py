"""``moe-route``: command-line entry point.

    moe-route demo [--out DIR]                 the study on the planted model, offline (< 2 min)
    moe-route analyze MODEL --data F --languages ... --reference L --out DIR
    moe-route experts MODEL --task F --baseline F --tau T [--layers A-B] --out plan.json
    moe-route supported                        transformers MoE families and their status
    moe-route info | bench [--op gate|dispatch|block]
"""
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
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if args.op == "dispatch":
        print(f"moe_route plan+permute+unpermute vs transformers' grouped_mm index path; device "
              f"{device} ({where}), torch {torch.__version__}")
        print("median per call (IQR as % of the median), the two alternating in bursts of 3 "
              "calls in one run; ratio = median over rounds of baseline / fused")
        print(benchmark.format_dispatch_header())
        rows = benchmark.run_dispatch(benchmark.dispatch_cases(args.full), device,
                                      min_time=args.min_time, progress=print)
    elif args.op == "block":
        import transformers

        print(f"MoE block forward, experts implementation \"moe_route\" vs transformers' "
              f"\"grouped_mm\" and \"eager\"; device {device} ({where}), torch "
              f"{torch.__version__}, transformers {transformers.__version__}")
        print("median per forward (IQR as % of the median), the three alternating in bursts of "
              "3 calls in one run; gmm/ours, eager/ours: median over rounds of their time / "
              "moe_route's (> 1: moe_route faster)")
        print(benchmark.format_block_header())
        rows = benchmark.run_block(benchmark.block_cases(args.full, args.family), device,
                                   min_time=args.min_time, progress=print)
    else:
        cases = benchmark.default_cases(full=args.full)
        if args.semantics:
            cases = [c for c in cases if c.semantics in args.semantics]
        print(f"moe_route topk_gate vs the transformers PyTorch composition; device {device} "
              f"({where}), torch {torch.__version__}")
        print("baseline/gate: median per call; ratio = baseline / gate (same run); "
              "stats+ = cost of fused statistics over the plain gate")
        print(benchmark.format_header(args.compile))
        rows = benchmark.run(cases, device, compile_baseline=args.compile, min_time=args.min_time,
                             progress=print)
    if args.json:
        benchmark.save(rows, args.json)
        print(f"wrote {args.json}")
    return 0


def _demo(args) -> int:
    from moe_route.analysis.demo import run_demo

    summary = run_demo(args.out, seed=args.seed)
    return 0 if all(summary["checks"].values()) else 1


def _load_model(args):
    import transformers

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _layer_range(text):
    if text is None:
        return None
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def _texts(path):
    """One text per line (.txt), or the first column of a .tsv/.jsonl parallel file."""
    from moe_route.analysis.pipeline import load_parallel

    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    return next(iter(load_parallel(path).values()))


def _analyze(args) -> int:
    from moe_route.analysis.pipeline import load_parallel, record_parallel
    from moe_route.analysis.report import write_report

    model, tok = _load_model(args)
    corpus = load_parallel(args.data, args.languages, limit=args.limit)
    stats = record_parallel(model, corpus, tokenizer=tok, batch_size=args.batch_size,
                            chat_template=args.chat_template, progress=True)
    stats.meta.update(model=args.model, data=str(args.data))
    stats.save(f"{args.out}/stats")
    accuracy = None
    if args.accuracy:
        with open(args.accuracy, encoding="utf-8") as f:
            accuracy = json.load(f)
    middle = None
    if args.middle:
        wanted = set(_layer_range(args.middle))
        middle = [p for p, i in enumerate(stats.layer_indices) if i in wanted]
    write_report(args.out, stats, args.reference, middle_layers=middle, accuracy=accuracy,
                 title=f"moe_route routing report: {args.model}")
    print(f"report: {args.out}/summary.txt")
    return 0


def _experts(args) -> int:
    from moe_route.analysis.experts import plan_from_experts, task_experts
    from moe_route.analysis.pipeline import record_sequences

    model, tok = _load_model(args)
    options = dict(tokenizer=tok, batch_size=args.batch_size, chat_template=args.chat_template,
                   progress=True)
    task = record_sequences(model, {"task": _texts(args.task)}, **options)
    base = record_sequences(model, {"baseline": _texts(args.baseline)}, **options)
    experts = task_experts(task, base, args.tau, layers=_layer_range(args.layers))
    plan = plan_from_experts(experts, mode=args.mode, lam=args.lam,
                             max_per_layer=args.max_per_layer)
    plan.save(args.out)
    for layer, chosen in experts.items():
        if chosen:
            print(f"layer {layer}: {chosen}")
    print(f"steering plan ({args.mode}): {args.out}")
    return 0


def _supported(args) -> int:
    from moe_route.hf import supported

    rows = supported()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        adapters = ", ".join(sorted({a for a in r["adapters"] if a})) or "-"
        limits = f"; limits: {r['limits']}" if r["limits"] else ""
        print(f"{r['family']:<24} {r['group']:<4} {adapters:<40} {r['status']}{limits}")
    ok = sum(r["status"] == "supported" for r in rows)
    print(f"{ok} of {len(rows)} families supported")
    return 0


def _model_arguments(p):
    p.add_argument("model", help="a Hugging Face model id or local path (AutoModelForCausalLM)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each text in the tokenizer's chat template (its tokens are not counted)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-route", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build and runtime information (for bug reports)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="benchmark moe_route against what transformers runs")
    p.add_argument("--op", default="gate", choices=["gate", "dispatch", "block"],
                   help="what to time: the fused gate (default), plan+permute+unpermute, or a "
                        "whole MoE block per experts implementation")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--full", action="store_true",
                   help="the full grid (gate/dispatch: T 1..8192, E 8..256, k 2/8, fp32+bf16; "
                        "block: adds T=4096)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd baselines")
    p.add_argument("--semantics", nargs="*",
                   choices=["softmax_topk", "softmax_topk_renorm", "topk_softmax", "deepseek_v3"])
    p.add_argument("--family", nargs="*", choices=["olmoe", "qwen3_moe", "mixtral"],
                   help="--op block: model families (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_bench)
    p = sub.add_parser("demo", help="the multilingual-routing study on the planted model (offline)")
    p.add_argument("--out", default="moe_route_demo", help="report directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    p = sub.add_parser("analyze", help="routing divergence across languages on parallel data")
    _model_arguments(p)
    p.add_argument("--data", required=True, help=".tsv/.jsonl parallel file, or flores/belebele")
    p.add_argument("--languages", nargs="+", help="language codes (default: all in the file)")
    p.add_argument("--reference", required=True, help="reference language, e.g. eng_Latn")
    p.add_argument("--limit", type=int, help="first N sentences per language")
    p.add_argument("--middle", help="middle layers for the accuracy correlation, e.g. 8-20")
    p.add_argument("--accuracy", help="JSON {language: accuracy} to correlate with divergence")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(func=_analyze)
    p = sub.add_parser("experts", help="task experts (task vs baseline data) -> a steering plan")
    _model_arguments(p)
    p.add_argument("--task", required=True, help="task texts: .txt (one per line), .tsv or .jsonl")
    p.add_argument("--baseline", required=True, help="baseline texts, same formats")
    p.add_argument("--tau", type=float, default=0.3, help="threshold on the frequency delta")
    p.add_argument("--layers", help="decoder layers to keep, e.g. 7-33 (0-based, inclusive)")
    p.add_argument("--mode", choices=["soft", "hard"], default="soft")
    p.add_argument("--lam", type=float, default=0.5, help="soft steering strength (std units)")
    p.add_argument("--max-per-layer", type=int)
    p.add_argument("--out", default="steering_plan.json")
    p.set_defaults(func=_experts)
    p = sub.add_parser("supported", help="transformers MoE families and what moe_route supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_supported)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
