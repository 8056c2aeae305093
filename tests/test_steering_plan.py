"""SteerEntry / SteeringPlan: validation, builders, merge precedence, steer_spec tables (known
answers, and the gate obeying them), JSON round trips (int vs str layer keys), atomic save."""
from __future__ import annotations

import json
import math
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_route.ops import SteerSpec, topk_gate
from moe_route.reference import FLT_MAX
from moe_route.steering import SteerEntry, SteeringPlan

# --------------------------------------------------------------------------------------------
# SteerEntry


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(add=float("nan")), ValueError, r"SteerEntry: add=nan must be finite"),
    (dict(std=float("inf")), ValueError, r"SteerEntry: std=inf must be finite"),
    (dict(abs=-float("inf")), ValueError, r"SteerEntry: abs=-inf must be finite"),
    (dict(add="0.5"), TypeError, r"SteerEntry: add='0.5' must be a float, got str"),
    (dict(std=True), TypeError, r"SteerEntry: std=True must be a float, got bool"),
    (dict(force=2), ValueError, r"SteerEntry: force=2 must be -1 \(off\), 0 or \+1 \(on\)"),
    (dict(force=1.0), TypeError, r"SteerEntry: force=1.0 must be an int in \{-1, 0, 1\}"),
    (dict(force=True), TypeError, r"SteerEntry: force=True must be an int"),
    (dict(select_only=1), TypeError, r"SteerEntry: select_only=1 must be a bool"),
])
def test_steer_entry_validation(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SteerEntry(**kwargs)


def test_steer_entry_values_must_be_finite_in_float32():
    """The gate takes fp32 tables: a finite double beyond FLT_MAX used to pass SteerEntry and the
    JSON loader, then crash building the table ("value cannot be converted to type float without
    overflow") when the plan was applied. FLT_MAX itself is the largest value that steers."""
    big = math.nextafter(FLT_MAX, math.inf)
    for name in ("add", "std", "abs"):
        with pytest.raises(ValueError, match=rf"SteerEntry: {name}=-?3.40282346638528\d*e\+38 "
                                             rf"must be finite in float32"):
            SteerEntry(**{name: -big if name == "abs" else big})
    with pytest.raises(ValueError, match=r"std=1e\+39 must be finite in float32"):
        SteeringPlan.from_json('{"format": "moe_route.SteeringPlan", "version": 1, '
                               '"layers": {"0": {"1": {"std": 1e39}}}}')
    plan = SteeringPlan({0: {1: {"add": FLT_MAX}, 2: {"abs": -FLT_MAX}}})
    table = plan.steer_spec(0, 4).table(4)
    assert table[0, 1].item() == FLT_MAX and table[2, 2].item() == -FLT_MAX
    _, ids = topk_gate(torch.zeros(3, 4), 1, steer=plan.steer_spec(0, 4))
    assert ids.flatten().tolist() == [1, 1, 1]


def test_steer_entry_values_and_dict_form():
    e = SteerEntry(add=1, std=np.float64(0.5), abs=-0.0, force=np.int64(-1))
    assert (type(e.add), e.add, e.std, type(e.force), e.force) == (float, 1.0, 0.5, int, -1)
    assert math.copysign(1.0, e.abs) == 1.0                   # -0.0 normalised to +0.0
    assert e.to_dict() == {"add": 1.0, "std": 0.5, "force": -1}
    assert SteerEntry().to_dict() == {}
    assert SteerEntry.from_dict({"std": 0.5, "select_only": True}) == \
        SteerEntry(std=0.5, select_only=True)
    assert repr(SteerEntry(std=0.5)) == "SteerEntry(std=0.5)"
    with pytest.raises(ValueError, match=r"SteerEntry: unknown field 'lambda'; allowed fields are "
                                         r"\['add', 'std', 'abs', 'force', 'select_only', "
                                         r"'std_unbiased'\]"):
        SteerEntry.from_dict({"lambda": 0.5})
    with pytest.raises(Exception):
        e.add = 2.0                                            # frozen


# --------------------------------------------------------------------------------------------
# construction


def test_plan_from_nested_dicts():
    plan = SteeringPlan({12: {5: {"std": 0.5}, 1: SteerEntry(add=-1.0)},
                         "model.layers.3.mlp.gate": {0: {"force": 1}},
                         np.int64(2): {torch.tensor(7): {"abs": 0.25}},
                         20: {}})                               # empty layer: dropped
    assert plan.layers == [2, 12, "model.layers.3.mlp.gate"]  # ints ascending, then strs
    assert list(plan[12]) == [1, 5]                            # experts sorted
    assert plan[12][5] == SteerEntry(std=0.5)
    assert plan[2] == {7: SteerEntry(abs=0.25)}
    assert type(plan.layers[0]) is int
    assert len(plan) == 3 and plan.num_entries == 4 and bool(plan)
    assert not SteeringPlan() and len(SteeringPlan()) == 0
    assert 12 in plan and "12" not in plan and 20 not in plan
    # keys compare as layer keys, not by Python equality: True and 2.0 are not layers 1 and 2
    assert np.int64(12) in plan and torch.tensor(12) in plan and list(plan[np.int64(12)]) == [1, 5]
    assert True not in SteeringPlan({1: {0: SteerEntry(add=1.0)}}) and 2.0 not in plan
    assert [2] not in plan and None not in plan
    with pytest.raises(KeyError):
        plan[2.0]
    with pytest.raises(TypeError):
        plan[12][5] = SteerEntry()                             # read-only view
    with pytest.raises(KeyError):
        plan[13]


@pytest.mark.parametrize("layers, exc, pattern", [
    ({1: {2: {"stdd": 0.5}}}, ValueError,
     r"SteeringPlan: layer 1, expert 2: SteerEntry: unknown field 'stdd'; allowed fields are "
     r"\['add', 'std', 'abs', 'force', 'select_only', 'std_unbiased'\]"),
    ({1: {2: {"force": 3}}}, ValueError, r"layer 1, expert 2: SteerEntry: force=3 must be"),
    ({1: {-1: {"std": 0.5}}}, ValueError, r"layer 1: expert key -1 must be >= 0"),
    ({1: {"3": {"std": 0.5}}}, TypeError, r"layer 1: expert key '3' must be an int >= 0, got str"),
    ({-2: {0: {}}}, ValueError, r"layer key -2 must be >= 0"),
    ({1.5: {0: {}}}, TypeError, r"layer key 1.5 must be an int >= 0 .* or a str .*got float"),
    ({True: {0: {}}}, TypeError, r"layer key True must be an int >= 0 or a str, got bool"),
    ({"": {0: {}}}, ValueError, r"layer key must be a non-empty str"),
    ({1: [0, 1]}, TypeError, r"layer 1 must map experts to entries, got list"),
    ({1: {0: 0.5}}, TypeError, r"layer 1, expert 0: entry must be a SteerEntry or a dict"),
    ({1: {0: {}}, torch.tensor(1): {1: {}}}, ValueError, r"layer 1 given twice"),
])
def test_plan_construction_errors(layers, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SteeringPlan(layers)


def test_builders():
    assert SteeringPlan.promote([8, 9], [5, 7]) == SteeringPlan(
        {8: {5: {"std": 0.5}, 7: {"std": 0.5}}, 9: {5: {"std": 0.5}, 7: {"std": 0.5}}})
    assert SteeringPlan.promote(range(3, 5), 1, std=0.25) == SteeringPlan(
        {3: {1: {"std": 0.25}}, 4: {1: {"std": 0.25}}})
    # a str layer is one layer, not an iterable of characters
    assert SteeringPlan.force("model.layers.3.mlp.gate", [0, 2], on=False) == SteeringPlan(
        {"model.layers.3.mlp.gate": {0: {"force": -1}, 2: {"force": -1}}})
    assert SteeringPlan.bias(4, [1], add=-2.0, select_only=True) == SteeringPlan(
        {4: {1: {"add": -2.0, "select_only": True}}})
    # per-layer experts: `layers` selects from the mapping; None takes all of it
    by_layer = {8: [1, 2], 9: [3], 10: []}
    assert SteeringPlan.promote([8, 10], by_layer) == SteeringPlan(
        {8: {1: {"std": 0.5}, 2: {"std": 0.5}}})
    assert SteeringPlan.promote(None, by_layer).layers == [8, 9]
    with pytest.raises(ValueError, match=r"SteeringPlan.promote: layers \[11\] are not keys of "
                                         r"experts \(its keys: \[8, 9, 10\]\)"):
        SteeringPlan.promote([8, 11], by_layer)
    with pytest.raises(ValueError, match=r"SteeringPlan.bias: layers=None needs experts as a"):
        SteeringPlan.bias(None, [1], add=1.0)
    with pytest.raises(TypeError, match=r"SteeringPlan.force: on=1 must be a bool"):
        SteeringPlan.force([1], [1], on=1)
    with pytest.raises(ValueError, match=r"SteerEntry: std=nan must be finite"):
        SteeringPlan.promote([1], [1], std=float("nan"))
    # a 0-d tensor or array is one id (iterating it raised torch's or numpy's TypeError)
    assert SteeringPlan.promote(torch.tensor(1), np.array(3)) == SteeringPlan.promote([1], [3])
    with pytest.raises(TypeError, match=r"SteeringPlan.force: expert key 3.0 must be an int"):
        SteeringPlan.force([1], torch.tensor(3.0))


def test_merge_later_wins_per_layer_and_expert():
    a = SteeringPlan({8: {1: {"std": 0.5}, 2: {"std": 0.5}}, 9: {1: {"add": 1.0}}})
    b = SteeringPlan({8: {2: {"force": -1}, 3: {"abs": 0.5}}, "x.gate": {0: {"add": 2.0}}})
    assert a | b == SteeringPlan({8: {1: {"std": 0.5}, 2: {"force": -1}, 3: {"abs": 0.5}},
                                  9: {1: {"add": 1.0}}, "x.gate": {0: {"add": 2.0}}})
    assert (b | a)[8][2] == SteerEntry(std=0.5)
    assert a[8][2] == SteerEntry(std=0.5)                      # inputs unchanged
    assert (a | {8: {1: {"add": 3.0}}})[8][1] == SteerEntry(add=3.0)
    assert ({8: {1: {"add": 3.0}}} | a)[8][1] == SteerEntry(std=0.5)


def test_equality_hash_pickle_repr():
    a = SteeringPlan.promote([8], [1, 2])
    b = SteeringPlan({8: {2: SteerEntry(std=0.5), 1: {"std": 0.5}}})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != SteeringPlan.promote([8], [1, 2], std=0.25)
    assert SteeringPlan({12: {0: {}}}) != SteeringPlan({"12": {0: {}}})
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a) == "SteeringPlan(1 layers, 2 entries: 8: {1: std=0.5; 2: std=0.5})"
    big = SteeringPlan.promote(range(10), range(4))
    assert len(repr(big)) < 400 and "(+28 entries)" in repr(big)


# --------------------------------------------------------------------------------------------
# steer_spec


def test_steer_spec_table_known_answer():
    E = 6
    plan = SteeringPlan({12: {0: {"add": 1.5}, 1: {"std": 0.5}, 2: {"abs": -0.25},
                              3: {"force": 1}, 4: {"force": -1, "add": 2.0}}})
    spec = plan.steer_spec(12, E)
    assert isinstance(spec, SteerSpec) and spec.select_only is False
    expected = torch.tensor([
        [1.5, 0.0, 0.0, 0.0, 2.0, 0.0],     # add
        [0.0, 0.5, 0.0, 0.0, 0.0, 0.0],     # std
        [0.0, 0.0, -0.25, 0.0, 0.0, 0.0],   # abs
        [0.0, 0.0, 0.0, 1.0, -1.0, 0.0],    # force
    ])
    assert torch.equal(spec.table(E), expected)
    assert plan.steer_spec(12, E) is spec                       # cached: device tables reused
    assert plan.steer_spec(13, E) is None
    assert plan.steer_spec("model.layers.12.mlp.gate", E) is None   # str and int keys differ
    only = SteeringPlan.bias(["r"], [1], add=-3.0, select_only=True).steer_spec("r", 3)
    assert only.select_only is True
    assert torch.equal(only.table(3), torch.tensor([[0.0, -3.0, 0.0]] + [[0.0] * 3] * 3))


def test_steer_spec_drives_the_gate():
    """The spec is what the gate takes: forced experts always in/out, and the steered gate equals
    the gate given the hand-built table's SteerSpec."""
    E, k = 8, 2
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(0))
    plan = SteeringPlan({3: {5: {"force": 1}, 0: {"force": -1}, 2: {"std": 0.5}}})
    w, ids = topk_gate(logits, k, steer=plan.steer_spec(3, E))
    assert (ids == 5).any(1).all() and not (ids == 0).any()
    table = torch.zeros(4, E)
    table[3, 5], table[3, 0], table[1, 2] = 1.0, -1.0, 0.5
    w_ref, ids_ref = topk_gate(logits, k, steer=SteerSpec(add=None, std=table[1].tolist(),
                                                           force=table[3].tolist()))
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)


