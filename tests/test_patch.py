"""moe_route.patch on tiny models of every supported family, against the unpatched model."""
import warnings

import pytest
import torch

import moe_route
from moe_route.hf import UnsupportedModelError, find_routers
from moe_route.nn import SparseMoE, TopKRouter

from tiny_models import (build, inputs, model_type, selected_experts,
                         supported_families)

pytest.importorskip("transformers")



SUPPORTED = supported_families()
CORE = ["olmoe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "granitemoe"]


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _route_log(model):
    """Hooks on every router: (name, ids, weights) per call, for whatever forward runs."""
    log, hooks = [], []
    for name, router, _ in find_routers(model):
        hooks.append(router.register_forward_hook(
            lambda mod, args, out, name=name: log.append((name, out[2].detach().clone(),
                                                          out[1].detach().clone()))))
    return log, hooks


def _run(model, family, ids):
    """The model's final output: logits, or the last hidden state of a bare (text) model."""
    with torch.no_grad():
        out = model(**inputs(family, ids, model))
    out = getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out[0]
    return out.float()


def _assert_same_routing(ref_log, our_log, weight_tol, logits=None):
    """Same id set per token (tokens whose choice was a tie in ``logits`` may differ: the gate
    breaks ties to the lower index, torch.topk as it happens to), weights to ``weight_tol``."""
    assert [n for n, _, _ in ref_log] == [n for n, _, _ in our_log]
    for j, ((name, i0, w0), (_, i1, w1)) in enumerate(zip(ref_log, our_log)):
        # Unsorted families (DeepSeek-V3 topk(sorted=False)) order their k ids differently.
        s0, s1 = i0.sort(-1), i1.sort(-1)
        same = (s0.values == s1.values).all(-1)
        differ = f"{name}: ids differ on tokens {(~same).nonzero().flatten().tolist()}"
        if logits is not None and not same.all():
            z = logits[j].float()
            tied = torch.equal(z[~same].gather(-1, i0[~same]).sort(-1).values,
                               z[~same].gather(-1, i1[~same]).sort(-1).values)
            assert tied, differ
        else:
            assert same.all(), differ
        assert w0.dtype == w1.dtype and i0.dtype == i1.dtype, name
        torch.testing.assert_close(w1.float().gather(-1, s1.indices)[same],
                                   w0.float().gather(-1, s0.indices)[same], **weight_tol)


@pytest.mark.parametrize("family", SUPPORTED)
def test_patched_model_matches_unpatched(family):
    """Whole model: the first router call sees identical hidden states, so its expert ids must be
    equal; final outputs agree to a tight tolerance. (Per-router weights on identical inputs:
    tests/test_adapters.py.)"""
    model = build(family)
    ids = _ids()
    _, first, block = find_routers(model)[0]
    k = moe_route.hf.adapter_for(first).k(first, block)
    seen = []
    hook = first.register_forward_hook(
        lambda mod, args, out: seen.append(selected_experts(model_type(family), out, k)))
    ref = _run(model, family, ids)
    with moe_route.patch(model):
        ours = _run(model, family, ids)
    hook.remove()
    assert len(seen) >= 2
    n = len(seen) // 2
    for a, b in zip(seen[:n], seen[n:]):
        assert torch.equal(a.view(-1, k).sort(-1).values, b.view(-1, k).sort(-1).values)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", CORE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_router_matches_on_the_same_input(family, dtype):
    """Every router, patched and unpatched, on the same captured hidden states."""
    model = build(family, dtype=dtype)
    captured = []
    def capture(mod, args, name):
        captured.append((name, mod, args[0]))

    hooks = [r.register_forward_pre_hook(lambda mod, args, name=name: capture(mod, args, name))
             for name, r, _ in find_routers(model)]
    _run(model, family, _ids(1))
    for h in hooks:
        h.remove()
    tol = dict(rtol=2e-6, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        ref = [(n, *reversed(mod(x)[1:])) for n, mod, x in captured]
        logits = [mod(x)[0] for n, mod, x in captured]
        with moe_route.patch(model):
            ours = [(n, *reversed(mod(x)[1:])) for n, mod, x in captured]
    _assert_same_routing(ref, ours, tol, logits)
    for (_, _, _), (n, mod, x) in zip(ref, captured):
        with torch.no_grad():
            z0 = mod(x)[0]
            with moe_route.patch(model):
                z1 = mod(x)[0]
        assert torch.equal(z0, z1), f"{n}: logits must be bit-identical"


@pytest.mark.parametrize("family", CORE)
def test_exact_mode_is_bit_identical(family):
    model = build(family)
    ids = _ids(2)
    ref = _run(model, family, ids)
    with moe_route.patch(model, exact=True):
        assert torch.equal(_run(model, family, ids), ref)
        with moe_route.record(model) as rec:  # recording does not disturb exact outputs
            assert torch.equal(_run(model, family, ids), ref)
    assert int(rec.stats[0].tokens.sum()) == ids.numel()


@pytest.mark.parametrize("family", CORE)
def test_unpatch_restores_everything(family):
    model = build(family)
    ids = _ids(3)
    ref = _run(model, family, ids)
    keys = list(model.state_dict())
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    handle = moe_route.patch(model)
    assert moe_route.patch(model) is handle  # idempotent
    assert all("forward" in r.__dict__ for _, r, _ in find_routers(model))
    assert list(model.state_dict()) == keys
    handle.remove()
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs
    assert torch.equal(_run(model, family, ids), ref)
    assert moe_route.unpatch(model) is False


def test_exception_inside_context_unpatches():
    model = build("olmoe")
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    with pytest.raises(KeyError):
        with moe_route.patch(model):
            raise KeyError("boom")
    with pytest.raises(KeyError):
        with moe_route.record(model):
            raise KeyError("boom")
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs


def test_a_patched_model_refuses_copy_and_pickle_by_name_and_saves_its_weights(tmp_path):
    """deepcopy and torch.save of a patched model were a TypeError about a C++ GateConfig or an
    AttributeError about a lambda; a copy would have routed through the original's patch. The
    error says what to do; save_pretrained works while patched, and the copy after unpatch."""
    import copy
    import io

    model = build("olmoe")
    with moe_route.patch(model):
        for save in (lambda: copy.deepcopy(model), lambda: torch.save(model, io.BytesIO())):
            with pytest.raises(TypeError, match=r"the model is patched \(model\.layers\.0\.mlp"
                                                r"\.gate, .*copy it before patching or after "
                                                r"moe_route\.unpatch\(model\)"):
                save()
        model.save_pretrained(tmp_path)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    assert (tmp_path / "config.json").exists()


def test_a_model_and_its_submodule_are_not_patched_at_once():
    """steer(model.model) inside record(model) (or the reverse) put a second patch over the
    same routers: the inner context was silently ignored, and exiting the two out of order left
    routers patched for good. The inner context is refused; everything is restored."""
    model = build("olmoe")
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    plan = moe_route.SteeringPlan.force(0, 3)
    for outer, inner in ((lambda: moe_route.steer(model.model, plan),
                          lambda: moe_route.record(model)),
                         (lambda: moe_route.record(model),
                          lambda: moe_route.steer(model.model, plan)),
                         (lambda: moe_route.patch(model), lambda: moe_route.patch(model.model))):
        with outer():
            with pytest.raises(ValueError, match=r"router (model\.)?layers\.0\.mlp\.gate is "
                                                 r"already patched through another module"):
                with inner():
                    pass
        assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_generate_with_kv_cache_matches(family):
    model = build(family)
    prompt = _ids(4, (2, 5))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
        with moe_route.patch(model):
            ours = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref)


def test_compile_fullgraph_patched_model():
    model = build("qwen3_moe")
    ids = _ids(5)
    ref = _run(model, "qwen3_moe", ids)
    with moe_route.patch(model):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            out = compiled(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_non_moe_model_raises():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="no MoE router"):
        moe_route.patch(transformers.LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        moe_route.patch("olmoe")


@pytest.mark.parametrize("key, name, index, expected", [
    (3, "model.layers.3.mlp.gate", 3, True),            # a decoder-layer index
    (3, "model.layers.13.mlp.gate", 13, False),
    (3, "m.block.router@pass1", 3, True),               # every pass of a loop layer
    ("model.layers.3.mlp.gate", "model.layers.3.mlp.gate", 3, True),   # the router's path
    ("model.layers.3.mlp", "model.layers.3.mlp.gate", 3, True),        # its MoE block's
    ("model.layers.3", "model.layers.3.mlp.gate", 3, False),           # not the decoder layer
    ("model.layers.3.mlp.gat", "model.layers.3.mlp.gate", 3, False),   # no prefix matching
    ("m.block.router", "m.block.router@pass1", 0, True),               # every pass
    ("m.block", "m.block.router@pass1", 0, True),
    ("m.block.router@pass1", "m.block.router@pass1", 0, True),         # one pass
    ("m.block.router@pass0", "m.block.router@pass1", 0, False),
    ("model.layers.3.mlp", None, 3, True),              # a layer known by its index only
    ("model.layers.3.mlp", None, 4, False),
    ("router", None, 3, False),                         # a path without a decoder index
])
def test_layer_keys_name_sites(key, name, index, expected):
    from moe_route.hf.patch import names_layer
    assert names_layer(key, name, index) is expected


@pytest.mark.parametrize("family", CORE)
def test_topk_router_from_module(family):
    model = build(family)
    name, router, block = find_routers(model)[0]
    tk = TopKRouter.from_module(router, block)
    assert tk.weight is (router.weight if hasattr(router, "weight") else tk.weight)
    x = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        z0, w0, i0 = router(x)
        z1, w1, i1 = tk(x)
    assert torch.equal(z0, z1)
    _assert_same_routing([(name, i0, w0)], [(name, i1, w1)], dict(rtol=2e-6, atol=2e-7))


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
def test_topk_router_gradients_match(family):
    """The gate has no backward; the router's weights still get the same gradient."""
    model = build(family)
    _, router, block = find_routers(model)[0]
    tk = TopKRouter.from_module(router, block)
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    grads = []
    for mod in (router, tk):
        router.weight.grad = None
        _, w, ids = mod(x)
        (w.float() * (ids + 1)).sum().backward()
        grads.append(router.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", CORE)
def test_sparse_moe_from_module(family):
    model = build(family)
    block = next(m for _, r, m in find_routers(model))
    moe = SparseMoE.from_module(block)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        got = moe(x)
        assert torch.equal(moe(x), got)  # deterministic
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_sparse_moe_from_module_of_a_bf16_block_with_an_fp32_router(family):
    """A bf16 checkpoint keeps these routers in fp32 (_keep_in_fp32_modules_strict): the check's
    probe was built in the router's dtype and the bf16 block raised on it (RuntimeError)."""
    model = build(family, torch.bfloat16)
    block = next(m for _, r, m in find_routers(model))
    assert block.gate.weight.dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    moe = SparseMoE.from_module(block)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = block(x.bfloat16())
        want = want[0] if isinstance(want, tuple) else want
        got = moe(x.bfloat16())
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("H, I, dtype", [(32, 16, torch.float32), (6, 8, torch.float32),
                                         (16, 12, torch.bfloat16)])
def test_sparse_moe_standalone_matches_reference_composition(H, I, dtype):
    """Rows of 6 fp32 or 12 bf16 features are not 16-byte strides, which grouped_mm refuses
    (RuntimeError): those go expert by expert."""
    torch.manual_seed(0)
    moe = SparseMoE(H, I, 8, 2, moe_route.RouterSpec(renormalize=True), dtype=dtype)
    x = torch.randn(11, H, dtype=dtype)
    with torch.no_grad():
        got = moe(x)
        moe, x, got = moe.double(), x.double(), got.double()
        z = x @ moe.router.weight.T
        p = z.softmax(-1)
        w, ids = p.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        want = torch.zeros_like(x)
        for t in range(11):
            for j in range(2):
                e = int(ids[t, j])
                gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
                act = torch.nn.functional.silu(gate) * up
                want[t] += w[t, j] * (moe.experts.down_proj[e] @ act)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("make, exc, message", [
    (lambda: TopKRouter(8, 4, True), TypeError,
     r"TopKRouter: top_k=True must be an int in \[1, 4\] \(of num_experts=4\), got bool"),
    (lambda: TopKRouter(8, 4, 2.0), TypeError, r"TopKRouter: top_k=2.0 must be an int"),
    (lambda: TopKRouter(8, 4, 5), ValueError, r"TopKRouter: top_k=5 must be an int in \[1, 4\]"),
    (lambda: TopKRouter(8, 4.0, 2), TypeError, r"TopKRouter: num_experts=4.0 must be an int"),
    (lambda: TopKRouter(0, 4, 2), ValueError, r"TopKRouter: hidden_size=0 must be an int >= 1"),
    (lambda: TopKRouter(8, 4, 2, bias=1), TypeError, r"TopKRouter: bias=1 must be a bool"),
    (lambda: TopKRouter(8, 6, 2, moe_route.RouterSpec(n_group=4, topk_group=2)), ValueError,
     r"TopKRouter: spec.n_group=4 must divide num_experts=6"),
    (lambda: TopKRouter(8, 8, 5, moe_route.RouterSpec(n_group=4, topk_group=2)), ValueError,
     r"TopKRouter: top_k=5 must be <= spec.topk_group \* experts per group = 4"),
    (lambda: SparseMoE(8, 8, 4, True), TypeError, r"SparseMoE: top_k=True must be an int"),
    (lambda: SparseMoE(8, 0, 4, 2), ValueError, r"SparseMoE: intermediate_size=0 must be an int"),
    (lambda: SparseMoE(8, 8, 4, 2, gated="yes"), TypeError, r"Experts: gated='yes' must be a bool"),
])
def test_modules_refuse_bad_arguments_when_built(make, exc, message):
    """Refused by the constructor, naming the module and the argument, not at the first forward
    (where top_k=True and a spec whose groups do not fit used to fail)."""
    with pytest.raises(exc, match=message):
        make()


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_train_mode_gradients_match(family):
    """The gate has no backward: patched routers recompute the chosen weights differentiably, so
    every parameter (router weights included) gets the unpatched model's gradient."""
    model = build(family).train()
    ids = _ids(9)
    grads = []
    for patched in (False, True):
        model.zero_grad()
        with moe_route.patch(model) if patched else torch.enable_grad():
            model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    routers = [n for n in grads[0] if n.endswith(("gate.weight", "router.weight"))]
    assert routers
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_record_under_compile_fullgraph():
    model = build("qwen3_moe")
    ids = _ids(10)
    with moe_route.record(model) as eager_rec, torch.no_grad():
        model(ids)
    with moe_route.record(model) as rec:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            compiled(ids)
    for a, b in zip(eager_rec.stats, rec.stats):
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)


def test_record_under_compile_does_not_recompile_for_new_groups():
    """A compiled model records group after group, and batch after batch of per-sequence
    groups, in the graphs of its first calls: the hook read each group's name and row, so
    Dynamo guarded on them and recompiled for every new group, and under fullgraph=True the
    ninth group failed (recompile limit). The statistics are the eager run's, and a group that
    no model call ran in is left out."""
    from torch._dynamo.testing import CompileCounter

    model = build("qwen3_moe")
    batches = [_ids(20 + b, (3, 5)) for b in range(12)]

    def run(compiled):
        counter = CompileCounter()
        torch._dynamo.reset()
        frames = []
        with moe_route.record(model) as rec, torch.no_grad():
            forward = torch.compile(model, fullgraph=True, backend=counter) if compiled \
                else model
            for b, ids in enumerate(batches):
                with rec.group(f"g{b}"):
                    forward(ids)
                frames.append(counter.frame_count)
            with rec.group("no call"):
                pass
            for b, ids in enumerate(batches):
                rec.per_sequence([f"s{3 * b + i}" for i in range(3)])
                forward(ids)
                frames.append(counter.frame_count)
        return rec.stats, frames

    (eager, _), (stats, frames) = run(False), run(True)
    assert frames[2:12] == [frames[1]] * 10 and frames[14:] == [frames[13]] * 10
    names = [f"g{b}" for b in range(12)] + [f"s{i}" for i in range(36)]
    assert stats.group_names == eager.group_names == names
    for a, b in zip(eager, stats):
        assert a.tokens.tolist() == [15] * 12 + [5] * 36
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_trace_under_compile_fullgraph_compiles_once(backend, tmp_path):
    """A model compiled with fullgraph=True traces: its trace step is a call of the side-effect
    op moe_route::trace_rows in the graph, run as the graph runs. It compiles in its first call
    and in none after, group after group and in a second record() that streams its trace to a
    file, and traces what the eager model traces; a call's layers share one copy of its token
    ids. Before, the step broke the graph at each router (fullgraph=True refused it); inside a
    graph, as a plain Python step, Dynamo guarded on the trace lists' lengths and recompiled at
    every call; AOT autograd drops an op with no outputs unless it is marked effectful."""
    model = build("qwen3_moe")
    batches = [_ids(40 + b, (3, 5)) for b in range(12)]

    def run(compiled):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        forward = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
        frames = []
        with moe_route.record(model, trace=True, trace_logits=True) as rec, torch.no_grad():
            for b, ids in enumerate(batches[:8]):
                with rec.group(f"g{b}"):
                    forward(ids)
                frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            parts = rec._trace
            shared = [parts[name]["tokens"] for name in parts]
            assert all(t is s for layer in shared for t, s in zip(layer, shared[0]))
        path = tmp_path / f"{backend}{compiled}.safetensors"
        with moe_route.record(model, trace_path=path) as streamed, torch.no_grad():
            for b, ids in enumerate(batches[8:]):
                with streamed.group(f"g{8 + b}"):
                    forward(ids)
                frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return rec.trace, moe_route.load_trace(path), frames

    (eager, eager_streamed, _), (traced, streamed, frames) = run(False), run(True)
    # one graph for the recorder with logits, one for the one without
    # two graphs, as statistics alone: record()'s call hook's and the model's forward
    assert frames == [2] * 12, frames
    assert list(traced) == list(eager) == list(streamed) and len(eager) == 2
    for name, layer in eager.items():
        assert layer["group"] == traced[name]["group"] == [f"g{b}" for b in range(8)
                                                           for _ in range(15)]
        assert streamed[name]["group"] == eager_streamed[name]["group"]
        for key in ("ids", "weights", "tokens", "logits"):
            assert torch.equal(layer[key], traced[name][key]), (name, key)
        for key in ("ids", "weights", "tokens"):
            assert torch.equal(eager_streamed[name][key], streamed[name][key]), (name, key)
        assert torch.equal(streamed[name]["tokens"], torch.cat(batches[8:]).flatten().int())


def test_trace_of_a_compiled_model_in_training():
    """The trace op stays in the graphs that AOT autograd makes of a training step (forward
    and backward), and runs once per router call, as in eager."""
    model = build("qwen3_moe").train()
    batches = [_ids(50 + b, (3, 5)) for b in range(3)]
    traces = []
    for forward in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(0)
        with moe_route.record(model, trace=True) as rec:
            for ids in batches:
                forward(ids, labels=ids).loss.backward()
        traces.append(rec.trace)
    eager, compiled = traces
    assert list(compiled) == list(eager)
    for name, layer in eager.items():
        assert layer["ids"].shape[0] == 45
        for key in ("ids", "weights", "tokens"):
            assert torch.equal(layer[key], compiled[name][key]), (name, key)


def test_trace_breaks_the_graph_where_torch_has_no_side_effect_ops(monkeypatch):
    """Where torch cannot mark the trace op's side effect, a compiled model's trace step runs
    between graphs: fullgraph=True refuses it, and without it the trace is the eager one."""
    from moe_route import recording

    monkeypatch.setattr(recording, "_TRACE_OP", False)
    model, ids = build("qwen3_moe"), _ids(60, (3, 5))
    torch._dynamo.reset()
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        with pytest.raises(torch._dynamo.exc.Unsupported, match="_record_trace"):
            torch.compile(model, fullgraph=True, backend="eager")(ids)
    torch._dynamo.reset()
    traces = []
    for forward in (model, torch.compile(model, backend="eager")):
        with moe_route.record(model, trace=True) as rec, torch.no_grad():
            forward(ids)
        traces.append(rec.trace)
    for name, layer in traces[0].items():
        assert torch.equal(layer["ids"], traces[1][name]["ids"])
        assert torch.equal(layer["tokens"], ids.flatten().int())
    torch._dynamo.reset()


def _qwen3_moe(compiled: bool):
    """A fresh tiny Qwen3-MoE and a Dynamo frame counter, the model compiled with
    fullgraph=True (``model.compile``, which takes the hooks into the graph) if ``compiled``."""
    from torch._dynamo.testing import CompileCounter

    model, counter = build("qwen3_moe"), CompileCounter()
    torch._dynamo.reset()
    if compiled:
        model.compile(fullgraph=True, backend=counter)
    return model, counter


def test_record_generate_of_a_compiled_model_over_many_groups():
    """generate() of a model compiled with fullgraph=True (``model.compile``, which takes the
    recorder's hooks into the graph) records and traces ten groups, more than the recompile
    limit, with the eager statistics and trace: graphs are compiled for the prompt's and the
    decoding steps' shapes, none for a group."""
    ids = _ids(30, (2, 5))
    runs = []
    for compiled in (False, True):
        model, counter = _qwen3_moe(compiled)
        frames = []
        with moe_route.record(model, trace=True) as rec, torch.no_grad():
            for g in range(10):
                with rec.group(f"g{g}"):
                    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
                frames.append(counter.frame_count)
        runs.append((rec.stats, rec.trace))
    assert frames[0] > 0 and frames[2:] == [frames[1]] * 8
    (eager, eager_trace), (stats, trace) = runs
    assert stats.group_names == eager.group_names == [f"g{g}" for g in range(10)]
    for a, b in zip(eager, stats):
        assert a.tokens.tolist() == [2 * (5 + 3)] * 10
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)
    assert list(trace) == list(eager_trace)
    for name, layer in eager_trace.items():
        assert layer["group"] == trace[name]["group"]
        for key in ("ids", "weights", "tokens"):
            assert torch.equal(layer[key], trace[name][key]), (name, key)


def _eager_and_compiled(ids, contexts):
    """``(eager, compiled, frames)``: the logits of a fresh tiny Qwen3-MoE under each context of
    ``contexts(model)`` in turn, eager and then compiled with fullgraph=True (``model.compile``,
    which takes the hooks into the graph), and the compiled run's Dynamo frame count after each
    context."""
    logits = []
    for compiled in (False, True):
        model, counter = _qwen3_moe(compiled)
        frames, out = [], []
        with torch.no_grad():
            for context in contexts(model):
                with context:
                    out.append(model(ids).logits)
                frames.append(counter.frame_count)
        logits.append(out)
    return logits[0], logits[1], frames


def test_steering_sweep_of_a_compiled_model_compiles_once():
    """Ten steering plans in turn (a sweep of biases and std-scaled terms) on a model compiled
    with fullgraph=True run in the graph of the first: the gate's table of a plan was made in
    the call, so Dynamo guarded on the plan's values, recompiled for each plan and failed at
    the ninth. The logits are the eager model's under each plan."""
    def plans(model):   # new plans each run: an eager call has made no table of theirs
        for i in range(10):
            yield moe_route.steer(model, moe_route.SteeringPlan(
                {0: {i % 8: {"add": float(i)}}, 1: {(i + 3) % 8: {"add": -float(i), "std": 0.5}}}))

    eager, compiled, frames = _eager_and_compiled(_ids(31, (2, 5)), plans)
    assert frames == [1] * 10
    for want, steered in zip(eager, compiled):
        torch.testing.assert_close(steered, want)
    assert not torch.equal(compiled[0], compiled[-1])


def test_replays_of_a_compiled_model_compile_once():
    """Ten routings replayed in turn on a model compiled with fullgraph=True run in one graph,
    each with the eager model's logits."""
    ids = _ids(32, (2, 5))
    with moe_route.record(build("qwen3_moe"), trace=True) as rec, torch.no_grad():
        rec.model(ids)
    shifted = [{key: {"ids": (layer["ids"].long() + i) % 8} for key, layer in rec.trace.items()}
               for i in range(10)]
    eager, compiled, frames = _eager_and_compiled(
        ids, lambda model: (moe_route.replay(model, routing) for routing in shifted))
    assert frames == [1] * 10
    for want, replayed in zip(eager, compiled):
        torch.testing.assert_close(replayed, want)
    assert not torch.equal(compiled[0], compiled[1])


def test_two_models_recorded_in_threads_do_not_mix():
    import threading

    models = {f: build(f) for f in ("olmoe", "mixtral")}
    results, errors = {}, []

    def work(family):
        try:
            ids = _ids(11 if family == "olmoe" else 12, (2, 8 if family == "olmoe" else 5))
            for _ in range(5):
                with moe_route.record(models[family]) as rec, torch.no_grad():
                    models[family](ids)
            results[family] = [int(layer.tokens.sum()) for layer in rec.stats]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f,)) for f in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {"olmoe": [16, 16], "mixtral": [10, 10]}


