"""Routing metrics on ``RoutingStats`` and on plain tensors (Bandarkar et al. 2025, OLMoE §5).

Shapes: ``L`` MoE layers (in ``RoutingStats`` order, axis 0), ``G`` groups, ``E`` experts, ``Λ``
languages, ``N`` parallel sequences per language, ``k`` experts per token. Every function is
vectorised over these axes: no Python loop over groups or experts; loops over chunks of layers
(or rows) only bound the size of temporaries.

Conventions shared by every function here:

* **Zero-token groups.** A per-token mean of a group with no tokens is NaN (undefined), never 0.
  Functions that average over groups or parallel pairs skip NaN entries (``nanmean``); where
  nothing is left the result is NaN.
* **Logs are natural** (nats); ``0 · log 0 = 0``.
* **Precision.** Statistics are fp32 sums; entropies, Jensen–Shannon divergences, coefficients of
  variation and correlations are computed in float64 (they subtract nearly equal numbers) and
  returned as float32 (float64 when the input was float64).
* **Distributions.** Functions taking distributions ``p [..., E]`` want non-negative rows that sum
  to 1 (checked to 1e-3; NaN rows pass and give NaN). Functions that build them from statistics
  renormalise each row to sum exactly 1 in float64 first: the dense importance already sums to 1
  up to fp32 rounding, the routed one does not when the router does not renormalise its top-k
  weights (OLMoE) or scales them (DeepSeek-V3 ``routed_scaling_factor``).

Group names for parallel data follow ``"{language}/{sequence}"`` (``"fra_Latn/17"``): sequence
``17`` of every language is the same text translated; see ``ParallelGroups``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from moe_route._checks import check_bool, check_int, is_int
from moe_route.hf.patch import layer_index, layer_positions
from moe_route.reference import MAX_EXPERTS
from moe_route.stats import RoutingStats

__all__ = [
    "per_token_mean", "expert_importance", "activation_frequency",
    "ParallelGroups", "parse_parallel_groups", "pool_by_language",
    "distribution_entropy", "js_divergence", "entropy_normalised_js", "pairwise_divergence",
    "parallel_divergence", "routing_divergence", "language_divergence",
    "routing_entropy", "mean_pairwise_overlap", "expert_set_jaccard", "routing_consistency",
    "RoutingAgreement", "routing_agreement", "trace_agreement", "trace_statistics",
    "coactivation", "conditional_coactivation", "LayerTransitions", "trace_transitions",
    "LoadBalance", "load_balance",
    "pearson", "spearman", "DivergenceCorrelation", "divergence_accuracy_correlation",
    "TokenRouting", "expert_token_counts", "trace_token_routing", "expert_token_entropy",
    "token_specialisation", "expert_top_tokens",
]

KINDS = ("dense", "routed")

# App. A.4 (author code ``calculate_entropy_normalized_jsd``): the normaliser is clamped at 1e-6.
JS_NORMALISER_FLOOR = 1e-6

# Elements of one work tensor before a function splits its work into chunks (32 MiB of float64).
# Why chunks of this size: glibc serves blocks above 32 MiB with a fresh mmap, so every larger
# temporary is page-faulted in again (on paper-sized statistics, 48 x 7500 x 128, that was most of
# the time); and chunks of several layers rather than one keep the number of parallel regions
# low, which matters when the machine's cores are shared (each region waits for its slowest
# thread).
_CHUNK_ELEMENTS = 1 << 22


def _layer_chunks(num_layers: int, elements_per_layer: int):
    """``(l0, l1)`` ranges of layers whose work tensors hold about ``_CHUNK_ELEMENTS``."""
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_layer))
    return [(l0, min(num_layers, l0 + step)) for l0 in range(0, num_layers, step)]


def _stack_layers(stats: RoutingStats, field: str, l0: int, l1: int) -> torch.Tensor:
    return torch.stack([getattr(stats[l], field) for l in range(l0, l1)])


def _one_device(stats: RoutingStats, where: str) -> torch.device:
    devices = {layer.device for layer in stats}
    if len(devices) > 1:
        raise ValueError(f"{where}: layers are on several devices {sorted(map(str, devices))}; "
                         f"call stats.to_cpu() or stats.to(device) first")
    return devices.pop()


# -------------------------------------------------------------------------------------------
# argument checks


def _check_stats(stats, where: str) -> RoutingStats:
    if not isinstance(stats, RoutingStats):
        raise TypeError(f"{where}: stats must be a RoutingStats, got {type(stats).__name__}")
    if len(stats) == 0:
        raise ValueError(f"{where}: stats has no layers")
    return stats


def _check_tensor(t, name: str, where: str, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(f"{where}: {name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(t.shape)}")
    return t


def _check_choice(value, name: str, choices, where: str):
    if value not in choices:
        raise ValueError(f"{where}: {name}={value!r} must be one of {choices}")
    return value


def _check_real(t: torch.Tensor, name: str, where: str, bool_ok: bool = False) -> torch.Tensor:
    """``t`` after checking it holds real numbers: floating-point or integer, and bool where
    ``bool_ok`` (a 0/1 mask that means something to the caller)."""
    if t.is_complex() or (t.dtype == torch.bool and not bool_ok):
        kinds = "real floating-point, integer or bool" if bool_ok else \
            "real floating-point or integer"
        raise TypeError(f"{where}: {name} must be a {kinds} tensor, got {t.dtype}")
    return t


def _check_experts(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    if t.shape[-1] < 1:
        raise ValueError(f"{where}: {name} must have at least one expert (last axis), got shape "
                         f"{tuple(t.shape)}")
    return t


def _check_broadcast(a: torch.Tensor, b: torch.Tensor, names: str, where: str) -> torch.Size:
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"{where}: {names} must have broadcastable shapes, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}") from None


def _check_distribution(p: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """``p`` as float64 after checking it holds distributions over its last axis."""
    _check_tensor(p, name, where)
    if not p.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {p.dtype}")
    _check_experts(p, name, where)
    p = p.to(torch.float64)
    if bool((p < 0).any()):
        raise ValueError(f"{where}: {name} has negative entries (min {float(p.min()):.3g}); "
                         f"expected distributions over the last axis")
    total = p.sum(-1)
    off = (total - 1).abs()
    bad = off > 1e-3  # NaN rows (zero-token groups) compare False and pass
    if bool(bad.any()):
        raise ValueError(f"{where}: {name} rows must sum to 1 (within 1e-3), got a row summing "
                         f"to {float(total[bad].flatten()[0]):.6g}; renormalise, or use the "
                         f"RoutingStats-level function")
    return p


def _out_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _renormalised(p: torch.Tensor) -> torch.Tensor:
    """Rows of ``p`` scaled to sum 1 in float64; rows summing to 0 become NaN."""
    p = p.to(torch.float64)
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total, torch.nan)


def _entropy64(p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last axis, float64, 0 log 0 = 0."""
    return torch.special.entr(p.to(torch.float64)).sum(-1)


# -------------------------------------------------------------------------------------------
# per-group expert distributions


