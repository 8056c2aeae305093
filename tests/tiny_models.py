"""Tiny randomly initialised MoE models from the real transformers config classes (no downloads).

Sizes are small but keep every family's routing and experts layout: E=8 experts (16 for the
grouped routers: DeepSeek-V3 style and DeepSeek-V2/Mistral-4 style), top-2, 2 layers, and every
layer an MoE layer wherever the config allows it.

* ``FAMILIES``: the six core families used by test_experts.py (unchanged).
* ``ALL_FAMILIES``: every token-routed MoE family of transformers 5.24 that builds and runs on
  CPU, keyed by the family's directory name under ``transformers/models`` (the config's own
  ``model_type`` can differ: "nllb-moe", "qwen3_vl_moe_text", "step3p5", ...). Values are
  ``(config class, model class, overrides)``; ``build(family)`` accepts any key.
* ``ROUTER_CLASSES``: the class name(s) of the module(s) that do the routing, per family.
* ``inputs(family, ids, model=None)``: forward kwargs for a [B, S] batch of token ids.
* ``router_modules(model, family)``, ``selected_experts(family, router_output)``: find the routing
  modules of a built model and read the chosen expert ids from one of their outputs.
* ``UNBUILDABLE``: MoE families that could not be instantiated or run here, with the reason.
* Other transformers releases: ``build`` skips (``require``) a family the installed release lacks
  (``missing``; ``BROKEN`` lists releases whose own code fails on a tiny model) or whose router
  moe_route does not trust there (``untrusted``); ``supported_families()`` is the release's list.
"""
import inspect
from typing import Optional

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

DROP = object()  # an override value that removes a COMMON key the config does not take

_SPARSE = ["sparse", "sparse"]
# multi-head latent attention, tiny
_MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
            v_head_dim=8, num_key_value_heads=4)
_MLA_Q = {**_MLA, "q_lora_rank": 16}  # configs that require a query LoRA rank
# DeepSeek-V3 style grouped routing: 16 experts in 4 groups, 2 groups kept, top-2
_GROUPED = dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=16,
                num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
                routed_scaling_factor=2.5)
_E8 = dict(num_experts=8, num_experts_per_tok=2)

