"""``moe-route demo``: the whole multilingual-routing study, offline, on the planted model.

The planted model (``moe_route.testing.planted_model``) is a real OLMoE architecture whose routers
are built so the answer is known: language-specific routing in the early and late layers, shared
routing in the middle, planted task experts. The demo runs what a user runs on a real model --
per-sequence recording of a parallel corpus, divergence from the reference language, task
experts from task vs baseline data, a steering plan, an A/B evaluation, the per-layer agreement of
steered and unsteered routing -- writes the report, and checks the result against what was
planted.
"""
from __future__ import annotations

import time

import torch

from moe_route.analysis.experts import mean_activation_frequency, plan_from_experts, task_experts
from moe_route.analysis.evaluation import choice_accuracy
from moe_route.analysis.pipeline import ab_test, record_parallel, record_sequences
from moe_route.analysis.metrics import trace_agreement
from moe_route.analysis.report import write_report
from moe_route.recording import record
from moe_route.steering import steer

__all__ = ["run_demo"]

TAU = 0.25  # the low end of the paper's 0.25-0.5 range; planted task experts have delta 0.5


def run_demo(out_dir: str = "moe_route_demo", *, seed: int = 0, progress: bool = True) -> dict:
    """Run the study on the planted model, write the report to ``out_dir``; returns the summary
    plus ``checks`` (did the analysis recover what was planted) and ``seconds``."""
    from moe_route.testing import planted_model

    t0 = time.perf_counter()
    pm = planted_model(seed=seed)
    truth = pm.truth
    say = print if progress else (lambda *a, **k: None)
    say(f"planted OLMoE: {len(truth.layer_roles)} layers ({', '.join(truth.layer_roles)}), "
        f"languages {', '.join(pm.languages)}")

    stats = record_parallel(pm.model, pm.corpus, batch_size=64)
    say(f"recorded {len(stats.group_names)} sequences x {len(stats)} MoE layers")
    task = record_sequences(pm.model, {"task": pm.task_corpus[pm.reference]}, batch_size=64)
    base = record_sequences(pm.model, {"base": pm.baseline_corpus[pm.reference]}, batch_size=64)
    delta = mean_activation_frequency(task) - mean_activation_frequency(base)
    experts = task_experts(task, base, TAU)
    middle = list(truth.middle_layers)
    plan = plan_from_experts(experts, mode="soft", lam=0.5, layers=middle)
    questions = pm.choice_items()          # the task as multiple choice, one per task token
    ab = ab_test(pm.model, plan, lambda: choice_accuracy(pm.model, questions, batch_size=256))
    plain = _trace(pm.model, pm.task_corpus)
    with steer(pm.model, plan):
        steered = _trace(pm.model, pm.task_corpus)
    agreement = trace_agreement(plain, steered)
    summary = write_report(out_dir, stats, pm.reference, middle_layers=middle, delta=delta,
                           tau=TAU, experts=experts, plan=plan, ab=ab,
                           accuracy=ab["baseline"], agreement=agreement,
                           title="moe_route demo: planted OLMoE")
    planted = {layer: sorted(e) for layer, e in truth.task_experts.items()}
    found = {layer: sorted(e) for layer, e in experts.items() if e}
    summary["checks"] = {
        "middle_over_edge_divergence": summary["middle_mean"] / summary["edge_mean"],
        "u_shape (< 1/3)": summary["middle_mean"] < summary["edge_mean"] / 3,
        "task_experts_exact": found == planted,
        "steering_helps": sum(ab["delta"].values()) > 0,
        "steering_gain_significant (p < 0.01)": ab["paired"]["all"]["p_value"] < 0.01,
        # the plan moves routing weight in the layers it steers, and none before them
        "steering_moves_steered_layers": all(
            summary["agreement"][str(i)]["weight_shift"] > 0 for i in plan),
        "steering_leaves_earlier_layers": all(
            summary["agreement"][str(i)]["weight_shift"] == 0.0 for i in stats.layer_indices
            if i < min(plan)),
    }
    summary["seconds"] = time.perf_counter() - t0
    for name, value in summary["checks"].items():
        say(f"  {name}: {value}")
    say(f"report: {out_dir}/summary.txt ({summary['seconds']:.1f} s)")
    return summary


def _trace(model, corpus) -> dict:
    """Per-token routing of every sequence of ``corpus`` (``rec.trace``)."""
    with record(model, trace=True) as rec, torch.no_grad():
        for seqs in corpus.values():
            model(input_ids=seqs)
    return rec.trace
