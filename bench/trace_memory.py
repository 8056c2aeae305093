"""Host memory of ``record_sequences(trace_path=)``: peak RSS with and without the trace, and
of reading the trace back for an analysis, all at once or a layer at a time.

    python bench/trace_memory.py [--tokens 1000000]

A 16-layer OLMoE of OLMoE's routing shape (64 experts, top-8) but hidden size 32 records a
corpus of random token ids (two languages, sequences of 500, batches of 20), once without a
trace and once saving one; each run is a process of its own, and its peak resident set size
(``ru_maxrss``) is read at the end. The difference is what the trace costs at its peak (its
buffer, streamed to a spill file and written out at the end: ``record(trace_path=)``); the
file's size is what it holds. Then two more processes compute the trace's renormalised
statistics (``trace_statistics(..., renormalize=True)``, what ``analyze --importance
renormalized`` does) from ``load_trace`` (the whole trace in memory) and from ``open_trace`` (a
layer at a time), against the peak of a process that only imports them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

S, BATCH = 500, 20


def measure(tokens: int, trace_path) -> dict:
    import time

    import torch
    import transformers

    from moe_route.analysis.pipeline import record_sequences

    config = transformers.OlmoeConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=16,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      num_experts=64, num_experts_per_tok=8, vocab_size=1000,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(config).eval()
    n = max(tokens // (2 * S), 1)
    corpus = {lang: torch.randint(3, 1000, (n, S)) for lang in ("a", "b")}
    t0 = time.perf_counter()
    record_sequences(model, corpus, batch_size=BATCH, trace_path=trace_path)
    return {"tokens": 2 * n * S, "seconds": time.perf_counter() - t0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "file_mib": os.path.getsize(trace_path) / 2**20 if trace_path else 0.0}


def read(how: str, trace_path: str) -> dict:
    import time

    from moe_route.analysis import trace_statistics
    from moe_route.traces import load_trace, open_trace

    t0 = time.perf_counter()
    if how != "none":
        trace = (load_trace if how == "load" else open_trace)(trace_path)
        trace_statistics(trace, renormalize=True)
    return {"seconds": time.perf_counter() - t0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--child", nargs=2, metavar=("TOKENS", "TRACE"), help=argparse.SUPPRESS)
    p.add_argument("--read", nargs=2, metavar=("HOW", "TRACE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        tokens, trace = args.child
        print(json.dumps(measure(int(tokens), trace or None)))
        return
    if args.read:
        print(json.dumps(read(*args.read)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        plain = child("--child", str(args.tokens), "")
        traced = child("--child", str(args.tokens), path)
        reads = {how: child("--read", how, path) for how in ("none", "load", "open")}
    extra = traced["peak_mib"] - plain["peak_mib"]
    print(f"{traced['tokens']:,} tokens, 16 layers, top-8: peak RSS {plain['peak_mib']:.0f} MiB "
          f"without the trace, {traced['peak_mib']:.0f} MiB with it (+{extra:.0f} MiB); "
          f"trace file {traced['file_mib']:.0f} MiB; "
          f"peak extra / file {extra / traced['file_mib']:.2f}; "
          f"recording {plain['seconds']:.1f} s / {traced['seconds']:.1f} s")
    base = reads["none"]["peak_mib"]
    for how, name in (("load", "load_trace"), ("open", "open_trace")):
        r = reads[how]
        print(f"trace_statistics(renormalize=True) from {name}: peak RSS {r['peak_mib']:.0f} MiB "
              f"(+{r['peak_mib'] - base:.0f} MiB over the imports' {base:.0f}), "
              f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