def test_std_unbiased_steers_by_the_sample_std():
    """``std_unbiased`` adds λ times the sample std (``torch.std``'s default, EasySteer's): the
    gate's choice equals top-k over z + λ·torch.std(z) computed here, and differs from the
    population-std plan's on some tokens (E = 8: the two stds differ by 7%)."""
    E, k, lam = 8, 2, 1.5
    z = torch.randn(4096, E, generator=torch.Generator().manual_seed(1))
    promoted = [3, 6]
    bias = torch.zeros(E)
    bias[promoted] = lam
    chosen = {}
    for unbiased in (True, False):
        plan = SteeringPlan.promote(0, promoted, std=lam, std_unbiased=unbiased)
        assert plan[0][3] == SteerEntry(std=lam, std_unbiased=unbiased)
        assert plan.steer_spec(0, E).std_unbiased is unbiased
        _, ids = topk_gate(z, k, steer=plan.steer_spec(0, E))
        chosen[unbiased] = ids.long().sort(-1).values
        sd = torch.std(z, -1, keepdim=True, unbiased=unbiased)
        want = torch.topk(torch.softmax(z + bias * sd, -1), k).indices.sort(-1).values
        assert torch.equal(chosen[unbiased], want)
    assert 0 < int((chosen[True] != chosen[False]).any(-1).sum()) < 4096 // 10
    assert SteeringPlan.from_json(plan.to_json()) == plan
    sample = SteeringPlan.promote(0, [3], std=lam, std_unbiased=True)
    assert json.loads(sample.to_json())["layers"]["0"]["3"] == {"std": lam, "std_unbiased": True}
    # the switch is per layer among the std entries: an add entry's flag does not count
    mixed = SteeringPlan({0: {1: {"std": 0.5, "std_unbiased": True}, 2: {"add": 1.0}}})
    assert mixed.steer_spec(0, E).std_unbiased is True
    with pytest.raises(ValueError, match=r"layer 0 mixes std_unbiased=True \(experts \[1\]\) "
                                         r"and std_unbiased=False \(experts \[2\]\)"):
        SteeringPlan({0: {1: {"std": 0.5, "std_unbiased": True}, 2: {"std": 1.0}}}).steer_spec(0, E)
    with pytest.raises(TypeError, match=r"SteerEntry: std_unbiased=1 must be a bool"):
        SteerEntry(std=0.5, std_unbiased=1)
    with pytest.raises(ValueError, match=r"SteerEntry: std_unbiased=True picks the std .* but "
                                         r"std=0\.0"):
        SteerEntry(force=1, std_unbiased=True)