def per_token_mean(sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``sums[..., g, e] / tokens[..., g]``: a per-group sum turned into a per-token mean.

    Shapes: ``sums [..., G, E]``, ``tokens [..., G]`` (int or float, >= 0). Returns float32
    (float64 for float64 ``sums``); groups with ``tokens == 0`` are NaN rows.
    """
    where = "per_token_mean"
    _check_tensor(sums, "sums", where, min_dim=2)
    _check_tensor(tokens, "tokens", where)
    if tuple(tokens.shape) != tuple(sums.shape[:-1]):
        raise ValueError(f"{where}: tokens must have shape {tuple(sums.shape[:-1])} (sums' shape "
                         f"without the expert axis), got {tuple(tokens.shape)}")
    if bool((tokens < 0).any()):
        raise ValueError(f"{where}: tokens must be >= 0, got {float(tokens.min())}")
    dtype = _out_dtype(sums)
    den = tokens.to(dtype).unsqueeze(-1)
    return torch.where(den > 0, sums.to(dtype) / den, torch.nan)


def expert_importance(stats: RoutingStats, kind: str = "dense") -> torch.Tensor:
    """Expert importance of every group, ``[L, G, E]`` float32 (the paper's Eq. 1).

    ``kind="dense"``: ``q[l, g] = prob_sum[l, g] / tokens[l, g]`` — the token-mean of the full
    routing distribution over all E experts (softmax, or normalised sigmoid scores); rows sum to 1
    up to fp32 rounding. Needs ``prob_sum`` (``record(model, dense=True)``, the default).
    ``kind="routed"``: ``weight_sum / tokens`` — the token-mean of the routed top-k weights (zero
    off the top-k), the variant of the author's later code. Rows sum to the mean routed weight
    mass: 1 for renormalising routers, less without renormalisation (OLMoE), ``scale`` with a
    routed scaling factor. Divergence and entropy functions renormalise rows to sum 1. For a
    router that does not renormalise, that is not quite the author's ``total_actual_weight``,
    which renormalises each token's k weights before the mean (a token with little top-k mass
    weighs as much as any other); the two agree for renormalising routers (Qwen3, GPT-OSS).
    ``trace_statistics(trace, renormalize=True)`` gives statistics whose routed importance is
    the author's, from a run recorded with ``trace=True``.

    Zero-token groups are NaN rows.
    """
    where = "expert_importance"
    _check_stats(stats, where)
    _check_choice(kind, "kind", KINDS, where)
    field = "prob_sum" if kind == "dense" else "weight_sum"
    missing = [layer.name for layer in stats if getattr(layer, field) is None]
    if missing:
        raise ValueError(f"{where}: kind={kind!r} needs {field}, which layers {missing[:3]} lack; "
                         f"record with dense=True or use kind='routed'")
    return _layer_means(stats, field, where)


def _layer_means(stats: RoutingStats, field: str, where: str,
                 scale_by_top_k: bool = False) -> torch.Tensor:
    """``field / tokens`` (optionally also / top_k) of every layer in one [L, G, E] float32
    output, NaN rows for zero-token groups; filled a chunk of layers at a time, so no [L, G, E]
    temporary besides the output (what ``stats.stack`` would make)."""
    device = _one_device(stats, where)
    L, G, E = len(stats), stats.num_groups, stats.num_experts
    out = torch.empty(L, G, E, dtype=torch.float32, device=device)
    for l0, l1 in _layer_chunks(L, G * E):
        den = _stack_layers(stats, "tokens", l0, l1).to(torch.float32).unsqueeze(-1)
        if scale_by_top_k:
            top_k = torch.tensor([stats[l].top_k for l in range(l0, l1)], dtype=torch.float32,
                                 device=device)
            den = den * top_k[:, None, None]
        torch.div(_stack_layers(stats, field, l0, l1), den, out=out[l0:l1])
        out[l0:l1].masked_fill_(den == 0, torch.nan)
    return out


def activation_frequency(stats: RoutingStats, per: str = "token") -> torch.Tensor:
    """Relative activation frequency of every expert in every group, ``[L, G, E]`` float32.

    ``per="token"`` (the paper's a/L, Eq. 3): ``f[l, g, e] = counts[l, g, e] / tokens[l, g]``, the
    share of the group's tokens whose top-k holds e; in [0, 1], and ``sum_e f = k`` (top_k).
    ``per="slot"``: ``counts / (k · tokens)``, the share of the k·tokens routing slots that went to
    e; a distribution over experts (sums to 1), the expert's load share.

    Zero-token groups are NaN rows.
    """
    where = "activation_frequency"
    _check_stats(stats, where)
    _check_choice(per, "per", ("token", "slot"), where)
    return _layer_means(stats, "counts", where, scale_by_top_k=per == "slot")


# -------------------------------------------------------------------------------------------
# parallel groups


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """Which group holds which (language, parallel sequence).

    ``rows[i, j]`` is the group (row of the statistics) of sequence ``sequences[j]`` in language
    ``languages[i]``, -1 where that language lacks that sequence; ``group_names`` are the
    statistics' group names the rows index (checked against the stats a function is given).
    Build with ``parse_parallel_groups`` (names ``"{language}/{sequence}"``), ``from_mapping``
    (any naming) or ``by_language`` (one group per language: a single "sequence").
    """

    languages: Tuple[str, ...]
    sequences: Tuple[str, ...]
    rows: torch.Tensor
    group_names: Tuple[str, ...]

    def __post_init__(self):
        where = "ParallelGroups"
        if not isinstance(self.rows, torch.Tensor) or self.rows.dtype != torch.int64:
            raise TypeError(f"{where}: rows must be an int64 tensor, got "
                            f"{getattr(self.rows, 'dtype', type(self.rows).__name__)}")
        shape = (len(self.languages), len(self.sequences))
        if tuple(self.rows.shape) != shape:
            raise ValueError(f"{where}: rows must have shape [languages, sequences]={shape}, got "
                             f"{tuple(self.rows.shape)}")
        if self.rows.numel() and (int(self.rows.min()) < -1
                                  or int(self.rows.max()) >= len(self.group_names)):
            raise ValueError(f"{where}: rows must be in [-1, {len(self.group_names)}) (the number "
                             f"of group names), got [{int(self.rows.min())}, "
                             f"{int(self.rows.max())}]")

    @classmethod
    def from_mapping(cls, group_names: Sequence[str],
                     mapping: Mapping[str, Tuple[str, object]]) -> "ParallelGroups":
        """From ``{group name: (language, sequence key)}``; sequence keys are compared as
        ``str``. Groups not in ``mapping`` are left out; a mapped name must be a group."""
        where = "ParallelGroups.from_mapping"
        group_names = _group_name_tuple(group_names, where)
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{where}: mapping must be a mapping {{group name: (language, "
                            f"sequence)}}, got {type(mapping).__name__}")
        position = {n: g for g, n in enumerate(group_names)}
        pairs = []
        for name, value in mapping.items():
            if name not in position:
                raise ValueError(f"{where}: mapping names group {name!r}, which is not among the "
                                 f"group names {_short(group_names)}")
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not isinstance(value[0], str) or not value[0]):
                raise ValueError(f"{where}: mapping[{name!r}]={value!r} must be a (language str, "
                                 f"sequence key) pair")
            pairs.append((position[name], value[0], str(value[1])))
        return cls._build(group_names, pairs, where)

    @classmethod
    def by_language(cls, group_names: Sequence[str]) -> "ParallelGroups":
        """Every group is one language's whole data (a single sequence named "all")."""
        group_names = _group_name_tuple(group_names, "ParallelGroups.by_language")
        return cls._build(group_names, [(g, n, "all") for g, n in enumerate(group_names)],
                          "ParallelGroups.by_language")

    @classmethod
    def _build(cls, group_names, pairs, where) -> "ParallelGroups":
        languages: Dict[str, int] = {}
        seq_keys: Dict[str, int] = {}
        for _, lang, seq in pairs:
            languages.setdefault(lang, len(languages))
            seq_keys.setdefault(seq, len(seq_keys))
        sequences = list(seq_keys)
        if all(s.isdigit() for s in sequences):  # "2" before "10"
            sequences.sort(key=int)
        column = {s: j for j, s in enumerate(sequences)}
        rows = torch.full((len(languages), len(sequences)), -1, dtype=torch.int64)
        for g, lang, seq in pairs:
            i, j = languages[lang], column[seq]
            if rows[i, j] >= 0:
                raise ValueError(f"{where}: language {lang!r}, sequence {seq!r} is held by two "
                                 f"groups: {group_names[int(rows[i, j])]!r} and "
                                 f"{group_names[g]!r}")
            rows[i, j] = g
        return cls(tuple(languages), tuple(sequences), rows, group_names)

    def language_index(self, language: str, where: str = "ParallelGroups") -> int:
        """Position of ``language`` in ``languages`` (ValueError naming the languages)."""
        try:
            return self.languages.index(language)
        except ValueError:
            raise ValueError(f"{where}: language {language!r} is not among the languages "
                             f"{_short(self.languages)}") from None

    def check_groups(self, group_names: Sequence[str], where: str) -> None:
        if tuple(group_names) != self.group_names:
            raise ValueError(f"{where}: parallel was built for other group names "
                             f"({_short(self.group_names, 4)}) than the statistics' "
                             f"({_short(list(group_names), 4)})")


def _group_name_tuple(group_names, where) -> Tuple[str, ...]:
    if isinstance(group_names, str) or not isinstance(group_names, Sequence):
        raise TypeError(f"{where}: group_names must be a sequence of str, got "
                        f"{type(group_names).__name__}")
    for name in group_names:
        if not isinstance(name, str):
            raise TypeError(f"{where}: group names must be str, got {name!r}")
    return tuple(group_names)


def _short(items, limit: int = 6) -> str:
    items = list(items)
    if len(items) <= limit:
        return repr(items)
    return repr(items[:limit])[:-1] + f", ... (+{len(items) - limit} more)]"


def parse_parallel_groups(group_names: Sequence[str], sep: str = "/", *,
                          skip_unmatched: bool = False) -> ParallelGroups:
    """Parse group names ``"{language}{sep}{sequence}"`` (``"fra_Latn/17"``).

    The split is at the *last* ``sep``; both parts must be non-empty. Sequence ``s`` of every
    language is one parallel text. Languages keep their first-appearance order; sequences are
    sorted numerically when every key is decimal digits, else kept in first-appearance order.
    A name that does not match raises ValueError, or is left out with ``skip_unmatched=True``
    (e.g. the recorder's default group ``"all"``). Two groups naming one (language, sequence)
    raise ValueError.
    """
    where = "parse_parallel_groups"
    group_names = _group_name_tuple(group_names, where)
    if not isinstance(sep, str) or not sep:
        raise ValueError(f"{where}: sep={sep!r} must be a non-empty str")
    pairs = []
    for g, name in enumerate(group_names):
        lang, found, seq = name.rpartition(sep)
        if not found or not lang or not seq:
            if skip_unmatched:
                continue
            raise ValueError(f"{where}: group name {name!r} is not '{{language}}{sep}{{sequence}}'"
                             f" (e.g. 'fra_Latn{sep}17'); pass skip_unmatched=True to leave such "
                             f"groups out, or build ParallelGroups.from_mapping")
        pairs.append((g, lang, seq))
    if not pairs:
        raise ValueError(f"{where}: no group name matches '{{language}}{sep}{{sequence}}'; names "
                         f"are {_short(group_names)}")
    return ParallelGroups._build(group_names, pairs, where)


def _resolve_parallel(group_names: Sequence[str], parallel, where: str) -> ParallelGroups:
    """``parallel`` as ParallelGroups over ``group_names``; None: parse ``language/sequence``
    names when every name has a '/', else one group per language when none has one."""
    if isinstance(parallel, ParallelGroups):
        parallel.check_groups(group_names, where)
        return parallel
    if isinstance(parallel, Mapping):
        return ParallelGroups.from_mapping(group_names, parallel)
    if parallel is not None:
        raise TypeError(f"{where}: parallel must be None, a ParallelGroups or a mapping "
                        f"{{group name: (language, sequence)}}, got {type(parallel).__name__}")
    with_sep = [n for n in group_names if "/" in n]
    if len(with_sep) == len(group_names):
        return parse_parallel_groups(group_names)
    if not with_sep:
        return ParallelGroups.by_language(group_names)
    without = [n for n in group_names if "/" not in n]
    raise ValueError(f"{where}: group names mix 'language/sequence' names ({_short(with_sep, 3)})"
                     f" and others ({_short(without, 3)}); select groups with stats.group(...) or "
                     f"pass parallel=parse_parallel_groups(names, skip_unmatched=True)")


def pool_by_language(stats: RoutingStats, parallel=None) -> RoutingStats:
    """The statistics summed over each language's sequences: one group per language.

    ``parallel``: as in ``routing_divergence`` (None parses ``"language/sequence"`` names).
    tokens, counts, weight_sum, prob_sum and entropy_sum are summed (fp32 sums are accumulated in
    float64, then stored as fp32); ``coact`` (all groups together) is kept when every group
    belongs to a language, else dropped. Pooled importance is a token-weighted average over
    sequences — unlike ``routing_divergence``'s mean over parallel pairs.
    """
    where = "pool_by_language"
    _check_stats(stats, where)
    parallel = _resolve_parallel(stats.group_names, parallel, where)
    lang_of = torch.full((stats.num_groups,), -1, dtype=torch.int64)
    lang_ids = torch.arange(len(parallel.languages)).unsqueeze(1).expand_as(parallel.rows)
    held = parallel.rows >= 0
    lang_of[parallel.rows[held]] = lang_ids[held]
    keep = lang_of >= 0
    every_group = bool(keep.all())
    n_lang = len(parallel.languages)
    device = _one_device(stats, where)
    sel, kept = lang_of[keep].to(device), keep.to(device)
    pooled: Dict[str, list] = {}
    for name in ("tokens", "counts", "weight_sum", "prob_sum", "entropy_sum"):
        if any(getattr(layer, name) is None for layer in stats):
            continue  # an optional field some layer lacks is dropped from the pooled stats
        parts = []
        for l0, l1 in _layer_chunks(len(stats), stats.num_groups * stats.num_experts):
            t = _stack_layers(stats, name, l0, l1)          # [c, G, ...]
            acc_dtype = torch.float64 if t.is_floating_point() else t.dtype
            acc = torch.zeros((l1 - l0, n_lang) + tuple(t.shape[2:]), dtype=acc_dtype,
                              device=device)
            parts.append(acc.index_add_(1, sel, t[:, kept].to(acc_dtype)).to(t.dtype))
        pooled[name] = list(torch.cat(parts).unbind(0))
    layers = []
    for l, layer in enumerate(stats):
        changes = {name: None for name in ("prob_sum", "entropy_sum") if name not in pooled}
        changes.update({name: values[l] for name, values in pooled.items()})
        changes["coact"] = (layer.coact.clone() if every_group and layer.coact is not None
                            else None)
        layers.append(layer.replace(**changes))
    return RoutingStats(layers, list(parallel.languages), dict(stats.meta))


# -------------------------------------------------------------------------------------------
# entropy and Jensen–Shannon divergence


def distribution_entropy(p: torch.Tensor, normalised: bool = False) -> torch.Tensor:
    """Shannon entropy ``H(p) = -sum_e p_e log p_e`` over the last axis, ``[...]``.

    ``normalised=True`` divides by ``log E`` (the entropy of the uniform distribution), giving
    [0, 1]; for E = 1 the normalised entropy is defined as 0 (one expert: no uncertainty).
    NaN rows give NaN.
    """
    p64 = _check_distribution(p, "p", "distribution_entropy")
    h = _entropy64(p64)
    if normalised:
        E = p.shape[-1]
        h = h / math.log(E) if E > 1 else torch.where(h.isnan(), h, torch.zeros_like(h))
    return h.to(_out_dtype(p))


def _js_from_parts(hm, hp, hq, log_e, normalised):
    """JSD = H(M) - (H(p)+H(q))/2 (float64), optionally over the App. A.4 normaliser."""
    hbar = 0.5 * (hp + hq)
    jsd = (hm - hbar).clamp_min(0.0)  # >= 0 exactly; rounding can go a few ulp below
    if normalised:
        jsd = jsd / (log_e - hbar).clamp_min(JS_NORMALISER_FLOOR)
    return jsd


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence over the last axis, nats: ``[...]`` (inputs broadcast).

    ``JSD(p, q) = ½ KL(p ‖ M) + ½ KL(q ‖ M) = H(M) − ½(H(p) + H(q))``, ``M = (p + q)/2``.
    Range [0, log 2]: 0 iff p = q; log 2 iff p and q have disjoint supports (e.g. two different
    one-hot distributions). E = 1 gives 0. Computed from the entropy form in float64
    (0 log 0 = 0 exactly, where the author code clamps probabilities at 1e-10; the two differ by
    up to about 1e-7 at E=128 with many zero entries, and the clamped value can exceed log 2).
    """
    return _js(p, q, normalised=False, where="js_divergence")


def entropy_normalised_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Entropy-normalised Jensen–Shannon divergence ``D_HJS`` (the paper's App. A.4, Eq. 6–8).

    ``D_HJS(p, q) = JSD(p, q) / max(log E − ½(H(p) + H(q)), 1e-6)``, natural logs, exactly as the
    author's ``calculate_entropy_normalized_jsd``. Why the normaliser: routing entropy falls with
    depth, so raw JSD shrinks in deep layers; dividing by the room left between the distributions'
    mean entropy and the uniform entropy removes that trend.

    Range [0, 1]: ``JSD = H(M) − ½(H(p)+H(q)) <= log E − ½(H(p)+H(q))`` because ``H(M) <= log E``,
    so ``D_HJS = 1`` exactly when the mixture ``M`` is uniform (e.g. p, q uniform on the two
    halves of the experts) — not for one-hot inputs: two different one-hot distributions give
    ``log 2 / log E`` (1 only for E = 2). Identical inputs give 0. E = 1 gives 0 (JSD = 0; the
    normaliser is floored at 1e-6). Shapes as ``js_divergence``.
    """
    return _js(p, q, normalised=True, where="entropy_normalised_js")


def _js(p, q, normalised: bool, where: str) -> torch.Tensor:
    p64 = _check_distribution(p, "p", where)
    q64 = _check_distribution(q, "q", where)
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"{where}: p and q must have the same number of experts (last axis), "
                         f"got {p.shape[-1]} and {q.shape[-1]}")
    _check_broadcast(p, q, "p and q", where)
    hm = _entropy64(0.5 * (p64 + q64))
    log_e = math.log(p.shape[-1]) if normalised else 0.0
    d = _js_from_parts(hm, _entropy64(p64), _entropy64(q64), log_e, normalised)
    return d.to(_out_dtype(p, q))


def pairwise_divergence(p: torch.Tensor, normalised: bool = True) -> torch.Tensor:
    """Divergence between every pair of rows: ``p [..., G, E]`` -> ``[..., G, G]``.

    ``D_HJS`` (``normalised=True``, as ``entropy_normalised_js``) or plain JSD, of one
    distribution per row: memory and time grow as G²·E, so G in the thousands wants a selection
    of groups first. Symmetric, zero diagonal. The paper's language-to-language heatmaps are
    not this on pooled languages but the mean over parallel sequences: ``language_divergence``.
    """
    where = "pairwise_divergence"
    p64 = _check_distribution(p, "p", where)
    if p.dim() < 2:
        raise ValueError(f"{where}: p must be [..., G, E], got shape {tuple(p.shape)}")
    h = _entropy64(p64)
    hm = _entropy64(0.5 * (p64.unsqueeze(-2) + p64.unsqueeze(-3)))
    d = _js_from_parts(hm, h.unsqueeze(-1), h.unsqueeze(-2), math.log(p.shape[-1]), normalised)
    return d.to(_out_dtype(p))


def parallel_divergence(importance: torch.Tensor, parallel: ParallelGroups, reference: str,
                        normalised: bool = True) -> Dict[str, torch.Tensor]:
    """Per-layer divergence of each language from ``reference`` over parallel pairs (Eq. 2).

    ``Div[lang, l] = mean_i D(q[l, (lang, i)], q[l, (reference, i)])`` over the sequences i that
    both languages hold and that have tokens on both sides (a pair with a missing or NaN side is
    skipped; none left -> NaN). ``D`` is ``D_HJS`` (``normalised=True``, the paper's) or plain
    JSD. ``importance [L, G, E]`` (e.g. ``expert_importance``); each row is renormalised to sum 1.
    Returns ``{language: [L] float32}`` for every language but the reference.
    """
    where = "parallel_divergence"
    _check_tensor(importance, "importance", where)
    if importance.dim() != 3:
        raise ValueError(f"{where}: importance must be [L, G, E], got shape "
                         f"{tuple(importance.shape)}")
    if not importance.is_floating_point():
        raise TypeError(f"{where}: importance must be a floating-point tensor, got "
                        f"{importance.dtype}")
    _check_experts(importance, "importance", where)
    if bool((importance < 0).any()):
        raise ValueError(f"{where}: importance has negative entries")
    L, G, E = importance.shape
    return _parallel_divergence(lambda l0, l1: importance[l0:l1], L, G, E, parallel,
                                reference, normalised, where)


def _parallel_divergence(layer_rows, L: int, G: int, E: int, parallel, reference: str,
                         normalised: bool, where: str) -> Dict[str, torch.Tensor]:
    """The Eq. 2 loop: ``layer_rows(l0, l1)`` gives layers l0..l1-1's non-negative [c, G, E]
    scores (any scale: rows are renormalised, so prob_sum works as well as prob_sum / tokens)."""
    if not isinstance(parallel, ParallelGroups):
        raise TypeError(f"{where}: parallel must be a ParallelGroups, got "
                        f"{type(parallel).__name__}")
    if len(parallel.group_names) != G:
        raise ValueError(f"{where}: parallel indexes {len(parallel.group_names)} groups, "
                         f"the statistics have G={G}")
    ref = parallel.language_index(reference, where)
    n_lang, n_seq = parallel.rows.shape
    out = torch.empty(n_lang, L, dtype=torch.float64)
    log_e = math.log(E)
    for l0, l1 in _layer_chunks(L, max(G, n_lang * n_seq) * E):
        x = layer_rows(l0, l1)                                       # [c, G, E]
        rows = parallel.rows.to(x.device)
        p = _renormalised(x)                                         # float64
        out[:, l0:l1] = _divergence_to(p, _entropy64(p), rows, ref, slice(None), log_e,
                                       normalised).T.cpu()
    return {lang: out[i].float() for i, lang in enumerate(parallel.languages) if i != ref}


def _divergence_to(p, h, rows, ref: int, others: slice, log_e: float, normalised: bool):
    """Eq. 2 for the languages ``others`` against language ``ref``: the mean over the parallel
    sequences both hold of ``D(q_(a, i), q_(ref, i))``, ``[c, languages]`` float64 (NaN where
    they share none). ``p [c, G, E]``: renormalised rows, ``h [c, G]`` their entropies,
    ``rows [Λ, N]`` the group of each language's sequence (-1: none). The sum that forms M
    takes the other language first, the reference second: the same bits either way round."""
    safe = rows.clamp_min(0)
    # M = (p + p_ref) / 2 in place on the gathered copy: one [c, Λ, N, E] temporary. For
    # identical rows (x + x) * 0.5 == x exactly, so identical pairs give exactly 0.
    m = p[:, safe[others]].add_(p[:, safe[ref]].unsqueeze(1)).mul_(0.5)
    hm = torch.special.entr(m, out=m).sum(-1)                        # [c, Λ, N]
    d = _js_from_parts(hm, h[:, safe[others]], h[:, safe[ref]].unsqueeze(1), log_e, normalised)
    paired = (rows[others] >= 0) & (rows[ref] >= 0).unsqueeze(0)     # [Λ, N]
    return d.masked_fill_(~paired, torch.nan).nanmean(-1)


def _importance_field(stats: RoutingStats, kind: str, where: str) -> str:
    """The statistics field ``expert_importance(stats, kind)`` reads, after checking that
    ``stats`` has it in every layer (the error names the missing field)."""
    _check_stats(stats, where)
    _check_choice(kind, "kind", KINDS, where)
    field = "prob_sum" if kind == "dense" else "weight_sum"
    if any(getattr(layer, field) is None for layer in stats):
        expert_importance(stats, kind)  # raises the error naming the missing field
    return field


def routing_divergence(stats: RoutingStats, reference: str, *, parallel=None,
                       kind: str = "dense", normalised: bool = True) -> Dict[str, torch.Tensor]:
    """The paper's ``Div^(lang, l)`` (Eq. 2 with App. A.4's ``D_HJS``), ``{language: [L]}``.

    Groups are parallel sequences named ``"{language}/{sequence}"`` (``parallel=None`` parses
    them), or whatever ``parallel`` says (a ``ParallelGroups`` or ``{group: (language,
    sequence)}``). When no group name has a '/', every group is a language (the language-level
    version: one pair per language, its whole data against the reference's; see also
    ``pool_by_language``). Importance is ``expert_importance(stats, kind)``; see
    ``parallel_divergence`` for the pairing, skipping and NaN rules. The reference language is
    not in the result (its divergence is 0 by definition).
    """
    where = "routing_divergence"
    field = _importance_field(stats, kind, where)
    parallel = _resolve_parallel(stats.group_names, parallel, where)
    # Each layer's sums go straight in: renormalising a row of prob_sum gives the same
    # distribution as prob_sum / tokens (zero-token rows are all 0 and become NaN), without an
    # [L, G, E] importance tensor in between.
    _one_device(stats, where)
    return _parallel_divergence(lambda l0, l1: _stack_layers(stats, field, l0, l1), len(stats),
                                stats.num_groups, stats.num_experts, parallel, reference,
                                normalised, where)


def language_divergence(stats: RoutingStats, layers: Optional[Sequence] = None, *,
                        parallel=None, kind: str = "dense",
                        normalised: bool = True) -> Tuple[List[str], torch.Tensor]:
    """Divergence between every two languages at ``layers`` (None: all),
    ``(languages, [n, Λ, Λ] float32)`` for the n layers named: the paper's language-to-language
    heatmaps. ``layers`` holds decoder-layer indices (``12`` is ``model.layers.12``, whatever
    dense layers precede it) or layer names (``layer_positions``).

    Cell ``[l, a, b]`` is ``routing_divergence`` of language a with b as the reference: the mean
    over the parallel sequences both hold of ``D(q_(a, i), q_(b, i))``, the curves' quantity for
    every pair. (The divergence of the two languages' pooled distributions is another, larger
    number: pooling raises each side's entropy, which shrinks D_HJS's normaliser.) Computed in
    float64 as ``routing_divergence`` is (natural log, D_HJS's normaliser floored at 1e-6), so a
    cell equals that function's value bit for bit. Symmetric, zero diagonal; NaN for a pair with
    no parallel sequence with tokens on both sides.
    """
    where = "language_divergence"
    field = _importance_field(stats, kind, where)
    positions = (list(range(len(stats))) if layers is None
                 else layer_positions(stats.layer_names, layers, where,
                                     indices=stats.layer_indices))
    if not positions:
        raise ValueError(f"{where}: layers must name at least one layer, got {layers!r}")
    parallel = _resolve_parallel(stats.group_names, parallel, where)
    _one_device(stats, where)
    languages = list(parallel.languages)
    n_lang, n_seq = parallel.rows.shape
    out = torch.zeros(len(positions), n_lang, n_lang)
    log_e = math.log(stats.num_experts)
    # each pair once: D is symmetric to the bit (_divergence_to), so [l, b, a] = [l, a, b]
    for c0, c1 in _layer_chunks(len(positions), max(stats.num_groups, n_lang * n_seq)
                                * stats.num_experts):
        x = torch.cat([_stack_layers(stats, field, p, p + 1) for p in positions[c0:c1]])
        rows = parallel.rows.to(x.device)
        p = _renormalised(x)
        h = _entropy64(p)
        for b in range(n_lang - 1):
            d = _divergence_to(p, h, rows, b, slice(b + 1, None), log_e, normalised).cpu()
            out[c0:c1, b + 1:, b] = d
            out[c0:c1, b, b + 1:] = d
    return languages, out


def routing_entropy(stats: RoutingStats, of: str = "importance", kind: str = "dense",
                    normalised: bool = False) -> torch.Tensor:
    """Routing entropy of every group, ``[L, G]`` float32, nats (or / log E).

    ``of="importance"`` (default): ``H(q)`` of the group's importance (Eq. 1, ``kind`` as in
    ``expert_importance``), the paper's per-sequence routing entropy (average it over sequences
    per layer for the paper's curves; the author's ``analyze_routing_entropy``).
    ``of="tokens"``: ``entropy_sum / tokens``, the mean over the group's tokens of the entropy of
    each token's dense routing distribution (needs ``entropy_sum``, ``record(dense=True)``): how
    sure the router is of each token, a smaller number (by concavity ``tokens <= importance``)
    that falls faster with depth.
    ``normalised=True`` divides by ``log E`` ([0, 1]; defined as 0 for E = 1).
    Zero-token groups are NaN.
    """
    where = "routing_entropy"
    _check_stats(stats, where)
    _check_choice(of, "of", ("tokens", "importance"), where)
    _check_choice(kind, "kind", KINDS, where)
    E = stats.num_experts
    if of == "tokens":
        missing = [layer.name for layer in stats if layer.entropy_sum is None]
        if missing:
            raise ValueError(f"{where}: of='tokens' needs entropy_sum, which layers "
                             f"{missing[:3]} lack; record with dense=True or use of='importance'")
        tokens = stats.stack("tokens").to(torch.float64)
        h = torch.where(tokens > 0, stats.stack("entropy_sum").to(torch.float64) / tokens,
                        torch.nan)
    else:
        field = _importance_field(stats, kind, where)
        _one_device(stats, where)
        h = torch.cat([_entropy64(_renormalised(_stack_layers(stats, field, l0, l1)))
                       for l0, l1 in _layer_chunks(len(stats), stats.num_groups * E)])
        h = h.masked_fill(stats.stack("tokens") == 0, torch.nan)
    if normalised:
        h = h / math.log(E) if E > 1 else torch.where(h.isnan(), h, torch.zeros_like(h))
    return h.float()


# -------------------------------------------------------------------------------------------
# consistency (Jaccard) of routing


def mean_pairwise_overlap(stats: RoutingStats) -> torch.Tensor:
    """Mean top-k overlap of two distinct tokens of a group, ``[L, G]`` float32, from counts.

    ``O[l, g] = mean over ordered pairs t != u of |S_t ∩ S_u| / k
              = sum_e c_e (c_e − 1) / (k · n (n − 1))``
    with ``c = counts[l, g]``, ``n = tokens[l, g]`` (exact: each expert e is shared by
    ``c_e (c_e − 1)`` ordered pairs). For sets of equal size k this is the Dice coefficient; the
    paper's Jaccard ``|∩| / |∪| = I / (2k − I)`` of the same pairs needs per-token ids
    (``routing_consistency``) because it is not linear in I. 1 when every token picks the same k
    experts; about k/E for uniform random routing. Groups with fewer than 2 tokens are NaN.
    """
    where = "mean_pairwise_overlap"
    _check_stats(stats, where)
    # sum_e c(c-1) in exact int64, a chunk of layers at a time (no float64 [L, G, E] copy)
    _one_device(stats, where)
    shared = torch.cat([(c * (c - 1)).sum(-1) for c in
                        (_stack_layers(stats, "counts", l0, l1) for l0, l1 in
                         _layer_chunks(len(stats), stats.num_groups * stats.num_experts))])
    n = stats.stack("tokens").to(torch.float64)
    k = torch.tensor([layer.top_k for layer in stats], dtype=torch.float64)[:, None]
    o = torch.where(n >= 2, shared.to(torch.float64) / (k * n * (n - 1)).clamp_min(1), torch.nan)
    return o.float()


def expert_set_jaccard(a: torch.Tensor, b: torch.Tensor, m: Optional[int] = None) -> torch.Tensor:
    """Jaccard similarity of two expert sets per row: ``|A ∩ B| / |A ∪ B|``, ``[...]`` float32.

    ``a, b [..., E]`` (broadcast) are per-expert scores (importance, frequency, counts), real
    floating-point or integer; bool masks are sets as they stand (``m=None`` only).
    ``m=None``: the sets are the *activated* experts, ``{e : score > 0}``. ``m=int``: the sets are
    the m highest-scoring experts (ties to the lower expert index, so integer counts give a
    deterministic set); ``1 <= m <= E``. Use it to compare groups' most-used experts (e.g. a
    language's sequence against its parallel English one, per layer). Two empty sets, or a row
    with NaN, give NaN.
    """
    where = "expert_set_jaccard"
    for name, x in (("a", a), ("b", b)):
        _check_real(_check_tensor(x, name, where), name, where, bool_ok=True)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{where}: a and b must have the same number of experts (last axis), got "
                         f"{a.shape[-1]} and {b.shape[-1]}")
    _check_broadcast(a, b, "a and b", where)
    E = a.shape[-1]
    m = check_int(where, "m", m, 1, E, none="activated experts",
                  means=f"top-scoring experts of E={E}")
    if m is not None and torch.bool in (a.dtype, b.dtype):
        raise TypeError(f"{where}: m={m} ranks scores, but a or b is a bool mask (dtypes "
                        f"{a.dtype}, {b.dtype}); pass scores, or m=None to use the masks as sets")
    # sets and NaN flags on the unbroadcast inputs: a reference row shared by many rows of the
    # other side is ranked once
    sets, nan_rows = [], []
    for x in (a, b):
        sets.append(x > 0 if m is None else _top_m_mask(x, int(m)))
        nan_rows.append(x.isnan().any(-1) if x.is_floating_point()
                        else torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device))
    in_a, in_b = torch.broadcast_tensors(*sets)
    inter = (in_a & in_b).sum(-1).to(torch.float64)
    union = (in_a | in_b).sum(-1).to(torch.float64)
    undefined = (union == 0) | nan_rows[0] | nan_rows[1]
    j = torch.where(undefined, torch.nan, inter / union.clamp_min(1))
    return j.float()