_MORE = {
    # ---- S1: softmax -> top-k -> (renorm) ----
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=8, block_size=4,
                     layer_types=["linear_attention", "full_attention"])),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(intermediate_size=16, **_E8, norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=32, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, **_E8, norm_topk_prob=False,
                       decoder_sparse_step=1)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(intermediate_size=32, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16, **_E8, norm_topk_prob=True,
                        decoder_sparse_step=1, head_dim=8, linear_key_head_dim=8,
                        linear_value_head_dim=8, linear_num_key_heads=2,
                        linear_num_value_heads=4,
                        layer_types=["linear_attention", "full_attention"])),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel",
                     dict(intermediate_size=32, moe_intermediate_size=16, **_E8,
                          decoder_sparse_step=1, head_dim=8)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, **_E8,
                         head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_num_key_heads=2, linear_num_value_heads=4,
                         layer_types=["linear_attention", "full_attention"])),
    "qwen3_omni_moe": ("Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel",
                       dict(intermediate_size=32, moe_intermediate_size=16, **_E8,
                            norm_topk_prob=True, decoder_sparse_step=1, head_dim=8)),
    "qwen3_omni_moe_talker": ("Qwen3OmniMoeTalkerTextConfig", "Qwen3OmniMoeTalkerModel",
                              dict(intermediate_size=32, moe_intermediate_size=16, **_E8,
                                   shared_expert_intermediate_size=16,
                                   norm_topk_prob=False, decoder_sparse_step=1,
                                   head_dim=8)),
    "qwen4_exp": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, **_E8,
                       norm_topk_prob=True, head_dim=8, linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=4, hc_lowrank=8, indexer_n_heads=2,
                       indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                       indexer_compress_ratio=2,
                       layer_types=["linear_attention", "full_attention"])),
    "mellum": ("MellumConfig", "MellumForCausalLM",
               dict(intermediate_size=32, moe_intermediate_size=16, **_E8, norm_topk_prob=True,
                    head_dim=8, sliding_window=8, mlp_layer_types=_SPARSE)),
    "lara_mini": ("LaraMiniConfig", "LaraMiniForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, **_E8,
                       norm_topk_prob=True, head_dim=8, linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=4, sliding_window=8,
                       layer_types=["linear_attention", "full_attention"])),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8)),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(intermediate_size=16, **_E8, expert_layer_period=1, expert_layer_offset=0,
                   attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
                   mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4)),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             dict(hidden_size=DROP, num_attention_heads=DROP, num_hidden_layers=DROP,
                  max_position_embeddings=DROP, num_key_value_heads=DROP, d_model=32, n_heads=4,
                  n_layers=2, max_seq_len=64,
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2))),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",
               dict(intermediate_size=32, moe_intermediate_size=16, enable_moe_block=True,
                    num_experts=8, top_k_experts=2, head_dim=8, sliding_window=8,
                    hidden_size_per_layer_input=0, vocab_size_per_layer_input=96)),
    "diffusion_gemma": ("DiffusionGemmaTextConfig", "DiffusionGemmaEncoderTextModel",
                        dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8,
                             top_k_experts=2, head_dim=8, sliding_window=8)),
    # ---- S2: top-k on logits -> softmax over the k ----
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
                       dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                            sliding_window=8)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                              shared_intermediate_size=16)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                              shared_intermediate_size=16, layer_types=["mamba", "attention"],
                              mamba_n_heads=4, mamba_d_state=8, mamba_d_head=16,
                              mamba_chunk_size=8)),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM",
               dict(num_attention_heads=DROP, intermediate_size=16, num_local_experts=8,
                    num_experts_per_tok=2, kv_channels=8)),
    "aria": ("AriaTextConfig", "AriaTextForCausalLM",
             dict(intermediate_size=16, moe_num_experts=8, moe_topk=2,
                  moe_num_shared_experts=1)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                    dict(intermediate_size=16, **_E8, head_dim=8, sliding_window=8,
                         mlp_layer_types=_SPARSE, num_shared_experts=1)),
    "openai_privacy_filter": ("OpenAIPrivacyFilterConfig",
                              "OpenAIPrivacyFilterForTokenClassification",
                              dict(intermediate_size=16, num_local_experts=8,
                                   num_experts_per_tok=2, head_dim=8, sliding_window=8)),
    # ---- S3: DeepSeek-V3 "noaux_tc" ----
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, first_k_dense_replace=0,
                          mlp_layer_types=_SPARSE, index_topk=4, index_head_dim=8,
                          index_n_heads=2, head_dim=4)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(**_GROUPED, n_shared_experts=1, first_k_dense_replace=0, head_dim=8)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                      dict(**_GROUPED, **_MLA, n_shared_experts=1, mlp_layer_types=_SPARSE)),
    "glm4v_moe": ("Glm4vMoeTextConfig", "Glm4vMoeTextModel",
                  dict(**_GROUPED, n_shared_experts=1, first_k_dense_replace=0, head_dim=8,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                            partial_rotary_factor=1.0,
                                            mrope_section=[2, 1, 1]))),
    "glm5_next": ("Glm5NextTextConfig", "Glm5NextTextModel",
                  dict(**_GROUPED, n_shared_experts=1, mlp_layer_types=_SPARSE,
                       kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=0,
                       qk_nope_head_dim=8, v_head_dim=8, head_dim=0, num_key_value_heads=4,
                       index_topk=4, index_head_dim=8, index_n_heads=2, linear_head_dim=8,
                       linear_num_heads=4, hc_mult=2, index_kpool=2,
                       layer_types=["linear_attention", "full_attention"])),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, first_k_dense_replace=0,
                         mlp_layer_types=_SPARSE, index_topk=4, index_head_dim=8,
                         index_n_heads=2, head_dim=4)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(**_GROUPED, n_shared_experts=1, first_k_dense_replace=0, head_dim=8,
                   sliding_window=8)),
    "dots3_note": ("Dots3NoteTextConfig", "Dots3NoteForCausalLM",
                   dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, mlp_layer_types=_SPARSE,
                        index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=8,
                        shared_experts_intermediate_size=16)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM",
                   dict(intermediate_size=32, moe_intermediate_size=16, num_experts=16,
                        num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_shared_experts=1,
                        first_k_dense_replace=0, mlp_layer_types=_SPARSE, head_dim=8,
                        sliding_window=8)),
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM",
              dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, mlp_layer_types=_SPARSE,
                   head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2)),
    "hy_v4_vl": ("HYV4VLTextConfig", "HYV4VLTextModel",
                 dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, mlp_layer_types=_SPARSE,
                      head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                           mrope_section=[1, 1, 0]))),
    # model types built from another family's classes (moe_route.hf.families.MODELING)
    "sarvam_moe": ("SarvamMoEConfig", "Glm4MoeForCausalLM",
                   dict(**_GROUPED, n_shared_experts=1, first_k_dense_replace=0, head_dim=8)),
    "sarvam_mla": ("SarvamMLAConfig", "DeepseekV3ForCausalLM",
                   dict(**_GROUPED, **_MLA, n_shared_experts=1, first_k_dense_replace=0)),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(intermediate_size=32, moe_intermediate_size=16, num_experts=16,
                         num_experts_per_token=2, num_expert_group=4, topk_group=2,
                         moe_renormalize=True, routed_scaling_factor=2.5,
                         num_shared_experts=1, mlp_layer_types=_SPARSE, **_MLA,
                         linear_head_dim=8, linear_num_heads=4,
                         layer_types=["linear_attention", "full_attention"])),
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM",
                       dict(intermediate_size=32, moe_intermediate_size=16, num_experts=16,
                            num_experts_per_token=2, num_expert_group=4, topk_group=2,
                            moe_renormalize=True, routed_scaling_factor=2.5,
                            num_shared_experts=1, first_k_dense_replace=0,
                            mlp_layer_types=_SPARSE, kv_lora_rank=16, qk_rope_head_dim=4,
                            qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                            num_key_value_heads=4, layer_group_size=2, num_mtp_layers=0,
                            model_max_length=64, max_position_embeddings=DROP)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM",
                      dict(**_GROUPED, head_dim=8, v_head_dim=8, sliding_window=8,
                           mlp_layer_types=_SPARSE)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(**_GROUPED, n_shared_experts=1, moe_shared_expert_intermediate_size=16,
                        num_hidden_layers=3, layers_block_type=["moe", "full_attention", "moe"],
                        head_dim=8,
                        use_mamba_kernels=False, mamba_num_heads=4, mamba_head_dim=8,
                        ssm_state_size=8, n_groups=1, chunk_size=8)),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM",
                   dict(**_GROUPED, n_shared_experts=1, head_dim=8)),
    "axk1": ("AXK1Config", "AXK1ForCausalLM",
             dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, mlp_layer_types=_SPARSE)),
    "axk2": ("AXK2Config", "AXK2ForCausalLM",
             dict(**_GROUPED, **_MLA_Q, n_shared_experts=1, mlp_layer_types=_SPARSE,
                  index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=4,
                  gated_norm_rank=4)),
    "beam": ("BeamConfig", "BeamForCausalLM",
             dict(intermediate_size=32, moe_intermediate_size=16, num_experts=16,
                  num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
                  routed_scaling_factor=2.5, head_dim=8, sliding_window=8,
                  mlp_layer_types=_SPARSE)),
    # ---- S4: score function + selection bias, no groups ----
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        head_dim=8)),
    "minimax_m3_vl": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM",
                      dict(intermediate_size=16, dense_intermediate_size=32,
                           shared_intermediate_size=16, num_local_experts=8,
                           num_experts_per_tok=2, routed_scaling_factor=2.0, head_dim=8,
                           rotary_dim=4, mlp_layer_types=_SPARSE, index_n_heads=2,
                           index_head_dim=8, index_block_size=4, index_topk_blocks=2)),
    "dots3_note_vision": ("Dots3NoteVisionConfig", "Dots3NoteVisionModel",
                          dict(intermediate_size=32, moe_intermediate_size=16,
                               pyramid_num_routed=[8, 8], num_experts_per_tok=2,
                               router_scaling_factor=2.5, patch_size=2, adapter_in_dim=32,
                               adapter_out_dim=32)),
    "step3p7": ("Step3p7TextConfig", "Step3p7TextModel",
                dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8,
                     num_experts_per_tok=2, share_expert_dim=16, head_dim=8,
                     mlp_layer_types=_SPARSE, moe_router_scaling_factor=2.0,
                     pad_token_id=0, sliding_window=8)),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM",
              dict(intermediate_size=32, moe_intermediate_size=16, **_E8, num_shared_experts=1,
                   head_dim=8, mlp_layer_types=_SPARSE, router_scaling_factor=2.5)),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM",
                    dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, routed_scaling_factor=1.5, head_dim=8,
                         num_key_value_heads=1, q_lora_rank=16, o_groups=2, o_lora_rank=8,
                         hc_mult=2, index_n_heads=2, index_head_dim=8, index_topk=4,
                         sliding_window=8, num_nextn_predict_layers=0,
                         mlp_layer_types=["hash_moe", "moe"])),
    "inkling2": ("Inkling2TextConfig", "Inkling2ForCausalLM",
                 dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                      route_scale=2.5, head_dim=8, swa_num_attention_heads=4,
                      swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8,
                      d_rel=4, rel_extent=16, unpadded_vocab_size=96,
                      n_layers_per_attn_res_block=1)),
    # layer 1 of 3 is looped: its router runs twice in every forward, between layers 0 and 2
    "inkling2_loop": ("Inkling2LoopTextConfig", "Inkling2LoopForCausalLM",
                      dict(num_hidden_layers=3, moe_intermediate_size=16, n_routed_experts=8,
                           num_experts_per_tok=2,
                           route_scale=2.5, head_dim=8, swa_num_attention_heads=4,
                           swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8,
                           d_rel=4, rel_extent=16, unpadded_vocab_size=96,
                           n_layers_per_attn_res_block=1, loop_layer_index_start=1,
                           loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=4)),
    "laguna": ("LagunaConfig", "LagunaForCausalLM",
               dict(intermediate_size=32, moe_intermediate_size=16,
                    shared_expert_intermediate_size=16, **_E8, head_dim=8, sliding_window=8,
                    mlp_layer_types=_SPARSE, moe_routed_scaling_factor=2.5,
                    moe_router_logit_softcapping=5.0)),
    "muse_spark": ("MuseSparkTextConfig", "MuseSparkTextModel",
                   dict(intermediate_size=32, moe_intermediate_size=16, moe_hidden_size=16,
                        num_local_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5,
                        head_dim=8, sliding_window=8, mlp_layer_types=_SPARSE)),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              dict(intermediate_size=32, moe_intermediate_size=16, num_dense_layers=0, **_E8,
                   num_shared_experts=1, route_scale=2.5, head_dim=8, sliding_window=8,
                   global_attn_every_n_layers=2)),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                 dict(intermediate_size=32, moe_intermediate_size=16, num_dense_layers=0, **_E8,
                      use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=2.5,
                      layer_types=["conv", "full_attention"])),
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM",
                 dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, **_E8,
                      norm_topk_prob=True, head_dim=8, sliding_window=8)),
    "flint": ("FlintConfig", "FlintForCausalLM",
              dict(intermediate_size=32, moe_intermediate_size=16,
                   shared_expert_intermediate_size=16, **_E8, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], head_dim=8,
                   sliding_window=8)),
    # ---- S5: softmax + selection bias ----
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM",
                      dict(num_hidden_layers=DROP, num_layers=2, ffn_hidden_size=32,
                           expert_ffn_hidden_size=16, n_routed_experts=8, moe_topk=2,
                           zero_expert_num=2, routed_scaling_factor=2.5, q_lora_rank=16,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           head_dim=4, v_head_dim=8, num_key_value_heads=4)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(intermediate_size=32, moe_intermediate_size=16, moe_num_experts=8,
                          moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0,
                          moe_layer_end_index=-1, moe_layer_interval=1)),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeTextConfig", "Ernie4_5_VLMoeTextModel",
                        dict(intermediate_size=32, moe_intermediate_size=[16, 16],
                             moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                             mlp_layer_types=_SPARSE,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                  mrope_section=[1, 1, 2]))),
    "zaya": ("ZayaConfig", "ZayaForCausalLM",
             dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=1, head_dim=8,
                  router_hidden_size=16)),
    # ---- S6: softmax + group-limited top-k ----
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=16,
                         num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4,
                         topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1,
                         first_k_dense_replace=0, **_MLA)),
    "deepseek_ocr2": ("DeepseekOcr2TextConfig", "DeepseekOcr2TextModel",
                      dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=16,
                           num_experts_per_tok=2, topk_method="group_limited_greedy",
                           n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           n_shared_experts=1, mlp_layer_types=_SPARSE)),
    "unlimited_ocr": ("UnlimitedOcrTextConfig", "UnlimitedOcrTextModel",
                      dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=16,
                           num_experts_per_tok=2, topk_method="group_limited_greedy",
                           n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           n_shared_experts=1, mlp_layer_types=_SPARSE, sliding_window=8)),
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM",
                 dict(**_GROUPED, **_MLA, n_shared_experts=1, first_k_dense_replace=0)),
    "mistral_large4": ("MistralLarge4TextConfig", "MistralLarge4TextModel",
                       dict(**_GROUPED, **_MLA, n_shared_experts=1, first_k_dense_replace=0,
                            mlp_layer_types=_SPARSE, head_dim=4, index_topk=4,
                            index_head_dim=8, index_n_heads=2)),
    # ---- S7: one-off routers ----
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(intermediate_size=16, intermediate_size_mlp=32, num_local_experts=8,
                    num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=1,
                    attention_chunk_size=8)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "inkling": ("InklingTextConfig", "InklingForCausalLM",
                dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8,
                     num_experts_per_tok=2, n_shared_experts=1, route_scale=2.5, head_dim=8,
                     swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                     sliding_window_size=8, d_rel=4, rel_extent=16, mlp_layer_types=_SPARSE)),
    "switch_transformers": ("SwitchTransformersConfig",
                            "SwitchTransformersForConditionalGeneration",
                            dict(hidden_size=DROP, num_attention_heads=DROP,
                                 num_hidden_layers=DROP, num_key_value_heads=DROP,
                                 max_position_embeddings=DROP, d_model=32, num_heads=4,
                                 num_layers=2, d_kv=8, d_ff=16, num_decoder_layers=2,
                                 num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                                 num_experts=8, expert_capacity=16, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)),
    "nllb_moe": ("NllbMoeConfig", "NllbMoeForConditionalGeneration",
                 dict(hidden_size=DROP, num_attention_heads=DROP, num_hidden_layers=DROP,
                      num_key_value_heads=DROP, d_model=32, encoder_attention_heads=4,
                      encoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                      decoder_layers=2, decoder_attention_heads=4, num_experts=8,
                      expert_capacity=16, encoder_sparse_step=1, decoder_sparse_step=1,
                      decoder_start_token_id=2, pad_token_id=1, eos_token_id=2,
                      bos_token_id=0)),
    "doge": ("DogeConfig", "DogeForCausalLM",
             dict(intermediate_size=16, is_moe=True, num_experts=16, num_experts_per_tok=2,
                  keep_window_size=64)),
}

