"""Routing analysis: metrics on ``RoutingStats`` and traces (``metrics``), Δ-experts and the
steering plans built from them (``experts``), data loading, recording and A/B evaluation
(``pipeline``), report directories (``report``) and the offline demo (``demo``).

The method follows *Multilingual Routing in Mixture-of-Experts* (Bandarkar et al., 2025): expert
importance (Eq. 1), entropy-normalised Jensen–Shannon divergence from a reference language over
parallel sequences (Eq. 2, App. A.4), routing entropy and consistency, task and language experts
(Eq. 3) and soft/hard steering of them (Eq. 4/5); plus OLMoE-style co-activation, load and
vocabulary specialisation. Definitions, edge cases and the choices made where the paper is
ambiguous are in each function's docstring.
"""
from moe_route.analysis.experts import (delta_frequency, expert_overlap, experts_above,
                                        language_delta, language_experts, language_frequency,
                                        layer_keys, mean_activation_frequency, plan_from_experts,
                                        task_experts)
from moe_route.analysis.pipeline import ab_test, load_parallel, record_parallel, record_sequences
from moe_route.analysis.report import write_report
from moe_route.analysis.metrics import (DivergenceCorrelation, LoadBalance, ParallelGroups,
                                        TokenRouting, activation_frequency, coactivation,
                                        conditional_coactivation, distribution_entropy,
                                        divergence_accuracy_correlation, entropy_normalised_js,
                                        expert_importance, expert_set_jaccard,
                                        expert_token_counts, expert_token_entropy,
                                        expert_top_tokens, js_divergence, load_balance,
                                        mean_pairwise_overlap, pairwise_divergence,
                                        parallel_divergence, parse_parallel_groups, pearson,
                                        per_token_mean, pool_by_language, routing_consistency,
                                        routing_divergence, routing_entropy, spearman,
                                        token_specialisation, trace_token_routing)

__all__ = [
    # metrics
    "per_token_mean", "expert_importance", "activation_frequency",
    "ParallelGroups", "parse_parallel_groups", "pool_by_language",
    "distribution_entropy", "js_divergence", "entropy_normalised_js", "pairwise_divergence",
    "parallel_divergence", "routing_divergence",
    "routing_entropy", "mean_pairwise_overlap", "expert_set_jaccard", "routing_consistency",
    "coactivation", "conditional_coactivation", "LoadBalance", "load_balance",
    "pearson", "spearman", "DivergenceCorrelation", "divergence_accuracy_correlation",
    "TokenRouting", "expert_token_counts", "trace_token_routing", "expert_token_entropy",
    "token_specialisation", "expert_top_tokens",
    # experts
    "layer_keys", "mean_activation_frequency", "delta_frequency", "experts_above",
    "task_experts", "language_frequency", "language_delta", "language_experts",
    "expert_overlap", "plan_from_experts",
    # pipeline and report
    "load_parallel", "record_parallel", "record_sequences", "ab_test", "write_report",
]
