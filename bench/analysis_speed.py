"""Time every ``moe_route.analysis`` metric on paper-sized synthetic statistics.

    python bench/analysis_speed.py [--languages 15] [--sequences 500] [--layers 48]
                                   [--experts 128] [--top-k 8] [--repeat 3]

The default size is the paper's Qwen3-30B-A3B study: 500 FLORES passages × 15 languages
(G = 7500 groups, one per sequence), 48 MoE layers, 128 experts, top-8. The statistics are
synthetic but shaped like real ones (language-specific routing in early/late layers, shared in the
middle), built directly as tensors (no model run). Every metric is timed ``--repeat`` times on the
CPU; the script prints the median and the min–max spread of each and the sum of the medians
(target: < 10 s). Trace metrics (per-token ids) are timed separately on a smaller synthetic trace.
Not collected by pytest (the name does not start with test_ or bench_).

On a machine whose cores are shared with other busy processes, libgomp's spin-waiting threads
make every parallel region wait for a descheduled thread: measured here at load average ~3 on 2
cores, 19.5 s with 2 threads, 5.4 s with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``, 5.1 s with
``--threads 1``; 2.7 s with 2 threads when the cores were free. The header prints the load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from moe_route.analysis import experts as X
from moe_route.analysis import metrics as M
from moe_route.stats import LayerStats, RoutingStats

LANGUAGES = ["eng_Latn", "bam_Latn", "fra_Latn", "tha_Thai", "pes_Arab", "arb_Arab", "arb_Latn",
             "ary_Arab", "hin_Deva", "zho_Hans", "srp_Cyrl", "lit_Latn", "ory_Orya", "ben_Beng",
             "asm_Beng"]


def synthetic_stats(n_lang: int, n_seq: int, L: int, E: int, k: int, seed: int = 0
                    ) -> RoutingStats:
    """Per-sequence statistics with a U-shaped language effect over depth."""
    g = torch.Generator().manual_seed(seed)
    langs = (LANGUAGES + [f"lang{i}" for i in range(len(LANGUAGES), n_lang)])[:n_lang]
    names = [f"{lang}/{i}" for lang in langs for i in range(n_seq)]
    G = len(names)
    lang_of = torch.arange(n_lang).repeat_interleave(n_seq)
    lang_bias = torch.randn(n_lang, E, generator=g)
    tokens = torch.randint(40, 300, (G,), generator=g)
    layers = []
    for l in range(L):
        depth = l / max(1, L - 1)
        language_strength = 2.0 * (2 * depth - 1) ** 2 + 0.2     # high at both ends
        sharpness = 1.0 + 2.0 * depth                              # entropy falls with depth
        logits = (torch.randn(E, generator=g) + language_strength * lang_bias[lang_of]
                  + 0.3 * torch.randn(G, E, generator=g)) * sharpness
        q = torch.softmax(logits, -1)                                          # [G, E]
        freq = (k * q).clamp_max(1.0)
        counts = (freq * tokens[:, None]).round().to(torch.int64)
        total = counts.sum(0)
        coact = torch.outer(total, total) // max(1, int(total.sum()))
        coact.diagonal().copy_(total)
        layers.append(LayerStats(
            f"model.layers.{l}.mlp.gate", l, k, tokens=tokens.clone(), counts=counts,
            weight_sum=(q * counts).float(), prob_sum=(q * tokens[:, None]).float(),
            entropy_sum=(torch.special.entr(q).sum(-1) * tokens * 0.8).float(), coact=coact))
    return RoutingStats(layers, names, {"synthetic": True})


def synthetic_trace(n_groups: int, tokens_per_group: int, E: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    N = n_groups * tokens_per_group
    ids = torch.argsort(torch.rand(N, E, generator=g), dim=1)[:, :k].to(torch.int16)
    groups = [f"g{i % n_groups}" for i in range(N)]
    token_ids = torch.randint(0, 32000, (N,), generator=g)
    return ids, groups, token_ids


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:  # not Linux
        return "n/a"


def time_it(fn, repeat: int):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--languages", type=int, default=15)
    ap.add_argument("--sequences", type=int, default=500)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's). On a shared machine whose "
                         "cores are busy, 1 thread (or OMP_WAIT_POLICY=PASSIVE) can be ~4x "
                         "faster than 2 spinning threads")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    L, E, k = args.layers, args.experts, args.top_k

    t0 = time.perf_counter()
    stats = synthetic_stats(args.languages, args.sequences, L, E, k)
    build_s = time.perf_counter() - t0
    G = stats.num_groups
    ref = "eng_Latn"
    print(f"synthetic RoutingStats: L={L} G={G} ({args.languages} languages x {args.sequences} "
          f"sequences) E={E} k={k}; fp32 sums / int64 counts on cpu; built in {build_s:.1f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores "
          f"(load average {_load()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})"
          f"; repeat={args.repeat}")

    names = stats.group_names
    eng_names = [n for n in names if n.startswith(ref + "/")]
    task_names = [n for n in names if n.startswith("zho_Hans/")]  # stands in for task data
    accuracy = {lang: 0.3 + 0.04 * i for i, lang in enumerate(LANGUAGES[:args.languages])}
    parallel = M.parse_parallel_groups(names)
    cache = {}

    def divergence():
        cache["div"] = M.routing_divergence(stats, ref, parallel=parallel)
        return cache["div"]

    def top_k_jaccard_vs_reference():
        freq = M.activation_frequency(stats)                                # [L, G, E]
        rows = parallel.rows
        ref_rows = rows[parallel.language_index(ref)]
        return M.expert_set_jaccard(freq[:, rows], freq[:, ref_rows].unsqueeze(1), m=k)

    def language_level():
        pooled = M.pool_by_language(stats, parallel)
        return M.routing_divergence(pooled, ref), M.pairwise_divergence(M.expert_importance(pooled))

    def identify_and_plan():
        task = X.task_experts(stats.group(task_names), stats.group(eng_names), 0.3)
        lang = X.language_experts(stats, 0.3, ref, parallel=parallel)
        overlap = X.expert_overlap(task, lang)
        plan = X.plan_from_experts(task, "soft", 0.5, layers=range(7, 34), max_per_layer=k)
        return task, lang, overlap, plan

    metrics = [
        ("parse_parallel_groups", lambda: M.parse_parallel_groups(names)),
        ("expert_importance dense", lambda: M.expert_importance(stats, "dense")),
        ("expert_importance routed", lambda: M.expert_importance(stats, "routed")),
        ("activation_frequency", lambda: M.activation_frequency(stats)),
        ("routing_divergence (Eq.2, D_HJS)", divergence),
        ("routing_divergence raw JSD",
         lambda: M.routing_divergence(stats, ref, parallel=parallel, normalised=False)),
        ("pool_by_language + language-level + pairwise", language_level),
        ("language_divergence, 3 heatmap layers",
         lambda: M.language_divergence(stats, [0, L // 2, L - 1], parallel=parallel)),
        ("language_divergence, every layer",
         lambda: M.language_divergence(stats, parallel=parallel)),
        ("routing_entropy tokens", lambda: M.routing_entropy(stats, of="tokens",
                                                             normalised=True)),
        ("routing_entropy importance", lambda: M.routing_entropy(stats, of="importance")),
        ("mean_pairwise_overlap", lambda: M.mean_pairwise_overlap(stats)),
        ("expert_set_jaccard top-k vs reference", top_k_jaccard_vs_reference),
        ("coactivation + conditional", lambda: M.conditional_coactivation(stats)),
        ("load_balance per layer", lambda: M.load_balance(stats)),
        ("load_balance per group", lambda: M.load_balance(stats.stack("counts"))),
        ("task/language experts + overlap + plan", identify_and_plan),
        ("divergence_accuracy_correlation",
         lambda: M.divergence_accuracy_correlation(cache["div"], accuracy, range(7, 34))),
    ]
    total = 0.0
    print(f"{'metric':48s} {'median s':>9s} {'min..max s':>15s}")
    for name, fn in metrics:
        _, times = time_it(fn, args.repeat)
        med = statistics.median(times)
        total += med
        print(f"{name:48s} {med:9.3f} {min(times):7.3f}..{max(times):<7.3f}")
    print(f"{'TOTAL (sum of medians)':48s} {total:9.3f}   target < 10 s: "
          f"{'met' if total < 10 else 'MISSED'} (load average now {_load()})")

    corr = M.divergence_accuracy_correlation(cache["div"], accuracy, range(7, 34))
    mid = cache["div"]["bam_Latn"] if "bam_Latn" in cache["div"] else None
    if mid is not None:
        print(f"sanity: bam_Latn divergence first/middle/last layer = {float(mid[0]):.3f} / "
              f"{float(mid[L // 2]):.3f} / {float(mid[-1]):.3f} (U-shape); pearson r = "
              f"{corr.pearson:+.3f}")

    n_groups, per_group = 500, 200
    ids, groups, token_ids = synthetic_trace(n_groups, per_group, E, k)
    print(f"\nsynthetic trace, one layer: N={ids.shape[0]} tokens in {n_groups} groups of "
          f"{per_group}, k={k}, E={E}")
    trace_metrics = [
        ("routing_consistency all pairs", lambda: M.routing_consistency(ids, groups)),
        ("routing_consistency adjacent", lambda: M.routing_consistency(ids, groups, "adjacent")),
        ("expert_token_counts + entropy + specialisation",
         lambda: [f(M.expert_token_counts(ids, token_ids, E))
                  for f in (M.expert_token_entropy, M.token_specialisation)]),
    ]
    for name, fn in trace_metrics:
        _, times = time_it(fn, args.repeat)
        print(f"{name:48s} {statistics.median(times):9.3f} {min(times):7.3f}..{max(times):<7.3f}")


if __name__ == "__main__":
    main()