def test_nested_patch_block_undoes_only_what_it_did():
    """``with patch(model):`` inside record/steer returns their patch; leaving the block puts back
    the mode it changed and leaves the patch to them (it goes when they end). Around an explicit
    patch it restores the mode and keeps the patch; a block that patched removes the patch."""
    model = build("qwen3_moe")
    ids = _ids(13, (2, 6))
    plan = moe_route.SteeringPlan.force(0, [5], on=True)
    with torch.no_grad():
        with moe_route.record(model) as rec:
            with moe_route.patch(model, exact=True) as handle:
                assert {s.exact for s in handle.routers.values()} == {True}
                model(ids)
            assert handle.active and {s.exact for s in handle.routers.values()} == {False}
            model(ids)                                   # still recorded
        assert [int(layer.tokens.sum()) for layer in rec.stats] == [24, 24]
        assert not hasattr(model, "_moe_route_patch")    # record's patch went with it
        with moe_route.steer(model, plan):
            steered = model(ids).logits
            with moe_route.patch(model):
                pass
            assert torch.equal(model(ids).logits, steered)
        assert not hasattr(model, "_moe_route_patch")
        handle = moe_route.patch(model)
        with moe_route.patch(model, exact=True):
            pass
        assert handle.active and {s.exact for s in handle.routers.values()} == {False}
        handle.remove()
        with moe_route.patch(model) as handle:
            with moe_route.patch(model, exact=True):
                pass
            assert handle.active
        assert not handle.active and not hasattr(model, "_moe_route_patch")