def test_steer_spec_errors():
    plan = SteeringPlan({12: {3: {"std": 0.5}, 9: {"std": 0.5}, 10: {"add": 1.0}}})
    with pytest.raises(ValueError, match=r"SteeringPlan.steer_spec: layer 12: expert 9 must be < "
                                         r"num_experts=8 \(also out of range: \[10\]\)"):
        plan.steer_spec(12, 8)
    mixed = SteeringPlan({4: {0: {"add": 1.0, "select_only": True}, 1: {"std": 0.5}}})
    with pytest.raises(ValueError, match=r"layer 4 mixes select_only=True \(experts \[0\]\) and "
                                         r"select_only=False \(experts \[1\]\)"):
        mixed.steer_spec(4, 8)
    with pytest.raises(ValueError, match=r"num_experts=0 must be an int >= 1"):
        plan.steer_spec(12, 0)


def test_validate():
    plan = SteeringPlan({8: {7: {"std": 0.5}}, "model.extra.gate": {0: {"add": 1.0}}, 30: {1: {}}})
    with pytest.raises(ValueError, match=r"SteeringPlan.validate: layers "
                                         r"\[30, 'model.extra.gate'\] are not in the model; "
                                         r"available layers are "
                                         r"\[0, 8, 'model.layers.0.mlp.gate'\]"):
        plan.validate({"model.layers.0.mlp.gate": 8, 8: 8, 0: 8})
    with pytest.raises(ValueError, match=r"validate: layer 8: expert 7 must be < num_experts=4"):
        plan.validate({8: 4, "model.extra.gate": 2, 30: 4})
    assert plan.validate({8: 8, "model.extra.gate": 2, 30: 4}) is plan


