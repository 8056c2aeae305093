"""``moe-route``: command-line entry point.

    moe-route demo [--out DIR]                 the study on the planted model, offline (< 1 min)
    moe-route analyze MODEL --data F --languages ... --reference L [--max-length N]
                      [--all-tokens] [--trace] [--importance dense|routed|renormalized]
                      --out DIR
    moe-route experts MODEL --task F --baseline F --tau T [--layers A-B] [--max-length N]
                      [--all-tokens] [--std-unbiased] --out plan.json
    moe-route evaluate MODEL --task belebele|global_mmlu|mgsm|F.jsonl [--shots N] [--plan P]
                       --out DIR
    moe-route compare TRACE_A TRACE_B          routing agreement of two traces, per layer
    moe-route supported                        transformers MoE families and their status
    moe-route info | bench [--op gate|dispatch|block]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

import torch

from moe_route._json import parse as parse_json, read as read_json


def _info(args) -> int:
    from moe_route._info import format_info, info

    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def _bench(args) -> int:
    import time

    from moe_route import benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("moe-route bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    min_time = args.min_time if args.min_time is not None else (0.05 if cuda else 0.2)
    started = time.monotonic()
    deadline = started + args.budget if args.budget else None
    meta = benchmark.run_meta(device)
    print(benchmark.format_meta(meta))
    rows, extra, complete = [], {}, False
    compiled = ", torch.compile(dynamic=False)" if args.compile else ""

    def on_row(row):
        rows.append(row)
        print(row_format(row), flush=True)

    try:
        if args.op == "dispatch":
            copy = benchmark.copy_bandwidth(device, min_time=min_time)
            extra["copy_bandwidth"] = copy
            print(f"copy bandwidth {copy['gbps']:.0f} GB/s (dst.copy_(src) of "
                  f"{copy['bytes'] >> 20} MiB, read + write)")
            print(f"moe_route dispatch ops vs transformers' grouped_mm index work "
                  f"(eager{compiled})")
            print("median per call (IQR as % of the median); b/f, c/f: baseline, compiled / fused "
                  "(CPU: median over rounds of alternating bursts); GB/s: token-row bytes moved "
                  "(no indices) / fused time; copy: that / copy bandwidth")
            print(benchmark.format_dispatch_header())
            row_format = benchmark.format_dispatch_row
            cases = (benchmark.gpu_dispatch_cases() if cuda and args.full
                     else benchmark.dispatch_cases(args.full))
            benchmark.run_dispatch(cases, device, compile_baseline=args.compile,
                                   min_time=min_time, copy_gbps=copy["gbps"], deadline=deadline,
                                   on_row=on_row)
            extra["targets"] = benchmark.dispatch_targets(rows, copy["gbps"], meta["device_name"])
        elif args.op == "block":
            import transformers

            print(f"MoE block forward, experts implementation \"moe_route\" vs transformers' "
                  f"\"grouped_mm\" and \"eager\"; transformers {transformers.__version__}")
            print("median per forward (IQR as % of the median), the three alternating in bursts "
                  "of 3 calls in one run; gmm/ours, eager/ours: median over rounds of their time "
                  "/ moe_route's (> 1: moe_route faster)")
            print(benchmark.format_block_header())
            row_format = benchmark.format_block_row
            benchmark.run_block(benchmark.block_cases(args.full, args.family), device,
                                min_time=min_time, on_row=on_row)
        else:
            cases = (benchmark.gpu_cases() if cuda and args.full
                     else benchmark.default_cases(full=args.full))
            if args.semantics:
                cases = [c for c in cases if c.semantics in args.semantics]
            print(f"moe_route topk_gate vs the transformers PyTorch composition (eager{compiled})")
            print("median per call; ratio = baseline / gate; stats = gate+stats / gate; steer: "
                  "3 constant biases, 1 std-scaled and 1 forced expert, on both sides")
            print(benchmark.format_header(args.compile))
            row_format = lambda row: benchmark.format_row(row, args.compile)  # noqa: E731
            benchmark.run(cases, device, compile_baseline=args.compile, min_time=min_time,
                          deadline=deadline, on_row=on_row)
            extra["targets"] = benchmark.gate_targets(rows)
        complete = True
    finally:
        elapsed = time.monotonic() - started
        compile_s = sum(row.get("compile_s", 0.0) for row in rows)
        skipped = sum("compile_skipped" in row for row in rows)
        print(f"{args.op}: {len(rows)} rows in {elapsed:.1f} s"
              + (f" ({compile_s:.1f} s compiling, {skipped} compiles skipped)" if args.compile
                 else "") + ("" if complete else ", stopped by an error"))
        if args.json:
            benchmark.save_report(args.json, op=args.op, meta=meta, command=sys.argv,
                                  complete=complete, elapsed_s=elapsed, min_time=min_time, **extra,
                                  rows=rows)
            print(f"wrote {args.json}")
    if extra.get("targets"):
        print("issue 6 targets" + ("" if cuda else " (set for H100/H200; here for reference)"))
        print(benchmark.format_targets(extra["targets"]))
    return 0


def _positive(kind):
    """An argparse ``type``: ``kind(text)`` that must be finite and > 0."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return value
    return convert


