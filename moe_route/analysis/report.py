"""A report directory from routing statistics: JSON + CSV tables, PNG plots, a text summary.

``write_report(out_dir, stats, reference="eng_Latn", ...)`` writes

    summary.txt                  what was measured and the headline numbers, in words
    divergence.json / .csv       Div[language, layer] from the reference (Eq. 2, D_HJS)
    divergence_by_layer.png      one curve per language over the layers (the paper's U shape)
    language_divergence_L{l}.png language x language divergence heatmaps at chosen layers (the
                                 curves' mean over parallel sentences, for every pair)
    expert_usage.png             activation frequency per layer and expert, reference language
    experts.json, delta.png      task experts and the histogram of delta with the threshold tau
    plan.json                    the steering plan built from them (SteeringPlan JSON)
    ab.json                      evaluation with and without steering (paired per question:
                                 gained, lost, 95% interval, McNemar p)
    agreement.json               per layer, how much of the routing steering kept (trace_agreement)
    correlation.json             middle-layer divergence vs accuracy (Pearson, Spearman)

Layers are labelled by their decoder-layer index; a loop layer's passes (Inkling2-Loop) as
``"7@pass0"``, ``"7@pass1"``, in the order the model routes them.

Plots need matplotlib (``pip install moe_route[analysis]``); without it the tables and the summary
are still written and the summary says so. Files are written to a temporary name and renamed.
A report written into the folder of an earlier one removes the files of that report (its
summary.json lists them) that it did not write itself (a correlation.json, a heatmap of another
layer), so each belongs to its summary.json; other files there (``evaluate``'s) stay.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from moe_route._atomic import write_text_atomic
from moe_route.hf.patch import PASS, layer_path, layer_positions, split_site
from moe_route.analysis.evaluation import format_paired
from moe_route.analysis.metrics import (RoutingAgreement, activation_frequency,
                                        divergence_accuracy_correlation, language_divergence,
                                        pool_by_language, routing_divergence)
from moe_route.stats import RoutingStats
from moe_route.steering import SteeringPlan

__all__ = ["write_report"]


def write_report(out_dir, stats: RoutingStats, reference: str, *,
                 heatmap_layers: Optional[Sequence] = None,
                 middle_layers: Optional[Sequence] = None,
                 delta: Optional[torch.Tensor] = None, tau: Optional[float] = None,
                 experts: Optional[Mapping] = None, plan: Optional[SteeringPlan] = None,
                 ab: Optional[Mapping] = None, accuracy: Optional[Mapping[str, float]] = None,
                 agreement: Optional[Mapping[str, RoutingAgreement]] = None,
                 title: str = "moe_route routing report", kind: str = "dense") -> dict:
    """Write the report for per-sequence parallel ``stats`` (groups ``"{language}/{i}"``).

    ``kind``: the expert importance the divergences compare (``expert_importance``): "dense"
    (the paper's Eq. 1) or "routed" (the routed weights; for statistics of
    ``trace_statistics(trace, renormalize=True)``, the author's later per-token renormalised
    importance).

    ``heatmap_layers`` / ``middle_layers``: decoder-layer indices or layer names
    (``layer_positions``; default: the first, middle and last MoE layer; the middle third of
    them). ``delta`` ``[L, E]`` with ``tau`` and
    ``experts`` (``task_experts``), ``plan``, ``ab`` (``ab_test``), ``accuracy`` (per language)
    and ``agreement`` (``trace_agreement`` of unsteered and steered runs, keyed by the
    statistics' layer names) are optional. Returns the summary as a dict (also in
    ``summary.json``).
    """
    if not isinstance(stats, RoutingStats):
        raise TypeError(f"write_report: stats must be a RoutingStats, got {type(stats).__name__}")
    L = len(stats)
    indices = _layer_labels(stats)
    names = stats.layer_names
    middle = (list(range(L // 3, L - L // 3)) if middle_layers is None
              else sorted(layer_positions(names, middle_layers, "write_report", "middle_layers",
                                         indices=stats.layer_indices)))
    heat = (sorted({0, L // 2, L - 1}) if heatmap_layers is None
            else layer_positions(names, heatmap_layers, "write_report", "heatmap_layers",
                                 indices=stats.layer_indices))
    if not middle:
        raise ValueError(f"write_report: middle_layers must name at least one layer, got "
                         f"{middle_layers!r}")
    by_name = dict(zip(stats.layer_names, indices))
    unknown = [name for name in (agreement or {}) if name not in by_name]
    if unknown:
        raise ValueError(f"write_report: agreement names layers the statistics lack: "
                         f"{unknown[:4]}; their layers are {stats.layer_names[:4]}"
                         f"{' ...' if L > 4 else ''}")
    # everything that can refuse the arguments runs before the first file is written
    div = {lang: d.tolist() for lang, d in routing_divergence(stats, reference,
                                                              kind=kind).items()}
    corr = None if accuracy is None else divergence_accuracy_correlation(
        {k: torch.tensor(v) for k, v in div.items()}, accuracy, middle)
    os.makedirs(out_dir, exist_ok=True)
    earlier = _files_of_report(out_dir)

    edge = [p for p in range(L) if p not in middle]
    importance = kind if kind == "dense" or not stats.meta.get("renormalized") else \
        "routed, renormalised per token"
    summary = {"title": title, "reference": reference, "layers": indices,
               "languages": [reference] + sorted(div), "sequences": len(stats.group_names),
               "middle_layers": [indices[p] for p in middle], "importance": importance}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    curve = [mean([div[lang][p] for lang in div if not math.isnan(div[lang][p])]) for p in range(L)]
    summary["mean_divergence_by_layer"] = curve
    summary["middle_mean"] = mean([curve[p] for p in middle])
    summary["edge_mean"] = mean([curve[p] for p in edge])
    _write_json(out_dir, "divergence.json", {"reference": reference, "layers": indices,
                                             "divergence": div})
    _write_csv(out_dir, "divergence.csv", ["language"] + [f"layer_{i}" for i in indices],
               [[lang] + vals for lang, vals in sorted(div.items())])

    pooled = pool_by_language(stats)
    freq = activation_frequency(pooled)                                # [L, languages, E]
    ref_row = pooled.group_names.index(reference)
    plots = []
    plt = _pyplot()
    if plt is not None:
        plots.append(_plot_curves(plt, out_dir, indices, div, middle, reference))
        languages, pairs = language_divergence(stats, [names[p] for p in heat], kind=kind)
        for p, matrix in zip(heat, pairs):
            plots.append(_plot_heatmap(plt, out_dir, matrix, languages, indices[p]))
        plots.append(_plot_usage(plt, out_dir, freq[:, ref_row], indices, reference))
        if delta is not None:
            plots.append(_plot_delta(plt, out_dir, delta, tau))
    summary["plots"] = [p for p in plots if p]
    if plt is None:
        summary["plots_skipped"] = "matplotlib is not installed (pip install moe_route[analysis])"

    if experts is not None:
        chosen = {str(k): list(v) for k, v in experts.items() if len(v)}
        _write_json(out_dir, "experts.json", {"tau": tau, "experts": chosen})
        summary["experts"] = chosen
    if plan is not None:
        _write_text(out_dir, "plan.json", plan.to_json(indent=2))
    if ab is not None:
        _write_json(out_dir, "ab.json", ab)
        summary["ab"] = ab
    if agreement is not None:
        summary["agreement"] = {str(by_name[name]): r._asdict() for name, r in agreement.items()}
        _write_json(out_dir, "agreement.json", summary["agreement"])
    if corr is not None:
        summary["correlation"] = {"pearson": float(corr.pearson), "spearman": float(corr.spearman)}
        _write_json(out_dir, "correlation.json", summary["correlation"])
    summary["files"] = sorted({"divergence.json", "divergence.csv", "summary.json",
                               "summary.txt", *summary["plots"], *(name for name, given in (
                                   ("experts.json", experts), ("plan.json", plan),
                                   ("ab.json", ab), ("agreement.json", agreement),
                                   ("correlation.json", corr)) if given is not None)})
    _write_json(out_dir, "summary.json", summary)
    _write_text(out_dir, "summary.txt", _summary_text(summary))
    for name in earlier - set(summary["files"]):
        os.remove(os.path.join(out_dir, name))
    return summary


# What a report may write besides the files every report writes (what an earlier report whose
# summary.json lists no files may have left)
_OPTIONAL = ("experts.json", "plan.json", "ab.json", "agreement.json", "correlation.json",
             "delta.png", "divergence_by_layer.png", "expert_usage.png")
_HEATMAP = re.compile(r"language_divergence_L.+\.png")


def _files_of_report(out_dir) -> set:
    """The files of an earlier report in ``out_dir`` that are still there: those its
    summary.json lists (a report made before the list: the report files there), none without
    one. Only these are removed when a new report replaces it; another command's files there
    (``evaluate``'s ab.json) stay."""
    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            listed = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    present = set(os.listdir(out_dir))
    if isinstance(listed, list):
        return present & {name for name in listed if isinstance(name, str)
                          and name == os.path.basename(name)}
    return {name for name in present if name in _OPTIONAL or _HEATMAP.fullmatch(name)}


def _layer_labels(stats: RoutingStats) -> list:
    """Each layer's label: its decoder-layer index (its position where it has none), with the
    pass for a loop layer's ("7@pass1" for ``model.layers.7.mlp.gate@pass1``). Where two layers
    would share a label (an encoder's and a decoder's layer 0), each is its module path up to its
    index ("encoder.block.0"), or its whole name."""
    labels = []
    for p, (name, index) in enumerate(zip(stats.layer_names, stats.layer_indices)):
        label = index if index is not None else p
        loop_pass = split_site(name)[1]
        labels.append(label if loop_pass is None else f"{label}{PASS}{loop_pass}")
    shared = {label for label in labels if labels.count(label) > 1}
    for p, name in enumerate(stats.layer_names):
        if labels[p] in shared:
            path, loop_pass = split_site(name)
            labels[p] = layer_path(path) + ("" if loop_pass is None else f"{PASS}{loop_pass}")
    if len(set(labels)) < len(labels):
        return list(stats.layer_names)
    return labels


def _summary_text(s: dict) -> str:
    lines = [s["title"], "=" * len(s["title"]), "",
             f"{len(s['languages'])} languages ({', '.join(s['languages'])}), reference "
             f"{s['reference']}; {s['sequences']} sequences; {len(s['layers'])} MoE layers.",
             "", f"Routing divergence from the reference (entropy-normalised JS of the "
             f"{s['importance']} expert importance, mean over languages and parallel "
             f"sequences), by layer:"]
    lines += [f"  layer {i:>3}: {d:.3f}"
              for i, d in zip(s["layers"], s["mean_divergence_by_layer"])]
    ratio = s["middle_mean"] / s["edge_mean"] if s["edge_mean"] else float("nan")
    lines += ["", f"Middle layers {s['middle_layers']}: mean {s['middle_mean']:.3f}; other layers: "
              f"{s['edge_mean']:.3f} (ratio {ratio:.2f}; the paper's finding is < 1: routing "
              f"aligns across languages in the middle)."]
    if "experts" in s:
        n = sum(len(v) for v in s["experts"].values())
        lines += ["", f"Task experts: {n} in {len(s['experts'])} layers: "
                  + "; ".join(f"layer {k}: {v}" for k, v in s["experts"].items())]
    if "ab" in s and "paired" in s["ab"]:
        lines += ["", "Steering A/B, the same questions without and with the plan (delta with a "
                  "95% interval; gained/lost: questions that turned right/wrong; p: exact "
                  "McNemar):"]
        lines += ["  " + line for line in format_paired(s["ab"]["paired"])]
    elif "ab" in s:
        lines += ["", f"Steering A/B: baseline {json.dumps(s['ab']['baseline'])}",
                  f"              steered  {json.dumps(s['ab']['steered'])}",
                  f"              delta    {json.dumps(s['ab']['delta'])}"]
    if "agreement" in s:
        lines += ["", "Routing under steering against the unsteered run, per token: top-k "
                  "overlap, same top-1, routed weight moved (½ Σ_e |Δw|):"]
        lines += [f"  layer {i:>3}: overlap {r['overlap']:.3f}  top-1 {r['top1']:.3f}  "
                  f"weight moved {r['weight_shift']:.4f}" for i, r in s["agreement"].items()]
    if "correlation" in s:
        c = s["correlation"]
        lines += ["", f"Middle-layer divergence vs accuracy: Pearson {c['pearson']:.3f}, "
                  f"Spearman {c['spearman']:.3f}"]
    if "plots" in s:
        lines += ["", "Plots: " + ", ".join(s["plots"])]
    if "plots_skipped" in s:
        lines += ["", "Plots skipped: " + s["plots_skipped"]]
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, out_dir, name) -> str:
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return name


