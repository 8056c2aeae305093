"""Routing analysis: metrics on ``RoutingStats`` and traces (``metrics``), Δ-experts and the
steering plans built from them (``experts``), data loading, recording and A/B runs
(``pipeline``), task accuracy and the paired significance of a steering effect
(``evaluation``), report directories (``report``) and the offline demo (``demo``).

The method follows *Multilingual Routing in Mixture-of-Experts* (Bandarkar et al., 2025): expert
importance (Eq. 1), entropy-normalised Jensen–Shannon divergence from a reference language over
parallel sequences (Eq. 2, App. A.4), routing entropy and consistency, task and language experts
(Eq. 3) and soft/hard steering of them (Eq. 4/5); plus OLMoE-style co-activation (within a
layer and across layers), load, vocabulary specialisation and router saturation (the agreement
of two runs over the same tokens). Definitions, edge cases and the choices made where the paper
is ambiguous are in each function's docstring.
"""
from moe_route.analysis.experts import (delta_frequency, expert_overlap, experts_above,
                                        language_delta, language_experts, language_frequency,
                                        layer_keys, mean_activation_frequency, plan_from_experts,
                                        task_experts)
from moe_route.analysis.evaluation import (ChoiceItem, EvalResult, GenerationItem,
                                           PairedComparison, choice_accuracy, few_shot,
                                           format_paired, generation_accuracy, last_number,
                                           load_choice_task, load_generation_task,
                                           mcnemar_exact, paired_comparison)
from moe_route.analysis.pipeline import ab_test, load_parallel, record_parallel, record_sequences
from moe_route.analysis.report import write_report
from moe_route.analysis.metrics import (DivergenceCorrelation, LoadBalance, ParallelGroups,
                                        RoutingAgreement, TokenRouting, activation_frequency,
                                        coactivation, conditional_coactivation,
                                        distribution_entropy,
                                        divergence_accuracy_correlation, entropy_normalised_js,
                                        expert_importance, expert_set_jaccard,
                                        expert_token_counts, expert_token_entropy,
                                        expert_top_tokens, js_divergence, language_divergence,
                                        LayerTransitions, load_balance,
                                        mean_pairwise_overlap, pairwise_divergence,
                                        parallel_divergence, parse_parallel_groups, pearson,
                                        per_token_mean, pool_by_language, routing_agreement,
                                        routing_consistency, routing_divergence, routing_entropy,
                                        spearman, token_specialisation, trace_agreement,
                                        trace_statistics, trace_token_routing,
                                        trace_transitions)

from moe_route.analysis import (evaluation as _evaluation, experts as _experts,  # noqa: E402
                                metrics as _metrics)

__all__ = [*_metrics.__all__, *_experts.__all__, *_evaluation.__all__,
           "load_parallel", "record_parallel", "record_sequences", "ab_test", "write_report"]
