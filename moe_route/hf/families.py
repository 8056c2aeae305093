"""Every token-routed MoE family of transformers 5.24 and whether moe_route can patch it.

The table lists each family's router classes (research/transformers_moe_map.md §2) and its
routing-semantics group (§3). Whether a family is supported is not written here: it is whether
every one of its router classes has an adapter (``adapters.lookup``), so the table cannot claim
more than the code does. Families added after the research note (transformers 5.24: hy_v4_vl,
inkling2_loop, lara_mini, sarvam_mla, sarvam_moe) were read from the release's own code.
"""
from __future__ import annotations

from moe_route.hf.adapters import family_module, lookup, transformers_class, unsupported_reason

__all__ = ["FAMILIES", "family_status", "supported"]

# model_type -> (semantics group, router classes)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "afmoe": ("S4", ('AfmoeTokenChoiceRouter',)),
    "aria": ("S2", ('AriaTextTopKRouter',)),
    "axk1": ("S3", ('AXK1TopkRouter',)),
    "axk2": ("S3", ('AXK2TopkRouter',)),
    "bailing_hybrid": ("S3", ('BailingHybridTopkRouter',)),
    "beam": ("S3", ('BeamTopKRouter',)),
    "cohere2_moe": ("S2", ('Cohere2MoeTopKRouter',)),
    "dbrx": ("S1d", ('DbrxRouter',)),
    "deepseek_ocr2": ("S6a", ('DeepseekOcr2TextTopkRouter',)),
    "deepseek_v2": ("S6a", ('DeepseekV2TopkRouter',)),
    "deepseek_v3": ("S3", ('DeepseekV3TopkRouter',)),
    "deepseek_v32": ("S3", ('DeepseekV32TopkRouter',)),
    "deepseek_v4": ("S4", ('DeepseekV4TopKRouter', 'DeepseekV4HashRouter')),
    "diffusion_gemma": ("S1b", ('DiffusionGemmaTextRouter',)),
    "dots1": ("S3", ('Dots1TopkRouter',)),
    "dots3_note": ("S3", ('Dots3NoteTextTopkRouter', 'Dots3NoteVisionTopKRouter')),
    "ernie4_5_moe": ("S5", ('Ernie4_5_MoeTopKRouter',)),
    "ernie4_5_vl_moe": ("S5", ('Ernie4_5_VLMoeMoeTopKRouter',)),
    "exaone_moe": ("S3", ('ExaoneMoeTopkRouter',)),
    "flex_olmo": ("S1a", ('FlexOlmoTopKRouter',)),
    "flint": ("S4", ('FlintTopKRouter',)),
    "gemma4": ("S1b", ('Gemma4TextRouter',)),
    "glm4_moe": ("S3", ('Glm4MoeTopkRouter',)),
    "glm4_moe_lite": ("S3", ('Glm4MoeLiteTopkRouter',)),
    "glm4v_moe": ("S3", ('Glm4vMoeTextTopkRouter',)),
    "glm5_next": ("S3", ('Glm5NextTextTopkRouter',)),
    "glm_moe_dsa": ("S3", ('GlmMoeDsaTopkRouter',)),
    "gpt_oss": ("S2", ('GptOssTopKRouter',)),
    "granitemoe": ("S2", ('GraniteMoeTopKRouter',)),
    "granitemoe_swa": ("S2", ('GraniteMoeSWATopKRouter',)),
    "granitemoehybrid": ("S2", ('GraniteMoeHybridTopKRouter',)),
    "granitemoeshared": ("S2", ('GraniteMoeSharedTopKRouter',)),
    "hunyuan_v1_moe": ("S1b", ('HunYuanMoEV1Gate',)),
    "hy_v3": ("S4", ('HYV3TopKRouter',)),
    "hy_v4": ("S3", ('HYV4TopkRouter',)),
    "hy_v4_vl": ("S3", ('HYV4VLTopkRouter',)),
    "inkling": ("S7", ('InklingTopkRouter',)),
    "inkling2": ("S4", ('Inkling2TopKRouter',)),
    "inkling2_loop": ("S4", ('Inkling2LoopTopKRouter',)),
    "jamba": ("S1c", ('JambaTopKRouter',)),
    "jetmoe": ("S2", ('JetMoeTopKGating',)),
    "kimi_linear": ("S3", ('KimiLinearTopkRouter',)),
    "kolibri1": ("S4", ('Kolibri1TopKRouter',)),
    "laguna": ("S4", ('LagunaTopKRouter',)),
    "lara_mini": ("S1a", ('LaraMiniTopKRouter',)),
    "lfm2_moe": ("S4", ('Lfm2MoeTopKRouter',)),
    "llama4": ("S7", ('Llama4Router',)),
    "longcat_flash": ("S5", ('LongcatFlashTopkRouter',)),
    "mellum": ("S1a", ('MellumTopKRouter',)),
    "mimo_v2_flash": ("S3", ('MiMoV2FlashTopkRouter',)),
    "minimax": ("S1b", ('MiniMaxTopKRouter',)),
    "minimax_m2": ("S4", ('MiniMaxM2TopKRouter',)),
    "minimax_m3_vl": ("S4", ('MiniMaxM3VLTopKRouter',)),
    "mistral4": ("S6b", ('Mistral4TopkRouter',)),
    "mistral_large4": ("S6b", ('MistralLarge4TextTopkRouter',)),
    "mixtral": ("S1b", ('MixtralTopKRouter',)),
    "muse_spark": ("S4", ('MuseSparkTopkRouter',)),
    "nemotron_h": ("S3", ('NemotronHTopkRouter',)),
    "nllb_moe": ("S7", ('NllbMoeTop2Router',)),
    "olmoe": ("S1a", ('OlmoeTopKRouter',)),
    "openai_privacy_filter": ("S2", ('OpenAIPrivacyFilterTopKRouter',)),
    "phimoe": ("S7", ('PhimoeTopKRouter',)),
    "qwen2_moe": ("S1a", ('Qwen2MoeTopKRouter',)),
    "qwen3_5_moe": ("S1b", ('Qwen3_5MoeTopKRouter',)),
    "qwen3_moe": ("S1a", ('Qwen3MoeTopKRouter',)),
    "qwen3_next": ("S1a", ('Qwen3NextTopKRouter',)),
    "qwen3_omni_moe": ("S1a", ('Qwen3OmniMoeTextTopKRouter', 'Qwen3OmniMoeThinkerTextTopKRouter',
                               'Qwen3OmniMoeTalkerTextTopKRouter')),
    "qwen3_vl_moe": ("S1b", ('Qwen3VLMoeTextTopKRouter',)),
    "qwen4_exp": ("S1a", ('Qwen4ExpTextTopKRouter',)),
    "sarvam_mla": ("S3", ('DeepseekV3TopkRouter',)),
    "sarvam_moe": ("S3", ('Glm4MoeTopkRouter',)),
    "solar_open": ("S3", ('SolarOpenTopkRouter',)),
    "step3p7": ("S4", ('Step3p7TopKRouter',)),
    "switch_transformers": ("S7", ('SwitchTransformersTop1Router',)),
    "unlimited_ocr": ("S6a", ('UnlimitedOcrTextTopkRouter',)),
    "zaya": ("S5", ('ZayaRouter',)),
    "doge": ("S7", ('DogeCDMoE',)),
}