def _plot_curves(plt, out_dir, indices, div, middle, reference):
    fig, ax = plt.subplots(figsize=(7, 4))
    # x: decoder-layer indices; a model with loop layers (labels "7@pass1") plots its layers in
    # routing order, one step each, labelled
    x = indices if all(isinstance(i, int) for i in indices) else list(range(len(indices)))
    for lang, vals in sorted(div.items()):
        ax.plot(x, vals, marker="o", ms=3, label=lang)
    if x is not indices:
        ax.set_xticks(x, [str(i) for i in indices], rotation=90, fontsize=7)
    lo, hi = x[middle[0]], x[middle[-1]]
    ax.axvspan(lo - 0.5, hi + 0.5, color="grey", alpha=0.12, label="middle layers")
    ax.set(xlabel="layer", ylabel=f"divergence from {reference}\n(entropy-normalised JS, mean "
                                  f"over parallel sentences)",
           title="Routing divergence by layer")
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, out_dir, "divergence_by_layer.png")


def _plot_heatmap(plt, out_dir, matrix, languages, layer):
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0)   # NaN (no shared sentence): blank
    ax.set_xticks(range(len(languages)), languages, rotation=90, fontsize=7)
    ax.set_yticks(range(len(languages)), languages, fontsize=7)
    ax.set_title(f"Language divergence, layer {layer}")
    fig.colorbar(im, ax=ax, label="entropy-normalised JS, mean over parallel sentences")
    return _save(plt, fig, out_dir, f"language_divergence_L{layer}.png")