def _fail(command: str, exc: Exception) -> int:
    print(f"moe-route {command}: {exc}", file=sys.stderr)
    return 2


def _out_dir(path: str, option: str = "--out") -> None:
    """Make the output directory now, so that a bad path fails before the model runs."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path!r} is not writable")


def _out_file(path: str, option: str = "--out") -> None:
    """Check that ``path`` can be written as a file (its directory is made)."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory, expected a file name")
    _out_dir(os.path.dirname(os.path.abspath(path)), option + " directory")


def _demo(args) -> int:
    from moe_route.analysis.demo import run_demo

    try:
        _out_dir(args.out)
    except (OSError, TypeError, ValueError) as exc:
        return _fail("demo", exc)
    summary = run_demo(args.out, seed=args.seed)
    return 0 if all(summary["checks"].values()) else 1


def _load_model(args):
    """The model and its tokenizer; one that cannot be loaded ends the command (exit 2)."""
    import transformers

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        _check_device(args.device)
        # With accelerate, a GPU's weights go there as they are read (no full copy in host memory
        # first) and "auto" spreads a model no single device holds over the GPUs, then the CPU;
        # without it, the model is read into host memory and moved.
        mapped = args.device != "cpu" and _has_accelerate()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, **({"device_map": args.device} if mapped else {}))
        if not mapped and args.device != "cpu":
            model = model.to(args.device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SystemExit(_fail(args.command, ValueError(f"cannot load {args.model!r} on "
                                                        f"{args.device}: {exc}")))
    if getattr(args, "chat_template", False) and not getattr(tokenizer, "chat_template", None):
        raise SystemExit(_fail(args.command, ValueError(
            f"--chat-template: the tokenizer of {args.model!r} has no chat template")))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def _check_device(device: str) -> None:
    """ValueError unless ``device`` is ``auto`` with accelerate installed or a device this
    machine has (a CUDA device torch was not built for, or past the count, was an AssertionError
    inside the load)."""
    if device == "auto":
        if not _has_accelerate():
            raise ValueError("--device auto places the model with accelerate's device map: "
                             "pip install accelerate, or name a device (cpu, cuda, cuda:N)")
        return
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError("--device must be cpu, cuda, cuda:N or auto") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if where.type == "cuda" and (where.index or 0) >= count:
        raise ValueError(f"this machine has {count} CUDA device{'s' * (count != 1)}")


def _check_max_length(max_length: int) -> None:
    """``--max-length`` is a number of tokens, at least 1."""
    if max_length < 1:
        raise ValueError(f"--max-length {max_length} must be an int >= 1 (tokens per text)")


def _layer_range(text, option: str):
    """``"A-B"`` (or ``"A"``) as ``range(A, B + 1)``, 0 <= A <= B."""
    if text is None:
        return None
    lo, _, hi = text.partition("-")
    try:
        layers = range(int(lo), int(hi or lo) + 1)
    except ValueError:
        layers = None
    if layers is None or not layers or layers.start < 0:
        raise ValueError(f"{option} {text!r} must be A-B or A with 0 <= A <= B (0-based "
                         f"decoder layers, inclusive)")
    return layers


def _texts(path, option: str):
    """One text per line (.txt), or the first column of a .tsv/.jsonl parallel file."""
    from moe_route.analysis.pipeline import load_parallel

    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"{option} {path} holds no texts")
        return texts
    return next(iter(load_parallel(path).values()))


