"""LayerStats / RoutingStats: validation, access, stack, merge by group name, group selection,
atomic save/load. Known answers are written out by hand; merge is also checked against the gate
itself (two recorded batches merged == one run over both)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_route
from moe_route import stats as stats_mod
from moe_route.ops import GateStats, topk_gate
from moe_route.stats import LayerStats, RoutingStats

i64, f32 = torch.int64, torch.float32


def make_layer(name="model.layers.0.mlp.gate", index=0, top_k=2, G=2, E=4, seed=0,
               optional=True, coact=True) -> LayerStats:
    """Random but valid numbers; floats are arbitrary fp32 (bit-exactness tests need that)."""
    g = torch.Generator().manual_seed(seed)
    return LayerStats(
        name, index, top_k,
        tokens=torch.randint(0, 100, (G,), generator=g),
        counts=torch.randint(0, 100, (G, E), generator=g),
        weight_sum=torch.rand(G, E, generator=g) * 10,
        prob_sum=torch.rand(G, E, generator=g) * 10 if optional else None,
        entropy_sum=torch.rand(G, generator=g) * 3 if optional else None,
        coact=torch.randint(0, 50, (E, E), generator=g) if coact else None)


def make_stats(L=3, G=2, E=4, groups=None, **kw) -> RoutingStats:
    groups = groups or [f"g{i}" for i in range(G)]
    layers = [make_layer(f"model.layers.{i}.mlp.gate", i, G=len(groups), E=E, seed=i, **kw)
              for i in range(L)]
    return RoutingStats(layers, groups, {"model": "tiny", "dtype": "fp32"})


def assert_stats_equal(a: RoutingStats, b: RoutingStats):
    """Bit-identical: names, indices, top_k, groups, meta, every tensor (dtype, shape, values)."""
    assert a.layer_names == b.layer_names
    assert a.layer_indices == b.layer_indices
    assert a.group_names == b.group_names
    assert a.meta == b.meta
    for la, lb in zip(a, b):
        assert la.top_k == lb.top_k
        assert la.fields_present() == lb.fields_present()
        for name, ta in la.tensors().items():
            tb = getattr(lb, name)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
            assert torch.equal(ta.view(torch.int32) if ta.dtype == f32 else ta,
                               tb.view(torch.int32) if tb.dtype == f32 else tb), name


# --------------------------------------------------------------------------------------------
# LayerStats


def _fields(G=2, E=4):
    return dict(tokens=torch.zeros(G, dtype=i64), counts=torch.zeros(G, E, dtype=i64),
                weight_sum=torch.zeros(G, E))


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(counts=torch.zeros(2, 4)), TypeError, r"counts must be torch.int64, got torch.float32"),
    (dict(weight_sum=torch.zeros(2, 4, dtype=torch.float64)), TypeError,
     r"weight_sum must be torch.float32"),
    (dict(weight_sum=torch.zeros(2, 5)), ValueError,
     r"weight_sum must have shape \[G=2, E=4\].*got \(2, 5\)"),
    (dict(counts=torch.zeros(8, dtype=i64)), ValueError,
     r"counts must be 2-D \[G, E\], got shape \(8,\)"),
    (dict(tokens=None), ValueError, r"tokens is required"),
    (dict(weight_sum=None), ValueError, r"weight_sum is required"),
    (dict(tokens=[1, 2]), TypeError, r"tokens must be a torch.Tensor or None, got list"),
    (dict(prob_sum=torch.zeros(2, 4, dtype=i64)), TypeError, r"prob_sum must be torch.float32"),
    (dict(entropy_sum=torch.zeros(3)), ValueError, r"entropy_sum must have shape \[G=2\]"),
    (dict(coact=torch.zeros(4, 5, dtype=i64)), ValueError, r"coact must have shape \[E=4, E=4\]"),
    (dict(counts=torch.zeros(2, 0, dtype=i64), weight_sum=torch.zeros(2, 0)), ValueError,
     r"counts must have at least one expert column"),
])
def test_layer_stats_rejects_bad_tensors(change, exc, pattern):
    with pytest.raises(exc, match=r"LayerStats\('L3'\): " + pattern):
        LayerStats("L3", 3, 2, **{**_fields(), **change})


@pytest.mark.parametrize("args, error, pattern", [
    (("", 0, 2), ValueError, r"name='' must be a non-empty str"),
    (("L", -1, 2), ValueError, r"index=-1 must be None \(no layer index\) or an int >= 0"),
    (("L", True, 2), TypeError, r"index=True must be None .*, got bool"),
    (("L", 0, 5), ValueError, r"top_k=5 must be an int in \[1, 4\] \(of num_experts=4\)"),
    (("L", 0, 0), ValueError, r"top_k=0 must be"),
    (("L", 0, 2.0), TypeError, r"top_k=2.0 must be an int in \[1, 4\] .*, got float"),
])
def test_layer_stats_rejects_bad_scalars(args, error, pattern):
    with pytest.raises(error, match=pattern):
        LayerStats(*args, **_fields())


def test_layer_stats_properties_and_none_index():
    layer = LayerStats("router", None, 1, **_fields(G=3, E=6))
    assert (layer.num_groups, layer.num_experts, layer.index) == (3, 6, None)
    assert layer.fields_present() == ["tokens", "counts", "weight_sum"]
    assert "experts=6" in repr(layer) and "groups=3" in repr(layer)


def test_from_gate_stats_shares_the_gate_buffers():
    gs = GateStats.zeros(2, 8, coact=True)
    layer = LayerStats.from_gate_stats("model.layers.5.mlp.gate", 5, 2, gs)
    for name in GateStats.NAMES:
        assert getattr(layer, name).data_ptr() == getattr(gs, name).data_ptr()
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    topk_gate(logits, 2, stats=gs, groups=torch.tensor([0, 1, 1, 0, 1, -1]))
    assert layer.tokens.tolist() == [2, 3]          # accumulated after construction: shared
    assert int(layer.counts.sum()) == 5 * 2


def test_from_gate_stats_errors():
    with pytest.raises(ValueError, match=r"gate_stats.weight_sum is None"):
        LayerStats.from_gate_stats("g", 0, 1, GateStats(tokens=torch.zeros(1, dtype=i64),
                                                        counts=torch.zeros(1, 2, dtype=i64)))
    with pytest.raises(TypeError, match=r"gate_stats must be a GateStats, got dict"):
        LayerStats.from_gate_stats("g", 0, 1, {})


# --------------------------------------------------------------------------------------------
# RoutingStats: construction and access


def test_routing_stats_construction_errors():
    a, b = make_layer("a", 0), make_layer("b", 1)
    with pytest.raises(ValueError, match=r"layer 'a' has 2 groups \(rows\), expected "
                                         r"len\(group_names\)=3"):
        RoutingStats([a, b], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"layer names must be unique, got duplicates \['a'\]"):
        RoutingStats([a, a], ["x", "y"])
    with pytest.raises(ValueError, match=r"group_names must be unique, got duplicates \['x'\]"):
        RoutingStats([a], ["x", "x"])
    with pytest.raises(TypeError, match=r"group_names\[1\]=3 must be a str"):
        RoutingStats([a], ["x", 3])
    with pytest.raises(ValueError, match=r"meta must be JSON-serialisable"):
        RoutingStats([a], ["x", "y"], {"dtype": torch.float32})
    with pytest.raises(TypeError, match=r"layers\[1\] must be a LayerStats, got dict"):
        RoutingStats([a, {}], ["x", "y"])


@pytest.mark.parametrize("call, pattern", [
    (lambda a: RoutingStats(None, ["x", "y"]),
     r"RoutingStats: layers must be an iterable of LayerStats, got NoneType"),
    (lambda a: RoutingStats([a], None), r"RoutingStats: group_names must be a sequence of str, "
                                        r"got NoneType"),
    (lambda a: RoutingStats([a], ["x", "y"], [("model", "m")]),
     r"RoutingStats: meta must be a dict or None, got list"),
    (lambda a: RoutingStats([a], ["x", "y"]).group(None),
     r"RoutingStats.group: names must be a str or a sequence of str, got NoneType"),
    (lambda a: RoutingStats.merge_all(None),
     r"RoutingStats.merge_all: items must be an iterable of RoutingStats, got NoneType"),
])
def test_wrong_argument_types_name_the_argument(call, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(make_layer("a", 0))


def test_access_by_position_and_name():
    s = make_stats(L=3, G=2)
    assert len(s) == 3
    assert s[0] is s["model.layers.0.mlp.gate"]
    assert s[-1].name == "model.layers.2.mlp.gate"
    assert [layer.name for layer in s] == s.layer_names
    assert s.layer_indices == [0, 1, 2]
    assert s.group_names == ["g0", "g1"]
    assert s.num_experts == 4 and s.num_groups == 2
    assert "model.layers.1.mlp.gate" in s and "nope" not in s
    with pytest.raises(KeyError, match=r"no layer named 'nope'"):
        s["nope"]
    with pytest.raises(IndexError, match=r"position 3 out of range for 3 layers"):
        s[3]
    with pytest.raises(TypeError, match=r"int position or a str name, got float"):
        s[1.0]


def test_repr_is_short_and_informative():
    s = make_stats(L=3, G=2, E=4)
    for layer in s:                                    # every layer saw the same 1234 tokens
        layer.tokens.copy_(torch.tensor([1000, 234]))
    assert repr(s) == ("RoutingStats(layers=3, groups=2 ['g0', 'g1'], experts=4, top_k=2, "
                       "tokens/layer=1,234, optional=['prob_sum', 'entropy_sum', 'coact'], "
                       "device=cpu)")
    s[1].tokens[0] = 0
    assert "tokens/layer=234..1,234" in repr(s)


# --------------------------------------------------------------------------------------------
# stack


def test_stack_shapes_and_values():
    s = make_stats(L=3, G=2, E=4)
    counts = s.stack("counts")
    assert counts.shape == (3, 2, 4) and counts.dtype == i64
    assert torch.equal(counts[1], s[1].counts)
    assert s.stack("tokens").shape == (3, 2)
    assert s.stack("entropy_sum").shape == (3, 2)
    assert s.stack("weight_sum").shape == (3, 2, 4)
    coact = s.stack("coact")
    assert coact.shape == (3, 4, 4) and torch.equal(coact[2], s[2].coact)


def test_stack_mixed_num_experts_names_layers_and_their_E():
    layers = [make_layer("a", 0, E=4), make_layer("b", 1, E=8), make_layer("c", 2, E=4)]
    s = RoutingStats(layers, ["x", "y"])
    with pytest.raises(ValueError, match=r"stack\('counts'\).*E=4 in \['a', 'c'\]; "
                                         r"E=8 in \['b'\]"):
        s.stack("counts")
    with pytest.raises(ValueError, match=r"E=4 in \['a', 'c'\]"):
        s.stack("coact")
    with pytest.raises(ValueError, match=r"num_experts: layers differ"):
        s.num_experts
    assert s.stack("tokens").shape == (3, 2)  # no expert axis: stacks whatever the E


def test_stack_errors():
    s = RoutingStats([make_layer("a", 0), make_layer("b", 1, optional=False)], ["x", "y"])
    with pytest.raises(ValueError, match=r"field 'prob_sum' is None in layers \['b'\]"):
        s.stack("prob_sum")
    with pytest.raises(ValueError, match=r"field='count' must be one of"):
        s.stack("count")
    with pytest.raises(ValueError, match=r"no layers"):
        RoutingStats([], ["x"]).stack("counts")


# --------------------------------------------------------------------------------------------
# copies


def test_to_cpu_is_an_independent_copy_and_to_shares():
    s = make_stats()
    c = s.to_cpu()
    assert_stats_equal(s, c)
    s[0].counts.add_(1)
    assert not torch.equal(s[0].counts, c[0].counts)
    assert s.to("cpu")[0].counts.data_ptr() == s[0].counts.data_ptr()
    assert s.to("cpu", copy=True)[0].counts.data_ptr() != s[0].counts.data_ptr()
    assert s.to("cpu") is not s


# --------------------------------------------------------------------------------------------
# merge


def _known_layer(name, index, tokens, counts, weight_sum, coact, prob_sum=None):
    return LayerStats(name, index, 2, tokens=torch.tensor(tokens),
                      counts=torch.tensor(counts), weight_sum=torch.tensor(weight_sum),
                      prob_sum=None if prob_sum is None else torch.tensor(prob_sum),
                      coact=torch.tensor(coact))


def test_merge_by_group_name_known_answer():
    # self: groups [en, fr]; other: groups [de, en] and its layers in the other order
    a = RoutingStats([
        _known_layer("L0", 0, tokens=[2, 1], counts=[[2, 1, 1], [0, 1, 1]],
                     weight_sum=[[1.0, 0.5, 0.5], [0.0, 0.75, 0.25]],
                     prob_sum=[[1.0, 0.5, 0.5], [0.25, 0.5, 0.25]],
                     coact=[[2, 1, 1], [1, 2, 1], [1, 1, 2]]),
        _known_layer("L1", 1, tokens=[2, 1], counts=[[1, 2, 1], [1, 0, 1]],
                     weight_sum=[[0.5, 1.0, 0.5], [0.5, 0.0, 0.5]],
                     prob_sum=[[0.5, 1.0, 0.5], [0.5, 0.0, 0.5]],
                     coact=[[1, 1, 0], [1, 2, 1], [0, 1, 1]]),
    ], ["en", "fr"], {"model": "m", "run": 1})
    b = RoutingStats([
        _known_layer("L1", 1, tokens=[3, 1], counts=[[3, 3, 0], [0, 1, 1]],
                     weight_sum=[[1.5, 1.5, 0.0], [0.0, 0.5, 0.5]],
                     prob_sum=[[1.5, 1.0, 0.5], [0.0, 0.5, 0.5]],
                     coact=[[3, 3, 0], [3, 4, 1], [0, 1, 1]]),
        _known_layer("L0", 0, tokens=[1, 4], counts=[[1, 0, 1], [4, 2, 2]],
                     weight_sum=[[0.5, 0.0, 0.5], [2.0, 1.0, 1.0]],
                     prob_sum=[[0.5, 0.25, 0.25], [2.0, 1.0, 1.0]],
                     coact=[[5, 1, 2], [1, 2, 0], [2, 0, 3]]),
    ], ["de", "en"], {"model": "other", "batch": 7})
    a_before = a.clone()
    with pytest.warns(UserWarning, match=r"the inputs' meta differ in \['model'\]; the merged "
                                         r"meta keeps the first input's values"):
        m = a.merge(b)

    assert m.layer_names == ["L0", "L1"]                     # self's order
    assert m.group_names == ["en", "fr", "de"]               # new group appended
    assert m.meta == {"model": "m", "run": 1, "batch": 7}    # self wins, other's new keys added
    # L0: en = a.en + b.en, fr = a.fr, de = b.de
    assert m["L0"].tokens.tolist() == [2 + 4, 1, 1]
    assert m["L0"].counts.tolist() == [[6, 3, 3], [0, 1, 1], [1, 0, 1]]
    assert m["L0"].weight_sum.tolist() == [[3.0, 1.5, 1.5], [0.0, 0.75, 0.25], [0.5, 0.0, 0.5]]
    assert m["L0"].prob_sum.tolist() == [[3.0, 1.5, 1.5], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]
    assert m["L0"].coact.tolist() == [[7, 2, 3], [2, 4, 1], [3, 1, 5]]
    assert m["L0"].entropy_sum is None
    # L1
    assert m["L1"].tokens.tolist() == [2 + 1, 1, 3]
    assert m["L1"].counts.tolist() == [[1, 3, 2], [1, 0, 1], [3, 3, 0]]
    assert m["L1"].weight_sum.tolist() == [[0.5, 1.5, 1.0], [0.5, 0.0, 0.5], [1.5, 1.5, 0.0]]
    assert m["L1"].coact.tolist() == [[4, 4, 0], [4, 6, 2], [0, 2, 2]]
    # inputs untouched, output owns its memory
    assert_stats_equal(a, a_before)
    assert m["L0"].counts.data_ptr() != a["L0"].counts.data_ptr()


def test_merge_errors_name_the_mismatch():
    a = RoutingStats([make_layer("a", 0), make_layer("b", 1)], ["x", "y"])
    with pytest.raises(ValueError, match=r"only in self: \['b'\], only in other: \['c'\]"):
        a.merge(RoutingStats([make_layer("a", 0), make_layer("c", 1)], ["x", "y"]))
    with pytest.raises(ValueError, match=r"layer 'b' has num_experts=4 in self but "
                                         r"num_experts=8 in other"):
        a.merge(RoutingStats([make_layer("a", 0), make_layer("b", 1, E=8)], ["x", "y"]))
    with pytest.raises(ValueError, match=r"layer 'a' has top_k=2 in self but top_k=1"):
        a.merge(RoutingStats([make_layer("a", 0, top_k=1), make_layer("b", 1)], ["x", "y"]))
    with pytest.raises(ValueError, match=r"layer 'a' holds fields .* in self but .* in other"):
        a.merge(RoutingStats([make_layer("a", 0, coact=False), make_layer("b", 1)], ["x", "y"]))
    with pytest.raises(TypeError, match=r"other must be a RoutingStats, got dict"):
        a.merge({})


@pytest.mark.parametrize("field", ["tokens", "counts", "coact"])
def test_merge_refuses_counts_that_overflow_int64(field):
    """int64 sums used to wrap silently: 2**62 + 2**62 came out as -2**63."""
    layer = make_layer("L", 0, G=1, E=2, optional=False)
    big = layer.replace(**{field: torch.full_like(getattr(layer, field), 2**62)})
    s = RoutingStats([big], ["x"])
    with pytest.raises(ValueError, match=rf"RoutingStats.merge: counts overflow int64: merged sums "
                                         rf"must be <= 2\*\*63 - 1, got layer 'L' {field} "
                                         rf"\(min -9223372036854775808\)"):
        s.merge(s)
    with pytest.raises(ValueError, match=r"counts overflow int64"):
        RoutingStats.merge_all([s, s, s])
    # five of them sum to 2**64 + 2**62, which wraps twice, back to 2**62 >= 0
    with pytest.raises(ValueError, match=r"counts overflow int64"):
        RoutingStats.merge_all([s] * 5)
    # the largest sum that fits is exact
    fits = RoutingStats([big.replace(**{field: torch.full_like(getattr(big, field), 2**62 - 1)})],
                        ["x"])
    assert getattr(s.merge(fits)[0], field).flatten().tolist()[0] == 2**63 - 1


def test_merge_refuses_negative_input_counts():
    layer = make_layer("L", 0)
    negative = RoutingStats([layer.replace(tokens=torch.tensor([3, -5]))], ["x", "y"])
    positive = RoutingStats([layer.replace(tokens=torch.tensor([1, 3]))], ["x", "y"])
    for inputs, i in (([negative, positive], 0), ([positive, negative], 1)):
        with pytest.raises(ValueError, match=rf"counts are never negative, but input {i} holds "
                                             rf"layer 'L' tokens \(min -5\)"):
            RoutingStats.merge_all(inputs)


def test_meta_device_stats_are_refused_by_merge_and_save(tmp_path):
    """Statistics moved to the meta device have shapes but no numbers: merging or saving them
    used to end in "NotImplementedError: Cannot copy out of meta tensor" (or, merged into a meta
    self, in a result without numbers)."""
    s = make_stats(L=2)
    on_meta = s.to("meta")
    assert {layer.device.type for layer in on_meta} == {"meta"}      # .to("meta") stays allowed
    layers = r"\['model.layers.0.mlp.gate', 'model.layers.1.mlp.gate'\] on the meta device"
    with pytest.raises(ValueError, match=r"RoutingStats.merge: other must hold data, got layers "
                                         + layers):
        s.merge(on_meta)
    with pytest.raises(ValueError, match=r"RoutingStats.merge: self must hold data"):
        on_meta.merge(s)
    with pytest.raises(ValueError, match=r"RoutingStats.merge_all: items\[2\] must hold data"):
        RoutingStats.merge_all([s, s, on_meta])
    with pytest.raises(ValueError, match=r"RoutingStats.save: the statistics must hold data, got "
                                         r"layers " + layers):
        on_meta.save(tmp_path / "run")
    assert os.listdir(tmp_path) == []


def test_merge_equals_one_gate_run_over_both_batches():
    """A recorder flushing two batches with different groups, merged, sees what one run over all
    tokens with global group ids sees (integers exactly, float sums to fp32 rounding)."""
    E, k = 8, 2
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(40, E, generator=g), torch.randn(30, E, generator=g)
    local1 = torch.randint(-1, 2, (40,), generator=g)   # batch 1: groups [en, fr], -1 = padding
    local2 = torch.randint(-1, 2, (30,), generator=g)   # batch 2: groups [fr, de]

    gs1, gs2 = GateStats.zeros(2, E, coact=True), GateStats.zeros(2, E, coact=True)
    topk_gate(x1, k, stats=gs1, groups=local1)
    topk_gate(x2, k, stats=gs2, groups=local2)
    s1 = RoutingStats([LayerStats.from_gate_stats("L", 0, k, gs1)], ["en", "fr"])
    s2 = RoutingStats([LayerStats.from_gate_stats("L", 0, k, gs2)], ["fr", "de"])
    merged = s1.merge(s2)

    full = GateStats.zeros(3, E, coact=True)                 # global ids: en 0, fr 1, de 2
    glob2 = torch.where(local2 < 0, local2, local2 + 1)
    topk_gate(torch.cat([x1, x2]), k, stats=full, groups=torch.cat([local1, glob2]))
    assert merged.group_names == ["en", "fr", "de"]
    for name in ("tokens", "counts", "coact"):
        assert torch.equal(getattr(merged[0], name), getattr(full, name)), name
    for name in ("weight_sum", "prob_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(merged[0], name), getattr(full, name),
                                   rtol=1e-5, atol=1e-5)


@given(st.lists(st.lists(st.sampled_from("abcdef"), unique=True, max_size=6),
                min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_merge_all_matches_per_name_sums(group_lists, seed):
    """Random group sets per part: each output row is the sum of that name's rows in the parts,
    and merge_all equals chained merges."""
    parts = []
    for i, names in enumerate(group_lists):
        layer = make_layer("L", 0, G=len(names), E=3, seed=seed + i)
        parts.append(RoutingStats([layer], names))
    merged = RoutingStats.merge_all(parts)
    chained = parts[0]
    for p in parts[1:]:
        chained = chained.merge(p)
    assert_stats_equal(merged, chained)
    expected_names = []
    for names in group_lists:
        expected_names += [n for n in names if n not in expected_names]
    assert merged.group_names == expected_names
    for g, name in enumerate(expected_names):
        want = sum(p[0].counts[p.group_names.index(name)] for p in parts if name in p.group_names)
        assert torch.equal(merged[0].counts[g], want)
    assert torch.equal(merged[0].coact, sum(p[0].coact for p in parts))


# --------------------------------------------------------------------------------------------
# group selection


def test_group_selects_rows_in_the_given_order():
    s = make_stats(L=2, G=3, groups=["en", "fr", "de"])
    de = s.group("de")
    assert de.group_names == ["de"] and len(de) == 2
    assert torch.equal(de[1].counts, s[1].counts[2:3])
    assert torch.equal(de[0].tokens, s[0].tokens[2:3])
    assert torch.equal(de[0].entropy_sum, s[0].entropy_sum[2:3])
    assert de[0].coact is None                                # pairs over all groups: not split
    two = s.group(["de", "en"])
    assert two.group_names == ["de", "en"]
    assert torch.equal(two[0].weight_sum, s[0].weight_sum[[2, 0]])
    everything = s.group(["fr", "de", "en"])                  # all groups: coact still exact
    assert torch.equal(everything[0].coact, s[0].coact)
    assert everything.meta == s.meta
    with pytest.raises(KeyError, match=r"unknown groups \['es'\]; groups are \['en', 'fr', 'de'\]"):
        s.group(["en", "es"])
    with pytest.raises(ValueError, match=r"names must be unique"):
        s.group(["en", "en"])


# --------------------------------------------------------------------------------------------
# save / load


def mixed_stats() -> RoutingStats:
    """Mixed E, a layer without any optional field, a None index, non-ASCII group names."""
    layers = [make_layer("model.layers.0.mlp.gate", 0, E=4, seed=1),
              make_layer("model.layers.1.mlp.gate", 1, E=8, seed=2, optional=False, coact=False),
              make_layer("extra.router", None, top_k=1, E=4, seed=3, coact=False)]
    return RoutingStats(layers, ["en", "日本語"], {"model": "tiny", "layers": [0, 1], "x": None})


def test_save_load_round_trip_is_bit_identical(tmp_path):
    s = mixed_stats()
    s.save(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["manifest.json", "tensors.safetensors"]
    loaded = RoutingStats.load(tmp_path / "run")
    assert_stats_equal(s, loaded)
    assert loaded[1].prob_sum is None and loaded[1].coact is None and loaded[2].coact is None
    assert all(t.device.type == "cpu" for layer in loaded for t in layer.tensors().values())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["format"] == "moe_route.RoutingStats" and manifest["version"] == 1
    assert manifest["moe_route_version"] == moe_route.__version__
    assert manifest["layers"][1] == {"name": "model.layers.1.mlp.gate", "index": 1, "top_k": 2,
                                     "num_experts": 8,
                                     "fields": ["tokens", "counts", "weight_sum"]}
    keys = set(safetensors.torch.load_file(str(tmp_path / "run" / "tensors.safetensors")))
    assert "layers.0.coact" in keys and "layers.1.prob_sum" not in keys
    assert sorted(os.listdir(tmp_path)) == ["run"]           # no temp dirs left


def test_meta_that_json_would_change_is_refused_not_altered(tmp_path):
    """json turns tuples into lists and int/bool/None keys into str, so such a meta used to
    save and load back different ({"layers": (0, 1), 3: "x"} -> {"layers": [0, 1], "3": "x"})."""
    layer = make_layer()
    for meta in ({"layers": (0, 1)}, {3: "x"}, {"nested": {True: 1}}, {"a": [{None: 0}]}):
        with pytest.raises(ValueError, match=r"RoutingStats: meta must read back from JSON "
                                             r"unchanged"):
            RoutingStats([layer], ["g0", "g1"], meta)
    s = RoutingStats([layer], ["g0", "g1"], {"layers": [0, 1], "x": {"y": [1.5, None, True]}})
    s.meta["added"] = (1, 2)                                   # meta is a plain, mutable dict
    with pytest.raises(ValueError, match=r"RoutingStats.save: meta must read back from JSON "
                                         r"unchanged"):
        s.save(tmp_path / "run")
    assert not os.path.exists(tmp_path / "run")
    del s.meta["added"]
    s.save(tmp_path / "run")
    assert_stats_equal(RoutingStats.load(tmp_path / "run"), s)


def test_save_accepts_views_into_one_buffer(tmp_path):
    # a recorder may hand out views of one [L, G, E] buffer; safetensors refuses shared storage
    buf = torch.arange(2 * 2 * 3).reshape(2, 2, 3)
    w = torch.ones(2, 2, 3)
    layers = [LayerStats(f"L{i}", i, 1, tokens=buf[i, :, 0], counts=buf[i], weight_sum=w[i])
              for i in range(2)]
    RoutingStats(layers, ["a", "b"]).save(tmp_path / "s")
    assert torch.equal(RoutingStats.load(tmp_path / "s").stack("counts"), buf)


def test_save_over_an_existing_save_replaces_it(tmp_path):
    path = tmp_path / "run"
    old, new = make_stats(L=2), mixed_stats()
    old.save(path)
    new.save(path)
    assert_stats_equal(RoutingStats.load(path), new)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_save_over_an_existing_save_without_atomic_exchange(tmp_path, monkeypatch):
    """The rename-aside fallback (no renameat2): replaces the save, and when the rename in fails
    puts the old save back."""
    path = tmp_path / "run"
    old, new = make_stats(L=2), mixed_stats()
    old.save(path)
    monkeypatch.setattr(stats_mod, "_exchange", lambda a, b: False)
    new.save(path)
    assert_stats_equal(RoutingStats.load(path), new)
    assert sorted(os.listdir(tmp_path)) == ["run"]

    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(os.fspath(src)).startswith(".run.tmp-"):
            raise OSError("disk on fire")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk on fire"):
        old.save(path)
    assert_stats_equal(RoutingStats.load(path), new)
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("exchange", [True, False])
def test_save_gives_the_modes_of_a_plain_create_and_keeps_a_replaced_saves(tmp_path, umask,
                                                                           monkeypatch, exchange):
    """The save directory came from mkdtemp, so every save was 0o700 whatever the umask:
    unreadable to colleagues on a shared machine, unlike a directory made by os.makedirs."""
    if not exchange:
        monkeypatch.setattr(stats_mod, "_exchange", lambda a, b: False)
    path = tmp_path / "run"
    make_stats().save(path)

    def modes():
        return [stat.S_IMODE(os.stat(p).st_mode) for p in
                (path, path / "manifest.json", path / "tensors.safetensors")]

    assert modes() == [0o777 & ~umask] + [0o666 & ~umask] * 2
    os.chmod(path, 0o705)                 # a mode given to the save survives a new save over it
    mixed_stats().save(path)
    assert modes() == [0o705] + [0o666 & ~umask] * 2
    assert_stats_equal(RoutingStats.load(path), mixed_stats())
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("existing", [False, True])
def test_crash_while_writing_keeps_the_old_save_and_removes_the_temp_dir(tmp_path, monkeypatch,
                                                                         existing):
    path = tmp_path / "run"
    old = make_stats(L=2)
    if existing:
        old.save(path)
    real_save_file = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save_file(dict(list(tensors.items())[:2]), filename, metadata=metadata)
        raise RuntimeError("crash while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(RuntimeError, match="crash while writing"):
        mixed_stats().save(path)
    monkeypatch.undo()
    if existing:
        assert_stats_equal(RoutingStats.load(path), old)
        assert sorted(os.listdir(tmp_path)) == ["run"]
    else:
        assert os.listdir(tmp_path) == []


def test_save_refuses_to_replace_something_that_is_not_a_save(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"is not a RoutingStats save"):
        make_stats().save(foreign)
    assert (foreign / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists and is not a directory"):
        make_stats().save(tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file", "results"]


def _rewrite_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"'.*run' is not a directory"):
        RoutingStats.load(path)
    make_stats(L=2).save(path)

    _rewrite_manifest(path, version=2)
    with pytest.raises(ValueError, match=r"manifest.json'.*version=2 is newer than this moe_route"):
        RoutingStats.load(path)
    _rewrite_manifest(path, version=1, format="something.else")
    with pytest.raises(ValueError, match=r"format='something.else', expected "
                                         r"'moe_route.RoutingStats'"):
        RoutingStats.load(path)
    _rewrite_manifest(path, format="moe_route.RoutingStats")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json' is not valid JSON"):
        RoutingStats.load(path)
    (path / "manifest.json").write_text("[" * 100_000)     # was a RecursionError
    with pytest.raises(ValueError, match=r"manifest.json' is not valid JSON \(arrays or objects "
                                         r"nest deeper than Python's recursion limit\)"):
        RoutingStats.load(path)

    make_stats(L=2).save(path)
    tensors_file = str(path / "tensors.safetensors")
    tensors = safetensors.torch.load_file(tensors_file)
    del tensors["layers.1.counts"]
    safetensors.torch.save_file(tensors, tensors_file)
    with pytest.raises(ValueError, match=r"tensors.safetensors' has no tensor 'layers.1.counts'"):
        RoutingStats.load(path)
    tensors["layers.1.counts"] = torch.zeros(2, 4, dtype=i64)
    tensors["layers.9.counts"] = torch.zeros(2, 4, dtype=i64)
    safetensors.torch.save_file(tensors, tensors_file)
    with pytest.raises(ValueError, match=r"tensors the manifest does not list: "
                                         r"\['layers.9.counts'\]"):
        RoutingStats.load(path)
    del tensors["layers.9.counts"]
    tensors["layers.1.counts"] = torch.zeros(2, 4)
    safetensors.torch.save_file(tensors, tensors_file)
    with pytest.raises(ValueError, match=r"layer 1: LayerStats\('model.layers.1.mlp.gate'\): "
                                         r"counts must be torch.int64"):
        RoutingStats.load(path)

    with open(tensors_file, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match=r"tensors.safetensors' is not a readable safetensors"):
        RoutingStats.load(path)

    os.remove(tensors_file)
    with pytest.raises(FileNotFoundError, match=r"missing '.*tensors.safetensors'"):
        RoutingStats.load(path)
    os.remove(path / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"missing '.*manifest.json'"):
        RoutingStats.load(path)


def _edit_layer_entry(i, **changes):
    def edit(manifest):
        manifest["layers"][i].update(changes)
    return edit


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.update(num_groups=99), r"num_groups=99 disagrees with len\(group_names\)=2"),
    (lambda m: m.pop("num_groups"), r"num_groups=None must be an int >= 0, got NoneType"),
    (lambda m: m.update(version="1"), r"version='1' must be an int >= 1, got str"),
    (_edit_layer_entry(0, num_experts="4"),
     r"layers\[0\].num_experts='4' must be an int >= 1, got str"),
    (_edit_layer_entry(1, top_k=2.0), r"layers\[1\].top_k=2.0 must be an int >= 1, got float"),
    (_edit_layer_entry(1, index="1"),
     r"layers\[1\].index='1' must be null or an int >= 0, got str"),
])
def test_load_checks_the_manifests_integers(tmp_path, edit, pattern):
    """num_groups was not compared with group_names, and a num_experts of "4" (a str) failed as
    "counts has 4 experts, the manifest says num_experts=4"."""
    path = tmp_path / "run"
    make_stats(L=2).save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"RoutingStats.load: '.*manifest.json': " + pattern):
        RoutingStats.load(path)


@pytest.mark.parametrize("field", ["tokens", "counts", "coact"])
def test_negative_counts_are_refused_by_load_and_save(tmp_path, field):
    path = tmp_path / "run"
    make_stats(L=2).save(path)
    tensors_file = str(path / "tensors.safetensors")
    tensors = safetensors.torch.load_file(tensors_file)
    tensors[f"layers.1.{field}"][0] = -7
    safetensors.torch.save_file(tensors, tensors_file)
    with pytest.raises(ValueError, match=rf"tensors.safetensors': tokens, counts, coact must be "
                                         rf">= 0, got layer 'model.layers.1.mlp.gate' {field} "
                                         rf"\(min -7\)"):
        RoutingStats.load(path)

    layer = make_layer("L", 0)
    negative = layer.replace(**{field: getattr(layer, field).clone().fill_(-1)})
    with pytest.raises(ValueError, match=rf"RoutingStats.save: tokens, counts, coact must be "
                                         rf">= 0, got layer 'L' {field} \(min -1\)"):
        RoutingStats([negative], ["x", "y"]).save(tmp_path / "negative")
    assert sorted(os.listdir(tmp_path)) == ["run"]
