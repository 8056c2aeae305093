"""Every MoE family of tests/tiny_models.py builds, runs and really routes.

For each family: build the tiny model (fp32 and bf16), run one forward on a [2, 7] batch, check
the output's shape and finiteness, and check through forward hooks on the routing modules that
the routing is exercised (more than 2 distinct experts chosen in some layer) and that the
selection-bias tensors were randomised.
"""
import pytest
import torch

import tiny_models as T

pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _output(family, out):
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _expected_shape(family, model):
    cfg = model.config
    if family == "dots3_note_vision":  # 2 images x (2 x 4) patches
        return (16, cfg.hidden_size)
    if family == "openai_privacy_filter":  # token classification
        return (2, 7, cfg.num_labels)
    if T.ALL_FAMILIES[family][1].endswith(("ForCausalLM", "ForConditionalGeneration")):
        return (2, 7, cfg.vocab_size)
    return (2, 7, cfg.hidden_size)  # text-only base models (VL / omni / OCR families)


def test_family_tables_consistent():
    for family, spec in T.FAMILIES.items():
        assert T.ALL_FAMILIES[family] == spec
    assert set(T.ROUTER_CLASSES) == set(T.ALL_FAMILIES)
    assert not set(T.UNBUILDABLE) & set(T.ALL_FAMILIES)


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine


@pytest.mark.parametrize("family", list(T.ALL_FAMILIES))
def test_builds_runs_and_routes(family):
    model = T.build(family)
    routers = T.router_modules(model, family)
    assert routers, f"no {T.ROUTER_CLASSES[family]} module in {type(model).__name__}"

    chosen = {}
    hooks = [m.register_forward_hook(
        lambda mod, args, out, n=n: chosen.setdefault(n, []).append(T.selected_experts(
            family, out, k=1 if family == "zaya" else 2)))
        for n, m in routers]
    try:
        with torch.no_grad():
            out = _output(family, model(**T.inputs(family, IDS, model)))
    finally:
        for h in hooks:
            h.remove()

    assert out.shape == _expected_shape(family, model)
    assert torch.isfinite(out).all()
    assert set(chosen) == {n for n, _ in routers}, "some routing modules were not called"
    distinct = {n: torch.cat(v).unique().numel() for n, v in chosen.items()}
    assert max(distinct.values()) > 2, f"degenerate routing: {distinct}"

    # the random re-initialisation reached every routing tensor, selection biases included
    for name, t in T._routing_tensors(model, family).items():
        spread = t.float().abs().max() if t.numel() == 1 else t.float().std()
        assert spread > 0.02, f"{name} was not re-initialised"


@pytest.mark.parametrize("family", list(T.ALL_FAMILIES))
def test_deterministic_and_bf16(family):
    a, b = T.build(family), T.build(family)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    model = T.build(family, dtype=torch.bfloat16)
    with torch.no_grad():
        out = _output(family, model(**T.inputs(family, IDS, model)))
    assert out.shape == _expected_shape(family, model)
    assert torch.isfinite(out.float()).all()