# Model types with no modeling code of their own: transformers' auto classes build them from
# another family's classes (the Sarvam checkpoints load as DeepSeek-V3 and GLM-4-MoE models).
MODELING = {"sarvam_mla": "deepseek_v3", "sarvam_moe": "glm4_moe"}


def modeling_module(family: str) -> str:
    """The transformers module that defines a family's router classes (``MODELING``)."""
    return family_module(MODELING.get(family, family))


def _adapters(family: str) -> tuple[list, str]:
    """Each router class's adapter (None where it has none) and the family's status string."""
    adapters, status = [], "supported"
    for name in FAMILIES[family][1]:
        cls, problem = transformers_class(modeling_module(family), name)
        adapter = lookup(cls) if cls is not None else None
        adapters.append(adapter)
        if status == "supported" and problem:
            status = f"unsupported: {problem}"
        elif status == "supported" and adapter is None:
            status = f"unsupported: {name}: {unsupported_reason(name)}"
    return adapters, status


def family_status(family: str) -> str:
    """``"supported"`` or ``"unsupported: <reason>"`` for a transformers model_type."""
    if family not in FAMILIES:
        raise ValueError(f"family_status: unknown MoE family {family!r}; known: {sorted(FAMILIES)}")
    return _adapters(family)[1]


def supported() -> list[dict]:
    """One row per MoE family: family, router classes, semantics group, adapter(s), status, and
    limits (what does not work for a supported family; "" when nothing)."""
    rows = []
    for family, (group, routers) in FAMILIES.items():
        adapters, status = _adapters(family)
        limits = "; ".join(dict.fromkeys(a.limits for a in adapters if a and a.limits))
        rows.append(dict(family=family, routers=list(routers), group=group,
                         adapters=[a.name if a else None for a in adapters], status=status,
                         limits=limits))
    return rows