ALL_FAMILIES = {**FAMILIES, **_MORE}

# Empty: every token-routed MoE family of transformers 5.24 (the 72 of the research note and the
# release's five new ones) builds and runs on CPU. Not MoE, hence absent: bamba, granite_docling,
# gemma4_unified, vitpose_backbone.
UNBUILDABLE: dict = {}

# Class name(s) of the routing module(s) per family (Doge has none: its product-key routing is
# inline in the block, so the block is listed).
ROUTER_CLASSES = {
    "olmoe": ("OlmoeTopKRouter",), "qwen3_moe": ("Qwen3MoeTopKRouter",),
    "mixtral": ("MixtralTopKRouter",), "gpt_oss": ("GptOssTopKRouter",),
    "deepseek_v3": ("DeepseekV3TopkRouter",), "granitemoe": ("GraniteMoeTopKRouter",),
    "minimax": ("MiniMaxTopKRouter",), "flex_olmo": ("FlexOlmoTopKRouter",),
    "qwen2_moe": ("Qwen2MoeTopKRouter",),
    "qwen3_next": ("Qwen3NextTopKRouter",), "qwen3_vl_moe": ("Qwen3VLMoeTextTopKRouter",),
    "qwen3_5_moe": ("Qwen3_5MoeTopKRouter",),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerTextTopKRouter",),
    "qwen3_omni_moe_talker": ("Qwen3OmniMoeTalkerTextTopKRouter",),
    "qwen4_exp": ("Qwen4ExpTextTopKRouter",), "mellum": ("MellumTopKRouter",),
    "hunyuan_v1_moe": ("HunYuanMoEV1Gate",), "jamba": ("JambaTopKRouter",),
    "dbrx": ("DbrxRouter",), "gemma4": ("Gemma4TextRouter",),
    "diffusion_gemma": ("DiffusionGemmaTextRouter",),
    "granitemoe_swa": ("GraniteMoeSWATopKRouter",),
    "granitemoeshared": ("GraniteMoeSharedTopKRouter",),
    "granitemoehybrid": ("GraniteMoeHybridTopKRouter",), "jetmoe": ("JetMoeTopKGating",),
    "aria": ("AriaTextTopKRouter",), "cohere2_moe": ("Cohere2MoeTopKRouter",),
    "openai_privacy_filter": ("OpenAIPrivacyFilterTopKRouter",),
    "deepseek_v32": ("DeepseekV32TopkRouter",), "glm4_moe": ("Glm4MoeTopkRouter",),
    "glm4_moe_lite": ("Glm4MoeLiteTopkRouter",), "glm4v_moe": ("Glm4vMoeTextTopkRouter",),
    "glm5_next": ("Glm5NextTextTopkRouter",), "glm_moe_dsa": ("GlmMoeDsaTopkRouter",),
    "dots1": ("Dots1TopkRouter",), "dots3_note": ("Dots3NoteTextTopkRouter",),
    "exaone_moe": ("ExaoneMoeTopkRouter",), "hy_v4": ("HYV4TopkRouter",),
    "hy_v4_vl": ("HYV4VLTopkRouter",), "sarvam_moe": ("Glm4MoeTopkRouter",),
    "sarvam_mla": ("DeepseekV3TopkRouter",),
    "kimi_linear": ("KimiLinearTopkRouter",), "bailing_hybrid": ("BailingHybridTopkRouter",),
    "mimo_v2_flash": ("MiMoV2FlashTopkRouter",), "nemotron_h": ("NemotronHTopkRouter",),
    "solar_open": ("SolarOpenTopkRouter",), "axk1": ("AXK1TopkRouter",),
    "axk2": ("AXK2TopkRouter",), "beam": ("BeamTopKRouter",),
    "minimax_m2": ("MiniMaxM2TopKRouter",), "minimax_m3_vl": ("MiniMaxM3VLTopKRouter",),
    "step3p7": ("Step3p7TopKRouter",), "dots3_note_vision": ("Dots3NoteVisionTopKRouter",),
    "hy_v3": ("HYV3TopKRouter",),
    "deepseek_v4": ("DeepseekV4TopKRouter", "DeepseekV4HashRouter"),
    "inkling2": ("Inkling2TopKRouter",), "laguna": ("LagunaTopKRouter",),
    "inkling2_loop": ("Inkling2LoopTopKRouter",), "lara_mini": ("LaraMiniTopKRouter",),
    "muse_spark": ("MuseSparkTopkRouter",), "afmoe": ("AfmoeTokenChoiceRouter",),
    "lfm2_moe": ("Lfm2MoeTopKRouter",), "kolibri1": ("Kolibri1TopKRouter",),
    "flint": ("FlintTopKRouter",), "longcat_flash": ("LongcatFlashTopkRouter",),
    "ernie4_5_moe": ("Ernie4_5_MoeTopKRouter",),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeMoeTopKRouter",), "zaya": ("ZayaRouter",),
    "deepseek_v2": ("DeepseekV2TopkRouter",), "deepseek_ocr2": ("DeepseekOcr2TextTopkRouter",),
    "unlimited_ocr": ("UnlimitedOcrTextTopkRouter",), "mistral4": ("Mistral4TopkRouter",),
    "mistral_large4": ("MistralLarge4TextTopkRouter",), "llama4": ("Llama4Router",),
    "phimoe": ("PhimoeTopKRouter",), "inkling": ("InklingTopkRouter",),
    "switch_transformers": ("SwitchTransformersTop1Router",),
    "nllb_moe": ("NllbMoeTop2Router",), "doge": ("DogeCDMoE",),
}

