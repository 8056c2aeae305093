"""moe_route.steer: interventions move routing where asked, in the chosen layers only."""
import warnings

import pytest
import torch

import moe_route
from moe_route import SteeringPlan

from tiny_models import build
from test_patch import CORE

pytest.importorskip("transformers")


def _ids(seed=0, shape=(3, 8)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _counts(model, ids, plan=None):
    """Per-layer [E] expert counts (recorded in exact mode when unsteered)."""
    with moe_route.patch(model, exact=True), moe_route.record(model) as rec, torch.no_grad():
        if plan is None:
            model(ids)
        else:
            with moe_route.steer(model, plan):
                model(ids)
    return [layer.counts[0] for layer in rec.stats], [layer.index for layer in rec.stats]


@pytest.mark.parametrize("family", CORE)
def test_force_on_and_off_in_one_layer_only(family):
    model = build(family)
    ids = _ids()
    T = ids.numel()
    base, layers = _counts(model, ids)
    last = layers[-1]
    rare = int(base[-1].argmin())
    common = int(base[-1].argmax())
    on, _ = _counts(model, ids, SteeringPlan.force(last, rare, on=True))
    assert int(on[-1][rare]) == T                       # in every token's top-k
    for before, after in zip(base[:-1], on[:-1]):       # earlier layers untouched
        assert torch.equal(before, after)
    off, _ = _counts(model, ids, SteeringPlan.force(last, common, on=False))
    assert int(off[-1][common]) == 0
    for before, after in zip(base[:-1], off[:-1]):
        assert torch.equal(before, after)


def test_forcing_more_experts_than_k_warns_and_takes_the_lowest_ids():
    """Four experts forced into a top-2 tie at the top: every token takes the two lowest ids
    (the paper draws among them with noise), and steer() says so once per layer."""
    model = build("olmoe")
    ids = _ids()
    k, forced = model.config.num_experts_per_tok, [7, 3, 5, 6]
    assert k < len(forced)
    with pytest.warns(UserWarning, match=rf"steer: layer 0 forces 4 experts \[3, 5, 6, 7\] "
                                         rf"into a top-{k}: each token takes the {k} of them "
                                         rf"the router ranks first"):
        counts, _ = _counts(model, ids, SteeringPlan.force(0, forced))
    assert counts[0].nonzero().flatten().tolist() == sorted(forced)[:k]
    assert int(counts[0].sum()) == k * ids.numel()


def test_forcing_more_groups_than_a_group_limited_router_keeps_warns():
    """DeepSeek-V3 keeps topk_group=2 of its 4 groups per token: experts 0, 4 and 8 forced on
    (three groups, k=4) are not all taken. Each token takes the forced experts of two of those
    groups, and steer() says so; forced experts in two groups are all taken, unwarned."""
    model = build("deepseek_v3")
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    for router in routers:
        router.top_k = 4
    topk_group = routers[0].topk_group
    assert (routers[0].num_group, topk_group, routers[0].num_experts) == (4, 2, 16)
    chosen = []
    routers[0].register_forward_hook(lambda m, a, out: chosen.append(out[2]))
    forced = torch.tensor([0, 4, 8])
    with pytest.warns(UserWarning, match=r"steer: layer 0 forces experts \[0, 4, 8\] of 3 expert "
                                         r"groups \[0, 1, 2\], but the router keeps 2 of its 4 "
                                         r"groups per token"):
        with moe_route.steer(model, SteeringPlan.force(0, forced.tolist())), torch.no_grad():
            model(_ids())
    taken = torch.isin(chosen[0], forced).sum(-1)
    assert taken.eq(topk_group).all(), taken
    chosen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with moe_route.steer(model, SteeringPlan.force(0, [0, 4])), torch.no_grad():
            model(_ids())
    assert torch.isin(chosen[0], torch.tensor([0, 4])).sum(-1).eq(2).all()


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("kind", ["std", "add"])
def test_soft_steering_moves_selection_up(family, kind):
    model = build(family)
    for module in model.modules():  # the random init's large correction biases (|b| ~ 1) would
        bias = getattr(module, "e_score_correction_bias", None)  # outweigh a saturated sigmoid
        if bias is not None:
            bias.zero_()
    ids = _ids(1)
    base, layers = _counts(model, ids)
    first = layers[0]
    expert = int(base[0].argmin())
    plan = (SteeringPlan.promote(first, expert, std=2.0) if kind == "std"
            else SteeringPlan.bias(first, expert, add=3.0))
    steered, _ = _counts(model, ids, plan)
    assert int(steered[0][expert]) > int(base[0][expert])
    assert int(steered[0].sum()) == int(base[0].sum())  # still k experts per token


def test_steering_is_undone_on_exit_and_on_error():
    model = build("qwen3_moe")
    ids = _ids(2)
    with torch.no_grad():
        ref = model(ids).logits
    plan = SteeringPlan.force([0, 1], 3, on=True)
    with pytest.raises(RuntimeError):
        with moe_route.steer(model, plan):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    with moe_route.patch(model, exact=True):
        with moe_route.steer(model, plan):
            with torch.no_grad():
                steered = model(ids).logits
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)
    assert not torch.equal(steered, ref)


