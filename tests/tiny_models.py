"""Tiny randomly initialised MoE models from the real transformers config classes (no downloads).

Sizes are small but keep every family's routing and experts layout: E=8 experts (16 for the
grouped DeepSeek-V3 router), top-2, 2 layers.
"""
import pytest
import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None,
              pad_token_id=None, bos_token_id=None, tie_word_embeddings=False)

FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=8, sliding_window=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=16,
                         num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                         first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                         routed_scaling_factor=2.5, num_key_value_heads=4)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
}


def build(family: str, dtype=torch.float32, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval().to(dtype)
    with torch.no_grad():  # random, well-spread routing: init leaves some routers at zero
        for name, p in model.named_parameters():
            if "gate" in name or "router" in name or "bias" in name:
                p.normal_(0, 0.5)
    return model