# Names of selection-bias tensors, wherever they live (router or block).
SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")


def router_modules(model, family):
    """[(qualified name, module)] of the routing modules of a built model."""
    names = ROUTER_CLASSES[family]
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]


# Zaya adds its balancing biases to the softmax probabilities of a top-1 router over E+1 classes:
# with N(0, 0.5) biases the selection no longer depends on the token.
_BIAS_STD = {"zaya": 0.1}


def _is_selection_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SELECTION_BIAS_NAMES or "moe_statics" in name


def _routing_tensors(model, family):
    """{qualified name: tensor} of every floating parameter/buffer of the routing modules plus
    every selection-bias tensor (e.g. a block's ``e_score_correction_bias``, Ernie's
    ``moe_statics``)."""
    out = {}
    for mname, mod in router_modules(model, family):
        for n, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            out[f"{mname}.{n}" if mname else n] = t
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if _is_selection_bias(n):
            out[n] = t
    return {n: t for n, t in out.items() if t.is_floating_point()}


def model_type(family: str) -> str:
    """The transformers model_type of a tiny-model key (``qwen3_omni_moe_talker`` -> its model)."""
    from moe_route.hf import FAMILIES

    return max((f for f in FAMILIES if family.startswith(f)), key=len)


# Tiny models that a transformers release builds but cannot run (its own bugs), by
# (family, release, dtype or None for every dtype).
BROKEN = {
    ("doge", "5.17.0", None): "DogeDecoderLayer passes the MoE block's output tuple to dropout",
    ("deepseek_v4", "5.17.0", torch.bfloat16): "its bf16 attention multiplies fp32 by bf16",
}