def test_nested_steering_restores_outer_plan():
    model = build("olmoe")
    ids = _ids(3)
    outer = SteeringPlan.force(0, 1, on=True)
    inner = SteeringPlan.force(0, 1, on=False)
    with moe_route.steer(model, outer), moe_route.record(model) as rec:
        with moe_route.steer(model, inner), torch.no_grad(), rec.group("inner"):
            model(ids)
        with torch.no_grad(), rec.group("outer"):
            model(ids)
    layer0 = rec.stats[0]
    assert int(layer0.counts[0, 1]) == 0 and int(layer0.counts[1, 1]) == ids.numel()


def test_reentering_an_active_steer_context_is_refused_and_changes_nothing():
    """The same Steering object entered again inside itself used to be accepted: its inner exit
    undid both entries and released one patch owner, the outer exit released nothing, so the
    model stayed patched for good (and a later patch(exact=True) user saw fast-mode routing)."""
    model = build("olmoe")
    ids = _ids(5)
    with torch.no_grad():
        ref = model(ids).logits
    ctx = moe_route.steer(model, SteeringPlan.force(0, 1, on=False))
    with moe_route.record(model) as rec, torch.no_grad():
        with ctx:
            with pytest.raises(RuntimeError, match=r"steer: this steer\(\) context is already "
                                                   r"active"):
                with ctx:
                    pass
            with rec.group("inside"):
                model(ids)                                   # still steered
        with ctx:                                           # entering it again after exit is fine
            with rec.group("again"):
                model(ids)
        with rec.group("after"):
            model(ids)
    counts = rec.stats[0].counts
    assert counts[0, 1] == 0 and counts[1, 1] == 0 and counts[2, 1] > 0
    assert not any("forward" in m.__dict__ for m in model.modules())   # unpatched
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_steer_contexts_exited_out_of_order_leave_the_active_plan():
    """Leaving an outer steer() while an inner one on the same layer is still active used to
    pop the inner's saved state: the layer went on routing by the outer plan, which had ended."""
    model = build("olmoe")
    ids = _ids(6)
    T = ids.numel()
    outer = moe_route.steer(model, SteeringPlan.force(0, 1, on=True))
    inner = moe_route.steer(model, SteeringPlan.force(0, 1, on=False) | SteeringPlan.force(1, 2))
    with moe_route.record(model) as rec, torch.no_grad():
        with rec.group("plain"):
            model(ids)
        outer.__enter__()
        inner.__enter__()
        outer.__exit__(None, None, None)                    # out of order: inner still active
        with rec.group("inner"):
            model(ids)
        inner.__exit__(None, None, None)
        with rec.group("none"):
            model(ids)
    plain, inner_c, none = rec.stats[0].counts
    assert plain[1] > 0 and inner_c[1] == 0 and torch.equal(none, plain)
    assert rec.stats[1].counts[1, 2] == T and torch.equal(rec.stats[1].counts[2],
                                                           rec.stats[1].counts[0])
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_plan_used_under_inference_mode_then_with_autograd():
    """A plan caches its SteerSpecs and they their device tables. A table first built under
    torch.inference_mode was an inference tensor, and a later differentiable steered forward
    failed ("Inference tensors cannot be saved for backward"). Gradients must equal those of
    the same plan never used under inference_mode."""
    model = build("olmoe")
    ids = _ids(7)
    plan = SteeringPlan.promote(0, [1, 2], std=0.5) | SteeringPlan.bias(1, 3, add=0.5)
    with moe_route.steer(model, plan), torch.inference_mode():
        model(ids)

    def router_grads(p):
        model.zero_grad()
        with moe_route.steer(model, p):
            model(ids).logits.float().square().mean().backward()
        return [model.model.layers[i].mlp.gate.weight.grad.clone() for i in (0, 1)]

    fresh = router_grads(SteeringPlan.from_json(plan.to_json()))
    used = router_grads(plan)
    assert all(torch.equal(a, b) for a, b in zip(used, fresh))
    assert fresh[0].abs().sum() > 0


def test_plan_validation_errors():
    model = build("olmoe")
    with pytest.raises(ValueError, match="layer 7 is not an MoE layer"):
        with moe_route.steer(model, SteeringPlan.force(7, 0)):
            pass
    with pytest.raises(ValueError, match="expert 8 must be < num_experts=8"):
        with moe_route.steer(model, SteeringPlan.force(0, 8)):
            pass
    with pytest.raises(ValueError, match="name the same router"):
        plan = SteeringPlan.force(0, 1) | SteeringPlan.force("model.layers.0.mlp.gate", 2)
        with moe_route.steer(model, plan):
            pass
    with pytest.raises(TypeError, match=r"plan must be a SteeringPlan \(SteeringPlan\(mapping\) "
                                        r"builds one .*\), got dict"):
        moe_route.steer(model, {0: {1: {"force": 1}}})
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("model", [None, "olmoe"])
def test_steer_refuses_a_model_that_is_not_a_module(model):
    with pytest.raises(TypeError, match=r"steer: model must be a torch.nn.Module, got "
                                        + type(model).__name__):
        moe_route.steer(model, SteeringPlan.force(0, 1))


def test_plan_by_module_path_and_json_round_trip():
    model = build("gpt_oss")
    ids = _ids(4)
    plan = SteeringPlan.from_json(SteeringPlan.force("model.layers.1.mlp", 5).to_json())
    counts, _ = _counts(model, ids, plan)
    assert int(counts[1][5]) == ids.numel()
