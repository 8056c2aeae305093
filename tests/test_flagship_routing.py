"""Patched routing at the routing hyper-parameters of released flagship checkpoints.

test_adapters.py checks every family at one tiny config: 8 experts, top-2 (16 experts in 4 groups,
2 kept, for the grouped routers). Released checkpoints route with other numbers: 16 to 768
experts, top-1 to top-12, 8 groups of which 3 or 4 are kept, renormalisation on or off, scaling
factors up to 16. Each case here is one checkpoint: its family's tiny model (``tiny_models.build``:
hidden sizes tiny, 2 layers, random routers and selection biases) with the routing
hyper-parameters of the checkpoint's config.json put over the tiny config. Every router is then
called unpatched and patched on the inputs it saw in one forward, as test_adapters does: the
logits bit-identical, the same expert ids per token (except where the family's own scores tie:
``_assert_same_ids_and_weights``), the weights equal to fp32 rounding (bf16: bf16 rounding).

Each case's ``doc`` names the checkpoint; values marked "(confirmed)" were checked against a
published copy of its config.json, the others are the well-known values of the release. A subset
runs in bf16, and a subset with near-ties: pairs of experts with equal (or all but equal) logits
and selection biases, so that for about a quarter of the tokens the top-k boundary falls
inside a pair.

Not run in bf16: Llama-4, whose router output test_adapters compares without tie tolerance (an
exact bf16 tie of two logits is broken by torch.topk one way and by the gate, lower index first,
the other; about 1 token in 400 at 16 experts). LFM2-MoE and DeepSeek-V4 score in the model dtype
and add an fp32 bias: in bf16 the gate ranks their scores rounded as theirs are
(``RouterSpec.round_scores``); with fp32 scores it chose other experts than the family for 4-7%
of the tokens at these expert counts.
"""
import functools
from dataclasses import dataclass, field

import pytest
import torch

import moe_route
from moe_route.hf import find_routers
from moe_route.hf.adapters import ROUTING_BLOCKS, lookup

from test_adapters import (BF16_TOL, FP32_TOL, MASK_OUTPUTS, _assert_router_outputs_match,
                           _call_all, _capture, _check_block_routing)
from tiny_models import ALL_FAMILIES, SELECTION_BIAS_NAMES, build

pytest.importorskip("transformers")


@dataclass(frozen=True)
class Flagship:
    """One checkpoint's routing in its family's tiny model: ``routing`` goes over the tiny config;
    every top-k router must then have ``experts`` experts and route ``top_k`` of them (so a
    config key that a transformers release renamed cannot silently leave the tiny values)."""

    family: str
    checkpoint: str
    doc: str
    experts: int
    top_k: int
    routing: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.family}-{self.checkpoint}"


_DS_V2 = Flagship(
    "deepseek_v2", "DeepSeek-V2",
    "deepseek-ai/DeepSeek-V2 (and V2.5): 160 experts, top-6, group_limited_greedy over 8 groups "
    "keeping 3, no renormalisation, routed_scaling_factor 16.0 (confirmed)",
    160, 6, dict(n_routed_experts=160, num_experts_per_tok=6, topk_method="group_limited_greedy",
                 n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0))
_DS_V3 = Flagship(
    "deepseek_v3", "DeepSeek-V3",
    "deepseek-ai/DeepSeek-V3 (and R1): 256 experts, top-8, sigmoid + correction bias, 8 groups "
    "keeping 4, renormalised, routed_scaling_factor 2.5 (confirmed)",
    256, 8, dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                 norm_topk_prob=True, routed_scaling_factor=2.5))
_KIMI_K2 = Flagship(
    "deepseek_v3", "Kimi-K2",
    "moonshotai/Kimi-K2-Instruct (DeepSeek-V3 architecture): 384 experts, top-8, one group, "
    "renormalised, routed_scaling_factor 2.827 (confirmed)",
    384, 8, dict(n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1,
                 norm_topk_prob=True, routed_scaling_factor=2.827))
_GLM45 = Flagship(
    "glm4_moe", "GLM-4.5",
    "zai-org/GLM-4.5 (4.6, 4.7): 160 experts, top-8 (confirmed), one group, renormalised, "
    "routed_scaling_factor 2.5",
    160, 8, dict(n_routed_experts=160, num_experts_per_tok=8, n_group=1, topk_group=1,
                 norm_topk_prob=True, routed_scaling_factor=2.5))

