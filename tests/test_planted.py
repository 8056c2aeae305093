"""The planted-structure model: the public record/steer API recovers what was planted.

Only ``moe_route.record`` / ``moe_route.steer`` / ``RoutingStats`` are used; every metric is
computed inline, so these tests check the planted model and the recording path independently of
the analysis package.
"""
import contextlib
import math

import pytest
import torch

import moe_route
from moe_route import SteeringPlan

pytest.importorskip("transformers")
from moe_route.testing import planted_model  # noqa: E402

# Δ-expert threshold: the paper uses 0.25-0.5; 0.25 is the permissive end (most false positives
# possible). Planted task experts have Δ >= 0.35 in both configurations (0.5 when every task
# concept routes to every task expert; checked below), every other expert Δ <= 0 in expectation.
TAU = 0.25

CONFIGS = {
    "default": dict(),  # 5 languages, 8 layers, E=16, top-2, 2 task experts
    "wide": dict(num_languages=4, num_layers=12, num_experts=32, top_k=4, num_task_experts=5,
                 seed=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pm(request):
    return planted_model(**CONFIGS[request.param])


def _record_per_sequence(pm, corpus):
    """Statistics with one group per sequence, named "{language}/{i}"."""
    with moe_route.record(pm.model) as rec, torch.no_grad():
        for lang, seqs in corpus.items():
            rec.set_groups(torch.arange(len(seqs)), [f"{lang}/{i}" for i in range(len(seqs))])
            pm.model(input_ids=seqs)
    return rec.stats


def _record_groups(pm, batches, plan=None):
    """Statistics with one group per named batch, optionally under a steering plan."""
    steering = moe_route.steer(pm.model, plan) if plan is not None else contextlib.nullcontext()
    with steering, moe_route.record(pm.model) as rec, torch.no_grad():
        for name, seqs in batches.items():
            with rec.group(name):
                pm.model(input_ids=seqs)
    return rec.stats


def _entropy(p):
    return -(p * p.clamp_min(1e-10).log()).sum(-1)


def _kl(p, q):
    return (p * (p.clamp_min(1e-10).log() - q.clamp_min(1e-10).log())).sum(-1)


def _hjs(p, q):
    """Entropy-normalised Jensen-Shannon divergence (the paper's Eq. 2 / App. A.4), natural log."""
    m = (p + q) / 2
    jsd = (_kl(p, m) + _kl(q, m)) / 2
    return jsd / (math.log(p.shape[-1]) - (_entropy(p) + _entropy(q)) / 2).clamp_min(1e-6)


def _divergence(stats, languages, n):
    """{language: [layers] mean over sentences of D_HJS(importance of the reference's sentence i,
    importance of the language's sentence i)}, importance = prob_sum / tokens (dense, Eq. 1)."""
    imp = stats.stack("prob_sum") / stats.stack("tokens")[..., None]   # [layers, G, E]
    row = {name: g for g, name in enumerate(stats.group_names)}
    ref = imp[:, [row[f"{languages[0]}/{i}"] for i in range(n)]]
    return {lang: _hjs(ref, imp[:, [row[f"{lang}/{i}"] for i in range(n)]]).mean(1)
            for lang in languages[1:]}


def test_routing_is_the_planted_routing(pm):
    """Early/late layers send every token of a language to its own experts; middle layers send a
    concept to the same experts in every language."""
    truth = pm.truth
    stats = _record_groups(pm, pm.corpus)
    assert stats.layer_indices == list(range(len(truth.layer_roles)))
    for layer in stats:
        for g, lang in enumerate(stats.group_names):
            counts, tokens = layer.counts[g], int(layer.tokens[g])
            if layer.index in truth.middle_layers:
                concepts = pm.corpus[lang] % pm.concepts_per_language
                expected = torch.zeros_like(counts)
                for c in concepts.flatten().tolist():
                    expected[list(truth.concept_experts[layer.index][c])] += 1
                assert torch.equal(counts, expected), (layer.name, lang)
            else:
                experts = list(truth.language_experts[layer.index][lang])
                assert counts[experts].tolist() == [tokens] * len(experts), (layer.name, lang)
                assert int(counts.sum()) == tokens * layer.top_k


def test_divergence_from_reference_is_u_shaped(pm):
    """Per-layer mean divergence of each language's per-sequence dense importance from its
    parallel reference sequence: every middle layer < 1/3 of every early/late layer."""
    truth = pm.truth
    n = len(pm.corpus[truth.reference])
    stats = _record_per_sequence(pm, pm.corpus)
    assert stats.num_groups == len(truth.languages) * n
    div = _divergence(stats, truth.languages, n)
    curve = torch.stack(list(div.values())).mean(0)                    # [layers]
    middle, edges = list(truth.middle_layers), truth.early_layers + truth.late_layers
    assert curve[middle].max() < curve[list(edges)].min() / 3, curve.tolist()
    assert tuple("low" if curve[i] < curve.max() / 3 else "high"
                 for i in range(len(curve))) == truth.divergence_shape
    # the planted leak grows with the language index: so does middle-layer divergence, while
    # the planted task accuracy falls (alignment with the reference tracks accuracy)
    mid = [float(div[lang][middle].mean()) for lang in truth.languages[1:]]
    assert mid == sorted(mid), mid
    acc = [truth.task_accuracy[lang] for lang in truth.languages]
    assert acc == sorted(acc, reverse=True) and acc[0] == 1.0 and acc[-1] < acc[0], acc


def test_task_experts_are_recovered_exactly(pm):
    """Δ = activation frequency (a/L) on reference task data minus on reference baseline data;
    experts with Δ > TAU are exactly the planted task experts, in middle layers only."""
    truth, ref = pm.truth, pm.truth.reference
    assert min(d for layer in truth.task_delta.values() for d in layer.values()) >= TAU + 0.1
    stats = _record_groups(pm, {"task": pm.task_corpus[ref], "baseline": pm.baseline_corpus[ref]})
    freq = stats.stack("counts") / stats.stack("tokens")[..., None]  # [layers, 2, E]
    task, base = stats.group_names.index("task"), stats.group_names.index("baseline")
    delta = freq[:, task] - freq[:, base]
    for layer, index in enumerate(stats.layer_indices):
        found = set((delta[layer] > TAU).nonzero().flatten().tolist())
        assert found == set(truth.task_experts.get(index, ())), (index, delta[layer].tolist())
        for e, planted in truth.task_delta.get(index, {}).items():
            assert delta[layer, e].item() == pytest.approx(planted, abs=1e-6)


def test_steering_task_experts(pm):
    """Forcing the task experts on routes baseline tokens to them (and no other layer changes);
    the paper's soft steering (+0.5 std) raises task accuracy in the leaky languages and keeps the
    reference's; forcing them off drops accuracy to 0."""
    truth, ref = pm.truth, pm.truth.reference
    experts = {layer: list(e) for layer, e in truth.task_experts.items()}
    batches = {"baseline": pm.baseline_corpus[ref]}

    def task_slots(stats):  # [layers] routed slots per token that go to the planted task experts
        counts, tokens = stats.stack("counts")[:, 0], stats.stack("tokens")[:, 0]
        return torch.tensor([float(counts[i, experts.get(idx, [])].sum()) / float(tokens[i])
                             for i, idx in enumerate(stats.layer_indices)])

    plain = _record_groups(pm, batches)
    k = plain[0].top_k
    past_k = any(len(e) > k for e in experts.values())   # "wide": 5 task experts, top-4
    with pytest.warns(UserWarning, match=f"into a top-{k}") if past_k else \
            contextlib.nullcontext():
        forced = _record_groups(pm, batches, SteeringPlan.force(None, experts))
    middle = list(truth.middle_layers)
    assert task_slots(plain)[middle].tolist() == [0.0] * len(middle)
    assert task_slots(forced)[middle].tolist() == \
        [float(min(k, len(experts[i]))) for i in middle]
    for i, index in enumerate(plain.layer_indices):
        if index not in truth.middle_layers:
            assert torch.equal(plain[i].counts, forced[i].counts), index

    promoted = _record_groups(pm, batches, SteeringPlan.promote(None, experts, std=0.5))
    importance = [s.stack("prob_sum")[:, 0] / s.stack("tokens")[:, 0, None]
                  for s in (plain, promoted)]
    for i in middle:
        assert importance[1][i, experts[i]].sum() > 2 * importance[0][i, experts[i]].sum()

    before = pm.accuracy_by_language()
    assert before == pytest.approx(truth.task_accuracy, abs=1e-9)
    with moe_route.steer(pm.model, SteeringPlan.promote(None, experts, std=0.5)):
        after = pm.accuracy_by_language()
    with moe_route.steer(pm.model, SteeringPlan.force(None, experts, on=False)):
        off = pm.accuracy_by_language()
    assert after[ref] == before[ref] == 1.0
    assert all(after[lang] >= before[lang] for lang in truth.languages), (before, after)
    assert sum(after.values()) > sum(before.values()) + 0.5, (before, after)
    assert set(off.values()) == {0.0}, off
    assert pm.accuracy_by_language() == before  # steering is undone on exit


def test_build_is_deterministic_and_validated():
    a, b = planted_model(num_layers=4, seed=3), planted_model(num_layers=4, seed=3)
    assert a.truth == b.truth
    for name, pa in a.model.state_dict().items():
        assert torch.equal(pa, b.model.state_dict()[name]), name
    assert all(torch.equal(a.corpus[lang], b.corpus[lang]) for lang in a.languages)
    with pytest.raises(ValueError, match="num_languages \\* top_k = 18 must be <= num_experts=16"):
        planted_model(num_languages=9)
    with pytest.raises(ValueError, match="route_logit=5.0 must exceed middle_leak"):
        planted_model(route_logit=5.0)
