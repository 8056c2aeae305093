"""Models whose forwards are wrapped or replaced around the router: ``device_map`` placement and
offloading (accelerate's hooks), GPT-OSS's MXFP4 MLP (which skips the router's forward) and
DBRX (whose block routes the router's logits). The patch must route, record and steer through
all of them and leave them as they were."""
import types
import warnings

import pytest
import torch
from torch import nn

import moe_route
from moe_route.hf import find_routers

from tiny_models import build, inputs

pytest.importorskip("transformers")


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, family, ids):
    with torch.no_grad():
        return model(**inputs(family, ids, model)).logits.float()


def _record(model, family, ids):
    with moe_route.record(model) as rec, torch.no_grad():
        model(**inputs(family, ids, model))
    return rec.stats


def _module_dicts(model):
    return {n: dict(m.__dict__) for n, m in model.named_modules()}


@pytest.fixture
def offloaded(tmp_path):
    """A tiny Qwen3-MoE saved and loaded back with ``device_map``: layer 0 offloaded to disk
    (its weights stay on the meta device; accelerate's hooks load them at each call), the rest
    on the CPU; and the model it came from."""
    pytest.importorskip("accelerate")
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placed = type(model).from_pretrained(tmp_path / "model", device_map=device_map,
                                         offload_folder=str(tmp_path / "offload"))
    routers = find_routers(placed)
    assert routers[0][1].weight.device.type == "meta" and "_hf_hook" in routers[0][1].__dict__
    return model, placed


def test_accelerate_hooks_added_or_removed_while_patched_survive_unpatch():
    """A hook added while patched wraps the patched forward (accelerate moves it to
    _old_forward): unpatch used to pop the hook's wrapper, and the router ran on its
    meta-device weights without the hook. A hook removed while patched moves the patched forward
    back to forward: unpatch used to re-create _old_forward and leave it there, and the next
    forward failed. Either way the model now runs as one never patched, with the same hooks."""
    pytest.importorskip("accelerate")
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules

    ids = _ids()
    want = _logits(build("olmoe"), "olmoe", ids)
    model = build("olmoe")
    moe_route.patch(model)
    cpu_offload(model, execution_device="cpu")  # the weights move to meta, hooks load them
    moe_route.unpatch(model)
    router = find_routers(model)[0][1]
    assert router.weight.device.type == "meta" and "_hf_hook" in router.__dict__
    assert torch.equal(_logits(model, "olmoe", ids), want)

    model = build("olmoe")
    for _, router, _ in find_routers(model):
        add_hook_to_module(router, AlignDevicesHook(execution_device="cpu"))
    moe_route.patch(model)
    remove_hook_from_submodules(model)
    moe_route.unpatch(model)
    assert not any("_old_forward" in router.__dict__ for _, router, _ in find_routers(model))
    assert torch.equal(_logits(model, "olmoe", ids), want)

    # a patched forward replaced by another is left to whoever replaced it, with a warning that
    # comes after every other router is restored (an error raised by it stops nothing)
    model = build("olmoe")
    moe_route.patch(model)
    (_, first, _), (_, second, _) = find_routers(model)
    mine = first.forward = types.MethodType(type(first).forward, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"the patched OlmoeTopKRouter.forward was "
                                              r"replaced while patched"):
            moe_route.unpatch(model)
    assert first.__dict__["forward"] is mine and "forward" not in second.__dict__
    assert torch.equal(_logits(model, "olmoe", ids), want)


def test_device_map_offload_patch_record_steer(offloaded):
    """Under accelerate's hooks the patch goes beneath them (``_old_forward``): outputs, recorded
    statistics and steering equal the unplaced model's, and unpatch leaves the hooks as they
    were."""
    model, placed = offloaded
    ids = _ids(1)
    ref = _logits(model, "qwen3_moe", ids)
    before = _module_dicts(placed)
    with moe_route.patch(placed) as handle:
        assert all(state.original.__func__ is type(r).forward
                   for (_, r, _), state in zip(find_routers(placed), handle.routers.values()))
        torch.testing.assert_close(_logits(placed, "qwen3_moe", ids), ref, rtol=1e-5, atol=1e-5)
    assert _module_dicts(placed) == before  # the hooks and their _old_forward are back
    for ours, theirs in zip(_record(placed, "qwen3_moe", ids), _record(model, "qwen3_moe", ids)):
        assert ours.counts.device.type == "cpu"  # the hook's execution device, not meta
        assert torch.equal(ours.counts, theirs.counts)
        torch.testing.assert_close(ours.weight_sum, theirs.weight_sum)
    plan = moe_route.SteeringPlan({0: {3: {"force": 1}}, 1: {5: {"std": 2.0}}})
    with moe_route.steer(model, plan):
        steered = _logits(model, "qwen3_moe", ids)
    with moe_route.steer(placed, plan):
        torch.testing.assert_close(_logits(placed, "qwen3_moe", ids), steered,
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, ref)
    assert _module_dicts(placed) == before
    torch.testing.assert_close(_logits(placed, "qwen3_moe", ids), ref, rtol=1e-5, atol=1e-5)