CASES = [
    Flagship("olmoe", "OLMoE-1B-7B",
             "allenai/OLMoE-1B-7B-0924: 64 experts, top-8, not renormalised (confirmed)",
             64, 8, dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)),
    Flagship("qwen3_moe", "Qwen3-30B-A3B",
             "Qwen/Qwen3-30B-A3B (and 235B-A22B): 128 experts, top-8, renormalised",
             128, 8, dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
    Flagship("qwen2_moe", "Qwen1.5-MoE-A2.7B",
             "Qwen/Qwen1.5-MoE-A2.7B: 60 experts (not a multiple of 8), top-4, not renormalised, "
             "a shared expert (confirmed)",
             60, 4, dict(num_experts=60, num_experts_per_tok=4, norm_topk_prob=False)),
    Flagship("qwen2_moe", "Qwen2-57B-A14B",
             "Qwen/Qwen2-57B-A14B: 64 experts, top-8, not renormalised",
             64, 8, dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)),
    Flagship("mixtral", "Mixtral-8x7B",
             "mistralai/Mixtral-8x7B-v0.1 (and 8x22B): 8 experts, top-2",
             8, 2, dict(num_local_experts=8, num_experts_per_tok=2)),
    Flagship("gpt_oss", "gpt-oss-20b",
             "openai/gpt-oss-20b: 32 experts, top-4, logit bias (confirmed)",
             32, 4, dict(num_local_experts=32, num_experts_per_tok=4)),
    Flagship("gpt_oss", "gpt-oss-120b",
             "openai/gpt-oss-120b: 128 experts, top-4 (confirmed)",
             128, 4, dict(num_local_experts=128, num_experts_per_tok=4)),
    Flagship("phimoe", "Phi-3.5-MoE",
             "microsoft/Phi-3.5-MoE-instruct: 16 experts, top-2, router_jitter_noise 0.01",
             16, 2, dict(num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.01)),
    Flagship("deepseek_v2", "DeepSeek-V2-Lite",
             "deepseek-ai/DeepSeek-V2-Lite: 64 experts, top-6, greedy (n_group 1, topk_group 1), "
             "no renormalisation, routed_scaling_factor 1.0 (confirmed)",
             64, 6, dict(n_routed_experts=64, num_experts_per_tok=6, topk_method="greedy",
                         n_group=1, topk_group=1, norm_topk_prob=False,
                         routed_scaling_factor=1.0)),
    _DS_V2,
    _DS_V3,
    Flagship("deepseek_v32", "DeepSeek-V3.2",
             "deepseek-ai/DeepSeek-V3.2-Exp: DeepSeek-V3's routing (256 experts, top-8, 8 groups "
             "keeping 4, renormalised, routed_scaling_factor 2.5)",
             256, 8, dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                          norm_topk_prob=True, routed_scaling_factor=2.5)),
    _KIMI_K2,
    _GLM45,
    Flagship("glm4_moe", "GLM-4.5-Air",
             "zai-org/GLM-4.5-Air: 128 experts, top-8, one group, renormalised, "
             "routed_scaling_factor 1.0 (confirmed)",
             128, 8, dict(n_routed_experts=128, num_experts_per_tok=8, n_group=1, topk_group=1,
                          norm_topk_prob=True, routed_scaling_factor=1.0)),
    Flagship("dots1", "dots.llm1",
             "rednote-hilab/dots.llm1.inst: 128 experts, top-6, renormalised, "
             "routed_scaling_factor 2.5 (confirmed); a published copy leaves n_group/topk_group "
             "null, on which transformers' own router fails, so one group here",
             128, 6, dict(n_routed_experts=128, num_experts_per_tok=6, n_group=1, topk_group=1,
                          norm_topk_prob=True, routed_scaling_factor=2.5)),
    Flagship("deepseek_v4", "DeepSeek-V4-Flash",
             "deepseek-ai/DeepSeek-V4-Flash: 384 experts, top-6, sqrt(softplus) + correction "
             "bias, renormalised, routed_scaling_factor 1.5 (confirmed); a hash layer first",
             384, 6, dict(n_routed_experts=384, num_experts_per_tok=6, routed_scaling_factor=1.5)),
    Flagship("kimi_linear", "Kimi-Linear-48B-A3B",
             "moonshotai/Kimi-Linear-48B-A3B: 256 experts, top-8, one expert group, renormalised, "
             "routed_scaling_factor 2.446",
             256, 8, dict(num_experts=256, num_experts_per_token=8, num_expert_group=1,
                          topk_group=1, moe_renormalize=True, routed_scaling_factor=2.446)),
    Flagship("nemotron_h", "Nemotron-3-Nano-30B-A3B",
             "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B: 128 experts, top-6, one group, "
             "renormalised, routed_scaling_factor 2.5",
             128, 6, dict(n_routed_experts=128, num_experts_per_tok=6, n_group=1, topk_group=1,
                          norm_topk_prob=True, routed_scaling_factor=2.5)),
    Flagship("granitemoe", "granite-3.1-3b-a800m",
             "ibm-granite/granite-3.1-3b-a800m (and 3.0): 40 experts, top-8 (confirmed)",
             40, 8, dict(num_local_experts=40, num_experts_per_tok=8)),
    Flagship("granitemoe", "granite-3.1-1b-a400m",
             "ibm-granite/granite-3.1-1b-a400m: 32 experts, top-8",
             32, 8, dict(num_local_experts=32, num_experts_per_tok=8)),
    Flagship("granitemoehybrid", "granite-4.0-h-small",
             "ibm-granite/granite-4.0-h-small: 72 experts, top-10",
             72, 10, dict(num_local_experts=72, num_experts_per_tok=10)),
    Flagship("jamba", "Jamba-v0.1",
             "ai21labs/Jamba-v0.1 (and Jamba-1.5): 16 experts, top-2",
             16, 2, dict(num_experts=16, num_experts_per_tok=2)),
    Flagship("llama4", "Llama-4-Scout",
             "meta-llama/Llama-4-Scout-17B-16E: 16 experts, top-1 sigmoid",
             16, 1, dict(num_local_experts=16, num_experts_per_tok=1)),
    Flagship("llama4", "Llama-4-Maverick",
             "meta-llama/Llama-4-Maverick-17B-128E: 128 experts, top-1 sigmoid",
             128, 1, dict(num_local_experts=128, num_experts_per_tok=1)),
    Flagship("qwen3_next", "Qwen3-Next-80B-A3B",
             "Qwen/Qwen3-Next-80B-A3B: 512 experts, top-10, renormalised, shared expert "
             "(confirmed)",
             512, 10, dict(num_experts=512, num_experts_per_tok=10, norm_topk_prob=True)),
    Flagship("qwen3_5_moe", "Qwen3.5-397B-A17B",
             "Qwen/Qwen3.5-397B-A17B: 512 experts, top-10",
             512, 10, dict(num_experts=512, num_experts_per_tok=10)),
    Flagship("qwen3_vl_moe", "Qwen3-VL-30B-A3B",
             "Qwen/Qwen3-VL-30B-A3B: 128 experts, top-8",
             128, 8, dict(num_experts=128, num_experts_per_tok=8)),
    Flagship("minimax_m2", "MiniMax-M2",
             "MiniMaxAI/MiniMax-M2: 256 experts, top-8, sigmoid + routing bias (confirmed)",
             256, 8, dict(num_local_experts=256, num_experts_per_tok=8)),
    Flagship("minimax", "MiniMax-Text-01",
             "MiniMaxAI/MiniMax-Text-01: 32 experts, top-2",
             32, 2, dict(num_local_experts=32, num_experts_per_tok=2)),
    Flagship("ernie4_5_moe", "ERNIE-4.5-21B-A3B",
             "baidu/ERNIE-4.5-21B-A3B: 64 experts, top-6, moe_statics bias (confirmed)",
             64, 6, dict(moe_num_experts=64, moe_k=6)),
    Flagship("ernie4_5_moe", "ERNIE-4.5-300B-A47B",
             "baidu/ERNIE-4.5-300B-A47B: 64 experts, top-8",
             64, 8, dict(moe_num_experts=64, moe_k=8)),
    Flagship("hunyuan_v1_moe", "Hunyuan-A13B",
             "tencent/Hunyuan-A13B-Instruct: 64 experts, moe_topk a per-layer list of 8s "
             "(confirmed)",
             64, 8, dict(num_experts=64, moe_topk=[8, 8])),
    Flagship("dbrx", "dbrx",
             "databricks/dbrx-instruct: 16 experts, top-4, weights renormalised (p=1)",
             16, 4, dict(ffn_config=dict(ffn_hidden_size=16, moe_num_experts=16, moe_top_k=4,
                                         moe_normalize_expert_weights=1.0))),
    Flagship("longcat_flash", "LongCat-Flash",
             "meituan-longcat/LongCat-Flash-Chat: 512 experts plus 256 zero experts, top-12, "
             "routed_scaling_factor 6.0",
             768, 12, dict(n_routed_experts=512, zero_expert_num=256, moe_topk=12,
                           routed_scaling_factor=6.0)),
    Flagship("lfm2_moe", "LFM2-8B-A1B",
             "LiquidAI/LFM2-8B-A1B: 32 experts, top-4, expert bias, renormalised",
             32, 4, dict(num_experts=32, num_experts_per_tok=4, use_expert_bias=True,
                         norm_topk_prob=True, routed_scaling_factor=1.0)),
    Flagship("gemma4", "Gemma-4-26B-A4B",
             "google/gemma-4-26b-a4b: 128 experts, top-8",
             128, 8, dict(num_experts=128, top_k_experts=8)),
    Flagship("aria", "Aria",
             "rhymes-ai/Aria: 64 experts, top-6",
             64, 6, dict(moe_num_experts=64, moe_topk=6)),
    Flagship("switch_transformers", "switch-base-128",
             "google/switch-base-128: 128 experts, top-1",
             128, 1, dict(num_experts=128)),
    Flagship("nllb_moe", "nllb-moe-54b",
             "facebook/nllb-moe-54b: 128 experts, top-2",
             128, 2, dict(num_experts=128)),
]

