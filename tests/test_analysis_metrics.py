"""moe_route.analysis: every metric against hand-computed numbers or a plain-Python loop.

Known answers are written out by hand where they are short (comments show the arithmetic);
otherwise an independent loop over plain floats (``ref_*`` below) computes them from the
definition. No scipy.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

from moe_route.analysis import experts as X
from moe_route.analysis import metrics as M
from moe_route.stats import LayerStats, RoutingStats
from moe_route.steering import SteerEntry, SteeringPlan

i64, f32 = torch.int64, torch.float32
nan = float("nan")


# -------------------------------------------------------------------------------------------
# builders and plain-Python references


def make_layer(index, tokens, counts, *, top_k=1, weight_sum=None, prob_sum=None,
               entropy_sum=None, coact=None, name=None):
    counts = torch.tensor(counts, dtype=i64)
    return LayerStats(
        name or f"model.layers.{index}.mlp.gate", index, top_k,
        tokens=torch.tensor(tokens, dtype=i64), counts=counts,
        weight_sum=counts.float() if weight_sum is None else torch.tensor(weight_sum, dtype=f32),
        prob_sum=None if prob_sum is None else torch.tensor(prob_sum, dtype=f32),
        entropy_sum=None if entropy_sum is None else torch.tensor(entropy_sum, dtype=f32),
        coact=None if coact is None else torch.tensor(coact, dtype=i64))


def ref_entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def ref_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_jsd(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * ref_kl(p, m) + 0.5 * ref_kl(q, m)


def ref_hjs(p, q):
    """App. A.4 as the author code writes it: JSD / max(log E - mean entropy, 1e-6)."""
    return ref_jsd(p, q) / max(math.log(len(p)) - (ref_entropy(p) + ref_entropy(q)) / 2, 1e-6)


def close(a, b, tol=1e-6):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# -------------------------------------------------------------------------------------------
# importance and frequency


def importance_stats():
    # 2 layers, 3 groups (the last has no tokens), E = 3, k = 2
    layers = [
        make_layer(0, [4, 2, 0], [[4, 2, 2], [1, 2, 1], [0, 0, 0]], top_k=2,
                   weight_sum=[[2.0, 1.0, 1.0], [0.5, 1.0, 0.5], [0, 0, 0]],
                   prob_sum=[[2.0, 1.0, 1.0], [0.5, 1.0, 0.5], [0, 0, 0]],
                   entropy_sum=[4.0, 1.0, 0.0]),
        make_layer(1, [4, 2, 0], [[4, 4, 0], [2, 1, 1], [0, 0, 0]], top_k=2,
                   weight_sum=[[1.0, 1.0, 0.0], [0.6, 0.2, 0.2], [0, 0, 0]],
                   prob_sum=[[3.0, 0.5, 0.5], [1.0, 0.5, 0.5], [0, 0, 0]],
                   entropy_sum=[2.0, 2.0, 0.0]),
    ]
    return RoutingStats(layers, ["a", "b", "empty"])


def test_importance_and_frequency_known_answer():
    stats = importance_stats()
    dense = M.expert_importance(stats, "dense")
    assert dense.shape == (2, 3, 3) and dense.dtype == f32
    # prob_sum / tokens: [2, 1, 1] / 4, [0.5, 1, 0.5] / 2, [3, .5, .5] / 4, [1, .5, .5] / 2
    torch.testing.assert_close(dense[:, :2], torch.tensor(
        [[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], [[0.75, 0.125, 0.125], [0.5, 0.25, 0.25]]]))
    assert dense[:, 2].isnan().all()  # zero-token group: undefined, not 0
    routed = M.expert_importance(stats, "routed")
    torch.testing.assert_close(routed[1, :2], torch.tensor([[0.25, 0.25, 0.0], [0.3, 0.1, 0.1]]))
    freq = M.activation_frequency(stats)  # a / L, sums to k = 2 per row
    torch.testing.assert_close(freq[0, :2], torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5]]))
    torch.testing.assert_close(freq[:, :2].sum(-1), torch.full((2, 2), 2.0))
    slot = M.activation_frequency(stats, per="slot")  # a / (k L): a distribution
    torch.testing.assert_close(slot[1, :2], torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]]))
    assert slot[:, 2].isnan().all()


def test_per_token_mean_plain_tensors():
    out = M.per_token_mean(torch.tensor([[2.0, 4.0], [1.0, 1.0]]), torch.tensor([2, 0]))
    assert out[0].tolist() == [1.0, 2.0] and out[1].isnan().all()
    with pytest.raises(ValueError, match=r"tokens must have shape \(2,\)"):
        M.per_token_mean(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        M.per_token_mean(torch.ones(2, 3), torch.tensor([1, -1]))


def test_importance_needs_prob_sum():
    layer = make_layer(0, [1], [[1, 0]])
    with pytest.raises(ValueError, match="kind='dense' needs prob_sum"):
        M.expert_importance(RoutingStats([layer], ["g"]), "dense")
    with pytest.raises(ValueError, match="kind='weights' must be one of"):
        M.expert_importance(RoutingStats([layer], ["g"]), "weights")
    with pytest.raises(TypeError, match="stats must be a RoutingStats"):
        M.expert_importance(torch.ones(2, 2))


# -------------------------------------------------------------------------------------------
# parallel group names


def test_parse_parallel_groups():
    names = ["eng_Latn/0", "fra_Latn/0", "eng_Latn/10", "eng_Latn/2", "fra_Latn/2", "x/y/1"]
    pg = M.parse_parallel_groups(names)
    assert pg.languages == ("eng_Latn", "fra_Latn", "x/y")   # split at the last '/'
    assert pg.sequences == ("0", "1", "2", "10")             # numeric order, not "10" < "2"
    assert pg.rows.tolist() == [[0, -1, 3, 2], [1, -1, 4, -1], [-1, 5, -1, -1]]
    assert pg.group_names == tuple(names)


def test_parse_parallel_groups_errors_and_skip():
    with pytest.raises(ValueError, match=r"group name 'all' is not"):
        M.parse_parallel_groups(["eng/0", "all"])
    pg = M.parse_parallel_groups(["eng/0", "all", "fra/0"], skip_unmatched=True)
    assert pg.rows.tolist() == [[0], [2]]
    with pytest.raises(ValueError, match="'eng', sequence '0' is held by two groups"):
        M.parse_parallel_groups(["eng/0", "fra/0", "eng/0"])
    with pytest.raises(ValueError, match="no group name matches"):
        M.parse_parallel_groups(["all"], skip_unmatched=True)
    with pytest.raises(ValueError, match="sep='' must be a non-empty str"):
        M.parse_parallel_groups(["a/1"], sep="")
    with pytest.raises(ValueError, match="'/0' is not"):
        M.parse_parallel_groups(["/0"])
    # non-numeric sequence keys keep first-appearance order
    assert M.parse_parallel_groups(["en:b", "en:a"], sep=":").sequences == ("b", "a")


def test_parallel_groups_from_mapping_and_by_language():
    names = ["s1", "s2", "s3", "s4"]
    pg = M.ParallelGroups.from_mapping(names, {"s1": ("en", 7), "s2": ("de", 7),
                                               "s4": ("de", 8)})
    assert pg.languages == ("en", "de") and pg.sequences == ("7", "8")
    assert pg.rows.tolist() == [[0, -1], [1, 3]]
    with pytest.raises(ValueError, match="names group 'nope'"):
        M.ParallelGroups.from_mapping(names, {"nope": ("en", 1)})
    with pytest.raises(ValueError, match=r"mapping\['s1'\]=.* must be a \(language str"):
        M.ParallelGroups.from_mapping(names, {"s1": "en"})
    by_lang = M.ParallelGroups.by_language(["en", "de"])
    assert by_lang.rows.tolist() == [[0], [1]] and by_lang.sequences == ("all",)


# -------------------------------------------------------------------------------------------
# entropy and Jensen–Shannon


def test_entropy_edge_cases():
    E = 8
    uniform = torch.full((E,), 1 / E)
    onehot = torch.eye(E)[3]
    assert close(float(M.distribution_entropy(uniform)), math.log(E))
    assert float(M.distribution_entropy(uniform, normalised=True)) == pytest.approx(1.0)
    assert float(M.distribution_entropy(onehot)) == 0.0
    assert float(M.distribution_entropy(torch.ones(1), normalised=True)) == 0.0  # E = 1
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert close(float(M.distribution_entropy(p)), 1.5 * math.log(2))  # ½ln2 + 2·¼ln4
    assert M.distribution_entropy(torch.tensor([[nan, nan]])).isnan().all()


def test_js_divergence_known_answers():
    # identical -> exactly 0, also for a generic distribution in float32
    p = torch.softmax(torch.randn(6, 128, generator=torch.Generator().manual_seed(0)), -1)
    assert M.js_divergence(p, p).eq(0).all()
    assert M.entropy_normalised_js(p, p).eq(0).all()
    # disjoint one-hots -> log 2 (the JSD maximum); normalised: log 2 / log E
    for E in (2, 3, 8, 128):
        a, b = torch.eye(E)[0], torch.eye(E)[E - 1]
        assert close(float(M.js_divergence(a, b)), math.log(2))
        assert close(float(M.entropy_normalised_js(a, b)), math.log(2) / math.log(E))
    # uniform on disjoint halves: the mixture is uniform, D_HJS reaches its maximum 1
    half_a = torch.tensor([0.5, 0.5, 0.0, 0.0])
    half_b = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert close(float(M.entropy_normalised_js(half_a, half_b)), 1.0)
    # E = 1: every distribution is [1]; both divergences 0 (normaliser floored at 1e-6)
    assert M.js_divergence(torch.ones(3, 1), torch.ones(3, 1)).eq(0).all()
    assert M.entropy_normalised_js(torch.ones(3, 1), torch.ones(3, 1)).eq(0).all()


def test_js_divergence_against_loop():
    g = torch.Generator().manual_seed(1)
    for E in (2, 3, 5, 16):
        p = torch.softmax(torch.randn(20, E, generator=g, dtype=torch.float64) * 3, -1)
        q = torch.softmax(torch.randn(20, E, generator=g, dtype=torch.float64) * 3, -1)
        q[0] = torch.eye(E, dtype=torch.float64)[0]  # a one-hot row with zeros
        jsd = M.js_divergence(p, q)
        hjs = M.entropy_normalised_js(p, q)
        assert jsd.dtype == torch.float64
        for i in range(20):
            pi, qi = p[i].tolist(), q[i].tolist()
            assert close(float(jsd[i]), ref_jsd(pi, qi), 1e-12)
            assert close(float(hjs[i]), ref_hjs(pi, qi), 1e-10)
        assert ((hjs >= 0) & (hjs <= 1)).all()  # H(M) <= log E bounds D_HJS by 1


def test_js_normaliser_floor():
    # both nearly uniform: log E - mean H < 1e-6, the floor decides the denominator
    E = 4
    p = torch.full((E,), 0.25, dtype=torch.float64)
    q = p + torch.tensor([1e-4, -1e-4, 0, 0], dtype=torch.float64)
    jsd = ref_jsd(p.tolist(), q.tolist())
    hbar = (ref_entropy(p.tolist()) + ref_entropy(q.tolist())) / 2
    assert math.log(E) - hbar < 1e-6
    assert close(float(M.entropy_normalised_js(p, q)), jsd / 1e-6, 1e-9)


def test_pairwise_divergence():
    p = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0.5, 0, 0]])
    d = M.pairwise_divergence(p)
    assert d.shape == (3, 3) and torch.equal(d, d.T) and d.diagonal().eq(0).all()
    for i, j in itertools.combinations(range(3), 2):
        assert close(float(d[i, j]), ref_hjs(p[i].tolist(), p[j].tolist()))
    raw = M.pairwise_divergence(p, normalised=False)
    assert close(float(raw[0, 1]), math.log(2))


def test_distribution_checks_name_the_argument():
    with pytest.raises(ValueError, match="p has negative entries"):
        M.js_divergence(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="q rows must sum to 1"):
        M.entropy_normalised_js(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="same number of experts"):
        M.js_divergence(torch.tensor([1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match="p must be a floating-point tensor"):
        M.distribution_entropy(torch.tensor([1, 0]))


@pytest.mark.parametrize("fn, names", [
    (M.js_divergence, "p and q"), (M.entropy_normalised_js, "p and q"),
    (M.pearson, "x and y"), (M.spearman, "x and y"), (M.expert_set_jaccard, "a and b"),
])
def test_pairwise_functions_name_both_shapes(fn, names):
    rows3, rows2 = torch.full((3, 4), 0.25), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match=rf"{fn.__name__}: {names} must have broadcastable "
                                         rf"shapes, got \(3, 4\) and \(2, 4\)"):
        fn(rows3, rows2)
    assert fn(rows3, rows2[:1]).shape == (3,)  # a single row still broadcasts


# -------------------------------------------------------------------------------------------
# divergence from a reference language (Eq. 2)


Q = {  # importance per (language, sequence) and layer: rows of 3 experts, as exact fp32 values
    ("eng", 0): [[0.5, 0.25, 0.25], [0.75, 0.25, 0.0]],
    ("eng", 1): [[0.25, 0.5, 0.25], [1.0, 0.0, 0.0]],
    ("fra", 0): [[0.5, 0.25, 0.25], [0.0, 0.25, 0.75]],
    ("fra", 1): [[0.125, 0.375, 0.5], [0.5, 0.5, 0.0]],
    ("fra", 2): [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],   # no English sequence 2: skipped
    ("deu", 0): [[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]],
    ("deu", 1): None,                                  # no tokens: the pair is skipped
}


def divergence_stats(tokens=4):
    names = [f"{lang}/{seq}" for lang, seq in Q]
    layers = []
    for layer in range(2):
        tok = [0 if Q[key] is None else tokens for key in Q]
        prob = [[0.0] * 3 if Q[key] is None else [tokens * x for x in Q[key][layer]] for key in Q]
        layers.append(make_layer(layer, tok, [[1, 1, 1]] * len(Q), prob_sum=prob))
    return RoutingStats(layers, names)


def shifted_divergence_stats():
    """``divergence_stats`` of a model whose MoE layers are decoder layers 3 and 4."""
    plain = divergence_stats()
    return RoutingStats([make_layer(3 + layer.index, layer.tokens.tolist(), layer.counts.tolist(),
                                    prob_sum=layer.prob_sum.tolist()) for layer in plain],
                        plain.group_names)


def test_routing_divergence_against_loop():
    div = M.routing_divergence(divergence_stats(), "eng")
    assert list(div) == ["fra", "deu"]  # the reference is left out
    for layer in range(2):
        fra = (ref_hjs(Q["fra", 0][layer], Q["eng", 0][layer])
               + ref_hjs(Q["fra", 1][layer], Q["eng", 1][layer])) / 2
        deu = ref_hjs(Q["deu", 0][layer], Q["eng", 0][layer])
        assert close(float(div["fra"][layer]), fra), layer
        assert close(float(div["deu"][layer]), deu), layer
    assert float(div["fra"][0]) > 0  # sequence 0 is identical in layer 0, sequence 1 is not
    raw = M.routing_divergence(divergence_stats(), "eng", normalised=False)
    assert close(float(raw["deu"][1]), ref_jsd(Q["deu", 0][1], Q["eng", 0][1]))


def test_language_divergence_is_the_mean_over_parallel_pairs():
    """Every language pair's cell is the mean of D_HJS over the sequences both hold (a loop over
    Q), symmetric with a zero diagonal, in the order the languages appear; not the divergence
    of the pooled languages. Layers are picked by position."""
    langs, div = M.language_divergence(divergence_stats())
    assert langs == ["eng", "fra", "deu"] and div.shape == (2, 3, 3)
    for layer in range(2):
        want = {("fra", "eng"): [0, 1], ("deu", "eng"): [0], ("fra", "deu"): [0]}
        for (a, b), seqs in want.items():
            mean = sum(ref_hjs(Q[a, i][layer], Q[b, i][layer]) for i in seqs) / len(seqs)
            i, j = langs.index(a), langs.index(b)
            assert close(float(div[layer, i, j]), mean) and div[layer, j, i] == div[layer, i, j]
        assert div[layer].diagonal().tolist() == [0.0] * 3
    for reference in langs:   # each pair is computed once: both cells are the curves' values
        for lang, curve in M.routing_divergence(divergence_stats(), reference).items():
            assert torch.equal(div[:, langs.index(lang), langs.index(reference)], curve)
    pooled = M.pairwise_divergence(M.expert_importance(M.pool_by_language(divergence_stats())))
    assert not torch.allclose(pooled[:, :2, :2], div[:, :2, :2])
    _, last = M.language_divergence(divergence_stats(), [1])
    assert torch.equal(last[0], div[1])
    # numpy's integers are layer indices too (write_report's heatmap_layers=np.arange(n) was
    # refused)
    assert torch.equal(M.language_divergence(divergence_stats(), np.arange(2))[1], div)
    with pytest.raises(ValueError, match=r"holds 2, which is not a layer here; the layers are "
                                         r"decoder layers \[0, 1\]"):
        M.language_divergence(divergence_stats(), [2])


def test_layer_options_take_decoder_layer_indices_not_positions():
    """A model whose first decoder layers are dense (DeepSeek-V3's first_k_dense_replace,
    Qwen2-MoE's mlp_only_layers) has MoE layers 3 and 4 at positions 0 and 1 of its statistics.
    Layer 4 is layer 4 for every analysis that takes layers, as for SteeringPlan: it was
    position 4 for language_divergence and write_report (so [1] silently took layer 4), and
    trace_transitions' and load_trace's layers were positions or names."""
    shifted = shifted_divergence_stats()
    _, div = M.language_divergence(divergence_stats())
    assert torch.equal(M.language_divergence(shifted, [4])[1], div[1:])
    assert torch.equal(M.language_divergence(shifted, ["model.layers.3.mlp.gate", 4])[1], div)
    assert torch.equal(M.language_divergence(shifted, ["model.layers.4.mlp"])[1], div[1:])
    with pytest.raises(ValueError, match=r"holds 1, which is not a layer here; the layers are "
                                         r"decoder layers \[3, 4\]"):
        M.language_divergence(shifted, [1])
    with pytest.raises(ValueError, match="names layer 'model.layers.3.mlp.gate' twice"):
        M.language_divergence(shifted, [3, "model.layers.3.mlp.gate"])
    with pytest.raises(TypeError, match=r"ints \(decoder-layer indices\) or str"):
        M.language_divergence(shifted, [3.0])
    with pytest.raises(ValueError, match="must name at least one layer"):
        M.language_divergence(shifted, [])


def test_routing_divergence_skips_everything_missing_to_nan():
    stats = divergence_stats().group(["eng/0", "fra/2", "deu/1"])
    div = M.routing_divergence(stats, "eng")
    assert div["fra"].isnan().all() and div["deu"].isnan().all()


def test_routing_divergence_explicit_mapping_and_errors():
    stats = divergence_stats()
    mapping = {f"{lang}/{seq}": (lang.upper(), seq) for lang, seq in Q}
    div = M.routing_divergence(stats, "ENG", parallel=mapping)
    torch.testing.assert_close(div["FRA"], M.routing_divergence(stats, "eng")["fra"])
    with pytest.raises(ValueError, match="language 'spa' is not among the languages"):
        M.routing_divergence(stats, "spa")
    other = M.parse_parallel_groups(["eng/0", "fra/0"])
    with pytest.raises(ValueError, match="parallel was built for other group names"):
        M.routing_divergence(stats, "eng", parallel=other)
    mixed = divergence_stats().group(["eng/0", "fra/0"])
    mixed = RoutingStats(mixed.layers, ["eng/0", "fra"])
    with pytest.raises(ValueError, match="group names mix"):
        M.routing_divergence(mixed, "eng")


def test_language_level_divergence_and_pooling():
    stats = divergence_stats()
    pooled = M.pool_by_language(stats)
    assert pooled.group_names == ["eng", "fra", "deu"]
    # eng pooled over its 2 sequences of 4 tokens: the token-weighted mean of its rows
    assert pooled[0].tokens.tolist() == [8, 12, 4]
    eng0 = [(a + b) / 2 for a, b in zip(Q["eng", 0][0], Q["eng", 1][0])]
    torch.testing.assert_close(M.expert_importance(pooled)[0, 0], torch.tensor(eng0))
    # language-level groups (no '/'): one pair per language
    div = M.routing_divergence(pooled, "eng")
    deu_l1 = [4 * x for x in Q["deu", 0][1]]
    deu_l1 = [x / 4 for x in deu_l1]
    eng_l1 = [(a + b) / 2 for a, b in zip(Q["eng", 0][1], Q["eng", 1][1])]
    assert close(float(div["deu"][1]), ref_hjs(deu_l1, eng_l1))


def test_routed_kind_is_renormalised():
    # routed weights at half the dense mass (a router without renormalisation): same distributions
    dense = divergence_stats()
    layers = [layer.replace(weight_sum=layer.prob_sum * 0.5) for layer in dense]
    routed = RoutingStats(layers, dense.group_names)
    a = M.routing_divergence(routed, "eng", kind="routed")
    b = M.routing_divergence(dense, "eng")
    for lang in a:
        torch.testing.assert_close(a[lang], b[lang], equal_nan=True)
    torch.testing.assert_close(M.routing_entropy(routed, of="importance", kind="routed"),
                               M.routing_entropy(dense, of="importance"), equal_nan=True)


def test_pool_by_language_drops_what_it_cannot_split():
    stats = importance_stats()
    layers = [layer.replace(coact=torch.eye(3, dtype=i64)) for layer in stats]
    stats = RoutingStats(layers, ["en/0", "en/1", "all"])
    pooled = M.pool_by_language(stats, M.parse_parallel_groups(stats.group_names,
                                                               skip_unmatched=True))
    assert pooled.group_names == ["en"] and pooled[0].counts.tolist() == [[5, 4, 3]]
    assert pooled[0].coact is None  # group "all" is not pooled, so coact no longer matches
    full = M.pool_by_language(RoutingStats(layers, ["en/0", "en/1", "de/0"]))
    assert torch.equal(full[1].coact, torch.eye(3, dtype=i64))
    assert full[0].entropy_sum.tolist() == [5.0, 0.0]


def random_stats(L=5, langs=("en", "de", "sw"), n_seq=7, E=6, k=2, seed=11):
    g = torch.Generator().manual_seed(seed)
    names = [f"{lang}/{i}" for lang in langs for i in range(n_seq)]
    G = len(names)
    layers = []
    for l in range(L):
        tokens = torch.randint(0, 6, (G,), generator=g)  # some zero-token groups
        q = torch.softmax(torch.randn(G, E, generator=g) * 2, -1)
        counts = torch.randint(0, 5, (G, E), generator=g) * (tokens > 0)[:, None]
        layers.append(LayerStats(f"model.layers.{l}.mlp.gate", l, k, tokens=tokens,
                                 counts=counts, weight_sum=(q * tokens[:, None]).float(),
                                 prob_sum=(q * tokens[:, None]).float(),
                                 entropy_sum=torch.rand(G, generator=g) * tokens))
    return RoutingStats(layers, names)


def test_chunked_paths_agree_with_one_chunk(monkeypatch):
    stats = random_stats()
    ids = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i))[:2]
                       for i in range(50)])
    groups = [f"g{i % 4}" if i % 9 else None for i in range(50)]

    def everything():
        return [M.expert_importance(stats), M.activation_frequency(stats, per="slot"),
                M.routing_divergence(stats, "en"), M.routing_entropy(stats, of="importance"),
                M.mean_pairwise_overlap(stats), M.load_balance(stats.stack("counts")),
                M.expert_set_jaccard(stats.stack("counts"), stats.stack("counts")[:, :1], m=3),
                M.pool_by_language(stats)[2].weight_sum, X.language_frequency(stats),
                M.routing_consistency(ids, groups)]

    whole = everything()
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 8)  # one layer / a few rows / one group per chunk
    chunked = everything()
    torch.testing.assert_close(chunked, whole, equal_nan=True)


def test_parallel_divergence_on_plain_tensors():
    imp = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])  # L=1, G=3, E=2
    pg = M.parse_parallel_groups(["en/0", "de/0", "fr/0"])
    div = M.parallel_divergence(imp, pg, "en")
    assert close(float(div["de"][0]), 1.0)  # E = 2 disjoint one-hots: log 2 / log 2
    assert close(float(div["fr"][0]), ref_hjs([0.5, 0.5], [1.0, 0.0]))
    with pytest.raises(ValueError, match="importance must be \\[L, G, E\\]"):
        M.parallel_divergence(imp[0], pg, "en")
    with pytest.raises(ValueError, match=r"importance must have at least one expert .* "
                                         r"\(1, 3, 0\)"):
        M.parallel_divergence(imp[..., :0], pg, "en")


# -------------------------------------------------------------------------------------------
# routing entropy


def test_routing_entropy():
    stats = importance_stats()
    h = M.routing_entropy(stats, of="tokens")  # entropy_sum / tokens
    assert h[:, :2].tolist() == [[1.0, 0.5], [0.5, 1.0]] and h[:, 2].isnan().all()
    hn = M.routing_entropy(stats, of="tokens", normalised=True)
    assert close(float(hn[0, 0]), 1.0 / math.log(3))
    hq = M.routing_entropy(stats)  # the paper's H(q), of [0.5, .25, .25] = 1.5 ln 2
    assert close(float(hq[0, 0]), 1.5 * math.log(2))
    assert close(float(hq[1, 0]), ref_entropy([0.75, 0.125, 0.125]))
    # routed importance [0.3, 0.1, 0.1] is renormalised to [0.6, 0.2, 0.2] first
    hr = M.routing_entropy(stats, of="importance", kind="routed")
    assert close(float(hr[1, 1]), ref_entropy([0.6, 0.2, 0.2]))
    one = RoutingStats([make_layer(0, [3], [[3]], entropy_sum=[0.0], prob_sum=[[3.0]])], ["g"])
    assert M.routing_entropy(one, of="tokens", normalised=True).tolist() == [[0.0]]  # E = 1
    assert M.routing_entropy(one, of="importance", normalised=True).tolist() == [[0.0]]


# -------------------------------------------------------------------------------------------
# consistency


TOKENS_SETS = [  # per token: (group, top-2 set), rows in trace order
    ("a", [0, 1]), ("a", [1, 0]), ("b", [2, 3]), ("a", [0, 2]), (None, [3, 1]),
    ("b", [2, 3]), ("c", [1, 3]), ("b", [0, 1]),
]


def ref_consistency(rows, pairs):
    out = {}
    for g in dict.fromkeys(r[0] for r in rows if r[0] is not None):
        sets = [set(s) for grp, s in rows if grp == g]
        if pairs == "all":
            js = [len(a & b) / len(a | b) for a, b in itertools.permutations(sets, 2)]
        else:
            js = [len(a & b) / len(a | b) for a, b in zip(sets, sets[1:])]
        out[g] = sum(js) / len(js) if js else nan
    return out


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_routing_consistency_against_loop(pairs):
    ids = torch.tensor([s for _, s in TOKENS_SETS], dtype=torch.int16)
    groups = [g for g, _ in TOKENS_SETS]
    got = M.routing_consistency(ids, groups, pairs=pairs)
    want = ref_consistency(TOKENS_SETS, pairs)
    assert list(got) == list(want) == ["a", "b", "c"]
    for g in want:
        assert close(got[g], want[g], 1e-12), (g, got[g], want[g])
    # hand check, group a, all pairs: {0,1}~{0,1} = 1, {0,1}~{0,2} = 1/3 twice -> 5/9
    if pairs == "all":
        assert close(got["a"], 5 / 9, 1e-12)
    assert math.isnan(got["c"])  # one token, no pair


def test_routing_consistency_int_groups_and_random_against_loop():
    g = torch.Generator().manual_seed(3)
    N, E, k = 60, 6, 2
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    groups = torch.randint(-1, 4, (N,), generator=g)
    rows = [(int(gr) if gr >= 0 else None, s.tolist()) for gr, s in zip(groups, ids)]
    for pairs in ("all", "adjacent"):
        got = M.routing_consistency(ids, groups, pairs=pairs)
        want = ref_consistency(rows, pairs)
        assert sorted(got) == sorted(want)
        for key in want:
            assert close(got[key], want[key], 1e-12)
    with pytest.raises(ValueError, match="max_group_tokens=3"):
        M.routing_consistency(ids, groups, max_group_tokens=3)
    with pytest.raises(ValueError, match="groups must have one entry per token row"):
        M.routing_consistency(ids, ["a"])
    with pytest.raises(ValueError, match="pairs='pairs' must be one of"):
        M.routing_consistency(ids, groups, pairs="pairs")
    # ids that are no top-k set gave J = -1/3 (or inf for adjacent pairs), silently
    with pytest.raises(ValueError, match=r"ids must be expert ids >= 0; row 1 .* \[0, -1\]"):
        M.routing_consistency(torch.tensor([[0, 1], [0, -1]]), ["a", "a"])
    with pytest.raises(ValueError, match=r"k distinct experts per token; row 0 is \[1, 1\]"):
        M.routing_consistency(torch.tensor([[1, 1], [1, 1]]), ["a", "a"], pairs="adjacent")
    skipped = M.routing_consistency(torch.tensor([[0, 1], [-1, -1], [0, 1]]), ["a", None, "a"])
    assert skipped == {"a": 1.0}  # a row outside every group is not checked


def test_routing_consistency_ids_need_not_be_small():
    # the same sets under ids far beyond any expert count: the value depends on the sets only
    small = torch.tensor([[0, 1], [0, 2], [2, 1], [3, 0], [3, 0]])
    big = torch.tensor([0, 2 ** 40, 7, 2 ** 62])[small]
    groups = ["a", "a", "a", "b", "b"]
    want = M.routing_consistency(small, groups)
    assert M.routing_consistency(big, groups) == want
    assert close(want["a"], 1 / 3, 1e-12) and want["b"] == 1.0  # a: every pair shares one


@pytest.mark.parametrize("value, exc, pattern", [
    ("x", TypeError, "max_group_tokens='x' must be an int >= 1, got str"),
    (True, TypeError, "max_group_tokens=True must be an int >= 1, got bool"),
    (2.0, TypeError, "max_group_tokens=2.0 must be an int >= 1, got float"),
    (0, ValueError, "max_group_tokens=0 must be an int >= 1"),
])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_routing_consistency_max_group_tokens_must_be_a_positive_int(value, exc, pattern, pairs):
    with pytest.raises(exc, match=f"routing_consistency: {pattern}"):
        M.routing_consistency(torch.tensor([[0, 1]]), ["a"], pairs=pairs, max_group_tokens=value)


def ref_agreement(a, b, wa, wb):
    """(top1, overlap, identical, weight_shift) by a loop over python sets and dicts."""
    n, k = len(a), len(a[0])
    top1 = sum(x[0] == y[0] for x, y in zip(a, b)) / n
    overlap = sum(len(set(x) & set(y)) for x, y in zip(a, b)) / (n * k)
    identical = sum(set(x) == set(y) for x, y in zip(a, b)) / n
    shift = 0.0
    for x, y, u, v in zip(a, b, wa, wb):
        da, db = dict(zip(x, u)), dict(zip(y, v))
        shift += sum(abs(da.get(e, 0.0) - db.get(e, 0.0)) for e in set(x) | set(y)) / 2
    return top1, overlap, identical, shift / n


def test_routing_agreement_known_answer():
    a = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 1, 2], [6, 7, 0]], dtype=torch.int16)
    b = torch.tensor([[0, 1, 2], [5, 4, 3], [0, 7, 6], [7, 6, 1]], dtype=torch.int16)
    r = M.routing_agreement(a, b)
    # top-1: rows 0 and 2 (row 1 has the same set in another order); overlap (3+3+1+2)/12;
    # identical sets: rows 0 and 1
    assert r == M.RoutingAgreement(tokens=4, top1=0.5, overlap=0.75, identical=0.5)
    assert M.routing_agreement(a, a) == M.RoutingAgreement(4, 1.0, 1.0, 1.0)
    assert math.isnan(r.weight_shift)  # no weights given
    masked = M.routing_agreement(a, b, mask=torch.tensor([False, True, True, False]))
    assert masked[:4] == (2, 0.5, (3 + 1) / 6, 0.5)
    none = M.routing_agreement(a, b, mask=torch.zeros(4, dtype=torch.bool))
    assert none.tokens == 0 and math.isnan(none.top1) and math.isnan(none.overlap)
    # weight shift: row 0 swaps the weights of the same two experts (|.6-.3| + |.4-.7| = .6),
    # row 1 moves .5 from expert 3 to expert 4 (.5 + .5); halved and averaged: (.3 + .5) / 2
    ids_a, ids_b = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 4]])
    w_a, w_b = torch.tensor([[.6, .4], [.5, .5]]), torch.tensor([[.7, .3], [.5, .5]])
    r = M.routing_agreement(ids_a, ids_b, weights_a=w_a, weights_b=w_b)
    assert r[:4] == (2, 0.5, 0.75, 0.5) and r.weight_shift == pytest.approx(0.4, abs=1e-7)
    same = M.routing_agreement(ids_a, ids_a[:, [1, 0]], weights_a=w_a, weights_b=w_a[:, [1, 0]])
    assert same.weight_shift == 0.0 and same.identical == 1.0


def test_routing_agreement_random_against_loop(monkeypatch):
    g = torch.Generator().manual_seed(5)
    N, E, k = 200, 12, 4
    a = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    b = a.clone()
    swap = torch.rand(N, generator=g) < 0.5      # half the tokens get other experts
    b[swap] = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(int(swap.sum()))])
    w_a = torch.rand(N, k, generator=g, dtype=torch.float64)
    w_b = torch.where(swap[:, None], torch.rand(N, k, generator=g, dtype=torch.float64), w_a)
    want = ref_agreement(a.tolist(), b.tolist(), w_a.tolist(), w_b.tolist())
    got = M.routing_agreement(a, b.to(torch.int32), weights_a=w_a, weights_b=w_b)
    assert got.tokens == N
    for x, y in zip(got[1:], want):
        assert close(x, y, 1e-12)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 16)  # one token per chunk
    chunked = M.routing_agreement(a, b, weights_a=w_a, weights_b=w_b)
    assert chunked[:4] == got[:4] and close(chunked.weight_shift, got.weight_shift, 1e-12)


def test_routing_agreement_errors_name_the_argument():
    a = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"same shape .* \(2, 2\) and \(2, 1\)"):
        M.routing_agreement(a, a[:, :1])
    with pytest.raises(ValueError, match=r"ids_b must hold k distinct experts per token; row 1 "
                                         r"is \[3, 3\]"):
        M.routing_agreement(a, torch.tensor([[0, 1], [3, 3]]))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[2\]"):
        M.routing_agreement(a, a, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ids must be an int tensor"):
        M.routing_agreement(a.float(), a)
    with pytest.raises(ValueError, match="pass both weights_a and weights_b or neither"):
        M.routing_agreement(a, a, weights_a=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"weights_b must be a float tensor of the ids' shape "
                                         r"\(2, 2\), got torch.int64"):
        M.routing_agreement(a, a, weights_a=torch.ones(2, 2), weights_b=a)


def test_trace_agreement_per_layer_and_ungrouped_rows():
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int16)
    plain = {"l0": {"ids": ids, "weights": torch.ones(3, 2), "group": ["x", "x", None]},
             "l1": {"ids": ids, "weights": torch.ones(3, 2), "group": ["x", "x", None]}}
    steered = {"l0": dict(plain["l0"]),
               "l1": {"ids": torch.tensor([[0, 1], [3, 6], [7, 8]], dtype=torch.int16),
                      "weights": torch.ones(3, 2), "group": ["y", "y", None]}}
    out = M.trace_agreement(plain, steered)
    assert list(out) == ["l0", "l1"]
    assert out["l0"] == M.RoutingAgreement(2, 1.0, 1.0, 1.0, 0.0)
    # the None row is left out; row 1 moves weight 1 from expert 2 to expert 6
    assert out["l1"] == M.RoutingAgreement(2, 0.5, 0.75, 0.5, 0.5)
    every = M.trace_agreement(plain, steered, skip_ungrouped=False)
    assert every["l1"] == M.RoutingAgreement(3, 1 / 3, 3 / 6, 1 / 3, 1.0)
    no_weights = {name: {"ids": layer["ids"], "group": layer["group"]}
                  for name, layer in steered.items()}
    assert math.isnan(M.trace_agreement(plain, no_weights)["l1"].weight_shift)
    with pytest.raises(ValueError, match=r"same layers; only in trace_a: \['l1'\]"):
        M.trace_agreement(plain, {"l0": plain["l0"]})
    short = {"l0": plain["l0"], "l1": {"ids": ids[:2], "weights": torch.ones(2, 2),
                                       "group": ["x", "x"]}}
    with pytest.raises(ValueError, match="layer 'l1': .*same shape"):
        M.trace_agreement(plain, short)
    with pytest.raises(TypeError, match="trace_b must be a mapping"):
        M.trace_agreement(plain, [plain])


def test_trace_agreement_checks_the_traces_models_and_tokens():
    """Traces that record expert counts and token ids: another expert count is another model
    (an error); other tokens in some rows (a generate() that decoded otherwise) are compared with
    one warning that counts them; unknown tokens (-1) and identical ones say nothing."""
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int16)

    def trace(tokens, experts=8):
        layer = {"ids": ids, "weights": torch.ones(3, 2), "group": ["x"] * 3,
                 "tokens": torch.tensor(tokens, dtype=torch.int32), "experts": experts}
        return {"l0": layer, "l1": dict(layer)}

    a = trace([5, 6, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.trace_agreement(a, trace([5, 6, -1]))["l0"].top1 == 1.0
    with pytest.warns(UserWarning, match=r"the traces hold different tokens \(2 of 3 rows of "
                                         r"layer 'l0'\)") as caught:
        M.trace_agreement(a, trace([5, 9, 9]))
    assert len(caught) == 1
    with pytest.raises(ValueError, match=r"layer 'l0' has 8 experts in trace_a and 64 in "
                                         r"trace_b: traces of different models"):
        M.trace_agreement(a, trace([5, 6, 7], experts=64))


def test_mean_pairwise_overlap():
    # group 0: tokens {0,1}, {0,1}, {0,2}: counts [3, 2, 1]; sum c(c-1) = 6 + 2 = 8;
    # 8 / (k n (n-1)) = 8 / 12 = 2/3 (= mean over pairs of |∩|/k: (1 + ½ + ½) / 3)
    layer = make_layer(0, [3, 1, 0], [[3, 2, 1], [1, 1, 0], [0, 0, 0]], top_k=2)
    o = M.mean_pairwise_overlap(RoutingStats([layer], ["g", "single", "empty"]))
    assert close(float(o[0, 0]), 2 / 3) and o[0, 1:].isnan().all()


def test_expert_set_jaccard():
    a = torch.tensor([[3.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 5.0]])
    # activated sets: {0,2} vs {0,1} -> 1/3; {0,1,2} vs {2,3} -> 1/4
    assert torch.allclose(M.expert_set_jaccard(a, b), torch.tensor([1 / 3, 1 / 4]))
    # top-1: {0} vs {1} -> 0; ties in a row 2 go to the lower index: {0} vs {3} -> 0
    assert M.expert_set_jaccard(a, b, m=1).tolist() == [0.0, 0.0]
    # top-2: {0,2} vs {1,0} -> 1/3; {0,1} vs {3,2} -> 0
    assert torch.allclose(M.expert_set_jaccard(a, b, m=2), torch.tensor([1 / 3, 0.0]))
    assert M.expert_set_jaccard(torch.zeros(4), torch.zeros(4)).isnan()      # both empty
    assert M.expert_set_jaccard(torch.tensor([nan, 1.0]), torch.ones(2)).isnan()
    with pytest.raises(ValueError, match=r"m=5 must be None \(activated experts\) or an int in "
                                         r"\[1, 4\] \(top-scoring experts of E=4\)"):
        M.expert_set_jaccard(a, b, m=5)


def test_expert_set_jaccard_dtypes():
    a = torch.tensor([[3.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 5.0]])
    # bool masks are the sets themselves: as the activated sets of the scores above
    assert torch.equal(M.expert_set_jaccard(a > 0, b > 0), M.expert_set_jaccard(a, b))
    with pytest.raises(TypeError, match=r"m=2 ranks scores, but a or b is a bool mask"):
        M.expert_set_jaccard(a > 0, b, m=2)
    with pytest.raises(TypeError, match="a must be a real floating-point, integer or bool "
                                        "tensor, got torch.complex64"):
        M.expert_set_jaccard(a.to(torch.complex64), b)


def test_expert_set_jaccard_top_m_ties_against_loop():
    # small integer counts: many ties at the m-th place, decided towards the lower expert index
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, 3, (3, 40, 6), generator=g)
    b = torch.randint(0, 3, (40, 6), generator=g)  # broadcast against every row block of a

    def top(row, m):
        return set(sorted(range(len(row)), key=lambda e: (-row[e], e))[:m])

    for m in (1, 2, 3, 6):
        got = M.expert_set_jaccard(a, b, m=m)
        assert got.shape == (3, 40)
        for i, j in itertools.product(range(3), range(40)):
            sa, sb = top(a[i, j].tolist(), m), top(b[j].tolist(), m)
            assert close(float(got[i, j]), len(sa & sb) / len(sa | sb)), (m, i, j)


# -------------------------------------------------------------------------------------------
# co-activation and load


def test_coactivation():
    # k = 2, four tokens {0,1}, {0,2}, {0,2}, {1,2}; expert 3 never chosen (diagonal 0)
    coact = [[3, 1, 2, 0], [1, 2, 1, 0], [2, 1, 3, 0], [0, 0, 0, 0]]
    layer = make_layer(0, [4], [[3, 2, 3, 0]], top_k=2, coact=coact)
    stats = RoutingStats([layer], ["g"])
    assert M.coactivation(stats).tolist() == [coact]
    p = M.conditional_coactivation(stats)[0]
    torch.testing.assert_close(p[:3], torch.tensor([[1.0, 1 / 3, 2 / 3, 0.0],
                                                    [0.5, 1.0, 0.5, 0.0],
                                                    [2 / 3, 1 / 3, 1.0, 0.0]]))
    assert p[3].isnan().all()
    torch.testing.assert_close(M.conditional_coactivation(torch.tensor(coact)), p, equal_nan=True)
    with pytest.raises(ValueError, match="no coact; record with coact=True"):
        M.coactivation(RoutingStats([make_layer(0, [1], [[1, 0]])], ["g"]))
    with pytest.raises(ValueError, match="coact must be square"):
        M.conditional_coactivation(torch.ones(2, 3))


def test_load_balance():
    # [4, 0, 2, 2]: mean 2, population std sqrt((4 + 4 + 0 + 0) / 4) = sqrt 2
    lb = M.load_balance(torch.tensor([[4, 0, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]))
    assert close(float(lb.cv[0]), math.sqrt(2) / 2) and float(lb.max_over_mean[0]) == 2.0
    assert lb.dead_fraction.tolist() == [0.25, 0.0, 1.0]
    assert float(lb.cv[1]) == 0.0 and float(lb.max_over_mean[1]) == 1.0
    assert lb.cv[2].isnan() and lb.max_over_mean[2].isnan()
    one = M.load_balance(torch.tensor([7.0]))  # E = 1
    assert float(one.cv) == 0.0 and float(one.max_over_mean) == 1.0
    # one expert takes everything: cv = sqrt(E - 1), max/mean = E
    allon = M.load_balance(torch.tensor([8.0, 0, 0, 0, 0]))
    assert close(float(allon.cv), 2.0) and close(float(allon.max_over_mean), 5.0)
    # RoutingStats: load = counts summed over groups, per layer
    stats = importance_stats()  # layer 1 load: [6, 5, 1]
    lb = M.load_balance(stats)
    mean, var = 4.0, ((6 - 4) ** 2 + (5 - 4) ** 2 + (1 - 4) ** 2) / 3
    assert close(float(lb.cv[1]), math.sqrt(var) / mean) and close(float(lb.max_over_mean[1]), 1.5)
    with pytest.raises(ValueError, match="load must be >= 0"):
        M.load_balance(torch.tensor([1.0, -1.0]))


def test_load_balance_layers_with_different_numbers_of_experts():
    # loads (counts summed over groups): layer 0 [2, 2, 2, 2], layer 1 [6, 0, 0, 0, 0, 0]
    stats = RoutingStats([make_layer(0, [2, 2], [[1, 1, 1, 1], [1, 1, 1, 1]]),
                          make_layer(1, [3, 3], [[3, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0]])],
                         ["g", "h"])
    lb = M.load_balance(stats)
    assert lb.cv.shape == (2,) and lb.cv.dtype == f32
    assert float(lb.cv[0]) == 0.0 and close(float(lb.cv[1]), math.sqrt(5))  # sqrt(E - 1)
    assert lb.max_over_mean.tolist() == [1.0, 6.0]
    assert close(float(lb.dead_fraction[1]), 5 / 6)


def test_load_balance_needs_real_loads_over_at_least_one_expert():
    with pytest.raises(ValueError, match=r"load must have at least one expert .* \(3, 0\)"):
        M.load_balance(torch.zeros(3, 0))
    for dtype in (torch.complex64, torch.bool):
        with pytest.raises(TypeError, match=f"load must be a real floating-point or integer "
                                            f"tensor, got {dtype}"):
            M.load_balance(torch.ones(3, dtype=dtype))


# -------------------------------------------------------------------------------------------
# correlation


def test_pearson_spearman_hand_values():
    x, y = torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, 4, 5, 9])
    # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]: 11 / sqrt(5 * 26)
    assert close(float(M.pearson(x, y)), 11 / math.sqrt(130), 1e-12)
    assert close(float(M.spearman(x, y)), 1.0, 1e-12)  # monotone
    # ties: ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5)
    xt, yt = torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4])
    assert close(float(M.spearman(xt, yt)), 4.5 / math.sqrt(22.5), 1e-12)
    assert close(float(M.spearman(x, -y)), -1.0, 1e-12)
    assert M.pearson(torch.ones(4), y).isnan()            # constant: undefined
    # ... also where the rounded mean leaves deviations of 1e-17 (equal accuracies of 0.1)
    f64 = torch.float64
    assert M.pearson(torch.full((3,), 0.1, dtype=f64), torch.tensor([0.3, 0.9, 0.5])).isnan()
    assert M.pearson(torch.arange(7.0), torch.full((7,), 0.1, dtype=f64)).isnan()
    assert M.spearman(torch.tensor([1.0, nan, 2]), torch.ones(3)).isnan()
    batched = M.pearson(torch.stack([x, -x]), y)          # rows correlated at once
    assert close(float(batched[1]), -11 / math.sqrt(130), 1e-12)
    with pytest.raises(ValueError, match="at least 2 values"):
        M.pearson(torch.ones(1), torch.ones(1))
    with pytest.raises(TypeError, match="y must be a real floating-point, integer or bool "
                                        "tensor, got torch.complex64"):
        M.spearman(x, y.to(torch.complex64))
    # a bool variable is a 0/1 one (point-biserial correlation)
    assert close(float(M.pearson(x > 2, y)), float(M.pearson((x > 2).double(), y)), 1e-12)


def test_divergence_accuracy_correlation():
    divergence = {  # [L = 4]; the middle layers 1..2 average to 0.2, 0.4, 0.3, 0.8
        "fra": torch.tensor([0.9, 0.1, 0.3, 0.9]),
        "deu": torch.tensor([0.5, 0.4, 0.4, 0.1]),
        "zho": torch.tensor([0.1, 0.2, 0.4, 0.7]),
        "bam": torch.tensor([0.9, 0.8, 0.8, 0.9]),
    }
    accuracy = {"eng": 0.95, "fra": 0.9, "deu": 0.85, "zho": 0.8, "bam": 0.3}
    res = M.divergence_accuracy_correlation(divergence, accuracy, layers=range(1, 3))
    assert res.languages == ("fra", "deu", "zho", "bam") and res.layers == (1, 2)
    mid = [0.2, 0.4, 0.3, 0.8]
    for lang, v in zip(res.languages, mid):
        assert close(res.middle_divergence[lang], v)
    acc = [0.9, 0.85, 0.8, 0.3]
    mx, ma = sum(mid) / 4, sum(acc) / 4
    sxy = sum((a - mx) * (b - ma) for a, b in zip(mid, acc))
    r = sxy / math.sqrt(sum((a - mx) ** 2 for a in mid) * sum((b - ma) ** 2 for b in acc))
    assert close(res.pearson, r, 1e-6)
    # ranks of mid [1, 3, 2, 4], of acc [4, 3, 2, 1]: d² = 9 + 0 + 0 + 9 -> 1 - 6·18/(4·15)
    assert close(res.spearman, 1 - 6 * 18 / 60, 1e-9)
    assert res.pearson_per_layer.shape == (4,)
    assert close(float(res.pearson_per_layer[1]),
                 float(M.pearson(torch.tensor([0.1, 0.4, 0.2, 0.8]), torch.tensor(acc))), 1e-6)
    # decoder-layer indices instead of positions
    by_index = M.divergence_accuracy_correlation(divergence, accuracy, layers=[11, 12],
                                                 layer_indices=[10, 11, 12, 13])
    assert close(by_index.pearson, res.pearson, 1e-12)
    with pytest.raises(ValueError, match=r"layers are positions along L=4.*\[4\]"):
        M.divergence_accuracy_correlation(divergence, accuracy, layers=[3, 4])
    with pytest.raises(ValueError, match=r"layers holds 9, which is not a layer here"):
        M.divergence_accuracy_correlation(divergence, accuracy, layers=[9],
                                          layer_indices=[10, 11, 12, 13])
    # a loop layer's two passes (positions 1 and 2 are layer 11's): an index takes both, a
    # pass's name one; indices alone cannot tell passes from an encoder's and a decoder's layer
    names = ["model.layers.10.mlp.gate", "model.layers.11.mlp.gate@pass0",
             "model.layers.11.mlp.gate@pass1", "model.layers.13.mlp.gate"]
    loop = M.divergence_accuracy_correlation(divergence, accuracy, layers=[11],
                                             layer_names=names)
    assert close(loop.pearson, res.pearson, 1e-12)
    one = M.divergence_accuracy_correlation(divergence, accuracy, layers=[names[2]],
                                            layer_names=names)
    assert one.middle_divergence == {lang: float(d[2]) for lang, d in divergence.items()
                                     if lang in accuracy}
    with pytest.raises(ValueError, match=r"layer_indices gives layer 11 to positions \[1, 2\] "
                                         r".*pass layer_names=stats.layer_names"):
        M.divergence_accuracy_correlation(divergence, accuracy, layers=[11],
                                          layer_indices=[10, 11, 11, 13])
    with pytest.raises(ValueError, match="needs at least 3 languages"):
        M.divergence_accuracy_correlation(divergence, {"fra": 0.9, "deu": 0.8}, layers=[1])
    with pytest.raises(ValueError, match=r"accuracy\['fra'\]=nan must be a finite number"):
        M.divergence_accuracy_correlation(divergence, dict(accuracy, fra=nan), layers=[1])
    with pytest.raises(ValueError, match="middle-layer divergence is NaN for \\['deu'\\]"):
        M.divergence_accuracy_correlation(dict(divergence, deu=torch.full((4,), nan)),
                                          accuracy, layers=[1])
    for layers in (None, "12", True):
        with pytest.raises(TypeError, match=rf"layers must be the middle layers, an int or an "
                                            rf"iterable of ints .*, got {layers!r}"):
            M.divergence_accuracy_correlation(divergence, accuracy, layers)


# -------------------------------------------------------------------------------------------
# token specialisation


def test_expert_token_counts_and_specialisation():
    # 5 tokens, k = 2, E = 3; token ids 7, 9, 7, 5, 7
    ids = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1]], dtype=torch.int16)
    token_ids = torch.tensor([7, 9, 7, 5, 7])
    tr = M.expert_token_counts(ids, token_ids, 3)
    assert tr.token_ids.tolist() == [5, 7, 9] and tr.occurrences.tolist() == [1, 3, 1]
    assert tr.counts.tolist() == [[0, 3, 0], [1, 2, 1], [1, 1, 1]]  # [E, U]
    # token 7: expert 0 in all 3 occurrences -> 1; tokens 5 and 9 occur once -> 1
    assert M.token_specialisation(tr).tolist() == [1.0, 1.0, 1.0]
    h = M.expert_token_entropy(tr)
    assert float(h[0]) == 0.0                                   # expert 0 only ever saw 7
    assert close(float(h[1]), ref_entropy([0.25, 0.5, 0.25]))
    assert close(float(h[2]), math.log(3))
    assert close(float(M.expert_token_entropy(tr, normalised=True)[2]), 1.0)
    top_ids, top_counts = M.expert_top_tokens(tr, 2)
    assert top_ids.tolist() == [[7, 5], [7, 5], [5, 7]]         # ties to the lower token id
    assert top_counts.tolist() == [[3, 0], [2, 1], [1, 1]]
    masked = M.expert_token_counts(ids, token_ids, 4, mask=torch.tensor([1, 1, 0, 0, 0]).bool())
    assert masked.counts.tolist() == [[1, 0], [1, 1], [0, 1], [0, 0]]
    assert M.expert_token_entropy(masked)[3].isnan()            # expert 3: no token
    with pytest.raises(ValueError, match=r"ids must be in \[0, num_experts=2\)"):
        M.expert_token_counts(ids, token_ids, 2)
    with pytest.raises(ValueError, match=r"token_ids must be int32/int64 of shape \[5\]"):
        M.expert_token_counts(ids, token_ids[:4], 3)
    with pytest.raises(ValueError,
                       match=r"num_experts=1099511627776 must be an int in \[1, 1048576\]"):
        M.expert_token_counts(ids, token_ids, 2 ** 40)  # a dense [E, U] table of it cannot fit
    with pytest.raises(TypeError,
                       match=r"num_experts='3' must be an int in \[1, 1048576\], got str"):
        M.expert_token_counts(ids, token_ids, "3")
    with pytest.raises(TypeError, match="n=2.0 must be an int >= 1, got float"):
        M.expert_top_tokens(tr, 2.0)


def test_token_specialisation_partial():
    # token 4 occurs 4 times: expert 1 three times, expert 0 once -> 3/4
    ids = torch.tensor([[1], [1], [0], [1]])
    tr = M.expert_token_counts(ids, torch.tensor([4, 4, 4, 4]), 2)
    assert M.token_specialisation(tr).tolist() == [0.75]


def test_trace_token_routing_skips_ungrouped_rows():
    trace = {"model.layers.0.mlp.gate": {"ids": torch.tensor([[0], [1], [1]], dtype=torch.int16),
                                         "weights": torch.ones(3, 1), "group": ["a", None, "a"]}}
    out = M.trace_token_routing(trace, torch.tensor([3, 3, 4]), 2)
    tr = out["model.layers.0.mlp.gate"]
    assert tr.token_ids.tolist() == [3, 4] and tr.counts.tolist() == [[1, 0], [0, 1]]
    every = M.trace_token_routing(trace, torch.tensor([3, 3, 4]), 2, skip_ungrouped=False)
    assert every["model.layers.0.mlp.gate"].counts.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="layer 'model.layers.0.mlp.gate': .*token_ids"):
        M.trace_token_routing(trace, torch.tensor([3, 3]), 2)
    with pytest.raises(ValueError, match=r"trace\['model.layers.0.mlp.gate'\] holds no 'tokens' "
                                         r".*; pass token_ids"):
        M.trace_token_routing(trace)


def test_trace_token_routing_reads_the_trace_s_tokens_and_expert_count():
    """A recorder trace carries each row's token id and the layer's expert count: by default
    those are used, and rows of unknown token (-1, a call given embeddings) are left out."""
    trace = {"l": {"ids": torch.tensor([[0], [1], [1], [2]], dtype=torch.int16),
                   "weights": torch.ones(4, 1), "group": ["a", None, "a", "a"],
                   "tokens": torch.tensor([3, 3, 4, -1], dtype=torch.int32), "experts": 3}}
    tr = M.trace_token_routing(trace)["l"]
    assert tr.token_ids.tolist() == [3, 4] and tr.counts.tolist() == [[1, 0], [0, 1], [0, 0]]
    given = M.trace_token_routing(trace, torch.tensor([5, 5, 5, 5]), 4)["l"]
    assert given.token_ids.tolist() == [5] and given.counts.tolist() == [[1], [1], [1], [0]]


def transitions_trace():
    """Two layers over the same 4 rows; E = 3 at the source, 4 at the target, k = 2; row 2 is
    padding (None) and row 3 belongs to group "b"."""
    def layer(ids, E):
        return {"ids": torch.tensor(ids, dtype=torch.int16), "weights": torch.ones(4, 2),
                "group": ["a", "a", None, "b"], "tokens": torch.tensor([5, 6, 0, 7]),
                "experts": E}
    return {"model.layers.0.mlp.gate": layer([[0, 1], [2, 0], [1, 2], [1, 2]], 3),
            "model.layers.7.mlp.gate": layer([[3, 0], [3, 1], [0, 1], [2, 0]], 4)}


def test_trace_transitions_known_answer():
    """pairs="all" counts each of a token's source experts with each of its target experts;
    "rank" the r-th with the r-th (OLMoE's zip of the two layers' top-k); padding is left out.
      row 0: source {0, 1} -> target {3, 0}; row 1: {2, 0} -> {3, 1}; row 3: {1, 2} -> {2, 0}
    all:  (0,3) (0,0) (1,3) (1,0) | (2,3) (2,1) (0,3) (0,1) | (1,2) (1,0) (2,2) (2,0)
    rank: (0,3) (1,0) | (2,3) (0,1) | (1,2) (2,0)"""
    trace = transitions_trace()
    t = M.trace_transitions(trace, "model.layers.0.mlp.gate", "model.layers.7.mlp.gate")
    assert t.counts.tolist() == [[1, 1, 0, 2],
                                 [2, 0, 1, 1],
                                 [1, 1, 1, 1]]
    assert t.source.tolist() == [2, 2, 2] and t.target.tolist() == [2, 1, 1, 2]
    assert t.tokens == 3 and t.pairs == "all"
    # P(b | a) = counts / source: rows sum to k = 2
    assert t.conditional().tolist() == [[0.5, 0.5, 0.0, 1.0], [1.0, 0.0, 0.5, 0.5],
                                        [0.5, 0.5, 0.5, 0.5]]
    # lift = counts * 12 / (row total 4 * column total [4, 2, 2, 4])
    assert t.lift().tolist() == [[0.75, 1.5, 0.0, 1.5], [1.5, 0.0, 1.5, 0.75],
                                 [0.75, 1.5, 1.5, 0.75]]
    r = M.trace_transitions(trace, 0, 7, pairs="rank")
    assert r.counts.tolist() == [[0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 0, 1]]
    assert r.conditional().sum(1).tolist() == [1.0, 1.0, 1.0]
    # lift = counts * 6 / (row total 2 * column total [2, 1, 1, 2])
    assert r.lift().tolist() == [[0.0, 3.0, 0.0, 1.5], [1.5, 0.0, 3.0, 0.0], [1.5, 0.0, 0.0, 1.5]]
    # groups by name or by a function of the name: row 3 alone
    for groups in (["b"], {"b", "zzz"}, lambda g: g.startswith("b")):
        only = M.trace_transitions(trace, 0, 7, groups=groups)
        assert only.tokens == 1 and only.counts.sum() == 4
        assert only.counts[1].tolist() == [1, 0, 1, 0] and only.counts[2].tolist() == [1, 0, 1, 0]
    # an expert never chosen at the source has a NaN row
    none = M.trace_transitions(trace, 0, 7, groups=["b"])
    assert none.conditional()[0].isnan().all() and none.lift()[0].isnan().all()


def test_trace_transitions_of_a_recorded_trace_in_chunks(monkeypatch):
    """On a recorded trace (the tiny OLMoE, two groups, padding), every counted row's
    pairs by a loop by hand, the same when the rows are taken two at a time."""
    import moe_route
    from tiny_models import build

    pytest.importorskip("transformers")
    model = build("olmoe")
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        rec.set_groups(torch.tensor([0, 1, 0]), ["x", "y"])
        model(input_ids=ids, attention_mask=mask)
    trace = rec.trace
    first, last = list(trace)[0], list(trace)[-1]
    a, b = trace[first]["ids"].long(), trace[last]["ids"].long()
    E, k = trace[first]["experts"], a.shape[1]
    want = torch.zeros(E, E, dtype=torch.int64)
    want_rank = torch.zeros(E, E, dtype=torch.int64)
    for t, group in enumerate(trace[first]["group"]):
        if group is None:
            continue
        for i in range(k):
            want_rank[a[t, i], b[t, i]] += 1
            for j in range(k):
                want[a[t, i], b[t, j]] += 1
    assert trace[first]["group"].count(None) == 2
    got = M.trace_transitions(trace, first, last)
    assert torch.equal(got.counts, want) and got.tokens == 19
    assert torch.equal(M.trace_transitions(trace, first, last, pairs="rank").counts, want_rank)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 2 * k * k)
    assert torch.equal(M.trace_transitions(trace, first, last).counts, want)


def test_trace_transitions_errors():
    trace = transitions_trace()
    with pytest.raises(ValueError, match=r"source holds 'model.layers.3.mlp.gate', which is not "
                                         r"a layer here; the layers are decoder layers \[0, 7\]"):
        M.trace_transitions(trace, "model.layers.3.mlp.gate", 7)
    # ints are decoder-layer indices, not positions in the trace (1 was layer 7)
    with pytest.raises(ValueError, match=r"target holds 1, which is not a layer here"):
        M.trace_transitions(trace, 0, 1)
    with pytest.raises(TypeError, match=r"source must be a decoder-layer index \(int\) or a "
                                        r"layer name \(str\), got float"):
        M.trace_transitions(trace, 0.0, 7)
    with pytest.raises(ValueError, match="pairs='both' must be one of"):
        M.trace_transitions(trace, 0, 7, pairs="both")
    with pytest.raises(TypeError, match="groups must be None, a collection of group names"):
        M.trace_transitions(trace, 0, 7, groups="a")
    with pytest.raises(TypeError, match=r"groups must hold group names \(str\), got \[\['a'\]\]"):
        M.trace_transitions(trace, 0, 7, groups=[["a"]])
    short = {name: dict(layer) for name, layer in trace.items()}
    short["model.layers.7.mlp.gate"]["ids"] = torch.tensor([[3], [3], [0], [2]])
    short["model.layers.7.mlp.gate"]["weights"] = torch.ones(4, 1)
    assert M.trace_transitions(short, 0, 7).counts.sum() == 3 * 2
    with pytest.raises(ValueError, match="pairs='rank' .* needs the same k; .* has k=2, .* k=1"):
        M.trace_transitions(short, 0, 7, pairs="rank")
    other = {name: dict(layer) for name, layer in trace.items()}
    other["model.layers.7.mlp.gate"]["tokens"] = torch.tensor([5, 6, 0, 8])
    with pytest.raises(ValueError, match="hold different tokens in 1 of 4 rows"):
        M.trace_transitions(other, 0, 7)
    for key, value, msg in (("experts", None, "holds no 'experts'"),
                            ("group", ["a"], "must hold N=4 group names")):
        bad = {name: dict(layer) for name, layer in trace.items()}
        bad["model.layers.0.mlp.gate"][key] = value
        with pytest.raises(ValueError, match=msg):
            M.trace_transitions(bad, 0, 7)
    dup = {name: dict(layer) for name, layer in trace.items()}
    dup["model.layers.0.mlp.gate"]["ids"] = torch.tensor([[0, 0], [2, 0], [1, 2], [1, 2]])
    with pytest.raises(ValueError, match="must hold k distinct experts per token; row 0"):
        M.trace_transitions(dup, 0, 7)


# -------------------------------------------------------------------------------------------
# Δ-experts


def delta_example():
    """Layers 3 and 5 (decoder indices), E = 4, k = 1, two sequences of 4 tokens each.

    Frequencies a/L are multiples of 1/4 (exact in fp32). Mean F over the two sequences:
      task     layer 3: [0.75, 0.25, 0.0, 0.0]   layer 5: [0.25, 0.25, 0.5, 0.0]
      baseline layer 3: [0.25, 0.25, 0.5, 0.0]   layer 5: [0.25, 0.5,  0.0, 0.25]
      Δ        layer 3: [0.5,  0.0, -0.5, 0.0]   layer 5: [0.0, -0.25, 0.5, -0.25]
    """
    task = RoutingStats([
        make_layer(3, [4, 4], [[3, 1, 0, 0], [3, 1, 0, 0]]),
        make_layer(5, [4, 4], [[1, 1, 2, 0], [1, 1, 2, 0]]),
    ], ["gsm/0", "gsm/1"])
    base = RoutingStats([
        make_layer(3, [4, 4], [[2, 0, 2, 0], [0, 2, 2, 0]]),
        make_layer(5, [4, 4], [[1, 2, 0, 1], [1, 2, 0, 1]]),
    ], ["eng/0", "eng/1"])
    return task, base


def test_delta_experts_known_answer():
    task, base = delta_example()
    delta = X.delta_frequency(task, base)
    assert delta.tolist() == [[0.5, 0.0, -0.5, 0.0], [0.0, -0.25, 0.5, -0.25]]
    assert X.task_experts(task, base, tau=0.3) == {3: [0], 5: [2]}
    assert X.task_experts(task, base, tau=0.5) == {3: [], 5: []}  # strict: Δ = τ is not in
    assert delta.dtype == torch.float64
    assert X.task_experts(task, base, tau=-0.1) == {3: [0, 1, 3], 5: [2, 0]}  # by Δ, ties low
    assert X.task_experts(task, base, tau=0.3, layers=range(4, 10)) == {5: [2]}
    # a layer named by its router's or its block's module path, as everywhere
    for path in ("model.layers.5.mlp.gate", "model.layers.5.mlp"):
        assert X.task_experts(task, base, tau=0.3, layers=[path]) == {5: [2]}
        assert X.plan_from_experts({3: [0], 5: [2]}, layers=[path]).layers == [5]
    with pytest.raises(ValueError, match="none of layers=\\[0, 1\\] is a layer"):
        X.task_experts(task, base, tau=0.3, layers=[0, 1])
    with pytest.raises(ValueError, match="tau=nan must be a finite number"):
        X.task_experts(task, base, tau=nan)
    # plain [L, E] frequencies: positions as keys unless layer_keys
    f = X.mean_activation_frequency(task)
    assert X.task_experts(f, X.mean_activation_frequency(base), 0.3) == {0: [0], 1: [2]}
    assert X.experts_above(delta, 0.3, ["a", "b"]) == {"a": [0], "b": [2]}


def test_delta_equal_to_tau_by_hand_is_not_above():
    """F = 5/10 against 2/10: Δ = 0.3, which float64 arithmetic by hand does not put above
    τ = 0.3 (float32 frequencies did: 0.5 − 0.2 rounds to 0.30000001). Same for languages."""
    task = RoutingStats([make_layer(0, [10], [[5, 5]])], ["gsm/0"])
    base = RoutingStats([make_layer(0, [10], [[2, 8]])], ["eng/0"])
    assert X.task_experts(task, base, tau=0.3) == {0: []}
    assert X.task_experts(task, base, tau=0.29) == {0: [0]}
    both = RoutingStats([make_layer(0, [10, 10], [[2, 8], [5, 5]])], ["eng/0", "fra/0"])
    assert X.language_experts(both, 0.3, "eng") == {0: []}
    assert X.language_delta(both, "eng", against="others")["fra"].dtype == torch.float64


def test_delta_no_false_positives_random():
    # task = baseline + a planted +0.6 on known experts; everything else moves by < 0.2
    g = torch.Generator().manual_seed(5)
    L, E = 6, 16
    base = torch.rand(L, E, generator=g) * 0.3
    noise = (torch.rand(L, E, generator=g) - 0.5) * 0.38
    planted = {0: [3], 2: [1, 7], 5: [15]}
    task = base + noise
    for layer, es in planted.items():
        task[layer, es] = base[layer, es] + 0.6
    got = X.task_experts(task, base, tau=0.25)  # ordered by Δ: 0.6 up to the inputs' rounding
    assert {layer: sorted(es) for layer, es in got.items()} == \
        {layer: planted.get(layer, []) for layer in range(L)}


def test_mean_activation_frequency_skips_empty_sequences():
    stats = RoutingStats([make_layer(0, [2, 0, 4], [[2, 0], [0, 0], [1, 3]])], ["s0", "s1", "s2"])
    # mean of [1, 0] and [0.25, 0.75]; the empty sequence is left out, not averaged as 0
    assert X.mean_activation_frequency(stats).tolist() == [[0.625, 0.375]]


def language_example():
    """eng, fra, swh; 2 parallel sequences of 4 tokens; one layer (index 2), E = 4, k = 1.

    F: eng [0.5, 0.5, 0, 0], fra [0.5, 0.25, 0.25, 0], swh [0.25, 0.25, 0, 0.5] (sequence means).
    """
    counts = {
        "eng/0": [2, 2, 0, 0], "eng/1": [2, 2, 0, 0],
        "fra/0": [2, 1, 1, 0], "fra/1": [2, 1, 1, 0],
        "swh/0": [1, 1, 0, 2], "swh/1": [1, 1, 0, 2],
    }
    return RoutingStats([make_layer(2, [4] * 6, list(counts.values()))], list(counts))


def test_language_frequency_with_missing_and_empty_sequences():
    stats = RoutingStats([make_layer(0, [4, 2, 0, 4], [[4, 0], [1, 1], [0, 0], [2, 2]])],
                         ["en/0", "de/0", "de/1", "sw/1"])
    freq = X.language_frequency(stats)
    # de: sequence 0 only (sequence 1 has no tokens); sw: sequence 1 only (it lacks sequence 0)
    assert freq["en"].tolist() == [[1.0, 0.0]] and freq["de"].tolist() == [[0.5, 0.5]]
    assert freq["sw"].tolist() == [[0.5, 0.5]]


def test_language_experts_reference_and_others():
    stats = language_example()
    freq = X.language_frequency(stats)
    assert freq["swh"].tolist() == [[0.25, 0.25, 0.0, 0.5]]
    delta = X.language_delta(stats, "eng")
    assert list(delta) == ["fra", "swh"]
    assert delta["fra"].tolist() == [[0.0, -0.25, 0.25, 0.0]]
    assert delta["swh"].tolist() == [[-0.25, -0.25, 0.0, 0.5]]
    assert X.language_experts(stats, 0.2, "eng") == {2: [3, 2]}  # max Δ 0.5 (swh), 0.25 (fra)
    assert X.language_experts(stats, 0.3, "eng") == {2: [3]}
    # against the other languages: swh - mean(eng, fra) = [-0.25, -0.125, -0.125, 0.5]
    others = X.language_delta(stats, "eng", against="others")
    assert others["swh"].tolist() == [[-0.25, -0.125, -0.125, 0.5]]
    with pytest.raises(ValueError, match="reference='spa' is not among the languages"):
        X.language_delta(stats, "spa")
    with pytest.raises(ValueError, match="against='all' must be one of"):
        X.language_delta(stats, "eng", against="all")


def test_language_delta_others_skips_a_language_without_tokens_in_a_layer():
    # layer 2 as in language_example; in layer 5, fra has no tokens (e.g. a layer its sequences
    # were not recorded in): its own Δ is NaN there, and the others' mean leaves it out.
    base = language_example()
    names = base.group_names
    tokens5 = [4, 4, 0, 0, 4, 4]
    counts5 = [[4, 0, 0, 0]] * 2 + [[0, 0, 0, 0]] * 2 + [[0, 0, 4, 0]] * 2
    stats = RoutingStats([base[0], make_layer(5, tokens5, counts5)], names)
    others = X.language_delta(stats, "eng", against="others")
    assert others["swh"][0].tolist() == [-0.25, -0.125, -0.125, 0.5]   # layer 2 as before
    assert others["swh"][1].tolist() == [-1.0, 0.0, 1.0, 0.0]          # swh - eng; fra left out
    assert others["fra"][1].isnan().all()
    assert X.language_delta(stats, "eng")["swh"][1].tolist() == [-1.0, 0.0, 1.0, 0.0]
    # experts still found in the layer fra lacks
    assert X.language_experts(stats, 0.6, "eng", against="others") == {2: [], 5: [2]}


def test_expert_overlap_and_modularity():
    task = {3: [0, 5], 5: [2], 7: []}
    lang = {3: [5, 1], 5: [4], 9: [1]}
    assert X.expert_overlap(task, lang) == {3: [5], 5: []}
    with pytest.raises(TypeError, match=r"expert_overlap: a\[0\] must be an iterable of expert "
                                        r"ids, got 1 \(int\)"):
        X.expert_overlap({0: 1}, {0: [1]})
    with pytest.raises(TypeError, match=r"expert_overlap: b\['l'\] must be an iterable of expert "
                                        r"ids, got '12' \(str\)"):
        X.expert_overlap({"l": [1, 2]}, {"l": "12"})


def test_layer_keys_fall_back_to_names():
    stats = RoutingStats([make_layer(None, [1], [[1, 0]], name="blocks.a.router"),
                          make_layer(4, [1], [[1, 0]])], ["g"])
    assert X.layer_keys(stats) == ["blocks.a.router", "model.layers.4.mlp.gate"]


# -------------------------------------------------------------------------------------------
# steering plans


def test_plan_from_experts_soft_hard_caps_and_layers():
    experts = {3: [4, 1, 4, 9], 5: [2], 7: [], 40: [0]}
    soft = X.plan_from_experts(experts, "soft", lam=0.5, layers=range(3, 8), max_per_layer=2)
    assert soft.layers == [3, 5]                      # 7 has no expert, 40 is out of range
    assert dict(soft[3]) == {4: SteerEntry(std=0.5), 1: SteerEntry(std=0.5)}  # deduped, capped
    hard = X.plan_from_experts(experts, "hard")
    assert hard.layers == [3, 5, 40] and dict(hard[3]) == {e: SteerEntry(force=1)
                                                           for e in (1, 4, 9)}
    # JSON round trip (and the documented JSON form)
    assert SteeringPlan.from_json(soft.to_json()) == soft
    assert json.loads(soft.to_json())["layers"] == {"3": {"1": {"std": 0.5}, "4": {"std": 0.5}},
                                                    "5": {"2": {"std": 0.5}}}
    assert SteeringPlan.from_json(hard.to_json()) == hard
    # from identified experts end to end: the Δ order decides which survive the cap
    task, base = delta_example()
    plan = X.plan_from_experts(X.task_experts(task, base, -0.1), max_per_layer=1, lam=-0.25)
    assert plan.to_dict() == {3: {0: SteerEntry(std=-0.25)}, 5: {2: SteerEntry(std=-0.25)}}
    sample = X.plan_from_experts({3: [1]}, lam=0.5, std_unbiased=True)
    assert sample.to_dict() == {3: {1: SteerEntry(std=0.5, std_unbiased=True)}}


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(mode="medium"), ValueError, "mode='medium' must be one of"),
    (dict(lam=float("inf")), ValueError, "lam=inf must be a finite number"),
    (dict(max_per_layer=0), ValueError,
     "max_per_layer=0 must be None \\(no limit\\) or an int >= 1"),
    (dict(layers=[10, 11]), ValueError, "none of layers=\\[10, 11\\] is a key"),
    (dict(layers=3), TypeError, "layers must be an iterable of layer keys"),
    (dict(std_unbiased="yes"), TypeError, "std_unbiased='yes' must be a bool"),
    (dict(mode="hard", std_unbiased=True), ValueError,
     "std_unbiased=True applies to mode='soft' .* got mode='hard'"),
])
def test_plan_from_experts_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        X.plan_from_experts({3: [1]}, **kwargs)


def test_plan_from_experts_rejects_bad_experts():
    with pytest.raises(TypeError, match="experts_by_layer must be a mapping"):
        X.plan_from_experts([1, 2])
    with pytest.raises(TypeError, match=r"experts_by_layer\[3\] must be an iterable"):
        X.plan_from_experts({3: 1})
    with pytest.raises(ValueError, match="expert key -1 must be >= 0"):
        X.plan_from_experts({3: [-1]})