def missing(family: str, dtype=None) -> Optional[str]:
    """Why the installed transformers cannot run ``family`` (in ``dtype``): a release without its
    classes, or one of the ``BROKEN`` ones; None when it can."""
    transformers = pytest.importorskip("transformers")
    version = transformers.__version__
    config_name, model_name, _ = ALL_FAMILIES[family]
    absent = [name for name in (config_name, model_name) if not hasattr(transformers, name)]
    if absent:
        return f"transformers {version} has no {', '.join(absent)}"
    broken = BROKEN.get((family, version, None)) or BROKEN.get((family, version, dtype))
    return f"transformers {version}, {family}: {broken}" if broken else None


def untrusted(family: str) -> Optional[str]:
    """Why moe_route does not route ``family`` with the installed transformers, or None. Every
    family is supported with the releases the suite was written for, so an unsupported status
    means a release that renamed or changed a router (``moe_route.hf.adapters.unvalidated``)."""
    from moe_route.hf import family_status

    mt = model_type(family)
    status = family_status(mt)
    return None if status == "supported" else f"{mt}: {status}"


def require(family: str, dtype=None) -> None:
    """Skip the calling test, with the reason, unless the installed transformers has ``family``
    and moe_route routes it (``missing``, ``untrusted``): ``build`` and ``config_for`` call it, so
    the suite runs with other transformers releases and tests what they allow."""
    why = missing(family, dtype) or untrusted(family)
    if why is not None:
        pytest.skip(why)


