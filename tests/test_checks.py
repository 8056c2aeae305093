"""Integer and bool arguments: one rule across the package (numpy's integers are ints, a bool is
not one; a switch is a Python bool) and one wording (caller, argument, what it must be, what it
was)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moe_route import GateStats, RouterSpec, SteerEntry, SteeringPlan, trace_by_position
from moe_route._checks import check_bool, check_int, is_int
from moe_route.analysis import expert_set_jaccard, few_shot, mcnemar_exact, plan_from_experts
from moe_route.analysis.evaluation import ChoiceItem
from moe_route.stats import LayerStats
from moe_route.testing import planted_model

ITEMS = {"eng": [ChoiceItem("q1 ", ["a", "b"], 0), ChoiceItem("q2 ", ["c", "d"], 1)]}


@pytest.mark.parametrize("value, want", [
    (3, True), (0, True), (-2, True), (np.int64(3), True), (np.uint8(3), True),
    (np.int32(-1), True),
    (True, False), (False, False), (np.bool_(True), False), (3.0, False), ("3", False),
    (None, False), (torch.tensor(3), False),
])
def test_is_int(value, want):
    assert is_int(value) is want


def test_check_int_returns_a_python_int():
    out = check_int("f", "n", np.int64(7), 1)
    assert out == 7 and type(out) is int
    assert check_int("f", "n", None, 1, none="all") is None


@pytest.mark.parametrize("value, kwargs, error, message", [
    (True, dict(minimum=1), TypeError, "f: n=True must be an int >= 1, got bool"),
    (2.0, dict(minimum=1), TypeError, "f: n=2.0 must be an int >= 1, got float"),
    (None, dict(minimum=1), TypeError, "f: n=None must be an int >= 1, got NoneType"),
    (0, dict(minimum=1), ValueError, "f: n=0 must be an int >= 1"),
    (9, dict(minimum=1, maximum=8), ValueError, "f: n=9 must be an int in [1, 8]"),
    (9, dict(maximum=8), ValueError, "f: n=9 must be an int <= 8"),
    (0, dict(minimum=1, none="all"), ValueError, "f: n=0 must be None (all) or an int >= 1"),
    (0, dict(minimum=1, means="rows"), ValueError, "f: n=0 must be an int >= 1 (rows)"),
    ("x", dict(), TypeError, "f: n='x' must be an int, got str"),
])
def test_check_int_errors_name_caller_argument_want_and_got(value, kwargs, error, message):
    with pytest.raises(error) as info:
        check_int("f", "n", value, **kwargs)
    assert str(info.value) == message


def test_numpy_integers_are_taken_as_ints():
    assert mcnemar_exact(np.int64(9), np.int64(1)) == mcnemar_exact(9, 1)
    spec = RouterSpec(n_group=np.int64(4), topk_group=np.int32(2))
    assert spec == RouterSpec(n_group=4, topk_group=2)
    assert type(spec.n_group) is int and type(spec.topk_group) is int
    stats = GateStats.zeros(np.int64(3), np.int64(8))
    assert stats.counts.shape == (3, 8)
    plan = SteeringPlan({0: {1: SteerEntry(add=2.0)}})
    assert plan.steer_spec(0, np.int64(8)) is plan.steer_spec(0, 8)  # one cache entry
    a, b = torch.tensor([[3.0, 1, 2, 0]]), torch.tensor([[3.0, 2, 0, 1]])
    assert torch.equal(expert_set_jaccard(a, b, m=np.int64(2)), expert_set_jaccard(a, b, m=2))
    layer = LayerStats("gate", np.int64(2), np.int64(2), torch.zeros(1, dtype=torch.int64),
                       torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4))
    assert (layer.index, layer.top_k) == (2, 2) and type(layer.top_k) is int
    routed = trace_by_position({"l": {"ids": torch.zeros(6, 1, dtype=torch.int64)}},
                               np.int64(2), np.int64(3))
    assert routed["l"].shape == (2, 3, 1)
    steer = plan_from_experts({0: [1, 2, 3]}, max_per_layer=np.int64(2))
    assert sorted(steer[0]) == [1, 2]
    assert few_shot(ITEMS, ITEMS, np.int64(1)) == few_shot(ITEMS, ITEMS, 1)


@pytest.mark.parametrize("call, message", [
    (lambda: mcnemar_exact(True, 0), "mcnemar_exact: gained=True must be an int >= 0, got bool"),
    (lambda: RouterSpec(n_group=True), "RouterSpec: n_group=True must be an int >= 1, got bool"),
    (lambda: GateStats.zeros(2, 8.0), "GateStats.zeros: num_experts=8.0 must be an int in "),
    (lambda: SteeringPlan({0: {1: SteerEntry(add=2.0)}}).steer_spec(0, True),
     "SteeringPlan.steer_spec: num_experts=True must be an int >= 1, got bool"),
    (lambda: trace_by_position({}, 2, 3, length=True),
     "trace_by_position: length=True must be None (the positions covered) or an int >= 1, got "
     "bool"),
    (lambda: planted_model(seed=True), "planted_model: seed=True must be an int, got bool"),
    (lambda: expert_set_jaccard(torch.ones(1, 4), torch.ones(1, 4), m=True),
     "expert_set_jaccard: m=True must be None (activated experts) or an int in [1, 4]"),
])
def test_a_bool_is_not_an_int(call, message):
    with pytest.raises(TypeError, match="^" + re.escape(message)):
        call()


@pytest.mark.parametrize("call, error, message", [
    (lambda: RouterSpec(n_group=4, topk_group=5), ValueError,
     "RouterSpec: topk_group=5 must be an int in [1, 4] (groups kept of n_group=4)"),
    (lambda: GateStats.zeros(0, 8), ValueError,
     "GateStats.zeros: num_groups=0 must be an int >= 1"),
    (lambda: few_shot(ITEMS, ITEMS, -1), ValueError, "few_shot: shots=-1 must be an int >= 0"),
    (lambda: plan_from_experts({0: [1]}, max_per_layer=0), ValueError,
     "plan_from_experts: max_per_layer=0 must be None (no limit) or an int >= 1"),
])
def test_out_of_range_is_a_value_error_naming_the_bounds(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


@pytest.mark.parametrize("value, got", [(1, "int"), ("yes", "str"), (None, "NoneType"),
                                        (np.bool_(True), "numpy.bool")])
def test_a_switch_is_a_python_bool(value, got):
    assert check_bool("f", "on", True) is True and check_bool("f", "on", False) is False
    with pytest.raises(TypeError) as info:
        check_bool("f", "on", value)
    # numpy 1 names its bool numpy.bool_
    assert str(info.value).removesuffix("_") == f"f: on={value!r} must be a bool, got {got}"
