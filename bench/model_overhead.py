"""Forward time of whole MoE models: unpatched vs ``patch`` vs ``record`` vs ``replay`` vs the usual
alternative for statistics.

    python bench/model_overhead.py [--size tiny|mid|both] [--tokens 256] [--reps 5]

Per model (random weights from the real transformers config classes; mid-size: hidden 1024,
8 layers, 64 experts, top-8), in one process and on the same inputs, the median forward time of:
    unpatched   the model as transformers builds it (experts implementation "grouped_mm");
    patch       moe_route.patch(model) (fused gate in every router);
    record      patch + moe_route.record(model) (counts, weight/prob/entropy sums on device);
    replay      moe_route.replay(model, routing): every router takes the experts of a traced
                forward of the same tokens, by position (the gate skips selection);
    alternative output_router_logits=True, then the same statistics computed in PyTorch from the
                returned logits (softmax, top-k, bincount, index_add) -- what users write today.
The variants alternate call by call; each cell is the median time and, in brackets, the median
over rounds of (variant time / unpatched time in the same round).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

import moe_route

MID = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
           vocab_size=1024, max_position_embeddings=4096, num_experts_per_tok=8)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=4096, num_experts_per_tok=2)

MODELS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              lambda s: dict(intermediate_size=s // 2, num_experts=64 if s >= 1024 else 8)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  lambda s: dict(intermediate_size=s, moe_intermediate_size=s // 2,
                                 num_experts=64 if s >= 1024 else 8, head_dim=64,
                                 norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    lambda s: dict(intermediate_size=s, moe_intermediate_size=s // 2,
                                   n_routed_experts=64 if s >= 1024 else 8,
                                   n_group=8 if s >= 1024 else 2,
                                   topk_group=4 if s >= 1024 else 1, n_shared_experts=1,
                                   first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=64,
                                   qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                                   routed_scaling_factor=2.5, num_key_value_heads=16)),
}


def build(family: str, base: dict):
    config_cls, model_cls, extra = MODELS[family]
    kwargs = {**base, **extra(base["hidden_size"])}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # spread routing (some families initialise routers at zero)
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.05)
    return model


def python_stats(router_logits, k):
    """The statistics ``record`` keeps, computed from output_router_logits in PyTorch."""
    out = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = probs.topk(k, dim=-1)
        E = probs.shape[-1]
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        wsum = torch.zeros(E).index_add_(0, ids.reshape(-1), weights.reshape(-1))
        entropy = torch.special.entr(probs).sum()
        out.append((counts, wsum, probs.sum(0), entropy))
    return out


def run(family: str, size: str, tokens: int, reps: int) -> dict:
    """Median ms per variant and the median over rounds of (variant / unpatched) in that round:
    the five variants alternate call by call, so drift in machine load hits them alike."""
    model = build(family, MID if size == "mid" else TINY)
    k = model.config.num_experts_per_tok
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(1))

    # Four copies (same weights), so no variant pays for patching or recording setup per call.
    patched_model, recorded_model = copy.deepcopy(model), copy.deepcopy(model)
    replayed_model = copy.deepcopy(model)
    moe_route.patch(patched_model)
    recorder = moe_route.record(recorded_model).__enter__()
    with moe_route.record(replayed_model, trace=True) as traced, torch.no_grad():
        replayed_model(ids)
    routing = {name: layer["ids"].reshape(1, tokens, k) for name, layer in traced.trace.items()}
    replayer = moe_route.replay(replayed_model, routing).__enter__()
    variants = {"unpatched": lambda: model(ids), "patch": lambda: patched_model(ids),
                "record": lambda: recorded_model(ids), "replay": lambda: replayed_model(ids),
                "alternative": lambda: python_stats(
                    model(ids, output_router_logits=True).router_logits, k)}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    recorder.__exit__(None, None, None)  # the one host copy of the statistics, untimed
    replayer.__exit__(None, None, None)
    base = times["unpatched"]
    return {name: (statistics.median(t), statistics.median(x / b for x, b in zip(t, base)))
            for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid", "both"], default="both")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--families", nargs="*", default=list(MODELS))
    args = p.parse_args()
    sizes = ["tiny", "mid"] if args.size == "both" else [args.size]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {args.tokens} tokens, median of {args.reps}")
    print("| model | unpatched | patch | record (stats on) | replay (by position) | "
          "alternative (output_router_logits + PyTorch) |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in sizes:
        for family in args.families:
            r = run(family, size, args.tokens, args.reps)
            cell = lambda key: f"{r[key][0]:.1f} ms ({r[key][1]:.3f}×)"  # noqa: E731
            print(f"| {family} {size} | {r['unpatched'][0]:.1f} ms | {cell('patch')} | "
                  f"{cell('record')} | {cell('replay')} | {cell('alternative')} |", flush=True)


if __name__ == "__main__":
    main()