def enable_checkpointing(model, reentrant: bool = False) -> None:
    """Activation checkpointing on ``model`` (transformers 5.23 renamed the method; 5.17 has only
    the old name)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})


def supported_families() -> list:
    """The keys of the families moe_route supports with the installed transformers."""
    from moe_route.hf import family_status

    return [k for k in ALL_FAMILIES if family_status(model_type(k)) == "supported"]


def config_for(family: str, dtype=None):
    transformers = pytest.importorskip("transformers")
    require(family, dtype)
    config_name, _, extra = ALL_FAMILIES[family]
    kw = {k: v for k, v in {**COMMON, **extra}.items() if v is not DROP}
    return getattr(transformers, config_name)(**kw)


def _fp32_in_half(model_cls, config, model, dtype) -> set:
    """Names of the tensors a real half-precision load keeps in fp32: those matched by the model's
    ``_keep_in_fp32_modules_strict`` (and ``_keep_in_fp32_modules`` for fp16), and those a module
    creates in fp32 explicitly (seen by building the model on the meta device under the half
    default dtype, as ``from_pretrained`` does)."""
    from transformers.core_model_loading import build_glob_alternation

    keep = set()
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    plan = model._get_dtype_plan(dtype)
    if plan:
        alt, _, _ = build_glob_alternation(list(plan))
        keep |= {n for n in names if alt.search(n)}
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            meta = model_cls(config)
    finally:
        torch.set_default_dtype(old)
    for n, t in list(meta.named_parameters()) + list(meta.named_buffers()):
        if t.dtype == torch.float32:
            keep.add(n)
    return keep


def _cast(model, dtype, keep_fp32):
    for mname, mod in model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for leaf, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                full = f"{mname}.{leaf}" if mname else leaf
                target = torch.float32 if full in keep_fp32 else dtype
                if t.dtype != target:
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.to(target)
                    else:
                        store[leaf] = t.to(target)


def build(family: str, dtype=torch.float32, seed: int = 0):
    """The tiny model of ``family`` in eval mode, deterministic for a given seed.

    In fp16/bf16 the tensors a real checkpoint load keeps in fp32 (``_keep_in_fp32_modules_strict``,
    tensors a module creates in fp32) stay fp32, everything else is cast. Random, well-spread
    routing: after the model's own init, (1) every parameter whose name contains "gate", "router"
    or "bias" ~ N(0, 0.5) (the original rule, unchanged, so the six FAMILIES keep their weights),
    (2) every other floating tensor of the routing modules and every selection bias (router or
    block: e_score_correction_bias, expert_bias, moe_statics, balancing_biases) ~ N(0, 0.5)
    (Zaya's balancing biases N(0, 0.1)), (3) hash tables (DeepSeek-V4 tid2eid) get k distinct
    random experts per token, (4) token embeddings ~ N(0, 1)."""
    transformers = pytest.importorskip("transformers")
    config = config_for(family, dtype)  # skips what this transformers lacks, changed or breaks
    model_cls = getattr(transformers, ALL_FAMILIES[family][1])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if dtype in (torch.float16, torch.bfloat16):
        _cast(model, dtype, _fp32_in_half(model_cls, config, model, dtype))
    else:
        model = model.to(dtype)
    with torch.no_grad():  # random, well-spread routing: init leaves some routers at zero
        done = set()
        for name, p in model.named_parameters():
            if "gate" in name or "router" in name or "bias" in name:
                p.normal_(0, 0.5)
                done.add(name)
        # every other floating tensor of the routers, and selection biases held as buffers or
        # on the block (e_score_correction_bias, expert_bias, moe_statics, balancing_biases)
        for name, t in sorted(_routing_tensors(model, family).items()):
            if name not in done:
                t.normal_(0, _BIAS_STD.get(family, 0.5) if _is_selection_bias(name) else 0.5)
        # hash routing tables (DeepSeek-V4 tid2eid, zeros at init): k distinct experts per token
        for name, t in model.named_buffers():
            if name.endswith("tid2eid"):
                E = model.config.num_local_experts
                t.copy_(torch.rand(t.shape[0], E).argsort(-1)[:, : t.shape[1]])
        # the Qwen3-Omni talker's _init_weights leaves its experts uninitialised (torch.empty)
        for name, p in model.named_parameters():
            if family == "qwen3_omni_moe_talker" and name.endswith("experts.down_proj"):
                p.normal_(0, model.config.initializer_range)
        # token embeddings ~ N(0, 1): with the random biases above (attention o_proj biases,
        # sinks...) and the default N(0, 0.02) embeddings, the residual stream is nearly the same
        # for every token and routing collapses (GPT-OSS, OpenAI-PF)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(emb, torch.nn.Embedding):
            emb.weight.normal_(0, 1.0)
    return model


def cache_argument(model) -> str:
    """The name of the KV cache argument of ``model``'s forward (transformers 5.24 renamed
    ``past_key_values`` to ``cache``, keeping the old name with a FutureWarning)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def inputs(family: str, ids: torch.Tensor, model=None) -> dict:
    """Forward kwargs for a [B, S] batch of token ids (``model`` is needed for the Qwen3-Omni
    talker, whose forward cannot embed input_ids itself: it has no ``embed_tokens``)."""
    if family == "qwen3_omni_moe_talker":
        return {"inputs_embeds": model.get_input_embeddings()(ids)}
    if family == "dots3_note_vision":  # a vision tower: 2 images of 2x4 patches, from the ids
        g = torch.Generator().manual_seed(int(ids.sum()))
        return {"pixel_values": torch.randn(16, 3 * 2 * 2, generator=g),
                "grid_thw": torch.tensor([[1, 2, 4], [1, 2, 4]])}
    kw = {"input_ids": ids}
    if family == "ernie4_5_vl_moe":  # the last 3 tokens of each row go to the vision experts
        S = ids.shape[-1]
        kw["moe_mm_token_type_ids"] = (torch.arange(S) >= S - 3).long().expand_as(ids)
    if family in ("switch_transformers", "nllb_moe"):
        kw["decoder_input_ids"] = ids
    return kw


