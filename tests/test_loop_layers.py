"""Loop layers: Inkling2-Loop runs decoder layers [loop_start, loop_end) several times per forward,
so their routers route once per *pass*. Each pass is a routing site of its own,
``"<router path>@pass<p>"``: recorded as a layer of its own, steered and replayed on its own.

The tiny model (``tiny_models``) has three layers; layer 1 loops twice, so a forward routes
layer 0, layer 1 pass 0, layer 1 pass 1, layer 2. Known answers: the unpatched routers' outputs
call by call, the gate's force steering (a forced expert is in every token's top-k), and a
replayed run's own trace.
"""
import re

import pytest
import torch

import moe_route
from moe_route.analysis import layer_keys, plan_from_experts

from tiny_models import build, enable_checkpointing

pytest.importorskip("transformers")

L0, LOOP, L2 = (f"model.layers.{i}.mlp.gate" for i in range(3))
SITES = [L0, f"{LOOP}@pass0", f"{LOOP}@pass1", L2]
B, S = 2, 6


@pytest.fixture(scope="module")
def model():
    return build("inkling2_loop")


def _ids(seed=23, shape=(B, S)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _trace(model, ids, plan=None):
    with moe_route.steer(model, plan or moe_route.SteeringPlan({})), \
            moe_route.record(model, trace=True) as rec, torch.no_grad():
        out = model(ids)
    return rec, out


def _own_calls(model, ids):
    """Every call of the unpatched loop router, in order: its (logits, weights, ids)."""
    calls = []
    hook = model.get_submodule(LOOP).register_forward_hook(lambda m, a, out: calls.append(out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return calls


def test_each_pass_is_a_layer_of_its_own(model):
    """Pass p's statistics and trace are those of the router's p-th call in the forward; the
    layers come in the order the forward routes them, each with the decoder-layer index."""
    ids = _ids()
    calls = _own_calls(model, ids)
    assert len(calls) == 2 and not torch.equal(calls[0][2], calls[1][2])  # passes differ
    rec, _ = _trace(model, ids)
    stats = rec.stats
    assert stats.layer_names == SITES and list(rec.trace) == SITES
    assert stats.layer_indices == [0, 1, 1, 2]
    for p, (z, w, chosen) in enumerate(calls):
        layer, traced = stats[f"{LOOP}@pass{p}"], rec.trace[f"{LOOP}@pass{p}"]
        assert torch.equal(traced["ids"].long().sort(-1).values, chosen.sort(-1).values)
        assert layer.tokens.tolist() == [B * S]
        assert torch.equal(layer.counts[0], torch.bincount(chosen.reshape(-1), minlength=8))
        q = torch.sigmoid(z.float())  # the dense distribution: scores over their sum
        torch.testing.assert_close(layer.prob_sum[0], (q / q.sum(-1, keepdim=True)).sum(0))
    # statistics keyed by name (the indices repeat), and the keys steer the passes they name
    assert layer_keys(stats) == SITES
    # a forward starts at pass 0 even after a call of the router on its own
    with moe_route.patch(model), torch.no_grad():
        model.get_submodule(LOOP)(torch.randn(3, model.config.hidden_size))
        again, _ = _trace(model, ids)
    for site in SITES:
        assert torch.equal(again.trace[site]["ids"], rec.trace[site]["ids"]), site


def test_steer_one_pass_or_every_pass(model):
    """A plain key (decoder index or module path) steers every pass; "@pass<p>" pass p alone,
    leaving the routing before it as it was; nested plans replace what they name, per pass."""
    ids = _ids()
    plain, _ = _trace(model, ids)
    forced = lambda rec, site, e: bool((rec.trace[site]["ids"] == e).any(-1).all())  # noqa: E731
    every, _ = _trace(model, ids, moe_route.SteeringPlan.force([1], [6]))
    assert forced(every, SITES[1], 6) and forced(every, SITES[2], 6)
    one, _ = _trace(model, ids, moe_route.SteeringPlan.force([SITES[2]], [6]))
    for site in SITES[:2]:  # routed before the steered pass: unchanged
        assert torch.equal(one.trace[site]["ids"], plain.trace[site]["ids"]), site
    assert forced(one, SITES[2], 6) and not forced(plain, SITES[2], 6)
    state = moe_route.patch(model).routers[LOOP]
    try:
        with moe_route.steer(model, moe_route.SteeringPlan.force([LOOP], [6])):
            with moe_route.steer(model, moe_route.SteeringPlan.force([SITES[2]], [3])):
                inner, _ = _trace(model, ids)
                assert isinstance(state.steer, tuple) and len(state.steer) == 2
            outer, _ = _trace(model, ids)
        assert state.steer is None and not state.steer_stack
    finally:
        moe_route.unpatch(model)
    assert forced(inner, SITES[1], 6) and forced(inner, SITES[2], 3)
    assert not forced(inner, SITES[2], 6)  # the inner plan replaced pass 1's steering
    assert forced(outer, SITES[1], 6) and forced(outer, SITES[2], 6)


def test_contexts_exited_out_of_order_on_a_loop_layer(model):
    """An outer context steering (replaying) every pass of the loop layer, an inner one pass 1:
    the outer leaving first takes its setting off pass 0 and leaves pass 1 the inner's. Pass 0
    used to keep the ended outer's steering or replay until the inner left."""
    ids = _ids()
    plain, _ = _trace(model, ids)
    fixed = lambda e: torch.tensor(e).expand(B, S, 2)  # noqa: E731  (ids by position)
    cases = [(moe_route.steer(model, moe_route.SteeringPlan.force([LOOP], [6])),
              moe_route.steer(model, moe_route.SteeringPlan.force([SITES[2]], [3]))),
             (moe_route.replay(model, {SITES[1]: fixed([6, 7]), SITES[2]: fixed([6, 7])}),
              moe_route.replay(model, {SITES[2]: fixed([3, 4])}))]
    state = moe_route.patch(model).routers[LOOP]  # patched throughout: the state persists
    try:
        for (outer, inner), setting in zip(cases, ("steer", "replay")):
            outer.__enter__()
            inner.__enter__()
            outer.__exit__(None, None, None)                # out of order: inner still active
            try:
                got, _ = _trace(model, ids)
            finally:
                inner.__exit__(None, None, None)
            for site in SITES[:2]:  # layer 0 and pass 0: as if neither context had been entered
                assert torch.equal(got.trace[site]["ids"], plain.trace[site]["ids"]), site
            assert bool((got.trace[SITES[2]]["ids"] == 3).any(-1).all())  # pass 1: the inner's
            assert getattr(state, setting) is None and not getattr(state, f"{setting}_stack")
            after, _ = _trace(model, ids)
            for site in SITES:
                assert torch.equal(after.trace[site]["ids"], plain.trace[site]["ids"]), site
    finally:
        moe_route.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_plans_from_per_pass_statistics_steer_the_model(model):
    """The analysis round trip: experts found in per-pass statistics, a plan built from them,
    that plan (JSON round trip included) steering the model: its keys are the site names."""
    rec, _ = _trace(model, _ids())
    stats = rec.stats
    top = {key: [int(stats[key].counts[0].argmin())] for key in layer_keys(stats)}
    plan = moe_route.SteeringPlan.from_json(plan_from_experts(top, mode="hard").to_json())
    steered, _ = _trace(model, _ids(), plan)
    for site in SITES:
        assert bool((steered.trace[site]["ids"] == top[site][0]).any(-1).all()), site


def test_replay_per_pass_in_call_order_and_by_position(model):
    """A trace replays as it is, each pass from its own rows, reproducing the model; under the
    layer's plain key the passes take the next rows in turn. By position each pass takes its own
    [B, S, k]; one set of ids for every pass of the layer is refused."""
    ids = _ids()
    rec, want = _trace(model, ids)
    with moe_route.replay(model, rec.trace) as rp, torch.no_grad():
        got = model(ids)
    assert rp.used == {site: B * S for site in SITES}
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    both = torch.cat([rec.trace[SITES[1]]["ids"], rec.trace[SITES[2]]["ids"]])
    with moe_route.replay(model, {LOOP: both}) as rp, torch.no_grad():  # the passes in turn
        got = model(ids)
    assert rp.used == {LOOP: 2 * B * S}
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    fixed = {SITES[1]: torch.tensor([3, 5]).expand(B, S, 2),
             SITES[2]: torch.tensor([0, 7]).expand(B, S, 2)}
    with moe_route.replay(model, fixed), moe_route.record(model, trace=True) as again, \
            torch.no_grad():
        model(ids)
    for site, pos in fixed.items():
        assert torch.equal(again.trace[site]["ids"].long(), pos.reshape(-1, 2)), site
    with pytest.raises(RuntimeError, match=r"ran twice in one model call .*@pass<p>"):
        with moe_route.replay(model, {1: fixed[SITES[1]]}), torch.no_grad():
            model(ids)
    with pytest.raises(ValueError, match=r"layers \['model.layers.1.mlp.gate@pass1'\] are not "):
        moe_route.replay(model, {SITES[1]: fixed[SITES[1]]}, layers=[SITES[2]]).__enter__()
    with moe_route.replay(model, fixed, layers=[SITES[2]]), \
            moe_route.record(model, trace=True) as only, torch.no_grad():
        model(ids)
    assert torch.equal(only.trace[SITES[2]]["ids"].long(), fixed[SITES[2]].reshape(-1, 2))
    assert torch.equal(only.trace[SITES[1]]["ids"], rec.trace[SITES[1]]["ids"])


def test_rollout_routing_of_a_loop_model_replays_by_position(model):
    """generate()'s trace names every pass, so trace_by_position turns it into positions and
    one forward over the generated sequences routes each pass as the rollout did."""
    P, N = 5, 3
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        seq = model.generate(_ids(21, (B, P)), max_new_tokens=N, do_sample=False)
    routing = moe_route.trace_by_position(rec.trace, B, P, length=seq.shape[1])
    assert list(routing) == SITES
    with moe_route.replay(model, routing), moe_route.record(model, trace=True) as again, \
            torch.no_grad():
        model(seq)
    for site, pos in routing.items():
        got = again.trace[site]["ids"].long().reshape(B, P + N, -1)
        assert torch.equal(got[:, :-1], pos[:, :-1]), site


def test_pass_keys_that_name_nothing_or_twice(model):
    cases = [({f"{LOOP}@pass2": [1]}, r"names pass 2, but .* runs 2 passes per forward"),
             ({f"{L0}@pass0": [1]}, r"is not a loop layer: it routes once per forward"),
             ({LOOP: [1], SITES[2]: [2]}, r"name the same router .* \(or the same pass of it\)"),
             ({SITES[1]: [1], "model.layers.1.mlp@pass0": [2]}, r"name the same router"),
             ({f"{LOOP}@passes": [1]}, r"is not an MoE layer of the model")]
    for layers, match in cases:
        plan = moe_route.SteeringPlan.force(None, layers)
        with pytest.raises(ValueError, match=match):
            with moe_route.steer(model, plan):
                pass
    assert not hasattr(model, "_moe_route_patch")  # every failed entry undid its patch


@pytest.mark.parametrize("per_pass", [False, True])
def test_activation_checkpointing(per_pass):
    """Checkpointing recomputes the passes inside backward, where which pass a call belongs to is
    unknown: steering every pass alike gives the gradients of the run without checkpointing;
    steering the passes differently is refused there, not recomputed with the wrong steering."""
    model = build("inkling2_loop").train()
    ids = _ids(5)
    plan = moe_route.SteeringPlan.promote(layers=[SITES[2] if per_pass else 1], experts=[3])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model)
        model.zero_grad()
        with moe_route.steer(model, plan), moe_route.record(model) as rec:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if checkpointing and per_pass:
                with pytest.raises(RuntimeError, match="different steering is being recomputed"):
                    loss.backward()
                return
            loss.backward()
        assert [int(layer.tokens.sum()) for layer in rec.stats] == [B * S] * 4
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_compiled_loop_model_records_each_pass():
    """torch.compile traces the pass counter (reset by the patch's hook before each forward) into
    one graph: a compiled forward records the same per-pass statistics as an eager one, twice.
    (The model's KV cache set-up deep-copies tensors, which dynamo cannot trace: no cache.)"""
    model = build("inkling2_loop")
    ids = _ids()
    eager, _ = _trace(model, ids)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with moe_route.record(model) as rec, torch.no_grad():
        compiled(ids, use_cache=False)
        compiled(ids, use_cache=False)
    assert rec.stats.layer_names == SITES
    for site in SITES:
        assert torch.equal(rec.stats[site].counts, 2 * eager.stats[site].counts), site


def test_report_and_expert_layers_of_a_loop_model(tmp_path):
    """The report labels a loop layer's passes "1@pass0", "1@pass1" (one heatmap each, none
    written over another), and an int in ``layers`` takes the passes of that decoder layer."""
    from moe_route.analysis import (language_divergence, task_experts, trace_transitions,
                                    write_report)

    model = build("inkling2_loop")
    with moe_route.record(model) as rec, torch.no_grad():
        for lang, seed in (("en", 1), ("de", 2), ("fr", 3)):
            rec.per_sequence([f"{lang}/{i}" for i in range(B)])
            model(_ids(seed))
    stats = rec.stats
    summary = write_report(tmp_path, stats, "en", heatmap_layers=[0, 1, 2])
    assert summary["layers"] == [0, "1@pass0", "1@pass1", 2]
    assert len(summary["mean_divergence_by_layer"]) == 4
    heatmaps = sorted(p.name for p in tmp_path.glob("language_divergence_L*.png"))
    if "plots_skipped" not in summary:
        assert heatmaps == ["language_divergence_L0.png", "language_divergence_L1@pass0.png",
                            "language_divergence_L1@pass1.png", "language_divergence_L2.png"]
    header = (tmp_path / "divergence.csv").read_text().splitlines()[0]
    assert header == "language,layer_0,layer_1@pass0,layer_1@pass1,layer_2"
    experts = task_experts(stats, stats, tau=-1.0, layers=[1])
    assert list(experts) == SITES[1:3]
    # and so does it in write_report's layers; a pass is named by its site, and the loop
    # layer's router path takes both passes (so it cannot be a trace_transitions end)
    one = write_report(tmp_path / "one", stats, "en", heatmap_layers=[SITES[2]],
                       middle_layers=[1])
    assert one["middle_layers"] == ["1@pass0", "1@pass1"]
    if "plots_skipped" not in one:
        assert sorted(p.name for p in (tmp_path / "one").glob("language_divergence_L*.png")) \
            == ["language_divergence_L1@pass1.png"]
    _, div = language_divergence(stats, [1])
    assert torch.equal(div, language_divergence(stats, SITES[1:3])[1])
    trace = {name: {} for name in SITES}
    with pytest.raises(ValueError, match=r"source=1 names 2 layers \(a loop layer's passes\): "
                                         r"name one, e\.g\. '" + re.escape(SITES[1])):
        trace_transitions(trace, 1, 0)