BY_ID = {case.id: case for case in CASES}

# bf16 runs: the flagship routers whose outputs test_adapters compares with tie tolerance, or
# whose families' half-precision scores the gate rounds alike (module docstring)
BF16_CASES = [BY_ID[i] for i in (
    "olmoe-OLMoE-1B-7B", "qwen3_moe-Qwen3-30B-A3B", "qwen2_moe-Qwen1.5-MoE-A2.7B",
    "mixtral-Mixtral-8x7B", "gpt_oss-gpt-oss-20b", "deepseek_v2-DeepSeek-V2",
    "deepseek_v3-DeepSeek-V3", "deepseek_v3-Kimi-K2", "glm4_moe-GLM-4.5",
    "qwen3_next-Qwen3-Next-80B-A3B", "minimax_m2-MiniMax-M2", "ernie4_5_moe-ERNIE-4.5-21B-A3B",
    "hunyuan_v1_moe-Hunyuan-A13B", "lfm2_moe-LFM2-8B-A1B", "deepseek_v4-DeepSeek-V4-Flash")]

# near-tie runs: routers that return (logits, weights, ids), whose ids test_adapters compares
# with tie tolerance
NEAR_TIE_CASES = [BY_ID[i] for i in (
    "olmoe-OLMoE-1B-7B", "qwen3_moe-Qwen3-30B-A3B", "qwen2_moe-Qwen1.5-MoE-A2.7B",
    "mixtral-Mixtral-8x7B", "gpt_oss-gpt-oss-20b", "deepseek_v2-DeepSeek-V2-Lite",
    "deepseek_v2-DeepSeek-V2", "deepseek_v3-DeepSeek-V3", "deepseek_v3-Kimi-K2",
    "glm4_moe-GLM-4.5", "dots1-dots.llm1", "deepseek_v4-DeepSeek-V4-Flash",
    "granitemoe-granite-3.1-3b-a800m", "jamba-Jamba-v0.1", "qwen3_next-Qwen3-Next-80B-A3B",
    "minimax_m2-MiniMax-M2", "ernie4_5_moe-ERNIE-4.5-21B-A3B", "hunyuan_v1_moe-Hunyuan-A13B")]

