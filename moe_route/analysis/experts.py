"""Δ-experts: experts more active on some data than on a baseline (the paper's Eq. 3), and the
``SteeringPlan`` that steers them (Eq. 4/5).

Identification uses discrete top-k counts, not weights, as the paper does ("to lock onto the most
frequently selected experts"):

    f_i[l, e] = a_i[l, e] / L_i          share of sequence i's tokens whose top-k holds e
    F[l, e]   = mean_i f_i[l, e]          over the dataset's sequences (groups), a macro average
    Δ[l, e]   = F_task[l, e] − F_baseline[l, e]            (baseline: English FLORES)
    task experts of layer l     = {e : Δ_task[l, e] > τ}   (τ ≈ 0.25–0.5 in the paper)
    language experts of layer l = {e : Δ_lang[l, e] > τ for any language other than the
                                   reference},  Δ_lang = F_lang − F_reference (FLORES in each
                                   language against English FLORES)

**Precision.** Frequencies and Δ are float64, computed from the integer counts, so the strict
``Δ > τ`` test decides as a float64 computation by hand would (5/10 − 2/10 > 0.3 is False there;
in float32 it was True).

**Layer keys.** Results are ``{layer key: [experts]}`` with the key of every layer of the
statistics: its decoder-layer index (``12`` for ``model.layers.12.mlp.gate``,
``RoutingStats.layer_indices``), which is also what ``SteeringPlan`` int keys mean — 0-based.
When the layers lack distinct indices, every key is the router's module path instead (a loop
layer's passes are ``"<path>@pass<p>"``: Inkling2-Loop); an int in a ``layers`` option still
keeps the keys of its decoder layer. Plain ``[L, E]`` tensors get positions 0..L-1 unless
``layer_keys`` is given (positions equal decoder indices only when every decoder layer is an MoE
layer).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Dict, List, Optional, Sequence, Union

import torch

from moe_route._checks import check_bool, check_int
from moe_route.analysis.metrics import (_check_stats, _layer_chunks, _one_device,
                                        _resolve_parallel, _stack_layers)
from moe_route.hf.patch import layer_index, names_layer
from moe_route.stats import RoutingStats
from moe_route.steering import SteerEntry, SteeringPlan

__all__ = ["layer_keys", "mean_activation_frequency", "delta_frequency", "experts_above",
           "task_experts", "language_frequency", "language_delta", "language_experts",
           "expert_overlap", "plan_from_experts"]

LayerKey = Union[int, str]
MODES = ("soft", "hard")
AGAINST = ("reference", "others")


def layer_keys(stats: RoutingStats) -> List[LayerKey]:
    """The key of each layer of ``stats``: decoder-layer indices when every layer has a distinct
    one, else module paths (module docstring)."""
    if not isinstance(stats, RoutingStats):
        raise TypeError(f"layer_keys: stats must be a RoutingStats, got {type(stats).__name__}")
    indices = stats.layer_indices
    if all(i is not None for i in indices) and len(set(indices)) == len(indices):
        return list(indices)
    return stats.layer_names


def mean_activation_frequency(source) -> torch.Tensor:
    """``F[l, e] = mean over groups g of counts[l, g, e] / tokens[l, g]``, ``[L, E]`` float64.

    ``source``: a RoutingStats whose groups are the dataset's sequences, or per-group
    frequencies ``[L, G, E]`` (``activation_frequency``, float32: F then carries its rounding).
    Zero-token groups (NaN) are skipped;
    a layer with none left is NaN. Each sequence weighs the same whatever its length (the paper's
    mean of a_i/L_i); for a token-weighted frequency record one group for the whole dataset.
    """
    where = "mean_activation_frequency"
    if isinstance(source, RoutingStats):
        if len(source) == 0:
            raise ValueError(f"{where}: source has no layers")
        return _frequency64(source, where)
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"{where}: source must be a RoutingStats or a [L, G, E] tensor, got "
                        f"{type(source).__name__}")
    if source.dim() != 3:
        raise ValueError(f"{where}: source must be [L, G, E] per-group frequencies, got shape "
                         f"{tuple(source.shape)}")
    return source.double().nanmean(1)


def _frequency64(stats: RoutingStats, where: str) -> torch.Tensor:
    """``mean_activation_frequency`` of statistics: counts / tokens per group in float64, a chunk
    of layers at a time."""
    _check_stats(stats, where)
    L, G, E = len(stats), stats.num_groups, stats.num_experts
    out = torch.empty(L, E, dtype=torch.float64, device=_one_device(stats, where))
    for l0, l1 in _layer_chunks(L, G * E * 2):
        tokens = _stack_layers(stats, "tokens", l0, l1).double().unsqueeze(-1)
        freq = _stack_layers(stats, "counts", l0, l1).double() / tokens
        out[l0:l1] = freq.masked_fill_(tokens == 0, torch.nan).nanmean(1)
    return out


def _frequency_and_keys(source, name: str, where: str):
    if isinstance(source, RoutingStats):
        if len(source) == 0:
            raise ValueError(f"{where}: {name} has no layers")
        return mean_activation_frequency(source), source
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"{where}: {name} as a tensor must be F [L, E] (mean activation "
                             f"frequency), got shape {tuple(source.shape)}")
        return source.double(), None
    raise TypeError(f"{where}: {name} must be a RoutingStats or an [L, E] tensor, got "
                    f"{type(source).__name__}")


def delta_frequency(task, baseline) -> torch.Tensor:
    """``Δ = F_task − F_baseline``, ``[L, E]`` float64 (module docstring).

    ``task``, ``baseline``: RoutingStats of the same model (one group per sequence; layers must
    match by name) or mean activation frequencies ``[L, E]``.
    """
    where = "delta_frequency"
    f_task, s_task = _frequency_and_keys(task, "task", where)
    f_base, s_base = _frequency_and_keys(baseline, "baseline", where)
    if s_task is not None and s_base is not None and s_task.layer_names != s_base.layer_names:
        raise ValueError(f"{where}: task and baseline must have the same layers; task has "
                         f"{s_task.layer_names[:3]}..., baseline {s_base.layer_names[:3]}...")
    if f_task.shape != f_base.shape:
        raise ValueError(f"{where}: task F has shape {tuple(f_task.shape)}, baseline F "
                         f"{tuple(f_base.shape)}; they must match [L, E]")
    return f_task - f_base


def _check_tau(tau, where: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau):
        raise ValueError(f"{where}: tau={tau!r} must be a finite number")
    return float(tau)


def _resolve_keys(delta: torch.Tensor, keys, where: str) -> List[LayerKey]:
    L = delta.shape[0]
    if keys is None:
        return list(range(L))
    keys = list(keys)
    if len(keys) != L:
        raise ValueError(f"{where}: layer_keys must give one key per layer (L={L}), got "
                         f"{len(keys)}")
    if len(set(keys)) != L:
        raise ValueError(f"{where}: layer_keys must be distinct, got {keys}")
    return keys


def _layer_filter(keys: List[LayerKey], layers, where: str,
                  of: str = "a layer of the statistics") -> List[LayerKey]:
    """The keys kept by ``layers`` (None: all), which names layers as everywhere: an int, a
    decoder-layer index, keeps the key of that layer (every pass of a loop layer, whose keys are
    names); a str, a router's or MoE block's module path (or a pass's name), keeps the key of
    that router, whether the keys are indices or names. Keys in ``layers`` that are not layers
    here are ignored (a decoder-index range may cover dense layers); none matching (of some keys)
    raises."""
    if layers is None:
        return keys
    if isinstance(layers, (str, int)) or not isinstance(layers, Iterable):
        raise TypeError(f"{where}: layers must be an iterable of layer keys (range, list), got "
                        f"{layers!r}")
    wanted = set(layers)

    def kept(key: LayerKey) -> bool:   # an int key is a layer known by its index only
        name, index = (key, layer_index(key)) if isinstance(key, str) else (None, key)
        return any(names_layer(w, name, index) for w in wanted)

    out = [key for key in keys if kept(key)]
    if not out and wanted and keys:
        raise ValueError(f"{where}: none of layers={sorted(wanted, key=str)[:8]} is {of} (keys "
                         f"{keys[:8]}{'...' if len(keys) > 8 else ''}); int keys are 0-based "
                         f"decoder-layer indices, str keys module paths")
    return out


def experts_above(delta: torch.Tensor, tau: float, layer_keys: Optional[Sequence] = None, *,
                  layers=None) -> Dict[LayerKey, List[int]]:
    """``{layer key: [e : delta[l, e] > tau]}`` for every layer (empty lists included).

    Strictly greater than ``tau``; NaN never passes. Each list is ordered by Δ, largest first
    (ties to the lower expert index), so ``plan_from_experts(max_per_layer=m)`` keeps the m
    strongest. ``delta [L, E]``; ``layer_keys`` name its rows (default 0..L-1); ``layers``
    restricts the result to those keys (e.g. the paper's middle layers).
    """
    where = "experts_above"
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"{where}: delta must be an [L, E] tensor, got {type(delta).__name__}")
    if delta.dim() != 2:
        raise ValueError(f"{where}: delta must be an [L, E] tensor, got shape "
                         f"{tuple(delta.shape)}")
    tau = _check_tau(tau, where)
    keys = _resolve_keys(delta, layer_keys, where)
    kept = set(_layer_filter(keys, layers, where))
    d = delta.to(torch.float64)
    above = d > tau
    order = torch.sort(d.nan_to_num(nan=-math.inf), dim=-1, descending=True, stable=True).indices
    keep = above.gather(-1, order)
    return {key: order[l][keep[l]].tolist() for l, key in enumerate(keys) if key in kept}


def task_experts(task, baseline, tau: float, *, layers=None) -> Dict[LayerKey, List[int]]:
    """The paper's task experts ``A+_l = {e : F_task[l, e] − F_baseline[l, e] > tau}``.

    ``task``: statistics of the task data (GSM8K-Instruct for math), one group per sequence;
    ``baseline``: of the baseline data (English FLORES); or ``[L, E]`` frequencies. Layer keys
    from ``task`` when it is a RoutingStats. See ``experts_above`` for order and ``layers``.
    """
    delta = delta_frequency(task, baseline)
    keys = layer_keys(task) if isinstance(task, RoutingStats) else None
    return experts_above(delta, tau, keys, layers=layers)


def language_frequency(stats: RoutingStats, *, parallel=None) -> Dict[str, torch.Tensor]:
    """Mean activation frequency of each language, ``{language: F [L, E]}`` float64.

    ``F_lang[l, e]`` = mean over the language's sequences of a/L (zero-token sequences skipped).
    ``parallel``: None parses ``"language/sequence"`` group names (or, when no name has a '/',
    treats each group as a language); a ParallelGroups or ``{group: (language, sequence)}``.
    """
    where = "language_frequency"
    if not isinstance(stats, RoutingStats):
        raise TypeError(f"{where}: stats must be a RoutingStats, got {type(stats).__name__}")
    parallel = _resolve_parallel(stats.group_names, parallel, where)
    rows = parallel.rows
    missing = (rows < 0)[None, :, :, None]
    L, G, E = len(stats), stats.num_groups, stats.num_experts
    per_lang = torch.empty(len(parallel.languages), L, E, dtype=torch.float64)
    for l0, l1 in _layer_chunks(L, max(G, rows.numel()) * E * 2):
        tokens = _stack_layers(stats, "tokens", l0, l1).double().unsqueeze(-1)
        freq = torch.where(tokens > 0, _stack_layers(stats, "counts", l0, l1) / tokens,
                           torch.nan)                                       # [c, G, E]
        gathered = freq[:, rows.clamp_min(0).to(freq.device)]              # [c, Λ, N, E]
        per_lang[:, l0:l1] = gathered.masked_fill_(missing.to(freq.device), torch.nan) \
            .nanmean(2).transpose(0, 1).cpu()
    return {lang: per_lang[i] for i, lang in enumerate(parallel.languages)}


def language_delta(stats: RoutingStats, reference: str, *, parallel=None,
                   against: str = "reference") -> Dict[str, torch.Tensor]:
    """Δ of each language, ``{language: [L, E]}`` float64, every language but ``reference``.

    ``against="reference"`` (the paper's): ``Δ_lang = F_lang − F_reference`` (FLORES in the
    language against English FLORES). ``against="others"``: ``Δ_lang = F_lang − mean of F over
    every other language`` (reference included), which finds experts peculiar to one language
    rather than experts non-English text uses more. Groups as in ``language_frequency``.

    A language with no tokens in a layer has NaN frequencies there (``language_frequency``): its
    own Δ is NaN in that layer, and under ``"others"`` the mean is over the other languages that
    have tokens in it (NaN when none has), so one empty language does not blank every Δ.
    """
    where = "language_delta"
    if against not in AGAINST:
        raise ValueError(f"{where}: against={against!r} must be one of {AGAINST}")
    freq = language_frequency(stats, parallel=parallel)
    if reference not in freq:
        raise ValueError(f"{where}: reference={reference!r} is not among the languages "
                         f"{list(freq)[:8]}")
    if len(freq) < 2:
        raise ValueError(f"{where}: needs at least 2 languages, got {list(freq)}")
    if against == "reference":
        return {lang: f - freq[reference] for lang, f in freq.items() if lang != reference}
    f_all = torch.stack(list(freq.values()))                       # [Λ, L, E]
    present = ~f_all.isnan()
    total, n_present = f_all.nan_to_num(0.0).sum(0), present.sum(0)
    deltas = {}
    for i, (lang, f) in enumerate(freq.items()):
        if lang == reference:
            continue
        others = (total - f_all[i].nan_to_num(0.0)) / (n_present - present[i].long())  # 0/0: NaN
        deltas[lang] = f_all[i] - others
    return deltas


def language_experts(stats: RoutingStats, tau: float, reference: str, *, parallel=None,
                     against: str = "reference", layers=None) -> Dict[LayerKey, List[int]]:
    """The paper's multilingual experts: ``{e : Δ_lang[l, e] > tau for any language}``.

    Δ_lang from ``language_delta`` (every language but ``reference``). Each layer's list is ordered
    by the largest Δ over languages (ties to the lower expert index); ``layers`` as in
    ``experts_above``. The paper reports no expert both task- and language-specific at tau >= 0.3
    (``expert_overlap``).
    """
    _check_tau(tau, "language_experts")
    deltas = language_delta(stats, reference, parallel=parallel, against=against)
    best = torch.stack(list(deltas.values())).nan_to_num(nan=-math.inf).amax(0)  # [L, E]
    return experts_above(best, tau, layer_keys(stats), layers=layers)


def _expert_ids(experts, label: str, where: str) -> list:
    """One layer's experts as a list; TypeError naming ``label`` for a str or a non-iterable."""
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Iterable):
        raise TypeError(f"{where}: {label} must be an iterable of expert ids, got "
                        f"{experts!r} ({type(experts).__name__})")
    return list(experts)


def expert_overlap(a: Mapping, b: Mapping) -> Dict[LayerKey, List[int]]:
    """``{layer: sorted experts in both a[layer] and b[layer]}`` for the layers of both mappings
    (e.g. task experts and language experts; the paper's modularity finding)."""
    where = "expert_overlap"
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, Mapping):
            raise TypeError(f"{where}: {name} must be a mapping {{layer: [experts]}}, got "
                            f"{type(m).__name__}")
    return {layer: sorted(set(_expert_ids(a[layer], f"a[{layer!r}]", where))
                          & set(_expert_ids(b[layer], f"b[{layer!r}]", where)))
            for layer in a if layer in b}


