"""The "moe_route" experts implementation against transformers' own implementations."""
import pytest
import torch

import moe_route
import moe_route.nn  # noqa: F401  (registers "moe_route" with ExpertsInterface)
from moe_route.nn import experts as moe_experts

from tiny_models import FAMILIES, build, inputs, supported_families

pytest.importorskip("transformers")
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402


def _logits(model, impl, ids):
    model.set_experts_implementation(impl)
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager_and_grouped_mm_fp32(family):
    model = build(family)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = _logits(model, "moe_route", ids)
    torch.testing.assert_close(ours, _logits(model, "eager", ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, _logits(model, "grouped_mm", ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours, _logits(model, "moe_route", ids))  # deterministic


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_experts_module_matches_transformers(family, dtype):
    """Same experts module, same (hidden, ids, weights), every implementation. (End to end in
    bf16 a last-bit difference can flip a later layer's routing, so the comparison is per
    module.)"""
    model = build(family, dtype=dtype)
    ex = next(m for n, m in model.named_modules() if n.endswith("experts"))
    g = torch.Generator().manual_seed(2)
    H = model.config.hidden_size
    h = torch.randn(17, H, generator=g).to(dtype)
    ids = torch.randint(0, ex.num_experts, (17, 2), generator=g)
    w = torch.rand(17, 2, generator=g).to(dtype)
    outs = {}
    for impl in ("eager", "grouped_mm", "moe_route"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            outs[impl] = ex(h, ids, w).float()
    # bf16: transformers multiplies by the routing weight in bf16, unpermute in fp32.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["moe_route"], outs["grouped_mm"], **tol)
    torch.testing.assert_close(outs["moe_route"], outs["eager"], **tol)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("fallback", [False, True], ids=["grouped_mm", "per_expert"])
def test_training_gradients_match_eager(family, fallback, monkeypatch):
    """A training step through the "moe_route" implementation: the loss and every parameter's
    gradient (experts, routers, attention, embeddings) as with transformers' "eager"."""
    if fallback:
        monkeypatch.setattr(moe_experts, "_grouped_mm_ok", lambda x, w: False)
    model = build(family)
    model.train()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    results = {}
    for impl in ("eager", "moe_route"):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # any dropout or jitter draws the same
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss_e, grads_e), (loss_m, grads_m) = results["eager"], results["moe_route"]
    torch.testing.assert_close(loss_m, loss_e, rtol=1e-5, atol=1e-6)
    for name, grad in grads_e.items():
        if grad is None:
            assert grads_m[name] is None, name
            continue
        assert grads_m[name] is not None, name
        torch.testing.assert_close(grads_m[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("intermediate, dtype", [(13, torch.float32), (10, torch.bfloat16)])
def test_training_with_rows_that_are_not_16_byte_strides(intermediate, dtype):
    """gate_up's 26 fp32 or 20 bf16 columns: the forward's operands pass grouped_mm's alignment
    check, but its backward takes the output's gradient, a row of 104 or 40 bytes, and raised
    "strides should be multiple of 16 bytes"; such a projection goes expert by expert."""
    transformers = pytest.importorskip("transformers")
    config = transformers.OlmoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=intermediate, num_experts=8,
                                      num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(config).to(dtype).train()
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl in ("eager", "moe_route"):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads[impl] = model.model.layers[0].mlp.experts.gate_up_proj.grad.float()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(grads["moe_route"], grads["eager"], **tol)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_generate_matches_eager(family):
    model = build(family)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    outs = {}
    for impl in ("eager", "moe_route"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            outs[impl] = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(outs["eager"], outs["moe_route"])


def _experts(family):
    model = build(family)
    return next(m for n, m in model.named_modules() if n.endswith("experts"))


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_expert_parallel_sentinels_are_dropped(family):
    ex = _experts(family)
    E = ex.num_experts
    g = torch.Generator().manual_seed(4)
    # gate_up_proj is [E, H, 2I] when transposed (GPT-OSS), else [E, 2I, H]
    H = ex.gate_up_proj.shape[1] if ex.is_transposed else ex.gate_up_proj.shape[-1]
    h = torch.randn(12, H, generator=g)
    ids = torch.randint(0, E, (12, 2), generator=g)
    ids[::3, 1] = E  # sentinel of an expert on another rank
    w = torch.rand(12, 2, generator=g)
    want = moe_experts.experts_forward(ex, h, ids.clamp(max=E - 1), w * (ids < E))
    got = moe_experts.experts_forward(ex, h, ids, w)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "muse_spark"])
@pytest.mark.parametrize("tail", [1.0, float("nan")])
def test_expert_parallel_sentinels_get_no_gradient(family, tail, monkeypatch):
    """Rows of dropped ids (the plan's unused tail) hold whatever the grouped GEMM leaves there,
    forward (here ``tail``) and backward (here NaN), on purpose. The backward's reached
    gate_up_proj_bias of the last expert (GPT-OSS: its gradient differed from transformers' by
    2 to 21 when the memory held numbers), the forward's NaN the post-expert norm's weight
    (MuseSpark: a zero gradient times NaN). Every parameter's gradient must be that of the
    same slots given to a real expert with weight 0."""
    ex = _experts(family)
    E = ex.num_experts
    real = moe_experts._per_expert_linear

    class Tail(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, start, fill):
            ctx.start = start
            t = t.clone()
            t[start:] = fill
            return t

        @staticmethod
        def backward(ctx, grad):
            return Tail.apply(grad, ctx.start, float("nan")), None, None

    def nan_tail(x, w, offsets):
        start = int(offsets[-1])
        return Tail.apply(real(Tail.apply(x, start, tail), w, offsets), start, tail)

    monkeypatch.setattr(moe_experts, "_grouped_mm_ok", lambda x, w: False)
    monkeypatch.setattr(moe_experts, "_per_expert_linear", nan_tail)
    up = ex.gate_up_proj if ex.has_gate else ex.up_proj
    g = torch.Generator().manual_seed(4)
    h = torch.randn(12, up.shape[-2] if ex.is_transposed else up.shape[-1], generator=g)
    ids = torch.randint(0, E, (12, 2), generator=g)
    ids[::3, 1] = E  # sentinel of an expert on another rank
    w = torch.rand(12, 2, generator=g)
    grads = []
    for i, wi in ((ids, w), (ids.clamp(max=E - 1), w * (ids < E))):
        ex.zero_grad(set_to_none=True)
        moe_experts.experts_forward(ex, h, i, wi).square().sum().backward()
        grads.append({n: p.grad for n, p in ex.named_parameters()})
    for name, want in grads[1].items():
        assert grads[0][name].isfinite().all(), name
        # the two runs sum different slot sets: fp32 rounding of the gradient's scale (its
        # largest entries are ~100 for down_proj; the difference depends on the thread count)
        torch.testing.assert_close(grads[0][name], want, rtol=1e-5,
                                   atol=1e-6 * max(1.0, float(want.abs().max())), msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_compiles_fullgraph_with_its_gradients(family):
    """Compiled, the per-expert GEMMs (grouped_mm's fake kernel takes bf16 only) are one op in
    the graph, forward and backward: their loop read the plan's offsets on the host, which
    failed fullgraph compiles ("data-dependent expression") and broke every other graph at each
    MoE layer. Loss and gradients as eager's."""
    model = build(family)
    model.set_experts_implementation("moe_route")
    model.train()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    results = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = run(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, grad in grads_e.items():
        if grad is None:
            assert grads_c[name] is None, name
        else:
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 4, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    offsets = torch.tensor([0, 4, 4, 9])  # expert 1 has no row; row 9 is a dropped id's
    torch.library.opcheck(moe_experts.expert_linear, (x, w, offsets))


def test_per_expert_fallback_matches_grouped_mm(monkeypatch):
    ex = _experts("gpt_oss")  # transposed, biased, interleaved gate/up
    g = torch.Generator().manual_seed(5)
    h = torch.randn(20, 32, generator=g)
    ids = torch.randint(0, ex.num_experts, (20, 2), generator=g)
    w = torch.rand(20, 2, generator=g)
    with torch.no_grad():
        grouped = moe_experts.experts_forward(ex, h, ids, w)
        monkeypatch.setattr(moe_experts, "_grouped_mm_ok", lambda x, w: False)
        looped = moe_experts.experts_forward(ex, h, ids, w)
    torch.testing.assert_close(looped, grouped, rtol=1e-5, atol=1e-6)


def test_capture_path_matches_the_per_expert_loop():
    """In a CUDA graph capture the offsets cannot be read on the host: every expert's GEMM over
    all rows, each row keeping its own expert's, gives the per-expert loop's rows (an expert with
    no row; dropped ids' rows 0)."""
    g = torch.Generator().manual_seed(8)
    ids = torch.tensor([[0, 2], [2, 5], [0, 3], [7, 2]])  # experts 1, 4 unused; 5 and 7 dropped
    plan = moe_route.dispatch_plan(ids, 5)
    x = torch.randn(8, 6, generator=g)
    w = torch.randn(5, 6, 3, generator=g)
    want = moe_experts._per_expert_linear(x, w, plan.expert_offsets)
    got = moe_experts._masked_expert_linear(x, w, plan)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert int(plan.expert_offsets[-1]) == 6 and not got[6:].any()


# Families whose experts lack transformers' @use_experts_implementation: setting "moe_route"
# leaves their own experts running, which enable() refuses.
OWN_EXPERTS = {"dbrx", "jetmoe", "step3p7", "longcat_flash", "llama4", "switch_transformers",
               "nllb_moe"}
# Experts that are not a module at all: Doge's are two embedding tables inside its MoE block
NO_EXPERTS_MODULE = {"doge"}


@pytest.mark.parametrize("family", supported_families())
def test_enable_runs_every_experts_module_or_refuses(family, monkeypatch):
    """enable() switches every experts module to "moe_route" (each one's call counted), with the
    model's outputs unchanged (the same GEMMs as "grouped_mm", one combine rounding apart), or
    refuses a model whose experts would ignore the setting, leaving it as it was."""
    model = build(family)
    kw = inputs(family, torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(6)),
                model)
    with torch.no_grad():
        want = model(**kw)[0]
    calls = []
    forward = moe_experts.experts_forward
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "moe_route",
                        lambda self, *a: calls.append(self) or forward(self, *a))
    if family in OWN_EXPERTS | NO_EXPERTS_MODULE:
        match = "has no experts module with" if family in NO_EXPERTS_MODULE else "without"
        with pytest.raises(ValueError, match=f"{match} transformers' @use_experts_implementation"):
            moe_experts.enable(model)
        assert model.config._experts_implementation != "moe_route"
        return
    names = moe_experts.enable(model)
    with torch.no_grad():
        got = model(**kw)[0]
    assert names and {id(m) for m in calls} == {id(model.get_submodule(n)) for n in names}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_enable_refuses_a_model_without_experts():
    with pytest.raises(ValueError, match="no experts module"):
        moe_experts.enable(torch.nn.Linear(2, 2))