def _top_m_mask(x: torch.Tensor, m: int) -> torch.Tensor:
    """The m largest entries of each row, ties to the lower index (torch.topk's choice among
    equal values is unspecified, so only its m-th value is used: everything above it is in, and
    the first entries equal to it fill the remaining places). Rows in chunks: the tie-break's
    cumsum is int64, 8x the bool mask."""
    E = x.shape[-1]
    flat = x.reshape(-1, E)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, E))
    for r0 in range(0, flat.shape[0], step):
        rows = flat[r0:r0 + step]
        threshold = torch.topk(rows, m, dim=-1).values[:, -1:]
        above = rows > threshold
        tied = rows == threshold
        room = m - above.sum(-1, keepdim=True)
        mask[r0:r0 + step] = above | (tied & (torch.cumsum(tied, -1) <= room))
    return mask.reshape(x.shape)


def _group_codes(groups, n: int, where: str):
    """(codes [n] int64 with -1 = skip, keys) for group labels given as names or ints."""
    if isinstance(groups, torch.Tensor):
        if groups.dtype not in (torch.int32, torch.int64) or tuple(groups.shape) != (n,):
            raise ValueError(f"{where}: groups as a tensor must be int32/int64 of shape [{n}], "
                             f"got {groups.dtype} of shape {tuple(groups.shape)}")
        codes = groups.to(torch.int64)
        if bool((codes < -1).any()):
            raise ValueError(f"{where}: group ids must be >= -1 (-1 skips a token), got "
                             f"{int(codes.min())}")
        keys = torch.unique(codes[codes >= 0])
        codes = torch.where(codes >= 0, torch.searchsorted(keys, codes), -1)
        return codes, keys.tolist()
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(f"{where}: groups must be a sequence of names (None skips a token) or an "
                        f"int tensor, got {type(groups).__name__}")
    if len(groups) != n:
        raise ValueError(f"{where}: groups must have one entry per token row ({n}), got "
                         f"{len(groups)}")
    index: Dict[object, int] = {}
    codes = torch.tensor([-1 if g is None else index.setdefault(g, len(index)) for g in groups],
                         dtype=torch.int64)
    return codes, list(index)