# --------------------------------------------------------------------------------------------
# JSON


def test_to_json_known_answer():
    plan = SteeringPlan({12: {5: {"std": 0.5}}, "12": {0: {"force": 1}},
                         "model.layers.3.mlp.gate": {1: {"add": -1.0, "select_only": True}},
                         '"quoted': {2: {}}})
    doc = json.loads(plan.to_json())
    assert doc == {"format": "moe_route.SteeringPlan", "version": 1, "layers": {
        "12": {"5": {"std": 0.5}},
        '"12"': {"0": {"force": 1}},                           # a str that looks like an int
        '"\\"quoted"': {"2": {}},                              # a str starting with a quote
        "model.layers.3.mlp.gate": {"1": {"add": -1.0, "select_only": True}}}}
    back = SteeringPlan.from_json(plan.to_json(indent=2))
    assert back == plan and back.layers == [12, '"quoted', "12", "model.layers.3.mlp.gate"]
    assert "\n" in plan.to_json(indent=2) and "\n" not in plan.to_json()


def test_hand_written_json():
    text = """{"format": "moe_route.SteeringPlan", "version": 1,
               "layers": {"3": {"1": {"std": 0.5}}, "model.layers.4.mlp.gate": {"0": {"abs": 1}},
                          "012": {"2": {"add": 1}}}}"""
    plan = SteeringPlan.from_json(text)
    assert plan.layers == [3, "012", "model.layers.4.mlp.gate"]  # only canonical digits are ints
    assert plan["model.layers.4.mlp.gate"][0] == SteerEntry(abs=1.0)