def test_record_refuses_meta_weights_without_a_hook():
    model = build("olmoe")
    _, router, _ = find_routers(model)[0]
    router.weight = nn.Parameter(torch.empty_like(router.weight, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        moe_route.record(model).__enter__()
    assert not hasattr(model, "_moe_route_patch")


class _RoutedExperts(nn.Module):
    """The interface of transformers' MXFP4 GPT-OSS experts over the eager experts' weights:
    ``forward(hidden, ids, weights)`` and ``forward_routed(hidden, routing_data, ...)``, where
    the stand-in kernel's routing data is just ``(ids, weights)``."""

    def __init__(self, eager):
        super().__init__()
        self.eager = eager
        self.calls = []

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.calls.append(("forward", top_k_index))
        return self.eager(hidden_states, top_k_index, top_k_weights)

    def forward_routed(self, hidden_states, routing_data, gather_idx, scatter_idx):
        self.calls.append(("forward_routed", routing_data[0]))
        return self.eager(hidden_states, *routing_data)


def _kernel_routing(logits, k):
    # gpt-oss-triton-kernels' routing(): softmax over the top-k logits, ids and weights packed
    # into its routing data (here the plain pair)
    values, ids = torch.topk(logits, k, dim=-1)
    return (ids, torch.softmax(values, dim=-1)), None, None


@pytest.fixture
def mxfp4_gpt_oss(monkeypatch):
    """A tiny GPT-OSS whose MLPs are transformers' ``Mxfp4GptOssMLP`` around the eager experts,
    with the Triton hub replaced by a CPU stand-in; and the eager model."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    if not hasattr(mxfp4, "Mxfp4GptOssMLP"):
        pytest.skip("this transformers release has no Mxfp4GptOssMLP")
    monkeypatch.setattr(mxfp4, "triton_kernels_hub",
                        types.SimpleNamespace(routing=types.SimpleNamespace(
                            routing=_kernel_routing)), raising=False)
    model = build("gpt_oss")
    eager = build("gpt_oss")
    for layer in model.model.layers:
        layer.mlp = mxfp4.Mxfp4GptOssMLP(layer.mlp.router, _RoutedExperts(layer.mlp.experts))
    return model, eager


def test_gpt_oss_mxfp4_block_routes_through_the_router(mxfp4_gpt_oss):
    """Unpatched, the MXFP4 MLP routes with the kernel on the raw logits and the router's
    forward never runs; patched, its forward calls the router (so statistics and steering
    apply) and the experts' forward, with the eager model's routing and outputs."""
    model, eager = mxfp4_gpt_oss
    ids = _ids(2)
    ref = _logits(eager, "gpt_oss", ids)
    experts = [layer.mlp.experts for layer in model.model.layers]
    torch.testing.assert_close(_logits(model, "gpt_oss", ids), ref, rtol=1e-5, atol=1e-5)
    assert {c[0] for e in experts for c in e.calls} == {"forward_routed"}
    before = _module_dicts(model)
    for e in experts:
        e.calls.clear()
    with moe_route.patch(model):
        torch.testing.assert_close(_logits(model, "gpt_oss", ids), ref, rtol=1e-5, atol=1e-5)
    assert {c[0] for e in experts for c in e.calls} == {"forward"}
    assert _module_dicts(model) == before
    for ours, theirs in zip(_record(model, "gpt_oss", ids), _record(eager, "gpt_oss", ids)):
        assert int(ours.tokens.sum()) == ids.numel()
        assert torch.equal(ours.counts, theirs.counts)
    for e in experts:
        e.calls.clear()
    with moe_route.steer(model, moe_route.SteeringPlan({1: {4: {"force": 1}}})):
        _logits(model, "gpt_oss", ids)
    chosen = [c[1] for c in experts[1].calls]
    assert chosen and all((c == 4).any(-1).all() for c in chosen)
    assert not any((c[1] == 4).any(-1).all() for c in experts[0].calls)


def test_dbrx_patch_sits_on_the_block_and_unpatches():
    """DBRX's router keeps its own forward; the block's route_tokens_to_experts is replaced for
    the patch's lifetime and restored after it; exact mode is bit-identical."""
    model = build("dbrx")
    ids = _ids(3)
    ref = _logits(model, "dbrx", ids)
    before = _module_dicts(model)
    with moe_route.patch(model):
        for _, router, block in find_routers(model):
            assert "forward" not in router.__dict__
            assert "route_tokens_to_experts" in block.__dict__
        torch.testing.assert_close(_logits(model, "dbrx", ids), ref, rtol=1e-5, atol=1e-5)
    assert _module_dicts(model) == before
    with moe_route.patch(model, exact=True):
        assert torch.equal(_logits(model, "dbrx", ids), ref)
    assert torch.equal(_logits(model, "dbrx", ids), ref)
