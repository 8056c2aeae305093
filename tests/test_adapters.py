"""Router adapters: every supported family's routers, patched and unpatched, on the same input.

Each router's input is captured with a forward pre-hook during one forward of the family's tiny
model; the router is then called unpatched and patched (``moe_route.patch``) on that input. The
logits (index 0) must be bit-identical, the expert ids the same set per token, the weights equal
to fp32 rounding (bf16: to bf16 rounding) and every output's dtype the same.
"""
import contextlib
import dataclasses
import importlib
import unittest.mock

import pytest
import torch

import moe_route
from moe_route.hf import FAMILIES, UnsupportedModelError, family_status, find_routers, supported
from moe_route.hf import adapters, validated
from moe_route.hf.adapters import ROUTING_BLOCKS, UNSUPPORTED, lookup
from moe_route.hf.patch import layer_index
from moe_route.nn import TopKRouter

from tiny_models import build, inputs, require, router_modules, supported_families

pytest.importorskip("transformers")


SUPPORTED = supported_families()

# bf16 runs for a representative subset: the tiny models of every router forward added for S1c-S7
# plus one family of each older adapter
BF16 = ["olmoe", "mixtral", "gpt_oss", "granitemoe", "deepseek_v3", "jamba", "qwen3_vl_moe",
        "hunyuan_v1_moe", "gemma4", "aria", "cohere2_moe", "openai_privacy_filter", "beam",
        "axk2", "deepseek_v2", "mistral4", "mistral_large4", "minimax_m2", "minimax_m3_vl",
        "hy_v3", "afmoe", "lfm2_moe", "laguna", "muse_spark", "inkling2", "kolibri1", "flint",
        "ernie4_5_moe", "ernie4_5_vl_moe", "longcat_flash", "llama4", "switch_transformers",
        "nllb_moe", "phimoe", "dbrx", "jetmoe", "inkling", "zaya", "doge"]

# Routers that return (dispatch/top-1 mask, weights, logits [.., E]) instead of (logits, weights,
# ids): the mask and the logits must be bit-identical, the weights equal to ``tol``.
MASK_OUTPUTS = {"SwitchTransformersTop1Router", "NllbMoeTop2Router"}

FP32_TOL = dict(rtol=2e-6, atol=2e-7)
BF16_TOL = dict(rtol=1e-2, atol=1e-2)