@pytest.mark.parametrize("doc, pattern", [
    ('{"format": "other", "version": 1, "layers": {}}',
     r"format='other', expected 'moe_route.SteeringPlan'"),
    ('{"format": "moe_route.SteeringPlan", "version": 2, "layers": {}}',
     r"version=2 is newer than this moe_route reads \(<= 1\)"),
    ('{"format": "moe_route.SteeringPlan", "layers": {}}', r"version=None must be an int >= 1"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": {"1": {"0": {"sd": 1}}}}',
     r"layer 1, expert 0: SteerEntry: unknown field 'sd'"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": {"1": {"x": {}}}}',
     r"layer '1': expert key 'x' must be a non-negative int"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": {"1": {"0": {}, "0": {}}}}',
     r"duplicate JSON key '0'"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": {"\\"12": {}}}',
     r"layer key '\"12' starts with '\"' but is not a JSON string literal"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": {"1": {"0": {"std": "x"}}}}',
     r"SteerEntry: std='x' must be a float"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": []}',
     r"layers must be a JSON object"),
    ('{"format": "moe_route.SteeringPlan", "version": 1, "layers": {}, "extra": 1}',
     r"unknown keys \['extra'\]"),
    ('[1, 2]', r"expected a JSON object, got list"),
    ('{', r"SteeringPlan.from_json: the plan is not valid JSON \(Expecting"),
])
def test_from_json_errors(doc, pattern):
    with pytest.raises(ValueError, match=pattern):
        SteeringPlan.from_json(doc)


_finite = st.floats(-FLT_MAX, FLT_MAX, width=64)               # what fp32 tables can hold
_entries = st.builds(SteerEntry, add=st.one_of(st.just(0.0), _finite),
                     std=st.one_of(st.just(0.0), _finite), abs=st.one_of(st.just(0.0), _finite),
                     force=st.sampled_from([-1, 0, 1]), select_only=st.booleans())