def _check_ids(ids, where: str) -> torch.Tensor:
    _check_tensor(ids, "ids", where, min_dim=2)
    if ids.dim() != 2 or ids.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"{where}: ids must be an int tensor [N, k] (a trace's 'ids'), got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    if ids.shape[1] < 1:
        raise ValueError(f"{where}: ids must hold k >= 1 experts per token, got shape "
                         f"{tuple(ids.shape)}")
    return ids.to(torch.int64)


def routing_consistency(ids: torch.Tensor, groups, pairs: str = "all",
                        max_group_tokens: int = 8192) -> Dict[object, float]:
    """Routing consistency per group: the mean Jaccard similarity of its tokens' top-k sets.

    ``J(t, u) = |S_t ∩ S_u| / |S_t ∪ S_u| = I / (2k − I)`` for top-k sets of size k. The paper
    (as summarised; exact formula unverified) measures Jaccard of top-K sets between tokens of
    the same sequence; ``pairs="all"`` averages over every pair of distinct tokens of the group
    (cost Σ_g n_g²·E, refused above ``max_group_tokens`` tokens in one group, an int >= 1),
    ``pairs="adjacent"`` over consecutive tokens of the group in row order (temporal locality,
    cost N·k²).

    ``ids [N, k]``: the trace's per-token expert ids (``rec.trace[layer]["ids"]``), a token's k ids
    distinct. ``groups``: per row, a group name (None skips the row: padding, masked tokens) —
    the trace's ``"group"`` list — or an int tensor [N] (-1 skips). Returns ``{group: J}`` with
    groups in first-appearance order (sorted ids for a tensor); a group with no pair gets NaN.
    1 = every token picks the same experts. See ``mean_pairwise_overlap`` for a counts-only
    (Dice) variant.
    """
    where = "routing_consistency"
    ids = _check_ids(ids, where)
    _check_choice(pairs, "pairs", ("all", "adjacent"), where)
    max_group_tokens = check_int(where, "max_group_tokens", max_group_tokens, 1)
    N, k = ids.shape
    codes, keys = _group_codes(groups, N, where)
    G = len(keys)
    if G == 0:
        return {}
    sel = torch.nonzero(codes >= 0).squeeze(1)
    negative = (ids[sel] < 0).any(1)
    if bool(negative.any()):
        r = int(sel[torch.nonzero(negative)[0]])
        raise ValueError(f"{where}: ids must be expert ids >= 0; row {r} (in a group) is "
                         f"{ids[r].tolist()}")
    _check_distinct(ids[sel], "ids (rows in a group)", where)
    order = torch.sort(codes[sel], stable=True).indices  # by group, row order kept inside
    sel = sel[order]
    c = codes[sel]
    x = ids[sel]
    n = torch.bincount(c, minlength=G)
    if pairs == "adjacent":
        same = c[1:] == c[:-1]
        inter = (x[1:].unsqueeze(2) == x[:-1].unsqueeze(1)).sum((1, 2))[same].to(torch.float64)
        jac = inter / (2 * k - inter)
        total = torch.zeros(G, dtype=torch.float64).index_add_(0, c[1:][same], jac)
        npairs = (n - 1).clamp_min(0).to(torch.float64)
    else:
        if int(n.max()) > max_group_tokens:
            big = keys[int(n.argmax())]
            raise ValueError(f"{where}: group {big!r} has {int(n.max())} tokens, more than "
                             f"max_group_tokens={max_group_tokens} (all pairs cost n²); use "
                             f"pairs='adjacent', per-sequence groups, or raise the limit")
        E = int(x.max()) + 1
        if E > x.numel():
            # The one-hot blocks below are E wide; ids sparser than that (2**40 asked for 2**40
            # columns) are renumbered over the distinct ids seen, which keeps every Jaccard.
            # Only then: on dense ids torch.unique would add a third to the time.
            seen, x = torch.unique(x, return_inverse=True)
            E = seen.numel()
        end = torch.cumsum(n, 0)
        start = end - n
        pos = torch.arange(sel.numel()) - start[c]
        n_max = int(n.max())
        total = torch.empty(G, dtype=torch.float64)
        # I = X Xᵀ per group on zero-padded one-hot blocks [groups, n_max, E]: padding rows are 0,
        # so they add nothing; each real token adds J(t, t) = 1 on the diagonal, removed below.
        chunk = max(1, _CHUNK_ELEMENTS // (n_max * max(n_max, E)))
        for g0 in range(0, G, chunk):
            g1 = min(G, g0 + chunk)
            t0, t1 = int(start[g0]), int(end[g1 - 1])  # rows are sorted by group
            block = torch.zeros(g1 - g0, n_max, E)
            rows_g = (c[t0:t1] - g0).unsqueeze(1).expand(-1, k)
            rows_p = pos[t0:t1].unsqueeze(1).expand(-1, k)
            block[rows_g, rows_p, x[t0:t1]] = 1.0
            inter = torch.bmm(block, block.transpose(1, 2)).to(torch.float64)
            total[g0:g1] = (inter / (2 * k - inter)).sum((1, 2)) - n[g0:g1]
        nn_ = n.to(torch.float64)
        npairs = nn_ * (nn_ - 1)
    values = torch.where(npairs > 0, total / npairs.clamp_min(1), torch.nan)
    return {key: float(v) for key, v in zip(keys, values.tolist())}


# -------------------------------------------------------------------------------------------
# agreement of two runs over the same tokens (router saturation, the effect of steering)


class RoutingAgreement(NamedTuple):
    """How alike two runs routed the same tokens in one layer (``routing_agreement``).

    tokens: rows compared. top1: share of tokens whose first-choice expert is the same.
    overlap: mean ``|S_a ∩ S_b| / k`` over tokens (OLMoE's top-k router saturation).
    identical: share of tokens whose top-k sets are equal.
    weight_shift: mean over tokens of ``½ Σ_e |w_a(e) − w_b(e)|``, the routed weights as vectors
    over all experts (0 outside the top-k): the total variation between the two weightings for
    weights that sum to 1. It sees soft steering that moves weight without changing the ids;
    NaN without weights. The shares are NaN when tokens is 0.
    """

    tokens: int
    top1: float
    overlap: float
    identical: float
    weight_shift: float = math.nan


def _check_distinct(ids: torch.Tensor, name: str, where: str) -> None:
    if ids.shape[1] > 1 and ids.shape[0]:
        s = torch.sort(ids, dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(1)
        if bool(dup.any()):
            r = int(torch.nonzero(dup)[0])
            raise ValueError(f"{where}: {name} must hold k distinct experts per token; row {r} is "
                             f"{ids[r].tolist()}")


def routing_agreement(ids_a: torch.Tensor, ids_b: torch.Tensor, *,
                      weights_a: Optional[torch.Tensor] = None,
                      weights_b: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None) -> RoutingAgreement:
    """Agreement of two routings of the same tokens, one layer: a checkpoint against the final
    model (OLMoE §5's router saturation), a steered run against the plain one (which decisions
    the intervention changed), two batch sizes or backends (batch invariance).

    ``ids_a, ids_b [N, k]``: row t of both is the same token (traces of the same inputs, in the
    same order: ``trace[layer]["ids"]``), each row k distinct experts in selection order (ids
    as the gate and ``torch.topk`` return them: the first is the top-1). ``weights_a,
    weights_b [N, k]`` (both or neither): the routed weights of those ids, for
    ``weight_shift``. ``mask [N]`` bool keeps rows (default all). Top-1 compares the first
    column, so it means "first choice" only for ids in descending score order; the other
    measures do not depend on the order.
    """
    where = "routing_agreement"
    a = _check_ids(ids_a, where)
    b = _check_ids(ids_b, where)
    if a.shape != b.shape:
        raise ValueError(f"{where}: ids_a and ids_b must have the same shape [N, k] (the same "
                         f"tokens, routed twice), got {tuple(a.shape)} and {tuple(b.shape)}")
    if (weights_a is None) != (weights_b is None):
        raise ValueError(f"{where}: pass both weights_a and weights_b or neither")
    weights = None
    if weights_a is not None:
        weights = []
        for name, w in (("weights_a", weights_a), ("weights_b", weights_b)):
            if not isinstance(w, torch.Tensor) or not w.is_floating_point() \
                    or tuple(w.shape) != tuple(a.shape):
                raise ValueError(f"{where}: {name} must be a float tensor of the ids' shape "
                                 f"{tuple(a.shape)}, got {getattr(w, 'dtype', type(w).__name__)}"
                                 f" of shape {tuple(getattr(w, 'shape', ()))}")
            weights.append(w.to(device=a.device, dtype=torch.float64))
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or tuple(mask.shape) != (a.shape[0],):
            raise ValueError(f"{where}: mask must be a bool tensor of shape [{a.shape[0]}], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} of shape "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        keep = mask.to(a.device)
        a, b = a[keep], b[keep]
        weights = None if weights is None else [w[keep] for w in weights]
    _check_distinct(a, "ids_a", where)
    _check_distinct(b, "ids_b", where)
    N, k = a.shape
    if N == 0:
        return RoutingAgreement(0, math.nan, math.nan, math.nan, math.nan)
    shared = torch.empty(N, dtype=torch.int64, device=a.device)  # |S_a ∩ S_b| per token
    l1 = torch.empty(N, dtype=torch.float64, device=a.device)    # Σ_e |w_a(e) − w_b(e)|
    step = max(1, _CHUNK_ELEMENTS // (k * k))
    for r0 in range(0, N, step):
        r = slice(r0, r0 + step)
        match = a[r].unsqueeze(2) == b[r].unsqueeze(1)           # [n, k_a, k_b]
        shared[r] = match.sum((1, 2))
        if weights is not None:
            wa, wb = weights[0][r], weights[1][r]
            wb_at_a = (match * wb.unsqueeze(1)).sum(2)            # b's weight on a's experts
            only_b = (wb * ~match.any(1)).sum(1)                  # b's experts a lacks
            l1[r] = (wa - wb_at_a).abs().sum(1) + only_b.abs()
    return RoutingAgreement(
        tokens=int(N),
        top1=float((a[:, 0] == b[:, 0]).sum()) / N,
        overlap=float(shared.sum()) / (N * k),
        identical=float((shared == k).sum()) / N,
        weight_shift=math.nan if weights is None else float(l1.sum()) / (2 * N))


def trace_agreement(trace_a: Mapping, trace_b: Mapping, *,
                    skip_ungrouped: bool = True) -> Dict[str, RoutingAgreement]:
    """``routing_agreement`` for every layer of two traces of the same inputs,
    ``{layer name: RoutingAgreement}`` in ``trace_a``'s order.

    ``trace_a, trace_b``: ``rec.trace`` or ``load_trace(path)`` of two runs over the same tokens
    in the same order (e.g. with and without ``steer``, or two checkpoints); both must hold the
    same layers with the same row counts (and expert counts, where the traces say them);
    ``weight_shift`` needs "weights" in both. Traces that record their token ids are checked to
    hold the same ones: rows of different tokens (a ``generate()`` that decoded otherwise) are
    compared all the same, with a warning. ``skip_ungrouped`` compares only rows grouped in both
    (padding, ignored and masked tokens are None).
    """
    where = "trace_agreement"
    for arg, t in (("trace_a", trace_a), ("trace_b", trace_b)):
        if not isinstance(t, Mapping):
            raise TypeError(f"{where}: {arg} must be a mapping {{layer: {{'ids', 'group', ...}}}} "
                            f"(rec.trace or load_trace), got {type(t).__name__}")
    if set(trace_a) != set(trace_b):
        raise ValueError(f"{where}: the traces must hold the same layers; only in trace_a: "
                         f"{_short(sorted(set(trace_a) - set(trace_b)))}, only in trace_b: "
                         f"{_short(sorted(set(trace_b) - set(trace_a)))}")
    out, differ = {}, None
    for name in trace_a:
        la, lb = trace_a[name], trace_b[name]
        for arg, layer in (("trace_a", la), ("trace_b", lb)):
            if not isinstance(layer, Mapping) or "ids" not in layer:
                raise ValueError(f"{where}: {arg}[{name!r}] must hold 'ids'")
        if None not in (la.get("experts"), lb.get("experts")) and la["experts"] != lb["experts"]:
            raise ValueError(f"{where}: layer {name!r} has {la['experts']} experts in trace_a "
                             f"and {lb['experts']} in trace_b: traces of different models")
        other = _other_tokens(la.get("tokens"), lb.get("tokens"))
        if other and not differ:
            differ = (name, *other)
        mask = None
        if skip_ungrouped and la.get("group") is not None and lb.get("group") is not None:
            ga, gb = la["group"], lb["group"]
            if len(ga) == len(gb):
                mask = torch.tensor([x is not None and y is not None for x, y in zip(ga, gb)],
                                    dtype=torch.bool)
        try:
            both = la.get("weights") is not None and lb.get("weights") is not None
            out[name] = routing_agreement(la["ids"], lb["ids"],
                                          weights_a=la["weights"] if both else None,
                                          weights_b=lb["weights"] if both else None, mask=mask)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: layer {name!r}: {exc}") from None
    if differ:
        warnings.warn(f"{where}: the traces hold different tokens ({differ[1]} of {differ[2]} "
                      f"rows of layer {differ[0]!r}), so they are not of the same inputs (a "
                      f"generate() that decoded otherwise?); their routing is compared row by "
                      f"row all the same", UserWarning, stacklevel=2)
    return out


def _other_tokens(a, b) -> Optional[Tuple[int, int]]:
    """``(rows whose known token ids differ, rows known in both)`` of two traces' "tokens" for
    one layer; None when either has none or the shapes differ (routing_agreement says so)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    known = (a >= 0) & (b >= 0)
    other = int((known & (a.long() != b.long())).sum())
    return (other, int(known.sum())) if other else None


def trace_statistics(trace: Mapping, *, renormalize: bool = False,
                     coact: bool = False) -> RoutingStats:
    """Routing statistics of a trace: per group and layer, ``tokens``, ``counts`` and
    ``weight_sum`` as ``record`` counts them (the rows whose group is not None), in a
    ``RoutingStats`` the analyses take with ``kind="routed"`` (a trace holds no dense
    distribution: no ``prob_sum`` or ``entropy_sum``).

    ``renormalize=True`` divides each token's k weights by their sum before they are added: the
    importance of the author's later code (``total_actual_weight``: the top-k of the router's
    probabilities, renormalised per token, averaged over the sequence), which differs from
    ``record``'s ``weight_sum / tokens`` for routers that do not renormalise (OLMoE, Qwen3-MoE
    without ``norm_topk_prob``): a token whose top-k holds little probability weighs as much as
    any other. The author's code takes the top-k of the scores without a selection bias; the
    trace holds the experts the model chose, so the two agree for routers that select on their
    scores (softmax top-k: OLMoE, Qwen3, Mixtral, ...). A row whose weights sum to 0 adds 0;
    NaN weights make NaN sums, renormalised or not.

    ``coact=True`` also counts each layer's co-activations ``[E, E]`` over the counted rows, as
    ``record(coact=True)`` does (every ordered pair of a token's experts, the diagonal its
    counts): for ``coactivation`` and ``conditional_coactivation``.

    Groups are numbered in order of first appearance. Sums are taken in float64 from the trace's
    weights, which are fp16 unless recorded with ``trace_dtype=torch.float32``. Each layer needs
    its expert count (``"experts"``, recorded since trace format 3). ``meta`` is the trace's, with
    ``"renormalized"`` set.
    """
    from moe_route.traces import _check_trace_layer
    from moe_route.stats import LayerStats

    where = "trace_statistics"
    if not isinstance(trace, Mapping):
        raise TypeError(f"{where}: trace must be a mapping {{layer: {{'ids', 'weights', 'group', "
                        f"'experts', ...}}}} (rec.trace or load_trace), got "
                        f"{type(trace).__name__}")
    if not trace:
        raise ValueError(f"{where}: the trace holds no layer")
    for arg, value in (("renormalize", renormalize), ("coact", coact)):
        check_bool(where, arg, value)
    # one pass (an open_trace reads each layer once): groups are numbered as they first appear,
    # and the layers counted before a group appeared get its rows (zeros) at the end
    codes: Dict[str, int] = {}
    counted = []
    last_names, last_group = None, None
    for name, layer in trace.items():
        _check_trace_layer(name, layer, where, checked_group=last_names)
        if layer.get("experts") is None:
            raise ValueError(f"{where}: trace[{name!r}] holds no 'experts' (a trace saved before "
                             f"moe_route recorded expert counts)")
        E, ids = int(layer["experts"]), layer["ids"]
        if layer["group"] != last_names:   # the layers of one model usually share the list
            last_names = layer["group"]
            last_group = torch.tensor([-1 if g is None else codes.setdefault(g, len(codes))
                                       for g in last_names], dtype=torch.long)
        G = len(codes)
        group = last_group
        keep = group >= 0
        group, ids = group[keep], ids[keep].long()
        weights = layer["weights"][keep].double()
        if renormalize:
            total = weights.sum(1, keepdim=True)
            weights = torch.where(total == 0, torch.zeros_like(weights), weights / total)
        cells = (group[:, None] * E + ids).flatten()
        weight_sum = torch.zeros(G * E, dtype=torch.float64).index_add_(0, cells, weights.flatten())
        counted.append((name, ids.shape[1], torch.bincount(group, minlength=G),
                        torch.bincount(cells, minlength=G * E).view(G, E),
                        weight_sum.view(G, E).float(), _pairs(ids, ids, E, E) if coact else None))
    if not codes:
        raise ValueError(f"{where}: no row of the trace has a group (every token is None: "
                         f"padding, ignored or not counted), so there is nothing to count")
    G, layers = len(codes), []
    for name, k, tokens, counts, weight_sum, pairs in counted:
        more = G - tokens.shape[0]
        layers.append(LayerStats(
            name, layer_index(name), k, tokens=torch.nn.functional.pad(tokens, (0, more)),
            counts=torch.nn.functional.pad(counts, (0, 0, 0, more)),
            weight_sum=torch.nn.functional.pad(weight_sum, (0, 0, 0, more)), coact=pairs))
    meta = {**(getattr(trace, "meta", None) or {}), "renormalized": renormalize}
    return RoutingStats(layers, list(codes), meta)


def _pairs(a: torch.Tensor, b: torch.Tensor, E_a: int, E_b: int) -> torch.Tensor:
    """``[E_a, E_b]`` int64 counts of every pair (one of row t's ids in ``a``, one of its ids in
    ``b``), int64 ``[N, k_a]`` and ``[N, k_b]``; ``a`` with itself counts a layer's ordered pairs,
    diagonal included. A chunk of rows at a time (a row makes k_a·k_b pair indices)."""
    out = torch.zeros(E_a * E_b, dtype=torch.int64)
    step = max(1, _CHUNK_ELEMENTS // max(a.shape[1] * b.shape[1], 1))
    for r0 in range(0, a.shape[0], step):
        cells = a[r0:r0 + step, :, None] * E_b + b[r0:r0 + step, None, :]
        out += torch.bincount(cells.flatten(), minlength=E_a * E_b)
    return out.view(E_a, E_b)


# -------------------------------------------------------------------------------------------
# co-activation and load


def coactivation(stats: RoutingStats) -> torch.Tensor:
    """Co-activation counts ``[L, E, E]`` int64: ``C[l, a, b]`` = tokens (over all groups) whose
    top-k holds both a and b; the diagonal is each expert's count (``C[a, a] = sum_g counts``).
    Needs ``record(model, coact=True)``."""
    where = "coactivation"
    _check_stats(stats, where)
    missing = [layer.name for layer in stats if layer.coact is None]
    if missing:
        raise ValueError(f"{where}: layers {missing[:3]} have no coact; record with coact=True "
                         f"(coact is dropped when selecting a subset of groups)")
    return stats.stack("coact")


def conditional_coactivation(coact) -> torch.Tensor:
    """``P(b | a) = C[a, b] / C[a, a]``: of the tokens routed to a, the share also routed to b.

    ``coact``: a RoutingStats (its ``coactivation``) or counts ``[..., E, E]`` with the diagonal
    holding each expert's count (as the gate accumulates). Returns float32 ``[..., E, E]``; the
    diagonal is 1 (P(a | a)); rows of experts that were never chosen are NaN. OLMoE §5 plots
    this for the most-used experts.
    """
    where = "conditional_coactivation"
    if isinstance(coact, RoutingStats):
        coact = coactivation(coact)
    _check_tensor(coact, "coact", where, min_dim=2)
    if coact.shape[-1] != coact.shape[-2]:
        raise ValueError(f"{where}: coact must be square in its last two axes [..., E, E], got "
                         f"shape {tuple(coact.shape)}")
    c = coact.to(torch.float64)
    diag = torch.diagonal(c, dim1=-2, dim2=-1).unsqueeze(-1)
    if bool((c < 0).any()):
        raise ValueError(f"{where}: coact must be >= 0 counts")
    return torch.where(diag > 0, c / diag.clamp_min(1), torch.nan).float()


@dataclass(frozen=True, eq=False)
class LayerTransitions:
    """How the tokens routed to each expert of one layer are routed in a later one (OLMoE §5's
    cross-layer expert counts), over the same tokens (``trace_transitions``).

    counts [E_s, E_t] int64: pairs (expert a at the source layer, expert b at the target layer)
        summed over the rows: with ``pairs="all"`` every expert of a token's top-k at the source
        with every one at the target (k_s·k_t pairs a token), with ``"rank"`` the r-th choice
        with the r-th choice (k pairs a token, as OLMoE's analysis script pairs them).
    source [E_s], target [E_t] int64: the rows whose top-k held each expert, at each layer.
    tokens: the rows counted.
    pairs: "all" or "rank".
    """

    counts: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    tokens: int
    pairs: str

    def conditional(self) -> torch.Tensor:
        """``[E_s, E_t]`` float32: of the tokens routed to a at the source, the share routed to
        b at the target (``pairs="all"``: rows sum to k_t) or whose same-rank choice there is b
        (``"rank"``: rows sum to 1). NaN rows for experts the source never chose."""
        src = self.source.to(torch.float64)[:, None]
        return torch.where(src > 0, self.counts / src.clamp_min(1), torch.nan).float()

    def lift(self) -> torch.Tensor:
        """``[E_s, E_t]`` float32: how much more often a and b are paired than if the two layers
        routed independently, ``counts[a, b] · total / (row total[a] · column total[b])``
        (``"all"``: P(a, b) / (P(a) P(b)) over tokens). 1 = independent, 0 = never together;
        NaN where a or b was never chosen."""
        c = self.counts.to(torch.float64)
        expected = c.sum(1, keepdim=True) * c.sum(0, keepdim=True)
        return torch.where(expected > 0, c * c.sum() / expected.clamp_min(1), torch.nan).float()


def _trace_layer(trace: Mapping, layer, arg: str, where: str) -> str:
    """The name of the one layer of ``trace`` that ``layer`` names (``layer_positions``)."""
    names = list(trace)
    if not isinstance(layer, str) and not is_int(layer):
        raise TypeError(f"{where}: {arg} must be a decoder-layer index (int) or a layer name "
                        f"(str), got {type(layer).__name__}")
    found = layer_positions(names, [layer], where, arg)
    if len(found) > 1:
        raise ValueError(f"{where}: {arg}={layer!r} names {len(found)} layers (a loop layer's "
                         f"passes): name one, e.g. {names[found[0]]!r}")
    return names[found[0]]


def trace_transitions(trace: Mapping, source, target, *, pairs: str = "all",
                      groups=None) -> LayerTransitions:
    """Cross-layer expert counts of a trace: for the tokens routed to each expert of layer
    ``source``, which experts of layer ``target`` they are routed to (OLMoE §5 looks at layers
    0 -> 7 and 7 -> 15; Mixtral's paper at consecutive tokens instead, ``routing_consistency``).

    ``source``, ``target``: decoder-layer indices (``7``) or layer names
    (``"model.layers.7.mlp.gate"``); the two must hold the same rows (the same tokens),
    each with its expert count (``"experts"``, traces since format 3). ``pairs``: "all" (every
    source expert of a token with every target expert) or "rank" (the r-th choice with the r-th
    choice, which needs the same k in both layers; the trace keeps the router's order, best
    first). ``groups``: which rows count, by their group in the source layer: None (every row
    with a group in both layers: padding and ignored tokens are left out), a collection of group
    names, or a function of a name (``lambda g: g.startswith("fra_Latn/")``).
    Returns ``LayerTransitions`` (``.conditional()``, ``.lift()``).
    """
    from moe_route.traces import _check_trace_layer

    where = "trace_transitions"
    if not isinstance(trace, Mapping):
        raise TypeError(f"{where}: trace must be a mapping {{layer: {{'ids', 'group', "
                        f"'experts', ...}}}} (rec.trace or load_trace), got "
                        f"{type(trace).__name__}")
    _check_choice(pairs, "pairs", ("all", "rank"), where)
    layers = []
    for arg, value in (("source", source), ("target", target)):
        name = _trace_layer(trace, value, arg, where)
        layer = trace[name]
        _check_trace_layer(name, layer, where)
        if layer.get("experts") is None:
            raise ValueError(f"{where}: trace[{name!r}] holds no 'experts' (a trace saved before "
                             f"moe_route recorded expert counts)")
        layers.append((name, layer))
    (sname, s), (tname, t) = layers
    N = s["ids"].shape[0]
    if t["ids"].shape[0] != N:
        raise ValueError(f"{where}: layers {sname!r} and {tname!r} hold {N} and "
                         f"{t['ids'].shape[0]} rows: not the same tokens")
    if pairs == "rank" and s["ids"].shape[1] != t["ids"].shape[1]:
        raise ValueError(f"{where}: pairs='rank' pairs the r-th choices of the two layers, which "
                         f"needs the same k; {sname!r} has k={s['ids'].shape[1]}, {tname!r} "
                         f"k={t['ids'].shape[1]}")
    other = _other_tokens(s.get("tokens"), t.get("tokens"))
    if other:
        raise ValueError(f"{where}: layers {sname!r} and {tname!r} hold different tokens in "
                         f"{other[0]} of {other[1]} rows: not the same tokens")
    if groups is None:
        def keep(g):
            return True
    elif callable(groups):
        keep = groups
    elif isinstance(groups, str) or not isinstance(groups, Iterable):
        raise TypeError(f"{where}: groups must be None, a collection of group names or a "
                        f"function of a group name, got {groups!r}")
    else:
        try:
            chosen = set(groups)
        except TypeError:
            raise TypeError(f"{where}: groups must hold group names (str), got "
                            f"{list(groups)!r}") from None
        keep = chosen.__contains__
    rows = torch.tensor([a is not None and b is not None and bool(keep(a))
                         for a, b in zip(s["group"], t["group"])], dtype=torch.bool)
    a, b = s["ids"][rows].long(), t["ids"][rows].long()
    _check_distinct(a, f"trace[{sname!r}]['ids']", where)
    _check_distinct(b, f"trace[{tname!r}]['ids']", where)
    E_s, E_t = int(s["experts"]), int(t["experts"])
    if pairs == "all":
        counts = _pairs(a, b, E_s, E_t)
    else:
        counts = torch.bincount((a * E_t + b).flatten(), minlength=E_s * E_t).view(E_s, E_t)
    return LayerTransitions(counts, torch.bincount(a.flatten(), minlength=E_s),
                            torch.bincount(b.flatten(), minlength=E_t), int(a.shape[0]), pairs)


class LoadBalance(NamedTuple):
    """Load-balance figures over the expert axis (each ``[...]`` float32, per layer for stats).

    cv: coefficient of variation of the load, population std / mean (0 = perfectly balanced;
        one expert taking everything gives sqrt(E − 1)).
    max_over_mean: the busiest expert's load over the mean load (1 = balanced, E = all on one).
    dead_fraction: share of experts with load exactly 0.
    """

    cv: torch.Tensor
    max_over_mean: torch.Tensor
    dead_fraction: torch.Tensor


def load_balance(load) -> LoadBalance:
    """Load-balance figures of expert loads (see ``LoadBalance``).

    ``load``: a RoutingStats — the load of expert e in layer l is ``sum_g counts[l, g, e]`` (tokens
    routed to e over every group), giving ``[L]`` figures (layers with different numbers of
    experts each over their own) — or a non-negative real tensor ``[..., E]`` of loads, E >= 1
    (e.g. ``stats.stack("counts")`` for per-group figures ``[L, G]``).
    A row with no load at all has NaN cv and max_over_mean and dead_fraction 1. E = 1 gives
    cv 0 and max_over_mean 1.
    """
    where = "load_balance"
    if isinstance(load, RoutingStats):
        _check_stats(load, where)
        loads = [layer.counts.sum(0) for layer in load]  # no [L, G, E] copy
        if len({x.shape[0] for x in loads}) > 1:
            per_layer = [load_balance(x) for x in loads]
            return LoadBalance(*(torch.stack(figure) for figure in zip(*per_layer)))
        load = torch.stack(loads)
    _check_real(_check_tensor(load, "load", where), "load", where)
    _check_experts(load, "load", where)
    if bool((load < 0).any()):
        raise ValueError(f"{where}: load must be >= 0, got min {float(load.min())}")
    E = load.shape[-1]
    flat = load.reshape(-1, E)
    figures = torch.empty(3, flat.shape[0], dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, E))
    for r0 in range(0, flat.shape[0], step):  # float64 copies of at most _CHUNK_ELEMENTS
        x = flat[r0:r0 + step].to(torch.float64)
        mean = x.mean(-1)
        busy = mean > 0
        safe_mean = mean.clamp_min(1e-300)
        figures[0, r0:r0 + step] = torch.where(busy, x.std(-1, correction=0) / safe_mean,
                                               torch.nan)
        figures[1, r0:r0 + step] = torch.where(busy, x.amax(-1) / safe_mean, torch.nan)
        figures[2, r0:r0 + step] = (x == 0).sum(-1) / E
    shape = load.shape[:-1]
    cv, peak, dead = (f.reshape(shape).float() for f in figures)
    return LoadBalance(cv, peak, dead)


# -------------------------------------------------------------------------------------------
# correlation with accuracy


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the last axis (inputs broadcast), float64 ``[...]``.

    ``r = sum (x − x̄)(y − ȳ) / sqrt(sum (x − x̄)² · sum (y − ȳ)²)``. A constant x or y (zero
    variance) or any NaN gives NaN. Needs at least 2 values.
    """
    where = "pearson"
    for name, t in (("x", x), ("y", y)):
        _check_real(_check_tensor(t, name, where), name, where, bool_ok=True)
    _check_broadcast(x, y, "x and y", where)
    x, y = torch.broadcast_tensors(x.to(torch.float64), y.to(torch.float64))
    if x.shape[-1] < 2:
        raise ValueError(f"{where}: needs at least 2 values on the last axis, got {x.shape[-1]}")
    dx = x - x.mean(-1, keepdim=True)
    dy = y - y.mean(-1, keepdim=True)
    den = ((dx * dx).sum(-1) * (dy * dy).sum(-1)).sqrt()
    # A constant row's deviations from its rounded mean need not be 0 (0.1 three times: 1e-17)
    constant = (x == x[..., :1]).all(-1) | (y == y[..., :1]).all(-1)
    return torch.where((den > 0) & ~constant, (dx * dy).sum(-1) / den.clamp_min(1e-300),
                       torch.nan)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks over the last axis; tied values share the mean of their ranks."""
    less = (x.unsqueeze(-2) < x.unsqueeze(-1)).sum(-1).to(torch.float64)
    equal = (x.unsqueeze(-2) == x.unsqueeze(-1)).sum(-1).to(torch.float64)
    return less + (equal + 1) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation over the last axis: Pearson of the average ranks (ties share
    their mean rank), float64 ``[...]``. NaN in a row gives NaN; constant x or y gives NaN."""
    where = "spearman"
    for name, t in (("x", x), ("y", y)):
        _check_real(_check_tensor(t, name, where), name, where, bool_ok=True)
    _check_broadcast(x, y, "x and y", where)
    x, y = torch.broadcast_tensors(x.to(torch.float64), y.to(torch.float64))
    r = pearson(_average_ranks(x), _average_ranks(y))
    has_nan = x.isnan().any(-1) | y.isnan().any(-1)
    return r.masked_fill(has_nan, torch.nan)


class DivergenceCorrelation(NamedTuple):
    """Result of ``divergence_accuracy_correlation``.

    languages: the languages correlated (in the divergence's order).
    layers: the middle layers averaged, as given.
    middle_divergence: ``{language: mean divergence over those layers}``.
    pearson, spearman: correlation of middle_divergence with accuracy across languages.
    pearson_per_layer, spearman_per_layer: ``[L]`` float64, the same correlation at each layer.
    """

    languages: Tuple[str, ...]
    layers: Tuple[int, ...]
    middle_divergence: Dict[str, float]
    pearson: float
    spearman: float
    pearson_per_layer: torch.Tensor
    spearman_per_layer: torch.Tensor


def divergence_accuracy_correlation(divergence: Mapping[str, torch.Tensor],
                                    accuracy: Mapping[str, float], layers,
                                    *, layer_indices: Optional[Sequence[int]] = None,
                                    layer_names: Optional[Sequence[str]] = None
                                    ) -> DivergenceCorrelation:
    """Correlation across languages of middle-layer divergence with accuracy (the paper's r).

    ``divergence``: ``{language: [L]}`` (``routing_divergence``); ``accuracy``: ``{language:
    accuracy}`` (e.g. Belebele). The languages in both are used (the reference, which has no
    divergence, drops out); at least 3 are needed. ``layers``: the middle layers, explicit (an
    int or an iterable of ints; there is no default) — positions along L, or layer keys when
    ``layer_names`` (``stats.layer_names``) or ``layer_indices`` (``stats.layer_indices``) say
    what each position is: decoder-layer indices and module paths, as everywhere
    (``layer_positions``; an index takes every pass of a loop layer; an index of two layers, an
    encoder's and a decoder's, needs ``layer_names`` to name one). Middle divergence = mean over
    those layers; its Pearson and Spearman correlation with accuracy are
    returned, and the per-layer correlations for every layer (the paper is unclear whether it
    correlates per layer or over the middle mean). The paper expects negative r (lower
    divergence, higher accuracy).
    """
    where = "divergence_accuracy_correlation"
    if not isinstance(divergence, Mapping) or not isinstance(accuracy, Mapping):
        raise TypeError(f"{where}: divergence and accuracy must be mappings keyed by language, "
                        f"got {type(divergence).__name__} and {type(accuracy).__name__}")
    languages = tuple(lang for lang in divergence if lang in accuracy)
    if len(languages) < 3:
        raise ValueError(f"{where}: needs at least 3 languages in both divergence "
                         f"({_short(divergence)}) and accuracy ({_short(accuracy)}), got "
                         f"{list(languages)}")
    curves = []
    for lang in languages:
        d = _check_tensor(divergence[lang], f"divergence[{lang!r}]", where)
        if d.dim() != 1:
            raise ValueError(f"{where}: divergence[{lang!r}] must be [L], got shape "
                             f"{tuple(d.shape)}")
        curves.append(d.to(torch.float64))
    L = curves[0].shape[0]
    if any(d.shape[0] != L for d in curves):
        raise ValueError(f"{where}: divergence curves differ in length: "
                         f"{sorted({d.shape[0] for d in curves})}")
    D = torch.stack(curves)                                          # [Λ, L]
    acc = []
    for lang in languages:
        a = accuracy[lang]
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise ValueError(f"{where}: accuracy[{lang!r}]={a!r} must be a finite number")
        acc.append(float(a))
    acc_t = torch.tensor(acc, dtype=torch.float64)
    if is_int(layers):
        layer_list = [layers]
    elif isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{where}: layers must be the middle layers, an int or an iterable of "
                        f"ints (e.g. range(8, 16)), got {layers!r}")
    else:
        layer_list = list(layers)
    if not layer_list:
        raise ValueError(f"{where}: layers must name at least one layer, got {layers!r}")
    if layer_indices is None and layer_names is None:
        if len(set(layer_list)) != len(layer_list):
            raise ValueError(f"{where}: layers={layer_list} has duplicates")
        bad = [p for p in layer_list if not is_int(p) or not 0 <= p < L]
        if bad:
            raise ValueError(f"{where}: layers are positions along L={L} (neither layer_names "
                             f"nor layer_indices given), got out-of-range {bad}")
        positions = [int(p) for p in layer_list]
    else:
        for arg, given in (("layer_names", layer_names), ("layer_indices", layer_indices)):
            if given is not None and len(given) != L:
                raise ValueError(f"{where}: {arg} must give one entry per layer (L={L}), got "
                                 f"{len(given)}")
        if layer_names is None:  # which positions are one layer's passes only names tell
            for key in layer_list:
                shared = [p for p, i in enumerate(layer_indices) if i == key]
                if len(shared) > 1:
                    raise ValueError(f"{where}: layer_indices gives layer {key} to positions "
                                     f"{shared} (a loop layer's passes, or an encoder's and a "
                                     f"decoder's layer); pass layer_names=stats.layer_names")
        names = list(layer_names) if layer_names is not None else [f"#{p}" for p in range(L)]
        positions = layer_positions(names, layer_list, where, indices=layer_indices)
    middle = D[:, positions].mean(1)
    if bool(middle.isnan().any()):
        nan_langs = [lang for lang, v in zip(languages, middle.tolist()) if math.isnan(v)]
        raise ValueError(f"{where}: middle-layer divergence is NaN for {nan_langs} (no parallel "
                         f"pair with tokens)")
    return DivergenceCorrelation(
        languages=languages, layers=tuple(layer_list),
        middle_divergence={lang: float(v) for lang, v in zip(languages, middle.tolist())},
        pearson=float(pearson(middle, acc_t)), spearman=float(spearman(middle, acc_t)),
        pearson_per_layer=pearson(D.T, acc_t), spearman_per_layer=spearman(D.T, acc_t))


# -------------------------------------------------------------------------------------------
# token / vocabulary specialisation (from traces)


@dataclass(frozen=True, eq=False)
class TokenRouting:
    """Which token ids went to which expert in one layer.

    token_ids [U] int64: the distinct token ids seen, ascending.
    counts [E, U] int64: occurrences of ``token_ids[u]`` whose top-k held expert e.
    occurrences [U] int64: occurrences of each token id (each occurrence adds k to a column).
    top_k: k.
    """

    token_ids: torch.Tensor
    counts: torch.Tensor
    occurrences: torch.Tensor
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def expert_token_counts(ids: torch.Tensor, token_ids: torch.Tensor, num_experts: int, *,
                        mask: Optional[torch.Tensor] = None) -> TokenRouting:
    """Count, for every expert, the token ids routed to it (one layer).

    ``ids [N, k]``: per-token expert ids (a trace's ``"ids"``); ``token_ids [N]``: the token id of
    each row (a trace's ``"tokens"``); ``mask [N]`` bool keeps rows (default all).
    ``num_experts``: E, an int in [1, 2**20]. Memory ``E × U`` int64 for U distinct token ids.
    """
    where = "expert_token_counts"
    ids = _check_ids(ids, where)
    N, k = ids.shape
    _check_tensor(token_ids, "token_ids", where)
    if token_ids.dtype not in (torch.int32, torch.int64) or tuple(token_ids.shape) != (N,):
        raise ValueError(f"{where}: token_ids must be int32/int64 of shape [{N}] (one per ids "
                         f"row), got {token_ids.dtype} of shape {tuple(token_ids.shape)}")
    num_experts = check_int(where, "num_experts", num_experts, 1, MAX_EXPERTS)
    if N and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"{where}: ids must be in [0, num_experts={num_experts}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or tuple(mask.shape) != (N,):
            raise ValueError(f"{where}: mask must be a bool tensor of shape [{N}], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} of shape "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        ids, token_ids = ids[mask], token_ids[mask]
    vocab, column = torch.unique(token_ids.to(torch.int64), return_inverse=True)
    U = vocab.numel()
    flat = (ids * U + column.unsqueeze(1)).reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts * U).view(num_experts, U)
    occurrences = torch.bincount(column, minlength=U)
    return TokenRouting(vocab, counts, occurrences, int(k))


def trace_token_routing(trace: Mapping, token_ids: Optional[torch.Tensor] = None,
                        num_experts: Optional[int] = None, *,
                        skip_ungrouped: bool = True) -> Dict[str, TokenRouting]:
    """``expert_token_counts`` for every layer of a recorder trace, ``{layer name: TokenRouting}``.

    ``trace``: ``rec.trace`` or ``load_trace(path)``. ``token_ids [N]`` (aligned with every
    layer's rows) and ``num_experts`` default to each layer's ``"tokens"`` and ``"experts"``
    (traces saved before moe_route recorded them need both given). ``skip_ungrouped`` leaves out
    rows whose group is None (padding, ignored or masked tokens); rows of unknown token id (-1: a
    call given ``inputs_embeds``) are left out too.
    """
    where = "trace_token_routing"
    if not isinstance(trace, Mapping):
        raise TypeError(f"{where}: trace must be a mapping {{layer: {{'ids', 'group', ...}}}} "
                        f"(rec.trace), got {type(trace).__name__}")
    out = {}
    for name, layer in trace.items():
        if not isinstance(layer, Mapping) or "ids" not in layer:
            raise ValueError(f"{where}: trace[{name!r}] must hold 'ids'")
        tokens = token_ids if token_ids is not None else layer.get("tokens")
        experts = num_experts if num_experts is not None else layer.get("experts")
        for arg, value, key in (("token_ids", tokens, "tokens"), ("num_experts", experts,
                                                                  "experts")):
            if value is None:
                raise ValueError(f"{where}: trace[{name!r}] holds no {key!r} (a trace saved "
                                 f"before moe_route recorded them); pass {arg}")
        keep = []
        if skip_ungrouped and layer.get("group") is not None:
            keep.append(torch.tensor([g is not None for g in layer["group"]], dtype=torch.bool))
        if isinstance(tokens, torch.Tensor) and bool((tokens < 0).any()):
            keep.append(tokens >= 0)
        mask = keep[0] if len(keep) == 1 else None
        if len(keep) == 2 and keep[0].shape == keep[1].shape:
            mask = keep[0] & keep[1]    # else expert_token_counts names the shapes
        try:
            out[name] = expert_token_counts(layer["ids"], tokens, experts, mask=mask)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: layer {name!r}: {exc}") from None
    return out


def expert_token_entropy(routing: TokenRouting, normalised: bool = False) -> torch.Tensor:
    """Entropy of each expert's token-id distribution, ``[E]`` float32, nats.

    ``H_e = −sum_u p(u|e) log p(u|e)``, ``p(u|e) = counts[e, u] / sum_u counts[e, u]``: low for an
    expert that sees few distinct tokens (vocabulary-specialised). ``normalised`` divides by
    ``log U`` (U distinct tokens; defined as 0 for U = 1). Experts that saw no token are NaN.
    """
    if not isinstance(routing, TokenRouting):
        raise TypeError(f"expert_token_entropy: routing must be a TokenRouting, got "
                        f"{type(routing).__name__}")
    p = _renormalised(routing.counts)
    h = _entropy64(p)
    if normalised:
        U = routing.counts.shape[1]
        h = h / math.log(U) if U > 1 else torch.where(h.isnan(), h, torch.zeros_like(h))
    return h.float()


def token_specialisation(routing: TokenRouting) -> torch.Tensor:
    """Per token id, the share of its occurrences routed to its most frequent expert, ``[U]``.

    ``s_u = max_e counts[e, u] / occurrences[u]`` (OLMoE §5's vocabulary specialisation): 1 when
    every occurrence of the token has one expert in common; random routing gives about k/E.
    Float32; tokens never seen do not appear (U counts seen tokens only).
    """
    if not isinstance(routing, TokenRouting):
        raise TypeError(f"token_specialisation: routing must be a TokenRouting, got "
                        f"{type(routing).__name__}")
    occ = routing.occurrences.to(torch.float64)
    if routing.counts.shape[1] == 0:
        return torch.zeros(0)
    return (routing.counts.amax(0).to(torch.float64) / occ.clamp_min(1)).float()


def expert_top_tokens(routing: TokenRouting, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` token ids each expert saw most often: ``(token_ids [E, n], counts [E, n])``,
    most frequent first, ties to the lower token id; ``n`` is capped at U."""
    if not isinstance(routing, TokenRouting):
        raise TypeError(f"expert_top_tokens: routing must be a TokenRouting, got "
                        f"{type(routing).__name__}")
    n = min(check_int("expert_top_tokens", "n", n, 1), routing.counts.shape[1])
    values, order = torch.sort(routing.counts, dim=1, descending=True, stable=True)
    return routing.token_ids[order[:, :n]], values[:, :n]