def _ids(seed=1, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _capture(model, key, seed=1, routers=None):
    """(name, router, args, kwargs) of every call of ``routers`` (default: every router) during
    one forward of ``model``."""
    calls = []
    if routers is None:
        routers = [(name, r) for name, r, _ in find_routers(model)]

    def hook(mod, args, kwargs, name):
        args = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
        calls.append((name, mod, args, dict(kwargs)))

    hooks = [r.register_forward_pre_hook(lambda m, a, kw, n=name: hook(m, a, kw, n),
                                         with_kwargs=True)
             for name, r in routers]
    try:
        with torch.no_grad():
            model(**inputs(key, _ids(seed), model))
    finally:
        for h in hooks:
            h.remove()
    assert calls, f"{key}: no router was called"
    return calls


def _call_all(model, calls, patched: bool):
    with torch.no_grad():
        if not patched:
            return [mod(*args, **kwargs) for _, mod, args, kwargs in calls]
        with moe_route.patch(model):
            return [mod(*args, **kwargs) for _, mod, args, kwargs in calls]


def _assert_same_ids_and_weights(name, z, ref_ids, our_ids, ref_w, our_w, tol):
    """Same id set per token, except on near-ties of ``z`` (the gate breaks ties of equal
    scores by value and lower index, torch.topk as it happens to); weights to ``tol``.
    In fp32 a near-tie is logits within 1e-6 relative, or sigmoid scores within 2**-21 relative
    (4 to 8 ulp: the gate's sigmoid and PyTorch's are each within 1.9 ulp of the exact value on
    [-12, 12], so where two scores are that close their order is either's; a sigmoid near 1 is
    that flat over logits more than 1e-6 apart)."""
    s0, s1 = ref_ids.sort(-1), our_ids.sort(-1)
    same = (s0.values == s1.values).all(-1)
    if not same.all():
        fp32 = z.dtype == torch.float32
        tie_tol = dict(rtol=1e-6, atol=0.0) if fp32 else dict(rtol=0, atol=0)
        z = z.float()
        for t in (~same).nonzero().flatten().tolist():
            a, b = z[t, ref_ids[t]].sort().values, z[t, our_ids[t]].sort().values
            if fp32 and torch.allclose(a.double().sigmoid(), b.double().sigmoid(),
                                       rtol=2.0 ** -21, atol=0.0):
                continue
            torch.testing.assert_close(a, b, **tie_tol,
                                       msg=lambda m: f"{name}: token {t} routes differently: "
                                                     f"{ref_ids[t].tolist()} vs "
                                                     f"{our_ids[t].tolist()} ({m})")
    torch.testing.assert_close(our_w.float().gather(-1, s1.indices)[same],
                               ref_w.float().gather(-1, s0.indices)[same], **tol)


def _same_masks_up_to_half_ties(name, ref_mask, our_mask, logits, dtype):
    """Per token, whether the one-hot masks (Switch, NLLB) are equal; they must be, except where a
    half-precision family's choice is a tie after rounding its probabilities to its dtype (the
    caveat documented at SWITCH_TOP1: it takes the argmax of the rounded probabilities, the gate
    that of the fp32 ones)."""
    E = logits.shape[-1]
    ref_rows, our_rows = ref_mask.reshape(-1, E), our_mask.reshape(-1, E)
    same = (ref_rows == our_rows).all(-1)
    if same.all():
        return same
    assert dtype in (torch.float16, torch.bfloat16), f"{name}: output 0 must be bit-identical"
    probs = torch.softmax(logits.reshape(-1, E).float(), dim=-1).to(dtype)
    for t in (~same).nonzero().flatten().tolist():
        chosen = (ref_rows[t] != 0) | (our_rows[t] != 0)
        assert chosen.any() and bool((probs[t][chosen] == probs[t][chosen].max()).all()), \
            f"{name}: token {t} routed differently without a tie in {dtype}"
    return same


def _assert_router_outputs_match(name, ref, ours, tol, mask=False, block=False, k=None):
    assert type(ref) is type(ours) and len(ref) == len(ours), name
    if block:  # a block patched as its router (Doge): (block output, router logits)
        assert torch.equal(ref[1], ours[1]), f"{name}: the logits must be bit-identical"
        assert ref[0].dtype == ours[0].dtype, name
        # the output shows the experts the gate chose, except for a token whose k-th and
        # (k+1)-th product-key sums tie (bf16), which the model and the gate may break apart
        kx, ky = ref[1]
        z = (kx.unsqueeze(-1) + ky.unsqueeze(-2)).flatten(1).sort(-1, descending=True).values
        untied = z[:, k - 1] != z[:, k]
        rows = lambda t: t.reshape(untied.numel(), -1)[untied]  # noqa: E731
        assert untied.float().mean() > 0.8, name
        torch.testing.assert_close(rows(ours[0]), rows(ref[0]), **tol)
        return
    if len(ref) == 5:  # JetMoeTopKGating's plan: (order, token, weight per slot, sizes, logits)
        assert ref[3] == ours[3], f"{name}: per-expert sizes differ"
        for i in (0, 1, 4):
            assert torch.equal(ref[i], ours[i]), f"{name}: output {i} must be bit-identical"
        assert ref[2].dtype == ours[2].dtype, name
        torch.testing.assert_close(ours[2], ref[2], **tol)
        return
    for i, (a, b) in enumerate(zip(ref, ours)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: output {i}: {a.dtype}" \
            f"{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if mask:
        assert torch.equal(ref[2], ours[2]), f"{name}: the logits must be bit-identical"
        same = _same_masks_up_to_half_ties(name, ref[0], ours[0], ref[2], ref[1].dtype)
        rows = lambda t: t.reshape(same.numel(), -1)[same]  # noqa: E731
        torch.testing.assert_close(rows(ours[1]), rows(ref[1]), **tol)
        return
    assert torch.equal(ref[0], ours[0]), f"{name}: output 0 must be bit-identical"
    if len(ref) == 4:  # InklingTopkRouter: 4th output, the shared experts' gammas
        torch.testing.assert_close(ours[3], ref[3], **tol)
    if len(ref) == 2:  # Llama4Router: (dense scores, logits), both rebuilt with the family's ops
        assert torch.equal(ref[1], ours[1]), f"{name}: the logits must be bit-identical"
        return
    _assert_same_ids_and_weights(name, ref[0], ref[2], ours[2], ref[1], ours[1], tol)


def _check_block_routing(model, key, tol, seed=1):
    """A router that returns only logits (DBRX): the patch replaces its block's routing method;
    that method, on the logits each router produced in one forward, must give the same ids and
    weights patched as not."""
    logits = []
    found = find_routers(model)
    hooks = [r.register_forward_hook(lambda m, a, out, n=name, b=block: logits.append(
        (n, b, out.detach().clone()))) for name, r, block in found]
    with torch.no_grad():
        model(**inputs(key, _ids(seed), model))
    for h in hooks:
        h.remove()
    method = lookup(type(found[0][1])).block_method
    assert logits and method
    with torch.no_grad():
        ref = [getattr(b, method)(z) for _, b, z in logits]
        with moe_route.patch(model):
            ours = [getattr(b, method)(z) for _, b, z in logits]
    for (name, _, z), (rw, ri), (ow, oi) in zip(logits, ref, ours):
        assert rw.dtype == ow.dtype and ri.dtype == oi.dtype and rw.shape == ow.shape, name
        _assert_same_ids_and_weights(name, z, ri, oi, rw, ow, tol)
    return ref, ours


def _check_family(key, dtype):
    model = build(key, dtype=dtype)
    if lookup(type(find_routers(model)[0][1])).block_method is not None:
        _check_block_routing(model, key, FP32_TOL if dtype == torch.float32 else BF16_TOL)
        return model
    calls = _capture(model, key)
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for (name, mod, _, _), r, o in zip(calls, ref, ours):
        _assert_router_outputs_match(f"{key}: {name}", r, o, tol,
                                     mask=type(mod).__name__ in MASK_OUTPUTS,
                                     block=type(mod).__name__ in ROUTING_BLOCKS,
                                     k=getattr(mod, "top_k", None))
    return model


@pytest.mark.parametrize("key", SUPPORTED)
def test_every_router_matches_on_the_same_input(key):
    _check_family(key, torch.float32)


@pytest.mark.parametrize("key", BF16)
def test_every_router_matches_on_the_same_input_bf16(key):
    require(key)
    assert key in SUPPORTED
    _check_family(key, torch.bfloat16)


def _validated_release() -> bool:
    import transformers

    return transformers.__version__ in validated.TRANSFORMERS


def test_supported_rows_and_status_strings():
    """Each validated release supports every family it ships; a family added in a later
    release is unsupported in an earlier one, naming the module it lacks."""
    if not _validated_release():
        pytest.skip("statuses of another transformers release than the validated ones")
    import importlib.util

    from moe_route.hf.families import modeling_module

    # find_spec of the family's package, which a release without the family lacks
    absent = {f for f in FAMILIES
              if importlib.util.find_spec(modeling_module(f).rpartition(".")[0]) is None}
    rows = supported()
    assert [r["family"] for r in rows] == list(FAMILIES)
    for row in rows:
        family, status = row["family"], row["status"]
        assert status == family_status(family)
        assert row["routers"] == list(FAMILIES[family][1])
        if family in absent:
            assert status.startswith("unsupported: cannot import transformers.models."), status
        else:
            assert status == "supported", f"{family}: {status}"
            assert None not in row["adapters"], family
    assert {r["family"] for r in rows if r["status"] != "supported"} == absent
    limits = {r["family"]: r["limits"] for r in rows if r["limits"]}
    assert set(limits) == {"deepseek_v4", "phimoe", "nllb_moe", "switch_transformers", "axk2",
                           "inkling2_loop", "doge"} - absent
    assert "cannot be steered" in limits["deepseek_v4"]
    if "inkling2_loop" not in absent:
        assert "once per pass" in limits["inkling2_loop"]


def test_every_exemplar_of_a_validated_release_is_validated():
    """The fingerprint table covers the release CI installs (else the families whose code it
    lacks would silently drop out of the suite as unsupported)."""
    if not _validated_release():
        pytest.skip("the fingerprint table is checked on the validated releases only")
    installed = validated._installed()
    assert installed, "no exemplar found in transformers"
    for name, value in installed.items():
        assert value in validated.FINGERPRINTS[name], name


def test_changed_router_code_is_refused_with_the_reason():
    """A router class whose name moe_route knows but whose forward differs from the tested code
    (GraniteMoe's router returned its ids first in transformers 5.17, its logits first in 5.23)
    is unsupported, with the reason, unless the user registers an adapter for it."""

    class OlmoeTopKRouter(torch.nn.Module):  # the name of a real exemplar, other code
        def forward(self, hidden_states):
            return hidden_states.topk(2, dim=-1)

    name = "OlmoeTopKRouter"
    saved = adapters.REGISTRY[name]
    try:
        known = validated.FINGERPRINTS[f"{name}.forward"]
        assert adapters.fingerprint(OlmoeTopKRouter) not in known
        assert lookup(OlmoeTopKRouter) is None
        assert "is not the code moe_route was tested against" in UNSUPPORTED[name]
        with pytest.raises(UnsupportedModelError, match="not the code moe_route was tested"):
            adapters.adapter_for(OlmoeTopKRouter())
        moe_route.hf.register_adapter(name, adapters.SOFTMAX_TOPK)
        assert lookup(OlmoeTopKRouter) is adapters.SOFTMAX_TOPK
    finally:
        adapters.REGISTRY[name] = saved
        adapters._USER_REGISTERED.discard(name)
        UNSUPPORTED.pop(name, None)
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter as Real

    assert lookup(Real) is saved  # the real class is still routed


def test_deepseek_v4_hash_and_topk_layers():
    """DeepSeek-V4 mixes hash layers (experts from a frozen token-id table) with sqrt(softplus)
    top-k layers. Patched, the hash routers run their own forward (bit-identical) and record the
    table's choice; the top-k routers go through the gate; a plan that steers a hash layer is
    refused, one that steers a top-k layer works."""
    model = build("deepseek_v4")
    kinds = {name: type(r).__name__ for name, r, _ in find_routers(model)}
    assert set(kinds.values()) == {"DeepseekV4HashRouter", "DeepseekV4TopKRouter"}
    hash_routers = [(n, r) for n, r, _ in find_routers(model) if kinds[n].endswith("HashRouter")]
    for _, router in hash_routers:  # a table that is not all zeros
        router.tid2eid.copy_(torch.randint(0, router.num_experts, router.tid2eid.shape,
                                           generator=torch.Generator().manual_seed(0)))
    _check_family("deepseek_v4", torch.float32)
    calls = _capture(model, "deepseek_v4", routers=hash_routers)
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    assert all(torch.equal(a, b) for r, o in zip(ref, ours) for a, b in zip(r, o))
    ids = _ids(3)
    with moe_route.record(model) as rec, torch.no_grad():
        model(**inputs("deepseek_v4", ids, model))
    name, router = hash_routers[0]
    chosen = router.tid2eid[ids.reshape(-1)]
    layer = rec.stats[name]
    assert torch.equal(layer.counts[0], torch.bincount(chosen.reshape(-1),
                                                       minlength=router.num_experts))
    assert int(layer.tokens[0]) == ids.numel()
    hash_index = layer_index(name)
    with pytest.raises(ValueError, match="cannot be steered"):
        with moe_route.steer(model, moe_route.SteeringPlan({hash_index: {0: {"force": 1}}})):
            pass
    assert not hasattr(model, "_moe_route_patch")
    topk_index = next(layer_index(n) for n, k in kinds.items()
                      if k.endswith("TopKRouter"))
    with torch.no_grad():
        plain = model(**inputs("deepseek_v4", ids, model))[0]
        with moe_route.steer(model, moe_route.SteeringPlan({topk_index: {0: {"force": 1}}})):
            steered = model(**inputs("deepseek_v4", ids, model))[0]
    assert not torch.allclose(plain, steered)


@pytest.mark.parametrize("key", ["ernie4_5_moe", "flint", "deepseek_v3", "inkling"])
def test_autocast(key):
    """Ernie and Flint compute their logits with autocast disabled, DeepSeek-V3 under it; the
    patched routers do the same (index 0 is bit-identical under CPU bf16 autocast)."""
    model = build(key)
    calls = _capture(model, key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _call_all(model, calls, patched=False)
        ours = _call_all(model, calls, patched=True)
        with torch.no_grad(), moe_route.patch(model) as handle:
            for state in handle.routers.values():  # an adapter that forgets to disable autocast
                state.adapter = dataclasses.replace(state.adapter, autocast=True)
            careless = [mod(*a, **kw) for _, mod, a, kw in calls]
    for (name, _, _, _), r, o, c in zip(calls, ref, ours, careless):
        _assert_router_outputs_match(name, r, o, BF16_TOL)
        disables = key != "deepseek_v3"
        assert (r[0].dtype == torch.float32) == disables
        assert torch.equal(r[0], c[0]) != disables, name


@pytest.mark.parametrize("key", ["deepseek_v3", "glm4_moe", "axk2", "muse_spark"])
def test_autocast_sigmoid_in_the_logits_dtype(key):
    """These routers' fp32 GEMM runs in bf16 under autocast, and their sigmoid stays there:
    they rank the rounded scores plus the fp32 selection bias. The patched router picks the same
    experts (it ranked the unrounded sigmoid: 7 to 13 of 2000 tokens differed)."""
    model = build(key).eval()
    name, router = router_modules(model, key)[0]
    x = torch.randn(2000, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = router(x)
        with moe_route.patch(model):
            got = router(x)
    assert want[0].dtype == torch.bfloat16
    assert torch.equal(got[2].sort(-1).values, want[2].sort(-1).values), name


def test_what_autocast_makes_of_the_score_op_is_asked_once(monkeypatch):
    """Which dtype autocast gives a rounding router's score op depends on the op, the device
    type and the dtypes only: it is asked at the first call, not by an extra op at every router
    call (one per MoE layer per decoding step)."""
    patching = importlib.import_module("moe_route.hf.patch")  # moe_route.hf.patch is a function
    asked = []
    sigmoid = patching._SCORE_OPS["sigmoid"]
    monkeypatch.setitem(patching._SCORE_OPS, "sigmoid", lambda x: asked.append(1) or sigmoid(x))
    monkeypatch.setattr(patching, "_AUTOCAST_FP32", {})
    model = build("deepseek_v3").eval()
    ids = _ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), moe_route.patch(model):
        for _ in range(3):
            model(**inputs("deepseek_v3", ids, model))
    assert len(asked) == 1
    assert list(patching._AUTOCAST_FP32.values()) == [False]  # CPU autocast leaves sigmoid alone


def test_ernie_clamped_renormalisation():
    """Ernie divides by clamp(sum, min=moe_norm_min): with a selection bias that picks experts of
    negligible probability, the weights stay negligible instead of summing to 1."""
    model = build("ernie4_5_moe")
    calls = _capture(model, "ernie4_5_moe")
    with torch.no_grad():
        for _, router, _, _ in calls:
            router.weight.mul_(40.0)
            p = torch.softmax(torch.nn.functional.linear(calls[0][2][0], router.weight), -1)
            least = p.mean(0).argsort()[:2]
            router.moe_statics.e_score_correction_bias[0, least] = 10.0
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    assert any((r[1].sum(-1) < 1e-3).any() for r in ref), "the probe must reach the clamp"
    for (name, _, _, _), r, o in zip(calls, ref, ours):
        _assert_router_outputs_match(name, r, o, dict(rtol=2e-6, atol=1e-30))


def test_cohere2_sigmoid_selection():
    model = build("cohere2_moe")
    calls = _capture(model, "cohere2_moe")
    for renorm in (False, True):
        for _, router, _, _ in calls:
            router.expert_selection_fn, router.norm_topk_prob = "sigmoid", renorm
        ref = _call_all(model, calls, patched=False)
        ours = _call_all(model, calls, patched=True)
        assert torch.allclose(ref[0][1].sum(-1), torch.ones(1)) == renorm
        for (name, _, _, _), r, o in zip(calls, ref, ours):
            _assert_router_outputs_match(name, r, o, FP32_TOL)


def test_deepseek_v2_topk_methods():
    """Greedy, and group-limited with one group kept (with k <= topk_group a group-max limit
    never binds, so the tiny model's own setting cannot tell the two apart)."""
    model = build("deepseek_v2")
    calls = _capture(model, "deepseek_v2")
    for method, topk_group in (("greedy", 2), ("group_limited_greedy", 1)):
        for _, router, _, _ in calls:
            router.topk_method, router.topk_group = method, topk_group
        ref = _call_all(model, calls, patched=False)
        ours = _call_all(model, calls, patched=True)
        for (name, _, _, _), r, o in zip(calls, ref, ours):
            _assert_router_outputs_match(f"{method}: {name}", r, o, FP32_TOL)
    for _, router, _, _ in calls:
        router.topk_method = "noaux_tc"
    with pytest.raises(UnsupportedModelError, match="topk_method='noaux_tc'"):
        moe_route.patch(model)


@pytest.mark.parametrize("key", ["gemma4", "ernie4_5_moe", "llama4", "switch_transformers",
                                 "nllb_moe", "phimoe", "dbrx", "jetmoe", "inkling", "zaya", "doge"])
def test_exact_mode_and_record_with_a_returns_hook(key):
    model = build(key)
    ids = _ids(2)
    with torch.no_grad():
        ref = model(**inputs(key, ids, model))[0]
        with moe_route.patch(model, exact=True):
            assert torch.equal(model(**inputs(key, ids, model))[0], ref)
        with moe_route.record(model) as rec:
            ours = model(**inputs(key, ids, model))[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert int(rec.stats[0].tokens.sum()) == ids.numel()


@pytest.mark.parametrize("key", ["jamba", "hunyuan_v1_moe", "aria", "openai_privacy_filter",
                                 "deepseek_v2", "mistral_large4", "minimax_m3_vl", "inkling2",
                                 "flint", "longcat_flash"])
def test_topk_router_from_module(key):
    model = build(key)
    name, router, block = find_routers(model)[0]
    tk = TopKRouter.from_module(router, block)
    x = torch.randn(13, tk.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, ours = router(x), tk(x)
    _assert_router_outputs_match(name, ref, ours, FP32_TOL)


@pytest.mark.parametrize("key", ["gemma4", "laguna", "muse_spark", "ernie4_5_moe", "kolibri1",
                                 "llama4", "dbrx"])
def test_topk_router_from_module_refuses_hooks(key):
    model = build(key)
    _, router, block = find_routers(model)[0]
    with pytest.raises(UnsupportedModelError,
                       match="route_tokens_to_experts" if key == "dbrx" else "hook"):
        TopKRouter.from_module(router, block)


@pytest.mark.parametrize("p", [2.0, 0.5, None])
def test_dbrx_p_norm(p):
    """DbrxFFN divides the k probabilities by their p-norm (moe_normalize_expert_weights): p=1
    is the gate's renormalisation (the other tests), other orders the family's torch.norm,
    None no normalisation."""
    model = build("dbrx")
    for _, _, block in find_routers(model):
        block.moe_normalize_expert_weights = p
    ref, ours = _check_block_routing(model, "dbrx", FP32_TOL, seed=5)
    sums = torch.cat([w for w, _ in ours]).sum(-1)
    if p is None:
        assert (sums < 1).all()
    else:
        norms = torch.cat([w for w, _ in ours]).norm(p=p, dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_dbrx_bad_p_norm_refused():
    model = build("dbrx")
    find_routers(model)[0][2].moe_normalize_expert_weights = -1.0
    with pytest.raises(UnsupportedModelError, match="moe_normalize_expert_weights=-1.0"):
        moe_route.patch(model)
    assert not hasattr(model, "_moe_route_patch")


def test_dbrx_training_jitter_and_select_only():
    """DBRX's router multiplies its input by uniform noise in training; the router's own forward
    still runs, so with the same seed the patched model routes and computes as the unpatched one.
    Select-only steering moves the choice without touching the weights' source logits."""
    model = build("dbrx").train()
    for _, router, _ in find_routers(model):
        router.moe_jitter_eps = 0.1
    ids = _ids(6)
    torch.manual_seed(0)
    ref = model(**inputs("dbrx", ids, model))[0]
    with moe_route.patch(model):
        torch.manual_seed(0)
        ours = model(**inputs("dbrx", ids, model))[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    model.eval()
    name, _, block = find_routers(model)[0]
    seen = []
    hook = block.experts.register_forward_pre_hook(lambda m, a: seen.append((a[1], a[2])))
    plan = moe_route.SteeringPlan({0: {3: {"force": 1, "select_only": True}}})
    with torch.no_grad(), moe_route.steer(model, plan):
        model(**inputs("dbrx", ids, model))
    hook.remove()
    chosen, weights = seen[0]
    assert (chosen == 3).any(-1).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))


def _forced_per_token(key, out, e):
    """Whether expert ``e`` is selected (and kept) for every token in one router output."""
    if key == "switch_transformers":  # (one-hot dispatch [B, S, E], max prob, logits)
        return bool((out[0][..., e] == 1).all())
    if key == "nllb_moe":  # (top-1 mask, combine weights [N, E], logits)
        return bool((out[1][:, e] > 0).all())
    if key == "phimoe":  # (logits, weights, ids)
        return bool((out[2] == e).any(-1).all())
    if key == "jetmoe":  # (order, token, weight per slot, per-expert sizes, logits [T, E])
        return out[3][e] == out[4].shape[0]
    if key == "dbrx":  # the ids DbrxFFN passes its experts [T, k]
        return bool((out == e).any(-1).all())
    raise AssertionError(key)


@pytest.mark.parametrize("key", [k for k in ("switch_transformers", "nllb_moe", "phimoe", "dbrx",
                                             "jetmoe")
                                 if k in SUPPORTED])
def test_force_on_selects_the_expert_for_every_token(key):
    """Steering acts on the selection of the S7 routers whose outputs an adapter rebuilds: an
    expert forced on in one router is selected for every token that router sees (and no other
    router changes), and the model's output moves."""
    model = build(key)
    ids = _ids(3)
    routers = find_routers(model)
    name, first, block = routers[0]
    outs = []
    if key == "dbrx":  # the router returns logits only; its block routes them
        hook = block.experts.register_forward_pre_hook(lambda m, a: outs.append(a[1]))
    else:
        hook = first.register_forward_hook(lambda m, a, out: outs.append(out))
    with torch.no_grad():
        ref = model(**inputs(key, ids, model))[0]
        unforced = [e for e in range(8) if not _forced_per_token(key, outs[-1], e)]
        assert unforced, f"{key}: the probe needs an expert not already chosen by every token"
        e = unforced[0]
        with moe_route.patch(model) as handle:
            handle.routers[name].steer = moe_route.SteerSpec(force={e: 1.0})
            steered = model(**inputs(key, ids, model))[0]
    hook.remove()
    assert len(outs) >= 2 and all(_forced_per_token(key, o, e) for o in outs[len(outs) // 2:])
    assert not torch.allclose(steered, ref)


@pytest.mark.parametrize("prioritized,before,fraction,capacity", [
    (True, False, 1.0, 16), (False, True, 1.0, 16), (True, False, 0.0, 3), (False, False, 0.0, 2),
    (True, True, 0.25, 16)])
def test_nllb_capacity_and_padding(prioritized, before, fraction, capacity):
    """NLLB's combine weights on the same captured inputs (padding mask included) under each
    capacity setting: batch-prioritised or in-order locations, normalisation before or after
    dropping, an eval capacity fraction or a fixed capacity small enough to drop tokens."""
    model = build("nllb_moe")
    for _, router, _ in find_routers(model):
        router.batch_prioritized_routing, router.normalize_router_prob_before_dropping = \
            prioritized, before
        router.moe_eval_capacity_token_fraction, router.expert_capacity = fraction, capacity
    ids = _ids(4)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding at the end of the first row
    calls = []
    hooks = [r.register_forward_pre_hook(lambda m, a, n=name: calls.append(
        (n, m, tuple(t.clone() if torch.is_tensor(t) else t for t in a), {})))
        for name, r, _ in find_routers(model)]
    with torch.no_grad():
        ref_out = model(**inputs("nllb_moe", ids, model), attention_mask=mask)[0]
    for h in hooks:
        h.remove()
    assert any(len(a) > 1 and a[1] is not None for _, _, a, _ in calls), "no padding mask passed"
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    dropped = 0
    for (name, _, _, _), r, o in zip(calls, ref, ours):
        _assert_router_outputs_match(name, r, o, FP32_TOL, mask=True)
        dropped += int(((r[1] > 0).sum(-1) < 2).sum())
    assert dropped > 0 or fraction == 1.0, "the probe must drop tokens at capacity"
    with torch.no_grad(), moe_route.patch(model):
        ours_out = model(**inputs("nllb_moe", ids, model), attention_mask=mask)[0]
    torch.testing.assert_close(ours_out, ref_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["sampling", "random"])
def test_nllb_sampling_policies_refused(policy):
    model = build("nllb_moe")
    for _, router, _ in find_routers(model):
        router.second_expert_policy = policy
    with pytest.raises(UnsupportedModelError, match=f"second_expert_policy='{policy}'"):
        moe_route.patch(model)
    assert not hasattr(model, "_moe_route_patch")


@pytest.mark.parametrize("jitter", [0.01, 0.3, 2.0])
def test_phimoe_sparsemixer_weights(jitter):
    """Sparsemixer's weights (a softmax per choice over the logits within the jitter threshold)
    are bit-identical for thresholds that keep one, a few or all experts; training is refused."""
    model = build("phimoe")
    calls = _capture(model, "phimoe")
    for _, router, _, _ in calls:
        router.router_jitter_noise = jitter
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    for (name, _, _, _), r, o in zip(calls, ref, ours):
        _assert_router_outputs_match(name, r, o, FP32_TOL)
        assert torch.equal(r[1], o[1]) and torch.equal(r[2], o[2]), name
    if jitter > 0.1:
        assert any((r[1] < 0.99).any() for r in ref), "the probe must mask fewer experts"
    model.train()
    with moe_route.patch(model), pytest.raises(UnsupportedModelError, match="training"):
        model(**inputs("phimoe", _ids(), model))


def test_inkling_weights_bit_identical_and_steered_choice():
    """Inkling's weights (normalised with the shared experts') and shared gammas are the
    family's own ops on the gate's ids: bit-identical once the unsorted family ids are aligned
    with the gate's; forcing an expert on puts it in every token's choice."""
    model = build("inkling")
    calls = _capture(model, "inkling")
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    for (name, _, _, _), r, o in zip(calls, ref, ours):
        a, b = r[2].sort(-1), o[2].sort(-1)
        assert torch.equal(a.values, b.values), name
        assert torch.equal(r[1].gather(-1, a.indices), o[1].gather(-1, b.indices)), name
        assert torch.equal(r[3], o[3]) and torch.equal(r[0], o[0]), name
    name, router, mod_args, kwargs = calls[0]
    free = [e for e in range(router.num_experts) if not (ref[0][2] == e).any(-1).all()][0]
    with torch.no_grad(), moe_route.patch(model) as handle:
        handle.routers[name].steer = moe_route.SteerSpec(force={free: 1.0})
        _, w, ids, gammas = router(*mod_args, **kwargs)
    assert (ids == free).any(-1).all()
    torch.testing.assert_close((w.sum(-1) + gammas.sum(-1)).float(),
                               torch.full((ids.shape[0],),
                                          router.route_scale * router.global_scale.item()))


# Families whose own ops compute the weights from the logits (``Adapter.weighs_logits``), and
# two whose weights are the gate's, for contrast
WEIGHS_LOGITS = ["llama4", "phimoe", "nllb_moe", "inkling", "olmoe", "mixtral"]


def _by_id(out, ids_at):
    """A router output with its (ids, weights) sorted by id per token (families differ in the
    order of the k)."""
    ids, w = out[ids_at], out[1]
    order = ids.argsort(-1)
    return ids.gather(-1, order), w.gather(-1, order)


@pytest.mark.parametrize("family", WEIGHS_LOGITS)
def test_steered_weights_are_the_familys_own_of_the_steered_logits(family):
    """Steering (not select_only) gives the weights the family's own router computes from the
    steered logits: the unpatched router whose logit GEMM returns the logits steered as
    ``reference.steer_logits`` steers them. The logits the patched router returns are its own,
    unsteered."""
    model = build(family)
    name, router, args, kwargs = _capture(model, family)[0]
    ad = lookup(type(router))
    weight, E = adapters._attr(router, ad.weight), ad.experts(router)
    spec = moe_route.SteerSpec(add={1: 2.5}, std={3: 0.5, 5: -1.0}, abs={6: 0.75})
    linear = torch.nn.functional.linear

    def steered_linear(x, w, b=None):
        z = linear(x, w, b)
        if w is not weight:
            return z
        head = z[..., :E].reshape(-1, E)  # Inkling's GEMM also gives its shared experts' logits
        head = moe_route.reference.steer_logits(head.float(), spec.table(E), spec.std_unbiased)[0]
        return torch.cat([head.to(z.dtype).reshape(*z.shape[:-1], E), z[..., E:]], -1)

    with torch.no_grad():
        plain = router(*args, **kwargs)
        with unittest.mock.patch.object(torch.nn.functional, "linear", steered_linear):
            want = router(*args, **kwargs)
        with moe_route.patch(model) as handle:
            handle.routers[name].steer = spec
            got = router(*args, **kwargs)
    at = 0 if ad.logits_at is None else ad.logits_at
    assert torch.equal(got[at], plain[at]), "the returned logits are the router's own"
    assert not torch.equal(want[at], plain[at]), "the probe must steer the family's logits"
    if ad.ids_at is None or family == "phimoe":  # dense or one-hot outputs (and PhiMoE's ids)
        outs = [i for i in range(len(want)) if i != at]
        for i in outs:
            torch.testing.assert_close(got[i], want[i], **FP32_TOL)
    else:
        (want_ids, want_w), (got_ids, got_w) = _by_id(want, ad.ids_at), _by_id(got, ad.ids_at)
        assert torch.equal(got_ids.long(), want_ids.long())
        torch.testing.assert_close(got_w, want_w, **FP32_TOL)
        if len(want) > 3:  # Inkling's shared experts' gammas, normalised with the chosen
            torch.testing.assert_close(got[3], want[3], **FP32_TOL)
    changed = [i for i in range(len(want)) if i != at and not torch.equal(want[i], plain[i])]
    assert changed, "steering must move the family's weights"


def test_zaya_skip_class_and_router_state():
    """Zaya routes over E experts and a skip class: with the skip class's bias raised every token
    picks it; the patched router masks it to expert 0 with weight 0 as the family does, the
    statistics count it as expert E, and the router state handed to the next layer is
    bit-identical."""
    model = build("zaya")
    for _, router, _ in find_routers(model):
        router.balancing_biases[-1] = 1.0
    calls = _capture(model, "zaya")
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    E = calls[0][1].num_experts
    for (name, _, _, _), r, o in zip(calls, ref, ours):
        _assert_router_outputs_match(name, r, o, FP32_TOL)
        assert torch.equal(r[3], o[3]), name
        assert torch.equal(r[2], o[2]) or torch.equal(r[2].sort(-1).values, o[2].sort(-1).values)
    with moe_route.record(model) as rec, torch.no_grad():
        model(**inputs("zaya", _ids(1), model))
    layer = rec.stats[0]
    assert layer.num_experts == E + 1
    assert int(layer.counts[0, E]) == int(layer.tokens[0])  # every token chose the skip class


def _loss_and_grads(model, key, ids, patched: bool, seed: int = 0):
    model.zero_grad()
    torch.manual_seed(seed)
    with moe_route.patch(model) if patched else contextlib.nullcontext():
        loss = model(**inputs(key, ids, model), labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_switch_training_jitter_is_applied_in_place():
    """SwitchTransformersTop1Router multiplies its input by uniform noise *in place* in training
    (its .to(router_dtype) is a no-op in an fp32 model), so its experts see the jittered tokens
    too: with the same seed the patched model has the unpatched model's loss and gradients."""
    model = build("switch_transformers").train()
    for _, router, _ in find_routers(model):
        router.jitter_noise = 0.3
    ids = _ids(7)
    ref_loss, ref_grads = _loss_and_grads(model, "switch_transformers", ids, patched=False)
    loss, grads = _loss_and_grads(model, "switch_transformers", ids, patched=True)
    assert not hasattr(model, "_moe_route_patch")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert any("router" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
def test_switch_and_nllb_router_side_effects_are_kept(family):
    """Switch's and NLLB's routers record the input dtype and cast their classifier to
    router_dtype (fp32) when called: in a bf16 model the classifier holds fp32 weights from the
    first call on, and its gradient is fp32. A patched model ends up in the same state."""
    ids = _ids(3)
    states = []
    for patched in (False, True):
        model = build(family, torch.bfloat16)
        with moe_route.patch(model) if patched else contextlib.nullcontext(), torch.no_grad():
            model(**inputs(family, ids, model))
        states.append(({n: (t.dtype, t) for n, t in model.state_dict().items()},
                       [router.input_dtype for _, router, _ in find_routers(model)]))
    (want, want_dtypes), (got, got_dtypes) = states
    assert any(n.endswith("classifier.weight") and dtype == torch.float32
               for n, (dtype, _) in want.items())
    assert got_dtypes == want_dtypes == [torch.bfloat16] * len(want_dtypes)
    assert got.keys() == want.keys()
    for name, (dtype, t) in want.items():
        assert got[name][0] == dtype, name
        assert torch.equal(got[name][1], t), name


@pytest.mark.parametrize("k", [1, 4])
def test_phimoe_routes_two_experts_whatever_num_experts_per_tok(k):
    """Sparsemixer always picks two experts; the router's top_k (config.num_experts_per_tok) is
    passed to it and ignored. A patched PhiMoE with another top_k routes as the unpatched one."""
    model = build("phimoe")
    for _, router, block in find_routers(model):
        router.top_k = block.top_k = k
    calls = _capture(model, "phimoe")
    ref = _call_all(model, calls, patched=False)
    ours = _call_all(model, calls, patched=True)
    for (name, _, _, _), r, o in zip(calls, ref, ours):
        assert r[2].shape[-1] == 2, name
        _assert_router_outputs_match(name, r, o, FP32_TOL)
    ids = _ids(4)
    with torch.no_grad():
        want = model(**inputs("phimoe", ids, model)).logits
        with moe_route.patch(model) as handle:
            assert {s.top_k for s in handle.routers.values()} == {2}
            got = model(**inputs("phimoe", ids, model)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_capacity_drops_are_recorded_and_documented():
    """Switch and NLLB drop tokens beyond an expert's capacity; record counts the router's choice
    of every token, dropped or not, and their limits (``moe-route supported``) say so."""
    model = build("switch_transformers")
    for _, router, _ in find_routers(model):
        router.expert_capacity = 1
    name, router, _ = find_routers(model)[0]
    dispatched = []
    hook = router.register_forward_hook(lambda m, a, out: dispatched.append(out[0].sum()))
    ids = _ids(5, (3, 8))
    with torch.no_grad(), moe_route.record(model) as rec:
        model(**inputs("switch_transformers", ids, model))
    hook.remove()
    layer = next(layer for layer in rec.stats if layer.name == name)
    assert int(layer.counts.sum()) == int(layer.tokens.sum()) == ids.numel()
    assert int(dispatched[0]) < ids.numel()  # the probe drops tokens
    limits = {r["family"]: r["limits"] for r in supported()}
    for family in ("switch_transformers", "nllb_moe"):
        assert "record counts tokens dropped for expert capacity" in limits[family], family


def test_axk2_zero_filled_groups_are_a_documented_limit():
    """AXK2TopkRouter.apply_group_scoring fills the dropped groups' scores with 0.0, not -inf;
    the gate never picks from a dropped group, so where a kept expert's biased score is below 0
    the two can differ. ``moe-route supported`` says so for axk2 (and for no other family of its
    adapter)."""
    limits = {r["family"]: r["limits"] for r in supported()}
    assert "dropped groups filled with 0.0, not -inf" in limits["axk2"]
    assert "below 0" in limits["axk2"]
    assert not limits["deepseek_v3"] and not limits["beam"]


def test_doge_product_keys_route_steer_and_refuse_more_than_a_half():
    """Doge's block is patched as its router: its experts are the product keys i*sqrt(E) + j, so
    forcing one steers every token to it, and the statistics count E = sqrt(E)^2 experts. With
    top_k above the keys per half, the model's two-stage search is not a top-k of all the sums:
    refused, naming both numbers."""
    model = build("doge")
    block = model.get_submodule("model.layers.0.mlp")
    plan = moe_route.SteeringPlan.force(["model.layers.0.mlp"], [13])
    with moe_route.steer(model, plan), moe_route.record(model, trace=True) as rec, \
            torch.no_grad():
        model(_ids(3))
    assert rec.stats[0].num_experts == block.num_keys ** 2 == 16
    assert bool((rec.trace["model.layers.0.mlp"]["ids"] == 13).any(-1).all())
    block.top_k = block.num_keys + 1
    with pytest.raises(UnsupportedModelError, match=r"top_k=5 is more than its "
                                                    r"sqrt\(num_experts\)=4 keys per half"):
        moe_route.patch(model)