def _analyze(args) -> int:
    from moe_route.analysis.inputs import check_batch_size
    from moe_route.analysis.pipeline import load_parallel, record_parallel
    from moe_route.analysis.report import write_report

    try:   # everything about the arguments is checked before the model is loaded and run
        check_batch_size("--batch-size", args.batch_size)
        _check_max_length(args.max_length)
        corpus = load_parallel(args.data, args.languages, limit=args.limit)
        if args.reference not in corpus:
            raise ValueError(f"--reference {args.reference!r} is not among the languages "
                             f"{list(corpus)}")
        wanted = _layer_range(args.middle, "--middle")
        accuracy = _accuracy(args.accuracy) if args.accuracy else None
        if accuracy is not None:
            _accuracy_overlap(accuracy, corpus, args.reference, args.accuracy)
        _out_dir(args.out)
    except (OSError, TypeError, ValueError) as exc:
        return _fail("analyze", exc)
    model, tok = _load_model(args)
    if wanted is not None:   # before the corpus is recorded
        from moe_route.hf.patch import find_routers, layer_index

        indices = sorted({layer_index(name) for name, _, _ in find_routers(model)} - {None})
        if not set(indices) & set(wanted):
            return _fail("analyze", ValueError(
                f"--middle {args.middle} holds none of the MoE layers {indices}"))
    traced = args.trace or args.importance == "renormalized"
    trace_path = f"{args.out}/trace.safetensors"
    stats = record_parallel(model, corpus, tokenizer=tok, batch_size=args.batch_size,
                            chat_template=args.chat_template, max_length=args.max_length,
                            all_tokens=args.all_tokens, progress=True,
                            trace_path=trace_path if traced else None,
                            meta={"model": args.model, "data": str(args.data)})
    stats.save(f"{args.out}/stats")
    compared = stats
    if args.importance == "renormalized":
        from moe_route.analysis.metrics import trace_statistics
        from moe_route.traces import open_trace

        # a layer at a time: the trace can be larger than memory
        compared = trace_statistics(open_trace(trace_path), renormalize=True)
    middle = None
    if wanted is not None:
        middle = [name for name, i in zip(compared.layer_names, compared.layer_indices)
                  if i in wanted]
    write_report(args.out, compared, args.reference, middle_layers=middle, accuracy=accuracy,
                 title=f"moe_route routing report: {args.model}",
                 kind="dense" if args.importance == "dense" else "routed")
    print(f"report: {args.out}/summary.txt")
    if traced:
        print(f"trace: {trace_path}")
    elif os.path.exists(trace_path):  # kept (it may have taken hours), but not this run's
        print(f"moe-route analyze: note: {trace_path} is an earlier run's trace; this run traced "
              f"nothing (--trace)", file=sys.stderr)
    return 0