def test_unpatch_takes_off_the_hooks_of_contexts_left_open():
    """record and replay contexts entered and never left (a notebook cell that failed) kept
    their call hooks and the wrapped ``generate`` on the model after ``unpatch``: every later
    forward ran them. unpatch takes them off with a warning; the contexts' late exits do nothing
    more, and the recorder keeps what it recorded."""
    model = build("olmoe")
    ids = _ids(14, (2, 6))
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks))
             for n, m in model.named_modules()}
    with torch.no_grad():
        rec = moe_route.record(model).__enter__()
        model(ids)
        k = model.config.num_experts_per_tok
        by_position = torch.arange(k).expand(*ids.shape, k)   # [B, S, k]: by position
        replay = moe_route.replay(model, {0: by_position}).__enter__()
        with pytest.warns(UserWarning, match=r"unpatched OlmoeForCausalLM while 2 "
                                             r"record/steer/replay context\(s\) on it were open"):
            assert moe_route.unpatch(model) is True
        assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs
        assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks))
                for n, m in model.named_modules()} == hooks
        model(ids)                        # not recorded
        replay.__exit__(None, None, None)
        rec.__exit__(None, None, None)
    assert [int(layer.tokens.sum()) for layer in rec.stats] == [12, 12]
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs
    # with warnings as errors the warning comes after the model is restored
    rec = moe_route.record(model).__enter__()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="while 1 record/steer/replay context"):
            moe_route.unpatch(model)
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks))
            for n, m in model.named_modules()} == hooks
    rec.__exit__(None, None, None)


def test_a_float64_model_names_its_router_and_what_to_do():
    """A float64 model patched fine and then failed in ``topk_gate`` with no router named. The
    error names the router and the fix, in fast mode and when exact mode records."""
    model = build("olmoe").double()
    ids = _ids(15, (2, 5))
    with torch.no_grad():
        for exact in (False, True):
            with moe_route.record(model), moe_route.patch(model, exact=exact):
                with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.gate: the router's "
                                                    r"logits are torch\.float64; moe_route routes "
                                                    r"float32, float16 or bfloat16 logits"):
                    model(ids)