def plan_from_experts(experts_by_layer: Mapping, mode: str = "soft", lam: float = 0.5,
                      layers=None, max_per_layer: Optional[int] = None, *,
                      std_unbiased: bool = False) -> SteeringPlan:
    """A ``SteeringPlan`` that promotes the given experts in every token (the paper's Eq. 4/5).

    ``experts_by_layer``: ``{layer key: [experts]}`` (``task_experts`` and friends); int keys are
    0-based decoder-layer indices as in ``model.layers.N`` (what ``RoutingStats.layer_indices``
    and ``SteeringPlan`` use), str keys router module paths. The paper's layer ranges are
    one-indexed per the author notebook (``TARGET_LAYERS = range(8, 35)  # one-indexed`` for
    Qwen3, i.e. 1-based layers 8..34), which is ``layers=range(7, 34)`` here; the exact
    convention is not settled (research note §1.7), so state the range you use.

    mode="soft": ``SteerEntry(std=lam)`` — ``z_e += lam · std(z_t)``, the token's population std
    over the E logits (λ = 0.5 in the paper; λ < 0 demotes); ``std_unbiased`` takes the sample
    std instead (``SteerEntry.std_unbiased``: the paper does not say which; EasySteer's
    implementation uses the sample std).
    mode="hard": ``SteerEntry(force=+1)`` — ``z_e = max(z_t) + ε``, forced into the top-k; ``lam``
    is ignored. More than top_k forced experts in a layer tie at the max, and each token takes
    the k the router ranks first (by selection bias and group, then the lowest-numbered; the
    paper's ε draws among them per token; ``steer`` warns): cap with ``max_per_layer <= k`` (the
    largest Δ first) or raise τ. A group-limited router (DeepSeek-V3) keeps ``topk_group``
    groups per token: forced experts in more groups than that are not all taken (``steer``
    warns).

    ``layers``: keep only these layer keys (a range or list; None = every key of
    ``experts_by_layer``). ``max_per_layer``: keep the first m experts of each list (lists from
    ``experts_above`` are ordered by Δ, largest first). Duplicates are dropped; layers left with no
    expert are not in the plan.
    """
    where = "plan_from_experts"
    if not isinstance(experts_by_layer, Mapping):
        raise TypeError(f"{where}: experts_by_layer must be a mapping {{layer: [experts]}}, got "
                        f"{type(experts_by_layer).__name__}")
    if mode not in MODES:
        raise ValueError(f"{where}: mode={mode!r} must be one of {MODES}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"{where}: lam={lam!r} must be a finite number")
    max_per_layer = check_int(where, "max_per_layer", max_per_layer, 1, none="no limit")
    keys = list(experts_by_layer)
    keys = _layer_filter(keys, layers, where, "a key of experts_by_layer")
    check_bool(where, "std_unbiased", std_unbiased)
    if std_unbiased and mode != "soft":
        raise ValueError(f"{where}: std_unbiased=True applies to mode='soft' (the std-scaled "
                         f"bias), got mode={mode!r}")
    entry = (SteerEntry(std=float(lam), std_unbiased=std_unbiased) if mode == "soft"
             else SteerEntry(force=1))
    data = {}
    for key in keys:
        experts = _expert_ids(experts_by_layer[key], f"experts_by_layer[{key!r}]", where)
        chosen = list(dict.fromkeys(experts))  # drop duplicates, keep order
        if max_per_layer is not None:
            chosen = chosen[:max_per_layer]
        data[key] = {e: entry for e in chosen}
    return SteeringPlan(data)