def _accuracy(path) -> dict:
    """``{language: accuracy}``: a JSON mapping, or a result of ``moe-route evaluate``."""
    from moe_route.analysis.evaluation import EVAL_FORMAT, EvalResult

    data = read_json(path, f"--accuracy {path}")
    if isinstance(data, dict) and data.get("format") == EVAL_FORMAT:
        return EvalResult.from_dict(data, where=path).accuracy()
    if not isinstance(data, dict):
        raise ValueError(f"--accuracy {path} must hold a JSON object {{language: accuracy}}, "
                         f"got {type(data).__name__}")
    bad = {lang: v for lang, v in data.items() if isinstance(v, bool)
           or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f"--accuracy {path}: accuracies must be finite numbers, got "
                         f"{str(bad)[:80]}")
    return data


def _accuracy_overlap(accuracy: dict, corpus: dict, reference: str, path) -> None:
    """The correlation of divergence with accuracy takes the languages of the data that have an
    accuracy, less the reference (no divergence): ValueError if fewer than 3 are left; a note on
    stderr naming the languages it leaves out if it leaves some out."""
    from moe_route.stats import _short_list

    compared = [lang for lang in corpus if lang != reference]
    shared = [lang for lang in compared if lang in accuracy]
    if len(shared) < 3:
        raise ValueError(f"--accuracy {path}: the correlation needs at least 3 languages of the "
                         f"data besides the reference {reference!r} with an accuracy, got "
                         f"{shared}; the data has {_short_list(list(corpus))}, the accuracy file "
                         f"{_short_list(list(accuracy))}")
    left_out = []
    unscored = [lang for lang in compared if lang not in accuracy]
    if unscored:
        left_out.append(f"{_short_list(unscored)} (no accuracy)")
    unrecorded = [lang for lang in accuracy if lang not in corpus]
    if unrecorded:
        left_out.append(f"{_short_list(unrecorded)} (not in the data)")
    if left_out:
        print(f"moe-route analyze: note: the accuracy correlation leaves out "
              f"{' and '.join(left_out)}; it uses {_short_list(shared)}", file=sys.stderr)


def _experts(args) -> int:
    from moe_route.analysis.experts import _check_tau, plan_from_experts, task_experts
    from moe_route.analysis.inputs import check_batch_size
    from moe_route.analysis.pipeline import record_sequences

    try:   # everything about the arguments is checked before the model is loaded and run
        check_batch_size("--batch-size", args.batch_size)
        _check_max_length(args.max_length)
        task_texts, base_texts = _texts(args.task, "--task"), _texts(args.baseline, "--baseline")
        layers = _layer_range(args.layers, "--layers")
        _check_tau(args.tau, "--tau")
        # checks --lam, --max-per-layer and --std-unbiased as the plan built after the run will
        plan_from_experts({}, mode=args.mode, lam=args.lam, max_per_layer=args.max_per_layer,
                          std_unbiased=args.std_unbiased)
        _out_file(args.out)
    except (OSError, TypeError, ValueError) as exc:
        return _fail("experts", exc)
    model, tok = _load_model(args)
    options = dict(tokenizer=tok, batch_size=args.batch_size, chat_template=args.chat_template,
                   max_length=args.max_length, all_tokens=args.all_tokens, progress=True)
    task = record_sequences(model, {"task": task_texts}, **options)
    base = record_sequences(model, {"baseline": base_texts}, **options)
    experts = task_experts(task, base, args.tau, layers=layers)
    plan = plan_from_experts(experts, mode=args.mode, lam=args.lam,
                             std_unbiased=args.std_unbiased,
                             max_per_layer=args.max_per_layer)
    plan.save(args.out)
    for layer, chosen in experts.items():
        if chosen:
            print(f"layer {layer}: {chosen}")
    print(f"steering plan ({args.mode}): {args.out}")
    return 0