def selected_experts(family: str, output, k: int = 2) -> torch.Tensor:
    """The expert ids selected by one call of a routing module (a module of
    ``ROUTER_CLASSES[family]``), from its forward output, as a 1-D int64 tensor (one entry per
    (token, slot) that was routed; LongCat ids >= n_routed_experts are its identity experts).
    ``k`` is only used where the output holds no ids (DBRX, JetMoE, Llama4, Doge)."""
    if family == "dbrx":  # DbrxRouter returns the logits only; DbrxFFN does softmax -> top-k
        return output.topk(k, dim=-1).indices.flatten()
    if family == "jetmoe":  # (index_sorted_experts, batch_index, batch_gates, expert_size, logits)
        return output[4].topk(k, dim=-1).indices.flatten()
    if family == "llama4":  # (scores [N, E]: sigmoid of the top-k logits, 0 elsewhere; logits)
        return output[1].topk(k, dim=-1).indices.flatten()
    if family == "switch_transformers":  # (one-hot dispatch [B, S, E], max prob, logits)
        mask = output[0].reshape(-1, output[0].shape[-1])
        return mask.argmax(-1)[mask.sum(-1) > 0]
    if family == "nllb_moe":  # (top-1 mask [N, E], combine weights [N, E], logits)
        return output[1].nonzero()[:, 1]
    if family == "doge":  # block output: (hidden, router_logits [2, N, sqrt(E)]), product keys
        logits = output[1]
        nk = logits.shape[-1]
        (sx, sy), (ix, iy) = logits.topk(nk, dim=-1)
        scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
        idx = (ix.unsqueeze(-1) * nk + iy.unsqueeze(-2)).flatten(-2)
        return idx.gather(-1, scores.topk(k, dim=-1).indices).flatten()
    if family == "zaya":  # a chosen skip class comes back as id 0 with weight 0
        return output[2][output[1] != 0]
    # (router_logits, top_k_weights, top_k_index[, ...]) everywhere else
    return output[2].flatten()


def word_tokenizer(words=("<pad>", "<s>", "<unk>", "user", ":", "assistant", "hello", "world",
                          "cat", "sat"), eos=None):
    """An in-memory fast word-level tokenizer (no downloads): ``words[i]`` is id i, text splits
    on whitespace, decoding joins with spaces, and a chat template wraps a user turn as
    ``<s> user : TEXT assistant :``. The first three words are pad, bos and unk. With ``eos``
    (a word), encoding with special tokens writes ``<s> TEXT eos``, as tokenizers that append
    an end of text do; without it, nothing is added."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    pad, bos, unk = words[:3]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token=unk))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")    # joins words with spaces
    if eos is not None:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, words.index(bos)),
                                                      (eos, words.index(eos))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad,
                                                bos_token=bos, unk_token=unk, eos_token=eos)
    fast.chat_template = ("{% for m in messages %}<s> user : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant : {% endif %}")
    return fast
