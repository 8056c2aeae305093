"""moe_route.replay: a model routes its tokens to given experts, call by call or by position.

Known answers: replaying a model's own routing reproduces the model (outputs and gradients of the
unpatched model); a replayed run's trace holds the given ids, with the weights the family's rule
gives from the model's own logits at them; a forward over whole sequences and a KV-cache decode
under the same per-position routing agree; statistics count the replayed ids.
"""

import numpy as np
import pytest
import torch

import moe_route
from moe_route import reference as R
from moe_route import replaying
from moe_route.hf.patch import find_routers, layer_index

from tiny_models import build, cache_argument, enable_checkpointing, inputs, supported_families
from test_patch import CORE

pytest.importorskip("transformers")


def _ids(seed=0, shape=(3, 8)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _trace(model, ids, **kw):
    with moe_route.record(model, trace=True, trace_logits=True, trace_dtype=torch.float32) as rec:
        with torch.no_grad():
            out = model(ids, **kw)
    return rec.trace, out


def _random_routing(trace, seed=0, shape=None):
    """{router name: random distinct ids} shaped like each layer's trace ids (or ``shape``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in trace.items():
        N, k = layer["ids"].shape
        E = layer["logits"].shape[1]
        ids = torch.rand(N, E, generator=g).argsort(-1)[:, :k]
        out[name] = ids.reshape(*shape, k) if shape else ids
    return out


def _specs(model):
    handle = moe_route.patch(model)
    return {name: state.spec for name, state in handle.routers.items()}


@pytest.mark.parametrize("family", CORE)
def test_replaying_own_routing_reproduces_the_model(family):
    model = build(family)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    trace, _ = _trace(model, ids)
    with moe_route.replay(model, trace) as rp, torch.no_grad():
        got = model(ids).logits
    assert rp.used == {name: layer["ids"].shape[0] for name, layer in trace.items()}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not hasattr(model, "_moe_route_patch")  # the implicit patch is gone


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "deepseek_v3", "qwen3_moe"])
def test_replayed_ids_and_weights_known_answer(family):
    """Random routing: the run's trace holds exactly the given ids, and the weights the family's
    spec gives from the run's own logits at those ids."""
    model = build(family)
    ids = _ids(1)
    trace, _ = _trace(model, ids)
    routing = _random_routing(trace, seed=2)
    specs = _specs(model)
    moe_route.unpatch(model)
    with moe_route.replay(model, routing):
        got, _ = _trace(model, ids)
    for name, layer in got.items():
        assert torch.equal(layer["ids"].long(), routing[name]), name
        s = specs[name]
        want = R.gate_weights(R.sanitize(layer["logits"]), routing[name], s.score, s.select_on,
                              s.renormalize, s.renorm_eps, s.scale)
        torch.testing.assert_close(layer["weights"], want, rtol=1e-5, atol=1e-6)


def test_rows_of_minus_one_route_as_usual():
    model = build("olmoe")
    ids = _ids(3)
    own, _ = _trace(model, ids)
    routing = _random_routing(own, seed=4)
    for t in routing.values():
        t[::2] = -1
    with moe_route.replay(model, routing):
        got, _ = _trace(model, ids)
    first = next(iter(got))
    layer, want = got[first]["ids"].long(), routing[first]
    assert torch.equal(layer[1::2], want[1::2])
    assert torch.equal(layer[::2], own[first]["ids"].long()[::2])  # the first layer: same inputs


def test_statistics_count_the_replayed_ids():
    model = build("qwen3_moe")
    ids = _ids(5)
    trace, _ = _trace(model, ids)
    routing = _random_routing(trace, seed=6)
    with moe_route.replay(model, routing), moe_route.record(model) as rec, torch.no_grad():
        model(ids)
    for layer in rec.stats:
        E = layer.counts.shape[1]
        assert torch.equal(layer.counts[0], torch.bincount(routing[layer.name].reshape(-1),
                                                           minlength=E))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("old_name", [False, True], ids=["cache_argument", "past_key_values"])
@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_by_position_prefill_and_decode_match_one_forward(family, old_name):
    """Per-position routing [B, S, k]: one forward over the sequences and a prefill followed by
    one-token steps with a KV cache see the same experts at every position, so their logits
    agree; the decode run's trace holds the given ids in call order. The cache is passed by the
    forward's own name for it, or by ``past_key_values``, which transformers 5.24 renamed
    ``cache`` and still takes."""
    model = build(family)
    cache_name = "past_key_values" if old_name else cache_argument(model)
    B, S, S0 = 2, 9, 4
    ids = _ids(7, (B, S))
    trace, _ = _trace(model, ids)
    routing = _random_routing(trace, seed=8, shape=(B, S))
    with moe_route.replay(model, routing), torch.no_grad():
        full = model(ids).logits
    with moe_route.replay(model, routing), moe_route.record(model, trace=True) as rec, \
            torch.no_grad():
        out = model(ids[:, :S0], use_cache=True)
        steps, cache = [out.logits], out[cache_argument(model)]
        for s in range(S0, S):
            out = model(ids[:, s:s + 1], **{cache_name: cache}, use_cache=True)
            steps.append(out.logits)
            cache = out[cache_argument(model)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    for name, layer in rec.trace.items():
        k = routing[name].shape[-1]
        want = torch.cat([routing[name][:, :S0].reshape(-1, k)] +
                         [routing[name][:, s] for s in range(S0, S)])
        assert torch.equal(layer["ids"].long(), want), name
    # without the replay the decode routes differently (the routing above is random)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, full, atol=1e-3)


def test_ids_moved_while_exporting_are_not_kept_for_eager_calls():
    """torch.export (non-strict) runs the replayed forward on FakeTensors: the ids it moved to
    int32 were kept for later calls, and the eager forward after it ran on FakeTensors."""
    model = build("qwen3_moe")
    ids = _ids(7, (2, 6))
    trace, _ = _trace(model, ids)
    routing = _random_routing(trace, 8, (2, 6))  # int64, as a trace holds them
    assert all(r.dtype == torch.int64 for r in routing.values())
    with moe_route.replay(model, routing), torch.no_grad():
        want = model(ids, use_cache=False).logits
    with moe_route.replay(model, routing), torch.no_grad():
        torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
        got = model(ids, use_cache=False).logits
    assert type(got) is torch.Tensor and torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen3_moe", "minimax"])
def test_by_position_with_generate(family):
    """generate(): the prompt and every new token take the experts of their positions (MiniMax:
    its cache's layer 0, a linear-attention layer, reports no positions)."""
    model = build(family)
    B, P, N = 2, 5, 4
    prompt = _ids(9, (B, P))
    with torch.no_grad():
        seq = model.generate(prompt, max_new_tokens=N, do_sample=False)
    trace, _ = _trace(model, seq)
    routing = _random_routing(trace, seed=10, shape=(B, P + N))
    with moe_route.replay(model, routing), moe_route.record(model, trace=True) as rec, \
            torch.no_grad():
        model.generate(prompt, max_new_tokens=N, do_sample=False)
    name = next(iter(routing))
    got = rec.trace[name]["ids"].long()
    k = routing[name].shape[-1]
    assert torch.equal(got[:B * P], routing[name][:, :P].reshape(-1, k))
    steps = got[B * P:].reshape(-1, B, k)   # generate runs N - 1 decode steps after the prefill
    for s in range(steps.shape[0]):
        assert torch.equal(steps[s], routing[name][:, P + s])


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
def test_train_mode_replay_of_own_routing_has_the_models_gradients(family):
    model = build(family).train()
    ids = _ids(11)
    trace, _ = _trace(model.eval(), ids)
    model.train()
    grads = []
    for replayed in (False, True):
        model.zero_grad()
        with moe_route.replay(model, trace) if replayed else torch.enable_grad():
            model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.endswith(("gate.weight", "router.weight")) for n in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_by_position(monkeypatch):
    """Activation recomputation re-runs the routers in backward: routing by position gives them
    the same experts, so the gradients equal those without checkpointing."""
    model = build("olmoe").train()
    B, S = 2, 8
    ids = _ids(12, (B, S))
    trace, _ = _trace(model.eval(), ids)
    model.train()
    routing = _random_routing(trace, seed=13, shape=(B, S))
    calls = []
    serve = replaying._Source.__call__
    monkeypatch.setattr(replaying._Source, "__call__",
                        lambda self, T, device: calls.append(self.name) or serve(self, T, device))
    grads, counts = [], []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model)
        model.zero_grad()
        calls.clear()
        with moe_route.replay(model, routing):
            model(ids, labels=ids, use_cache=False).loss.backward()
        counts.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert counts[1] == 2 * counts[0]  # every router ran again in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_in_call_order_is_refused():
    """Checkpointing's recompute in backward took the next call's rows of a call-order trace: a
    trace of two forwards trained the first batch on the second's experts in its recomputed
    layers (different gradients, and strict=True saw every row used). It raises instead."""
    model = build("olmoe")
    first, second = _ids(15, (2, 7)), _ids(16, (2, 7))
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        model(first)
        model(second)
    model.train()
    enable_checkpointing(model)
    with pytest.raises(RuntimeError, match=r"replay: model.layers.1.mlp.gate is recomputed in "
                                           r"the backward \(activation checkpointing\), which "
                                           r"call-order routing cannot serve"):
        with moe_route.replay(model, rec.trace, strict=False):
            model(first, labels=first, use_cache=False).loss.backward()


def test_replay_with_steering_keeps_the_ids_and_steers_the_weights():
    model = build("olmoe")
    ids = _ids(14)
    own, _ = _trace(model, ids)
    last = max(layer_index(n) for n in own)
    name = next(n for n in own if layer_index(n) == last)
    expert = int(own[name]["ids"][:, 0].mode().values)
    plan = moe_route.SteeringPlan.bias(last, expert, add=3.0)
    with moe_route.steer(model, plan), moe_route.replay(model, own):
        got, _ = _trace(model, ids)
    assert torch.equal(got[name]["ids"], own[name]["ids"])
    table = plan.steer_spec(last, own[name]["logits"].shape[1]).table(
        own[name]["logits"].shape[1])
    want = R.gate_weights(R.steer_logits(R.sanitize(got[name]["logits"]), table)[0],
                          own[name]["ids"].long())
    torch.testing.assert_close(got[name]["weights"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[name]["weights"], own[name]["weights"], atol=1e-3)


def test_layers_subset_and_nesting():
    model = build("olmoe")
    ids = _ids(15)
    own, _ = _trace(model, ids)
    names = list(own)
    a, b = _random_routing(own, seed=16), _random_routing(own, seed=17)
    first = layer_index(names[0])
    with moe_route.replay(model, a, layers=[first]):     # an int key picks a traced layer
        got, _ = _trace(model, ids)
    assert torch.equal(got[names[0]]["ids"].long(), a[names[0]])
    assert not torch.equal(got[names[1]]["ids"].long(), a[names[1]])
    twice = {n: torch.cat([t, t]) for n, t in a.items()}  # rows for two calls
    with moe_route.replay(model, twice, strict=False):  # layer 1 uses half its rows
        with moe_route.replay(model, {names[1]: b[names[1]]}):
            inner, _ = _trace(model, ids)
        outer, _ = _trace(model, ids)
    assert torch.equal(inner[names[0]]["ids"].long(), a[names[0]])
    assert torch.equal(inner[names[1]]["ids"].long(), b[names[1]])
    # the outer replay goes on where each of its layers stopped
    assert torch.equal(outer[names[0]]["ids"].long(), a[names[0]])
    assert torch.equal(outer[names[1]]["ids"].long(), a[names[1]])


def test_call_order_mismatch_and_leftover_rows():
    model = build("olmoe")
    ids = _ids(18)
    own, _ = _trace(model, ids)
    with pytest.raises(RuntimeError, match="on 24 tokens, but only 0 of its 24 rows are left"):
        with moe_route.replay(model, own), torch.no_grad():
            model(ids)
            model(ids)
    with pytest.raises(ValueError, match="rows left unused.*strict=False"):
        with moe_route.replay(model, own), torch.no_grad():
            model(ids[:1])
    with moe_route.replay(model, own, strict=False) as rp, torch.no_grad():
        model(ids[:1])
    assert set(rp.used.values()) == {8}
    assert not hasattr(model, "_moe_route_patch")


def test_a_trace_of_another_model_is_refused():
    """An 8-expert OLMoE's trace has the router paths and k of this 16-expert DeepSeek-V3: it
    replayed silently to unrelated experts. The trace's expert count is checked."""
    olmoe, other = build("olmoe"), build("deepseek_v3")
    ids = _ids(2, (2, 6))
    with moe_route.record(olmoe, trace=True) as rec, torch.no_grad():
        olmoe(ids)
    with pytest.raises(ValueError, match=r"replay: routing\['model.layers.0.mlp.gate'\] was "
                                         r"recorded on a router of 8 experts, but "
                                         r"model.layers.0.mlp.gate has 16: a trace of another"):
        with moe_route.replay(other, rec.trace):
            pass
    assert not hasattr(other, "_moe_route_patch")


def test_bad_routing_is_refused_before_anything_runs():
    model = build("olmoe")
    names = [n for n, _, _ in find_routers(model)]
    good = torch.tensor([[0, 1]] * 4)
    cases = [
        ({names[0]: torch.tensor([[0, 1, 2]] * 4)}, ValueError, "3 ids per token, but "),
        ({names[0]: torch.tensor([[0, 0]] * 4)}, ValueError,
         r"routing\['model.layers.0.mlp.gate'\]: "
         r"row 0 must hold 2 distinct expert ids in \[0, 8\)"),
        ({names[0]: torch.tensor([[0, 8]] * 4)}, ValueError, r"got \[0, 8\]"),
        ({names[0]: good.float()}, ValueError, "int16/int32/int64"),
        ({names[0]: good[0]}, ValueError, r"\[N, k\] or \[B, S, k\]"),
        ({names[0]: [[0, 1]]}, TypeError, "must be an int tensor"),
        ({names[0]: {"weights": good}}, ValueError, "without 'ids'"),
        ({7: good}, ValueError, "layer 7 is not an MoE layer"),
        ({}, TypeError, "non-empty mapping"),
        # True replayed layer 1 (a bool is an int); a float or None key failed in a regex
        ({True: good}, TypeError, r"layer keys must be ints .* got True \(bool\)"),
        ({1.0: good}, TypeError, r"layer keys must be ints .* got 1.0 \(float\)"),
    ]
    for routing, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            with moe_route.replay(model, routing):
                pass
        assert not hasattr(model, "_moe_route_patch")
    with pytest.raises(ValueError, match="are not in the routing"):
        with moe_route.replay(model, {names[0]: good}, layers=[names[1]]):
            pass
    with pytest.raises(TypeError, match="torch.nn.Module"):
        moe_route.replay("model", {0: good})
    with torch.no_grad(), moe_route.replay(model, {np.int64(0): torch.tensor([[3, 5]] * 8)}), \
            moe_route.record(model, trace=True) as rec:
        model(_ids(0, (2, 4)))
    assert rec.trace[names[0]]["ids"].tolist() == [[3, 5]] * 8


def test_by_position_shape_mismatch_and_outside_a_model_call():
    model = build("olmoe")
    name = find_routers(model)[0][0]
    routing = {name: torch.tensor([[0, 1]] * 6).reshape(2, 3, 2)}
    with moe_route.replay(model, routing), torch.no_grad():
        with pytest.raises(RuntimeError, match=r"positions \[0, 4\) of 2 sequences"):
            model(_ids(0, (2, 4)))
        with pytest.raises(RuntimeError, match="3 positions of 2 sequences"):
            model(_ids(0, (3, 2)))


def test_hash_layers_cannot_be_replayed():
    model = build("deepseek_v4")
    kinds = {n: type(r).__name__ for n, r, _ in find_routers(model)}
    hash_name = next(n for n, kind in kinds.items() if kind.endswith("HashRouter"))
    with pytest.raises(ValueError, match="cannot be replayed"):
        with moe_route.replay(model, {hash_name: torch.tensor([[0, 1]])}):
            pass
    assert not hasattr(model, "_moe_route_patch")


# record() assigns statistics rows per model call and refuses a model that routes a subset of
# its input tokens; its routers are traced and replayed call by call outside a model forward.
ROUTES_A_SUBSET = {"ernie4_5_vl_moe"}


@pytest.mark.filterwarnings("ignore:record. a router ran outside a forward:UserWarning")
@pytest.mark.parametrize("family", supported_families())
def test_every_family_replays_its_own_routing(family):
    """Every supported family: replaying the routing of a traced run (call order) routes the
    same experts and gives the same outputs. Hash routers (DeepSeek-V4) are left out: they
    cannot be replayed. Families that route a subset of their tokens are run router by router
    (outside the model's forward, which record() warns of)."""
    model = build(family)
    kw = inputs(family, _ids(19, (2, 6)), model)
    routers = [(n, r) for n, r, _ in find_routers(model)
               if not type(r).__name__.endswith("HashRouter")]
    if family in ROUTES_A_SUBSET:
        calls = []
        hooks = [r.register_forward_pre_hook(
            lambda m, a, k, n=n: calls.append((m, a, dict(k))), with_kwargs=True)
            for n, r in routers]
        with torch.no_grad():
            model(**kw)
        for h in hooks:
            h.remove()
        run = lambda: [m(*a, **k) for m, a, k in calls]  # noqa: E731
    else:
        run = lambda: model(**kw)  # noqa: E731
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        want = run()
    names = {n for n, _ in routers}  # a loop layer's passes are traced as "<router>@pass<p>"
    trace = {n: t for n, t in rec.trace.items() if n.partition("@pass")[0] in names}
    with moe_route.replay(model, trace), moe_route.record(model, trace=True) as again, \
            torch.no_grad():
        got = run()
    for name, layer in trace.items():
        assert torch.equal(again.trace[name]["ids"], layer["ids"]), name
    for a, b in zip(_tensors(got), _tensors(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and random routing is taken as given
    g = torch.Generator().manual_seed(20)
    num_experts = {n: s.num_experts for n, s in moe_route.patch(model).routers.items()}
    moe_route.unpatch(model)
    other = {n: torch.rand(len(t["ids"]), num_experts[n.partition("@pass")[0]],
                           generator=g).argsort(-1)
             [:, :t["ids"].shape[1]] for n, t in trace.items()}
    with moe_route.replay(model, other), moe_route.record(model, trace=True) as third, \
            torch.no_grad():
        run()
    for name, ids in other.items():
        assert torch.equal(third.trace[name]["ids"].long(), ids), name


def _tensors(output):
    """The floating tensors of a model output or of a list of router outputs."""
    if isinstance(output, list):
        return [t for out in output for t in _tensors(out)]
    values = output.values() if hasattr(output, "values") else output
    return [v.float() for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def test_rollout_routing_replays_in_a_training_forward():
    """The RL use: routing recorded during generate() (call order) as positions, replayed in one
    forward over the generated sequences. That forward routes every fed position like the
    rollout did and reproduces the rollout's next-token logits; the last token, never fed during
    generate, routes as usual."""
    model = build("olmoe")
    B, P, N = 2, 5, 4
    prompt = _ids(21, (B, P))
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=N, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    seq = gen.sequences
    routing = moe_route.trace_by_position(rec.trace, B, P, length=seq.shape[1])
    name = next(iter(routing))
    assert routing[name].shape[:2] == (B, P + N) and bool((routing[name][:, -1] == -1).all())
    with moe_route.replay(model, routing), moe_route.record(model, trace=True) as again, \
            torch.no_grad():
        logits = model(seq).logits
    k = routing[name].shape[-1]
    ids = again.trace[name]["ids"].long().reshape(B, P + N, k)
    assert torch.equal(ids[:, :-1], routing[name][:, :-1])
    torch.testing.assert_close(logits[:, P - 1:-1], torch.stack(gen.logits, 1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(use_cache=False), dict(prefill_chunk_size=2)],
                         ids=["no_cache", "chunked_prefill"])
def test_trace_by_position_checks_the_layout_against_the_sequences(options):
    """A generate() without the KV cache (the whole sequence again at every step) or with a
    chunked prefill routes in another order than one prefill and one token per step; laid out
    by position, its trace gave 5 to 9 of 16 positions other positions' experts, unwarned. With
    the generated sequences the recorded tokens are checked, and it is refused; a cached
    generate() of the same sequences passes the check."""
    model = build("olmoe")
    B, P = 2, 5
    prompt = _ids(22, (B, P))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        seq = model.generate(prompt, **kw)
    routing = moe_route.trace_by_position(rec.trace, B, P, sequences=seq)
    layer = routing[next(iter(routing))]
    assert layer.shape[1] == P + 4 and bool((layer[:, -1] == -1).all())
    with moe_route.record(model, trace=True) as other, torch.no_grad():
        assert torch.equal(model.generate(prompt, **kw, **options), seq)
    message = {"use_cache": r"covers 26 positions, more than the 9 of sequences",
               "prefill_chunk_size": r"routed token \d+ at position \d+ of sequence \d by this "
                                     r"layout, but sequences\[\d, \d+\] is \d+"}
    message = message[next(iter(options))]
    with pytest.raises(ValueError, match=message + r": the trace is not of one generate\(\) of "
                                         r"these sequences with the KV cache and a single "
                                         r"prefill"):
        moe_route.trace_by_position(other.trace, B, P, sequences=seq)


def test_trace_by_position_layout_and_errors():
    k = 2
    rows = torch.arange(2 * 3 * k + 2 * 2 * k).reshape(-1, k)   # B=2, P=3, two decode steps
    out = moe_route.trace_by_position({"r": {"ids": rows}}, 2, 3)["r"]
    assert out.shape == (2, 5, k)
    assert torch.equal(out[0, :3], rows[0:3]) and torch.equal(out[1, :3], rows[3:6])
    assert torch.equal(out[:, 3], rows[6:8]) and torch.equal(out[:, 4], rows[8:10])
    padded = moe_route.trace_by_position({"r": rows}, 2, 3, length=7)["r"]
    assert torch.equal(padded[:, :5], out) and bool((padded[:, 5:] == -1).all())
    with pytest.raises(ValueError, match="has 10 rows, not 3 x 3 prompt rows"):
        moe_route.trace_by_position({"r": rows}, 3, 3)
    with pytest.raises(ValueError, match="length=4 is shorter than the 5 positions"):
        moe_route.trace_by_position({"r": rows}, 2, 3, length=4)
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        moe_route.trace_by_position({"r": rows}, 0, 3)


@pytest.mark.parametrize("change,msg", [
    (dict(trace=[torch.zeros(10, 2, dtype=torch.int64)]),
     r"trace_by_position: trace must be a mapping \{layer: ids\} \(a trace\), got list"),
    (dict(trace={"r": [[0, 1]]}), r"trace_by_position: trace\['r'\] must be an int tensor"),
    (dict(batch_size=2.0), r"trace_by_position: batch_size=2.0 must be an int >= 1, got float"),
    (dict(prompt_length=True), r"prompt_length=True must be an int >= 1, got bool"),
    (dict(length=7.0), r"length=7.0 must be None \(the positions covered\) or an int >= 1, got "
                       r"float"),
    (dict(length="7"), r"length='7' must be None .* or an int >= 1, got str"),
    (dict(length=True), r"length=True must be None .* or an int >= 1, got bool"),
], ids=["trace_list", "trace_entry", "batch_size_float", "prompt_length_bool", "length_float",
        "length_str", "length_bool"])
def test_trace_by_position_type_errors_name_the_argument(change, msg):
    rows = torch.arange(20).reshape(10, 2)   # B=2, P=3, two decode steps
    args = dict(trace={"r": rows}, batch_size=2, prompt_length=3, length=None) | change
    with pytest.raises(TypeError, match=msg):
        moe_route.trace_by_position(**args)


def test_by_position_reads_a_positional_cache():
    """``model(ids, None, None, cache)`` passes the KV cache positionally
    (OlmoeForCausalLM.forward's fourth parameter): the call continues at the cache's length, so
    it takes those positions."""
    model = build("olmoe")
    B, S, S0 = 2, 7, 4
    ids = _ids(14, (B, S))
    trace, _ = _trace(model, ids)
    routing = _random_routing(trace, seed=15, shape=(B, S))
    with moe_route.replay(model, routing), moe_route.record(model, trace=True) as rec, \
            torch.no_grad():
        cache = model(ids[:, :S0], use_cache=True)[cache_argument(model)]
        model(ids[:, S0:], None, None, cache)
    for name, layer in rec.trace.items():
        k = routing[name].shape[-1]
        assert torch.equal(layer["ids"][B * S0:].long(), routing[name][:, S0:].reshape(-1, k))


def test_past_length_of_a_model_call():
    """Where a model call starts: its cache_position when given, else the longest layer of its
    KV cache (layer 0 of a hybrid model can be a linear-attention layer reporting 0), by any of
    the cache argument's names, else what a 2-D attention mask longer than the call's tokens
    says."""
    from moe_route.hf.model_calls import past_length

    class Cache:  # get_seq_length(i) per layer, as transformers' Cache
        def __init__(self, lengths):
            self.lengths = lengths

        def __len__(self):
            return len(self.lengths)

        def get_seq_length(self, layer_idx=0):
            return self.lengths[layer_idx]

    mask = torch.ones(2, 9, dtype=torch.long)
    assert past_length({}, 3) == 0
    assert past_length({"past_key_values": Cache([5, 5])}, 1) == 5
    assert past_length({"past_key_values": Cache([0, 6])}, 1) == 6
    assert past_length({"past_key_values": Cache([0, 0]), "attention_mask": mask}, 2) == 7
    assert past_length({"past_key_values": Cache([0, 6]),
                        "cache_position": torch.tensor([4, 5])}, 2) == 4
    assert past_length({"attention_mask": mask}, 9) == 0
    for name in ("cache", "past_key_values", "cache_params"):  # 5.24's name, the older ones
        assert past_length({name: Cache([0, 6])}, 1) == 6, name
        assert past_length({name: None, "attention_mask": mask}, 2) == 7, name


def test_by_position_on_an_encoder_decoder():
    """Switch: encoder routers take positions of input_ids, decoder routers of
    decoder_input_ids (of another length)."""
    model = build("switch_transformers")
    ids, dec = _ids(16, (2, 6)), _ids(17, (2, 4))
    routing = {}
    g = torch.Generator().manual_seed(18)
    for name, router, _ in find_routers(model):
        S = ids.shape[1] if name.startswith("encoder.") else dec.shape[1]
        routing[name] = torch.randint(0, router.num_experts, (2, S, 1), generator=g)
    with moe_route.replay(model, routing), moe_route.record(model, trace=True) as rec, \
            torch.no_grad():
        model(input_ids=ids, decoder_input_ids=dec)
    for name, layer in rec.trace.items():
        assert torch.equal(layer["ids"].long(), routing[name].reshape(-1, 1)), name


def test_replay_contexts_exited_out_of_order_leave_the_active_routing():
    """Each replay() pushed a router's previous source and popped it on exit, assuming LIFO.
    Leaving an outer replay while an inner one on the same layer was still active popped the
    inner's saved value: the layer kept the ended outer's source (by position it then raised
    "called outside a forward", the outer's hooks gone; in call order it takes the outer's rows)."""
    model = build("olmoe")
    ids = _ids(20)
    with torch.no_grad():
        ref = model(ids).logits
    own, _ = _trace(model, ids)
    names = list(own)
    k = own[names[0]]["ids"].shape[1]
    a = _random_routing(own, seed=21, shape=ids.shape)
    b = {names[0]: _random_routing(own, seed=22, shape=ids.shape)[names[0]]}
    with moe_route.replay(model, b):
        want, _ = _trace(model, ids)                        # the inner routing alone
    outer, inner = moe_route.replay(model, a), moe_route.replay(model, b)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)                        # out of order: inner still active
    got, _ = _trace(model, ids)
    inner.__exit__(None, None, None)
    assert torch.equal(got[names[0]]["ids"].long(), b[names[0]].reshape(-1, k))
    for name in names:
        assert torch.equal(got[name]["ids"], want[name]["ids"]), name
    assert not any("forward" in m.__dict__ for m in model.modules())   # unpatched
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_reentering_an_active_replay_context_is_refused_and_changes_nothing():
    """The same Replay entered again inside itself was accepted: its inner exit undid both
    entries (the rest of the block routed as usual) and released one patch owner, the outer exit
    released nothing, so the model stayed patched after the block. Entering it again after an
    exit starts over; rows an earlier entry left unused are not its business."""
    model = build("olmoe")
    ids = _ids(23)
    with torch.no_grad():
        ref = model(ids).logits
    own, _ = _trace(model, ids)
    a = _random_routing(own, seed=24)                       # call order: rows for one call
    ctx = moe_route.replay(model, a)
    with ctx:
        with pytest.raises(RuntimeError, match=r"replay: this replay\(\) context is already "
                                               r"active"):
            with ctx:
                pass
        got, _ = _trace(model, ids)                         # still replayed, from the first row
    assert all(torch.equal(got[n]["ids"].long(), a[n]) for n in own)
    assert not any("forward" in m.__dict__ for m in model.modules())   # unpatched
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(KeyError):                           # a block left by an error ...
        with ctx:
            raise KeyError("stop")
    with ctx:                                               # ... and entering it again is fine
        again, _ = _trace(model, ids)
    assert ctx.used == {n: a[n].shape[0] for n in own}
    assert all(torch.equal(again[n]["ids"].long(), a[n]) for n in own)


def test_by_position_refuses_a_router_run_outside_the_models_forward():
    """model.model(...) skips the hooks on model: its routers took the previous call's
    positions, and the second call was refused as "a loop layer". It is refused for what it
    is: a router called outside a forward of the model."""
    model = build("olmoe")
    ids = _ids(3, (2, 6))
    trace, _ = _trace(model, ids)
    with moe_route.replay(model, replaying.trace_by_position(trace, 2, 6)), torch.no_grad():
        model(ids)
        with pytest.raises(RuntimeError, match=r"replay: model\.layers\.0\.mlp\.gate was called "
                                               r"outside a forward of the model"):
            model.model(input_ids=ids)