def _evaluate(args) -> int:
    from moe_route._atomic import write_text_atomic
    from moe_route.analysis import evaluation
    from moe_route.analysis.inputs import check_batch_size
    from moe_route.analysis.pipeline import ab_test
    from moe_route.steering import SteeringPlan, steer

    try:
        check_batch_size("--batch-size", args.batch_size)
        kind = _task_kind(args.task)
        load = (evaluation.load_choice_task if kind == "choice"
                else evaluation.load_generation_task)
        if args.subjects and args.task not in evaluation.GLOBAL_MMLU:
            raise ValueError(f"--subjects applies to --task global_mmlu, not {args.task!r}")
        hub = {"subjects": args.subjects} if args.subjects else {}
        items = load(args.task, args.languages, limit=args.limit, **hub)
        if args.shots_from and not args.shots:
            raise ValueError("--shots-from needs --shots N (N >= 1)")
        if args.shots:
            if args.shots_from and not args.shots_from.endswith(".jsonl"):   # a Hub split
                if args.task not in evaluation.GLOBAL_MMLU:
                    raise ValueError(f"--shots-from {args.shots_from!r} must be a .jsonl file "
                                     f"(a split name works with --task global_mmlu)")
                pool = load(args.task, args.languages, split=args.shots_from, **hub)
            else:
                pool = load(args.shots_from) if args.shots_from else items
            if args.shots_from and len(pool) == 1:      # one language's examples for all
                pool = next(iter(pool.values()))
            items = evaluation.few_shot(items, pool, args.shots)
        plan = SteeringPlan.load(args.plan) if args.plan else None
        _out_dir(args.out)
    except (OSError, TypeError, ValueError) as exc:
        return _fail("evaluate", exc)
    model, tok = _load_model(args)
    if plan is not None:
        try:  # the plan against the model's routers before the baseline runs (nothing runs here)
            with steer(model, plan):
                pass
        except (TypeError, ValueError) as exc:
            return _fail("evaluate", exc)
    options = dict(tokenizer=tok, batch_size=args.batch_size, chat_template=args.chat_template,
                   progress=True)
    if kind == "choice":
        options["normalize"] = args.normalize
    else:
        options["max_new_tokens"] = args.max_new_tokens
    run = evaluation.choice_accuracy if kind == "choice" else evaluation.generation_accuracy
    results = []

    def evaluate():
        result = run(model, items, **options)
        result.meta.update(model=args.model, task=str(args.task), shots=args.shots,
                           shots_from=args.shots_from,
                           plan=str(args.plan) if results and args.plan else None)
        if not results:  # kept should the steered run fail
            result.save(f"{args.out}/baseline.json")
        results.append(result)
        return result

    if plan is None:
        evaluate()
        width = max(len(lang) for lang in items)
        for lang, acc in results[0].accuracy().items():
            print(f"{lang:<{width}}  n {len(items[lang]):>5}  accuracy {acc:.3f}")
    else:
        ab = ab_test(model, plan, evaluate)
        print("\n".join(evaluation.format_paired(ab["paired"])))
        print("baseline -> steered accuracy; delta with a 95% interval; +gained/-lost questions; "
              "p: exact McNemar test")
        write_text_atomic(f"{args.out}/ab.json", json.dumps(ab, indent=2) + "\n")
        results[1].save(f"{args.out}/steered.json")
    print(f"results: {args.out}/")
    return 0