SEEDS = (1, 2, 3)  # three forwards of 18 tokens each


def _params(cases):
    return [pytest.param(case, id=case.id) for case in cases]


def _build(case: Flagship, dtype, monkeypatch):
    """The family's tiny model with the checkpoint's routing over its tiny config, checked to
    route ``case.top_k`` of ``case.experts`` experts in every top-k router."""
    config_class, model_class, tiny = ALL_FAMILIES[case.family]
    monkeypatch.setitem(ALL_FAMILIES, case.family,
                        (config_class, model_class, {**tiny, **case.routing}))
    model = build(case.family, dtype)
    with moe_route.patch(model) as handle:
        sizes = {(state.num_experts, state.top_k) for state in handle.routers.values()
                 if not state.adapter.fixed_choice}  # DeepSeek-V4's hash layers choose by table
    assert sizes == {(case.experts, case.top_k)}, \
        f"{case.id}: routers have (experts, top_k) {sorted(sizes)}, the checkpoint " \
        f"({case.experts}, {case.top_k}): a routing key of the case did not reach the config"
    return model


def _check(case: Flagship, model, dtype, ties: bool = False):
    """Every router unpatched and patched on the inputs of ``SEEDS`` forwards (test_adapters'
    ``_check_family`` on a model built here). ``ties``: the routers return (logits, weights, ids)
    and tie pairs of experts (``_pair_experts``); test_adapters accepts any choice among experts
    with equal logits and leaves those tokens' weights out, so here each token's ids must also be
    distinct and its weights, sorted, those of the family (a tied pair has equal weights)."""
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    if lookup(type(find_routers(model)[0][1])).block_method is not None:  # DBRX
        for seed in SEEDS:
            _check_block_routing(model, case.family, tol, seed=seed)
        return
    for seed in SEEDS:
        calls = _capture(model, case.family, seed=seed)
        ref = _call_all(model, calls, patched=False)
        ours = _call_all(model, calls, patched=True)
        for (name, mod, _, _), r, o in zip(calls, ref, ours):
            name = f"{case.checkpoint} ({case.doc}): {name}"
            _assert_router_outputs_match(name, r, o, tol,
                                         mask=type(mod).__name__ in MASK_OUTPUTS,
                                         block=type(mod).__name__ in ROUTING_BLOCKS,
                                         k=getattr(mod, "top_k", None))
            if ties:
                ids = o[2].sort(-1).values
                assert (ids[:, 1:] != ids[:, :-1]).all(), f"{name}: an expert chosen twice"
                torch.testing.assert_close(o[1].float().sort(-1).values,
                                           r[1].float().sort(-1).values, **tol,
                                           msg=lambda m: f"{name}: weights of tied tokens: {m}")