def _plot_usage(plt, out_dir, freq, indices, reference):
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow(freq.numpy(), aspect="auto", cmap="magma", vmin=0)
    ax.set(xlabel="expert", ylabel="layer", title=f"Activation frequency ({reference})")
    ax.set_yticks(range(len(indices)), indices, fontsize=7)
    fig.colorbar(im, ax=ax, label="share of tokens routed to the expert")
    return _save(plt, fig, out_dir, "expert_usage.png")


def _plot_delta(plt, out_dir, delta, tau):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = delta[~torch.isnan(delta)].flatten().numpy()
    ax.hist(values, bins=60, color="tab:blue")
    if tau is not None:
        ax.axvline(tau, color="tab:red", ls="--", label=f"tau = {tau}")
        ax.legend()
    ax.set(xlabel="delta activation frequency (task - baseline)", ylabel="experts x layers",
           title="Task-expert threshold")
    return _save(plt, fig, out_dir, "delta.png")


def _write_json(out_dir, name, obj):
    """Strict JSON: a NaN (a language with no sentence to compare) is written as null."""
    _write_text(out_dir, name, json.dumps(_nan_to_none(obj), indent=2, allow_nan=False,
                                          default=lambda x: _nan_to_none(float(x))))


def _nan_to_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _write_csv(out_dir, name, header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    _write_text(out_dir, name, buf.getvalue())


def _write_text(out_dir, name, text):
    write_text_atomic(os.path.join(out_dir, name), text)