def _task_kind(source) -> str:
    """choice or generation: by dataset name, or by the first question of a .jsonl file."""
    from moe_route.analysis.evaluation import CHOICE_DATASETS, GENERATION_DATASETS
    from moe_route.analysis.inputs import check_not_retired

    check_not_retired("--task", source, "juletxara/mgsm", "mgsm (CohereLabs/global-mgsm)")
    if source in CHOICE_DATASETS:
        return "choice"
    if source in GENERATION_DATASETS:
        return "generation"
    if not str(source).endswith(".jsonl"):
        raise ValueError(f"--task {source!r} must be belebele, global_mmlu, mgsm or a .jsonl "
                         f"file")
    with open(source, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise ValueError(f"--task {source} holds no questions")
    question = parse_json(first, f"--task {source}: the first line")
    if not isinstance(question, dict):
        raise ValueError(f"--task {source}: the first line must be a JSON object (a question), "
                         f"got {type(question).__name__}")
    return "choice" if "options" in question else "generation"


def _compare(args) -> int:
    from moe_route.analysis.metrics import trace_agreement
    from moe_route.traces import open_trace

    try:   # a layer of each at a time: the traces can be larger than memory
        a, b = open_trace(args.a), open_trace(args.b)
        result = trace_agreement(a, b, skip_ungrouped=not args.all_rows)
    except (OSError, TypeError, ValueError) as exc:
        print(f"moe-route compare: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: r._asdict() for name, r in result.items()}, indent=2))
        return 0
    width = max([len("layer")] + [len(n) for n in result])
    print(f"{'layer':<{width}}  {'tokens':>9}  {'top-1':>6}  {'overlap':>7}  {'same set':>8}  "
          f"{'w shift':>7}")
    for name, r in result.items():
        print(f"{name:<{width}}  {r.tokens:>9,}  {r.top1:>6.3f}  {r.overlap:>7.3f}  "
              f"{r.identical:>8.3f}  {r.weight_shift:>7.4f}")
    print("shares of tokens with the same first-choice expert (top-1) and identical top-k sets "
          "(same set); overlap: mean |top-k(a) ∩ top-k(b)| / k; w shift: mean ½ Σ_e |w_a − w_b| "
          "(routed weights over all experts)")
    for label, path, trace in (("a", args.a, a), ("b", args.b, b)):
        model = trace.meta.get("model")
        print(f"{label}: {path}" + (f" (model {model})" if model is not None else ""))
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
    p.add_argument("--device", default="cpu",
                   help="where the model goes: cpu (default), cuda, cuda:1, ..., or auto (over "
                        "every GPU, then the CPU, for a model one device cannot hold; needs "
                        "accelerate)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each text in the tokenizer's chat template, thinking off (its "
                        "tokens are not counted)")


def _all_tokens_argument(p):
    p.add_argument("--all-tokens", action="store_true",
                   help="count the chat template's and the special tokens too, every token but "
                        "the padding, as the paper's code averages")


def _max_length_argument(p):
    p.add_argument("--max-length", type=int, default=512, metavar="N",
                   help="tokens per text, at most (default 512, with the chat template's): a "
                        "longer text is cut there, with a warning naming its language; a larger "
                        "N keeps it whole, for more memory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-route", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build and runtime information (for bug reports)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="benchmark moe_route against what transformers runs")
    p.add_argument("--op", default="gate", choices=["gate", "dispatch", "block"],
                   help="what to time: the fused gate (default), the dispatch ops (plan, permute, "
                        "unpermute, all three, permute of a block-64 plan without its unused "
                        "tail), or a whole MoE block per experts implementation")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--full", action="store_true",
                   help="the full grid. gate: on the CPU T 1..8192, E 8..256, k 2/8; on CUDA "
                        "issue 6's T 1..16384, E 64..512, k 4/8, DeepSeek-V3 grouped; both fp32 "
                        "and bf16. dispatch: on the CPU T 1..8192, H 1024/4096, E 8..256, k 2/8; "
                        "on CUDA DeepSeek-V3's, Qwen3's and Mixtral's shapes in bf16. block: adds "
                        "T=4096")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(dynamic=False) of the baselines (the CUDA gate "
                        "grid: at its 12 target shapes)")
    p.add_argument("--budget", type=_positive(float), metavar="SECONDS",
                   help="once the run has taken this long, skip the remaining compiled baselines")
    p.add_argument("--semantics", nargs="*",
                   choices=["softmax_topk", "softmax_topk_renorm", "topk_softmax", "deepseek_v3",
                            "deepseek_v4"])
    p.add_argument("--family", nargs="*", choices=["olmoe", "qwen3_moe", "mixtral"],
                   help="--op block: model families (default: all)")
    p.add_argument("--threads", type=_positive(int), help="torch CPU threads (default: torch's)")
    p.add_argument("--min-time", type=_positive(float),
                   help="seconds per measurement (default 0.2 on the CPU, 0.05 on CUDA)")
    p.add_argument("--json", metavar="PATH",
                   help="also write a JSON report: run metadata, every row, targets")
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
    p.add_argument("--accuracy",
                   help="per-language accuracy to correlate with divergence: JSON {language: "
                        "accuracy}, or baseline.json of moe-route evaluate")
    _max_length_argument(p)
    _all_tokens_argument(p)
    p.add_argument("--trace", action="store_true",
                   help="also save every token's routing to OUT/trace.safetensors (for moe-route "
                        "compare; streamed to the file as it is recorded, about 256 MiB of host "
                        "memory, syncs at each router call)")
    p.add_argument("--importance", choices=["dense", "routed", "renormalized"], default="dense",
                   help="what the divergences compare: the mean dense routing distribution (the "
                        "paper's Eq. 1, default), the mean routed top-k weights, or those "
                        "renormalised per token (the author's later code; needs the trace, "
                        "which it saves as --trace does)")
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
    p.add_argument("--std-unbiased", action="store_true",
                   help="soft steering scales by the sample std of the token's logits (E - 1, "
                        "as EasySteer) instead of the population std")
    p.add_argument("--max-per-layer", type=int)
    _max_length_argument(p)
    _all_tokens_argument(p)
    p.add_argument("--out", default="steering_plan.json")
    p.set_defaults(func=_experts)
    p = sub.add_parser("evaluate", help="task accuracy per language, and with --plan the "
                                        "steered run against the plain one, question by question")
    _model_arguments(p)
    p.add_argument("--task", required=True,
                   help="belebele or global_mmlu (multiple choice), mgsm (generation; all from "
                        "the Hub), or a .jsonl file: {language, prompt, options, answer} per "
                        "line for multiple choice, {language, prompt, answer} for generation")
    p.add_argument("--subjects", nargs="+",
                   help="global_mmlu: keep these subjects or subject categories (e.g. medical)")
    p.add_argument("--languages", nargs="+",
                   help="language splits/configs (needed for the Hub tasks; default: all "
                        "in the file)")
    p.add_argument("--limit", type=int, help="first N questions per language")
    p.add_argument("--plan", help="a steering plan (SteeringPlan JSON): run without and with it")
    p.add_argument("--normalize", choices=["none", "tokens", "chars", "bytes"], default="none",
                   help="multiple choice: divide an option's log-likelihood by its length "
                        "(chars: lm-eval's acc_norm)")
    p.add_argument("--max-new-tokens", type=_positive(int), default=256, help="generation: at most")
    p.add_argument("--shots", type=int, default=0,
                   help="solved examples before each question (default 0): the first N other "
                        "questions of its language, or of --shots-from")
    p.add_argument("--shots-from",
                   help="a .jsonl file of solved examples in the task's format (generation: "
                        "the answer may be a worked solution ending in the number; one "
                        "language in it serves every language), or a split of the Hub task "
                        "(global_mmlu: dev)")
    p.add_argument("--out", required=True,
                   help="directory for baseline.json (and steered.json, ab.json with --plan)")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("compare", help="how alike two traces of the same tokens route, per layer "
                                       "(steered vs plain, checkpoint vs final)")
    p.add_argument("a", help="a trace file (Recorder.save_trace / save_trace)")
    p.add_argument("b", help="a trace of the same inputs, in the same order")
    p.add_argument("--all-rows", action="store_true",
                   help="also compare ungrouped rows (padding, ignored tokens)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_compare)
    p = sub.add_parser("supported", help="transformers MoE families and what moe_route supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_supported)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