def _path(module, path: str):
    """The tensor at an adapter's attribute path (``"wg.weight"``)."""
    return functools.reduce(getattr, path.split("."), module)


def _pair_experts(model, delta: float) -> None:
    """Near-ties: experts 4j and 4j+1 of every router get the same logit row (times 1 + delta)
    and the same logit and selection bias, so that for about a quarter of the tokens the top-k
    boundary splits such a pair (pairs only: every tie stays inside one group of experts)."""
    with torch.no_grad():
        for _, router, _ in find_routers(model):
            adapter = lookup(type(router))
            weight = _path(router, adapter.weight)
            weight[1::4] = weight[0::4] * (1 + delta)
            if adapter.bias:
                bias = _path(router, adapter.bias)
                bias[1::4] = bias[0::4]
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.rpartition(".")[2] in SELECTION_BIAS_NAMES:
                t[..., 1::4] = t[..., 0::4]


@pytest.mark.parametrize("case", _params(CASES))
def test_flagship_routing_matches(case, monkeypatch):
    """Patched == unpatched routing at the checkpoint's routing hyper-parameters (``case.doc``
    names the checkpoint and where the numbers come from), fp32."""
    model = _build(case, torch.float32, monkeypatch)
    _check(case, model, torch.float32)


@pytest.mark.parametrize("case", _params(BF16_CASES))
def test_flagship_routing_matches_bf16(case, monkeypatch):
    """The same in bf16 (the tensors a real bf16 load keeps in fp32 stay fp32)."""
    model = _build(case, torch.bfloat16, monkeypatch)
    _check(case, model, torch.bfloat16)


@pytest.mark.parametrize("delta", [pytest.param(0.0, id="tied"),
                                   pytest.param(2.0 ** -21, id="near")])
@pytest.mark.parametrize("case", _params(NEAR_TIE_CASES))
def test_flagship_routing_near_ties(case, delta, monkeypatch):
    """The same with many tokens' top-k boundary between two experts whose logits are equal or
    differ by a relative 2**-21 (and whose selection biases are equal): a tie may be broken either
    way, but no expert twice and with the family's weights."""
    model = _build(case, torch.float32, monkeypatch)
    _pair_experts(model, delta)
    _check(case, model, torch.float32, ties=True)