_layer_keys = st.one_of(
    st.integers(0, 200),
    st.integers(0, 200).map(str),                              # str keys that look like ints
    st.text(min_size=1, max_size=12),
    st.text(max_size=6).map(lambda s: '"' + s),
    st.sampled_from(["model.layers.3.mlp.gate", "0", "00", "-1", " 7", "\"7\""]))
_plans = st.dictionaries(_layer_keys, st.dictionaries(st.integers(0, 300), _entries,
                                                      max_size=4), max_size=6).map(SteeringPlan)


@given(_plans)
def test_json_round_trip_random_plans(plan):
    text = plan.to_json()
    back = SteeringPlan.from_json(text)
    assert back == plan
    assert back.layers == plan.layers
    assert [type(k) for k in back.layers] == [type(k) for k in plan.layers]
    for layer in plan:
        for expert, entry in plan[layer].items():
            got = back[layer][expert]
            assert got == entry
            for name in ("add", "std", "abs"):                 # floats bit for bit
                assert math.copysign(1.0, getattr(got, name)) == \
                    math.copysign(1.0, getattr(entry, name))
    assert back.to_json() == text


@given(_plans, _plans)
def test_merge_random_plans(a, b):
    merged = a | b
    for layer in set(a) | set(b):
        for expert in set(a.get(layer, {})) | set(b.get(layer, {})):
            want = b[layer][expert] if layer in b and expert in b[layer] else a[layer][expert]
            assert merged[layer][expert] == want


# --------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    old = SteeringPlan.promote([8, 9], [1, 2])
    old.save(path)
    assert SteeringPlan.load(path) == old
    assert json.loads(path.read_text())["format"] == "moe_route.SteeringPlan"

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        SteeringPlan.force(["r"], [0]).save(path)
    monkeypatch.undo()
    assert SteeringPlan.load(path) == old                      # old file intact
    assert os.listdir(tmp_path) == ["plan.json"]               # temp file removed

    new = SteeringPlan.force(["r"], [0])
    new.save(path)
    assert SteeringPlan.load(path) == new
    assert os.listdir(tmp_path) == ["plan.json"]


def test_save_gives_the_mode_of_a_plain_create_and_keeps_a_replaced_files(tmp_path, umask):
    """The temporary file came from mkstemp, so every saved plan was 0o600 whatever the umask:
    unreadable to colleagues on a shared machine, unlike a file written by open(path, "w")."""
    path = tmp_path / "plan.json"
    SteeringPlan.promote([8, 9], [1, 2]).save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    os.chmod(path, 0o604)                 # a mode given to the file survives a save, as in editors
    new = SteeringPlan.force(["r"], [0])
    new.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
    assert SteeringPlan.load(path) == new
    assert os.listdir(tmp_path) == ["plan.json"]


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "moe_route.SteeringPlan", "version": 9, "layers": {}}')
    with pytest.raises(ValueError, match=r"version=9 is newer .*\(in '.*bad.json'\)"):
        SteeringPlan.load(bad)
    with pytest.raises(FileNotFoundError):
        SteeringPlan.load(tmp_path / "missing.json")
    # a foreign binary file, and an entry of the wrong type: these errors named no file
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=r"SteeringPlan.from_json: .*codec can't decode.*"
                                         r"\(in '.*bad.json'\)"):
        SteeringPlan.load(bad)
    bad.write_text("[" * 100_000)     # was a RecursionError
    with pytest.raises(ValueError, match=r"SteeringPlan.from_json: the plan is not valid JSON "
                                         r"\(arrays or objects nest deeper .*\(in '.*bad.json'\)"):
        SteeringPlan.load(bad)
    bad.write_text('{"format": "moe_route.SteeringPlan", "version": 1, '
                   '"layers": {"3": {"1": {"force": 1.0}}}}')
    # damaged content is a ValueError, whatever field it hits (this was a TypeError)
    with pytest.raises(ValueError, match=r"layer 3, expert 1: SteerEntry: force=1.0 must be an "
                                         r"int.*\(in '.*bad.json'\)"):
        SteeringPlan.load(bad)
