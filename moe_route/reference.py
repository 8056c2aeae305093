"""Pure-PyTorch reference of every moe_route op: the specification.

The C++ and CUDA kernels must agree with these functions: identical expert ids, weights and float
statistics within fp32 rounding, identical integer statistics. Tests compare against them and the
benchmarks time them. They favour clarity over speed.

Numerics of ``topk_gate`` (shared by every backend)
---------------------------------------------------
* Logits of any float dtype are read as fp32; all arithmetic is fp32.
* **Non-finite values.** Every logit is *sanitised* on load: NaN -> -FLT_MAX, +inf -> FLT_MAX,
  -inf -> -FLT_MAX. The steered logits, the selection bias and the selection values are sanitised
  the same way, so everything downstream is finite: a NaN or -inf expert ranks last (ties with other
  such experts go to the lower index); under softmax a row of only NaN routes uniformly and
  several +inf experts share the mass equally.
* **Steering** (``steer`` is a ``[4, E]`` fp32 table: rows add, std, abs, force) is applied to the
  sanitised logits ``z0`` before scoring and selection::

      z = z0 + add + std * sd(z0) + abs * |z0|        (the std term only where std != 0)

  with ``sd`` the population standard deviation over the E logits (``std_unbiased=True``: divide by
  E - 1; E = 1 gives 0), computed in fp32. Where that overflows (logits near +-FLT_MAX), the
  result depends on the order of the additions (inf or NaN), so ``sd`` is then +inf on every
  backend. ``z`` is sanitised, then forcing: ``force > 0`` sets ``z_e = max(z)``,
  ``force < 0`` sets ``z_e = min(z)``. Instead of the paper's random epsilon, forcing is a *rank
  tier*: forced-on experts are selected before all others and forced-off experts after all others
  (their groups too), so forcing works deterministically also under selection biases and groups.
  A group-limited router still keeps ``topk_group`` groups, the forced experts' first: forced
  experts spread over more groups than that are not all selected.
* **Selection values** ``v``: ``select_on="logits"``: ``z + bias``; ``select_on="scores"``:
  ``score(z) + bias`` where score is softmax over E, sigmoid, sqrt(softplus) or none (identity).
  Elementwise scores are computed as the kernels do (``selection_score``), so equal logits score
  equally wherever they stand in a row.
  Softmax without a bias selects on ``z`` itself (the same order, and free of exp rounding),
  except with ``top2_sum`` groups, whose sums need probabilities.
* **Rounded scores** (``round_scores``, for routers that score in their logits' half precision:
  PyTorch ops on fp16/bf16 logits round each result to that dtype). With half-precision logits,
  the scores the selection ranks are rounded as such a router's ops round them:
  ``r(sigmoid(z))``, ``r(sqrt(r(softplus(z))))`` (two ops), ``r(softmax(z))``, ``r(z)`` for
  "none", with ``r`` round-to-nearest-even to the logits' dtype; the selection bias is then added
  in fp32. Without a bias, a ``top2_sum`` group score is ``r(a + b)`` (a half-precision sum).
  Softmax then ranks the rounded probabilities (which tie where logits do not), not the logits.
  fp32 logits and ``select_on="logits"`` are unaffected, and weights and statistics always use
  fp32 scores.
* **Groups** (``n_group > 1``): the E experts form n_group contiguous groups; a group's score is
  the max (``"max"``, DeepSeek-V2) or the sum of its two largest values (``"top2_sum"``,
  DeepSeek-V3) of ``v``; the ``topk_group`` best groups stay eligible (a group holding a forced-on
  expert first, then by score, ties to the lower group index).
* **Order and ties.** Among eligible experts the k best by (tier, v) are returned in descending
  order; equal keys go to the lower expert index. -0.0 equals +0.0.
* **Replay** (``replay`` ``[T, k]`` int32/int64, router replay): a row of k distinct ids in
  [0, E) *is* that token's selection, in the given order (selection values, groups and forcing
  are not consulted); a row of -1 selects as above. Weights and statistics are computed for the
  replayed ids exactly as for selected ones. Any other row is an error where the values can be
  read without a device sync (CPU tensors); the CUDA kernel selects such a row as usual.
* **Weights** come from ``zw = z0`` if ``steer_select_only`` else ``z``: ``select_on="scores"``:
  ``score(zw)[ids]`` (softmax over all E); ``select_on="logits"``: softmax over the k selected
  ``zw`` (score softmax) or the elementwise score of them. The bias never enters the weights.
  ``renormalize``: ``w / (sum(w) + renorm_eps)`` (left as is when that sum is 0); then ``* scale``.
* **Statistics** per group g (``groups[t]``; -1 skips the token; no ``groups``: all in group 0):
  ``tokens[g] += 1``; ``counts[g, ids] += 1``; ``weight_sum[g, ids] += w``; ``prob_sum[g] += q``
  and ``entropy_sum[g] += H(q)`` (natural log, 0 log 0 = 0), where q is the dense routing
  distribution of ``zw``: softmax over E for softmax/none scores, ``s / sum(s)`` for
  sigmoid/sqrtsoftplus (uniform if that sum is 0); ``coact[a, b] += 1`` for every ordered pair of
  the token's ids, diagonal included (so ``coact.diag() == counts.sum(0)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLT_MAX = torch.finfo(torch.float32).max
# The most experts a num_experts argument may name: more than any router has (PEER's product
# keys give 1024² = 2**20). A larger value is a mistake, and the [num_experts]-sized tables built
# from it would not fit in memory (the allocator's error would not say which argument was wrong).
MAX_EXPERTS = 1 << 20
# The largest block a dispatch plan pads experts to: far past any GEMM tile. A plan holds
# num_experts * (block_size - 1) rows of padding, so a larger one is a mistake of the same kind.
MAX_BLOCK_SIZE = 1 << 16

SCORES = ("softmax", "sigmoid", "sqrtsoftplus", "none")
SELECT_ON = ("scores", "logits")
GROUP_SCORES = ("max", "top2_sum")
STEER_ROWS = ("add", "std", "abs", "force")

TIER_FORCED_ON, TIER_NORMAL, TIER_FORCED_OFF, TIER_INELIGIBLE = 2, 1, 0, -1


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -FLT_MAX, +inf -> FLT_MAX, -inf -> -FLT_MAX, as fp32."""
    return torch.nan_to_num(x.float(), nan=-FLT_MAX, posinf=FLT_MAX, neginf=-FLT_MAX)


def steer_logits(z0: torch.Tensor, steer: torch.Tensor | None, std_unbiased: bool = False):
    """Steered logits ``z`` and the rank tier of every expert (see the module docstring)."""
    tier = torch.full_like(z0, TIER_NORMAL, dtype=torch.int8)
    if steer is None:
        return z0, tier
    add, lam, mul, force = steer.float()
    E = z0.shape[-1]
    mean = z0.sum(-1, keepdim=True) / E
    var = ((z0 - mean) ** 2).sum(-1, keepdim=True)
    if std_unbiased:
        sd = (var / (E - 1)).sqrt() if E > 1 else torch.zeros_like(var)
    else:
        sd = (var / E).sqrt()
    sd = torch.where(torch.isnan(sd), float("inf"), sd)  # overflow: inf or NaN by summation order
    std_term = torch.where(lam != 0, lam * sd, torch.zeros_like(z0))
    z = sanitize(z0 + add + std_term + mul * z0.abs())
    top = z.max(-1, keepdim=True).values
    bottom = z.min(-1, keepdim=True).values
    z = torch.where(force > 0, top, torch.where(force < 0, bottom, z))
    tier = torch.where(force > 0, TIER_FORCED_ON,
                       torch.where(force < 0, TIER_FORCED_OFF, TIER_NORMAL))
    return z, tier.to(torch.int8).expand_as(z)


def score_fn(z: torch.Tensor, score: str) -> torch.Tensor:
    """The model's score function over the last dim (softmax) or elementwise."""
    if score == "softmax":
        return torch.softmax(z, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(z)
    if score == "sqrtsoftplus":
        return F.softplus(z).sqrt()
    return z


def selection_score(z: torch.Tensor, score: str) -> torch.Tensor:
    """``score_fn`` for ranking: the kernels' fp32 formulas, 1 / (1 + exp(-z)) and
    sqrt(z > 20 ? z : log1p(exp(z))). torch's own sigmoid and softplus can round one element of a
    row differently from an equal one elsewhere in it, which would break the tie rule; these
    compositions do not. No gradient is taken through them (exp overflows where they saturate)."""
    if score == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-z))
    if score == "sqrtsoftplus":
        return torch.where(z > 20, z, torch.log1p(torch.exp(z))).sqrt()
    return score_fn(z, score)


def dense_distribution(zw: torch.Tensor, score: str) -> torch.Tensor:
    """Routing distribution over all E experts used by ``prob_sum`` and ``entropy_sum``."""
    if score in ("sigmoid", "sqrtsoftplus"):
        s = score_fn(zw, score)
        total = s.sum(-1, keepdim=True)
        uniform = torch.full_like(s, 1.0 / s.shape[-1])
        return torch.where(total > 0, s / total, uniform)
    return torch.softmax(zw, dim=-1)


def selects_on_logits(score, select_on, has_bias, n_group, group_score, rounds=False):
    """Whether selection values are the steered logits themselves. Softmax without a bias ranks
    experts exactly like its logits, except that a top2_sum group score adds probabilities and
    that rounded probabilities tie where the logits do not."""
    return select_on == "logits" or (score == "softmax" and not has_bias and not rounds and
                                     (n_group == 1 or group_score == "max"))


def round_to(x: torch.Tensor, dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (nearest even) and back to fp32, as a PyTorch op in that dtype
    rounds its result; ``dtype=None`` leaves it. Beyond the dtype's range it is sanitised to
    +-FLT_MAX (fp16 overflows at 65520)."""
    return x if dtype is None else sanitize(x.to(dtype))


def selection_values(z, score, select_on, selection_bias, n_group=1, group_score="max",
                     round_dtype=None):
    """``round_dtype``: the half-precision dtype the router scores in (``round_scores``), or
    None."""
    if selects_on_logits(score, select_on, selection_bias is not None, n_group, group_score,
                         round_dtype is not None):
        v = z
    elif round_dtype is not None and score == "sqrtsoftplus":  # softplus, then sqrt: two ops
        # the kernels' sqrt is IEEE's, correctly rounded; torch's fp32 sqrt on the CPU is not
        # always (1 - 2^-11 gives the fp16 rounding midpoint), so it is taken in float64
        s = round_to(torch.where(z > 20, z, torch.log1p(torch.exp(z))), round_dtype)
        v = round_to(s.double().sqrt().float(), round_dtype)
    else:
        v = round_to(selection_score(z, score), round_dtype)
    if selection_bias is not None:
        v = sanitize(v + sanitize(selection_bias))
    return v


def rounding_dtype(logits, select_on: str, round_scores: bool):
    """The dtype selection scores are rounded to: the logits' half precision under
    ``round_scores`` (scores, not logits, are ranked), else None."""
    if round_scores and select_on == "scores" and logits.dtype in (torch.float16, torch.bfloat16):
        return logits.dtype
    return None


def _rank(values: torch.Tensor, tier: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest (tier, value) keys, descending, ties to the lower index."""
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_value), dim=-1, descending=True, stable=True).indices
    return by_value.gather(-1, by_tier)[..., :k]


def eligible_tiers(values, tier, n_group, topk_group, group_score, round_dtype=None):
    """``tier`` with experts outside the chosen groups set to TIER_INELIGIBLE (a ``top2_sum``
    group score rounded to ``round_dtype``, as a half-precision sum of two scores)."""
    if n_group == 1:
        return tier
    T, E = values.shape
    gv = values.view(T, n_group, E // n_group)
    if group_score == "max":
        gscore = gv.max(-1).values
    else:
        gscore = sanitize(gv.topk(min(2, E // n_group), dim=-1).values.sum(-1))
        if E // n_group > 1:
            gscore = round_to(gscore, round_dtype)
    has_forced = (tier.reshape(T, n_group, E // n_group) == TIER_FORCED_ON).any(-1)
    gtier = torch.where(has_forced, TIER_FORCED_ON, TIER_NORMAL).to(torch.int8)
    keep = _rank(gscore, gtier, topk_group)
    group_ok = torch.zeros(T, n_group, dtype=torch.bool, device=values.device)
    group_ok.scatter_(1, keep, True)
    ok = group_ok.repeat_interleave(E // n_group, dim=1)
    return torch.where(ok, tier, torch.full_like(tier, TIER_INELIGIBLE))


def check_logits_shape(logits) -> None:
    """Raise unless ``logits`` is a ``[T, E]`` tensor with E >= 1."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"topk_gate: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"topk_gate: logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("topk_gate: logits must have at least one expert column, got E=0")


def check_gate_args(logits, k, score, select_on, selection_bias, n_group, topk_group, group_score,
                    renorm_eps, scale, steer, groups, stats, check_group_values=True,
                    replay=None):
    """Raise ValueError/TypeError for bad gate arguments; the C++ op checks the same things.

    ``check_group_values=False`` skips the checks that need data (fake tensors have none): group
    and replay values, and statistics buffers sharing memory with another argument.
    """
    check_logits_shape(logits)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"topk_gate: logits must be float32, float16 or bfloat16, got "
                        f"{logits.dtype}")
    E = logits.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_gate: k={k} must be in [1, num_experts={E}]")
    for name, value, allowed in (("score", score, SCORES), ("select_on", select_on, SELECT_ON),
                                 ("group_score", group_score, GROUP_SCORES)):
        if value not in allowed:
            raise ValueError(f"topk_gate: {name}={value!r} must be one of {allowed}")
    if n_group < 1 or E % n_group != 0:
        raise ValueError(f"topk_gate: n_group={n_group} must be >= 1 and divide num_experts={E}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_gate: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if n_group > 1 and k > topk_group * (E // n_group):
        raise ValueError(f"topk_gate: k={k} must be <= topk_group * experts_per_group = "
                         f"{topk_group * (E // n_group)}")
    if not (renorm_eps >= 0 and renorm_eps <= FLT_MAX):
        raise ValueError(f"topk_gate: renorm_eps={renorm_eps} must be finite in float32 and >= 0")
    if not abs(scale) <= FLT_MAX:
        raise ValueError(f"topk_gate: scale={scale} must be finite in float32")
    _check_tensor("selection_bias", selection_bias, (E,), (torch.float32,), logits.device)
    _check_tensor("steer", steer, (4, E), (torch.float32,), logits.device)
    T = logits.shape[0]
    _check_tensor("groups", groups, (T,), (torch.int32, torch.int64), logits.device)
    _check_tensor("replay", replay, (T, k), (torch.int32, torch.int64), logits.device)
    if check_group_values and replay is not None and T > 0 and replay.device.type == "cpu":
        check_replay_rows(replay, E, "topk_gate: replay")
    G = None
    shapes = {"tokens": ("G",), "counts": ("G", E), "prob_sum": ("G", E), "weight_sum": ("G", E),
              "entropy_sum": ("G",), "coact": (E, E)}
    dtypes = {"tokens": torch.int64, "counts": torch.int64, "coact": torch.int64}
    for name, buf in stats.items():
        if buf is None:
            continue
        if G is None and shapes[name][0] == "G" and isinstance(buf, torch.Tensor) and buf.dim() > 0:
            G = buf.shape[0]
        want = tuple(G if s == "G" else s for s in shapes[name])
        _check_tensor(name, buf, want, (dtypes.get(name, torch.float32),), logits.device)
        if not buf.is_contiguous():
            raise ValueError(f"topk_gate: {name} must be contiguous (it is written in place)")
        if buf.requires_grad:
            raise ValueError(f"topk_gate: {name} requires grad and is written in place, which "
                             f"autograd would not see: make the statistics buffers without "
                             f"requires_grad")
    if G == 0 and any(stats[n] is not None for n in shapes if shapes[n][0] == "G"):
        raise ValueError("topk_gate: statistics buffers need at least one group, got G=0")
    written = [(n, b) for n, b in stats.items() if b is not None] if check_group_values else []
    read = [("logits", logits), ("selection_bias", selection_bias), ("steer", steer),
            ("groups", groups), ("replay", replay)]
    for i, (name, buf) in enumerate(written):
        for other, t in read + written[:i]:
            if t is not None and _shares_memory(buf, t):
                raise ValueError(f"topk_gate: {name} shares memory with {other}; statistics "
                                 "buffers are written in place and must not overlap any other "
                                 "argument")
    if (check_group_values and groups is not None and G is not None and T > 0
            and groups.device.type == "cpu"):
        lo, hi = int(groups.min()), int(groups.max())
        if lo < -1 or hi >= G:
            raise ValueError(f"topk_gate: groups must be in [-1, {G}) (the statistics' group "
                             f"count), got values in [{lo}, {hi}]")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the addresses a's and b's elements span intersect (tensors with data). Addresses,
    not storages: two tensors made over the same memory (from_numpy twice) have two storages."""
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = t.data_ptr() + t.element_size() * sum(min(0, (n - 1) * s)
                                                   for n, s in zip(t.shape, t.stride()))
        hi = t.data_ptr() + t.element_size() * (sum(max(0, (n - 1) * s)
                                                    for n, s in zip(t.shape, t.stride())) + 1)
        return lo, hi

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def replay_rows(replay: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T]`` bool: the rows of ``replay`` that are a selection (k distinct ids in [0, E))."""
    r = replay.long()
    in_range = ((r >= 0) & (r < num_experts)).all(-1)
    s = r.sort(-1).values
    distinct = (s[:, 1:] != s[:, :-1]).all(-1)
    return in_range & distinct


def check_replay_rows(replay: torch.Tensor, num_experts: int, where: str) -> None:
    """Raise ValueError naming the first row of ``replay [T, k]`` that is neither a selection
    (k distinct ids in [0, E)) nor all -1."""
    bad = ~(replay_rows(replay, num_experts) | (replay == -1).all(-1))
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"{where}: row {t} must hold {replay.shape[1]} distinct expert ids in "
                         f"[0, {num_experts}) or be all -1 (route as usual), got "
                         f"{replay[t].tolist()}")


def _check_tensor(name, t, shape, dtypes, device):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"topk_gate: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"topk_gate: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"topk_gate: {name} must be {want}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"topk_gate: {name} must be on the logits' device {device}, got "
                         f"{t.device}")


def topk_gate(logits, k, score="softmax", select_on="scores", selection_bias=None, n_group=1,
              topk_group=1, group_score="max", renormalize=False, renorm_eps=0.0, scale=1.0,
              round_scores=False, steer=None, steer_select_only=False, std_unbiased=False,
              groups=None, replay=None, tokens=None, counts=None, prob_sum=None, weight_sum=None,
              entropy_sum=None, coact=None):
    """Reference fused gate: ``(weights [T, k] fp32, ids [T, k] int32)``; stats updated in place.

    Same arguments and semantics as ``torch.ops.moe_route.topk_gate`` (module docstring).
    """
    stats = dict(tokens=tokens, counts=counts, prob_sum=prob_sum, weight_sum=weight_sum,
                 entropy_sum=entropy_sum, coact=coact)
    check_gate_args(logits, k, score, select_on, selection_bias, n_group, topk_group, group_score,
                    renorm_eps, scale, steer, groups, stats, replay=replay)
    if not isinstance(round_scores, bool):
        raise TypeError(f"topk_gate: round_scores must be a bool, got "
                        f"{type(round_scores).__name__}")
    half = rounding_dtype(logits, select_on, round_scores)
    z0 = sanitize(logits)
    z, tier = steer_logits(z0, steer, std_unbiased)
    v = selection_values(z, score, select_on, selection_bias, n_group, group_score, half)
    tier = eligible_tiers(v, tier, n_group, topk_group, group_score,
                          half if selection_bias is None else None)
    ids = _rank(v, tier, k)
    if replay is not None:
        ids = torch.where(replay_rows(replay, logits.shape[1])[:, None], replay.long(), ids)

    zw = z0 if steer_select_only else z
    w = gate_weights(zw, ids, score, select_on, renormalize, renorm_eps, scale)
    if any(b is not None for b in stats.values()):
        accumulate_stats(zw, score, w, ids, groups, **stats)
    return w, ids.to(torch.int32)


def gate_weights(zw, ids, score="softmax", select_on="scores", renormalize=False, renorm_eps=0.0,
                 scale=1.0):
    """The k routing weights of the chosen ``ids`` from the (steered) fp32 logits ``zw``.

    Differentiable in ``zw``: the drop-in router uses it to give router weights their gradient
    (the fused gate has no backward) while the kernel picks the ids.
    """
    if select_on == "scores":
        w = score_fn(zw, score).gather(1, ids)
    elif score == "softmax":
        w = torch.softmax(zw.gather(1, ids), dim=-1)
    else:
        w = score_fn(zw.gather(1, ids), score)
    if renormalize:
        den = w.sum(-1, keepdim=True) + renorm_eps
        w = torch.where(den != 0, w / den, w)
    return w * scale


def accumulate_stats(zw, score, w, ids, groups, tokens, counts, prob_sum, weight_sum, entropy_sum,
                     coact):
    """Add one call's routing (fp32 logits ``zw [T, E]``, weights and ids ``[T, k]``, token
    groups ``[T]`` or None, -1 skips a token) to the statistics buffers, in place. Counts,
    tokens and coactivations are exact integer adds; weight, probability and entropy sums are
    summed over the call in float64, then added to the fp32 buffers. Probabilities are the
    softmax of ``zw``, or for sigmoid/sqrtsoftplus scores the scores over their sum (uniform
    where the sum is 0)."""
    T, k = ids.shape
    E = zw.shape[1]
    g = torch.zeros(T, dtype=torch.int64, device=zw.device) if groups is None else groups.long()
    keep = g >= 0
    g, ids, w, zw = g[keep], ids[keep], w[keep], zw[keep]
    if tokens is not None:
        tokens.index_add_(0, g, torch.ones_like(g))
    flat = (g[:, None] * E + ids).reshape(-1)
    if counts is not None:
        counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
    if weight_sum is not None:
        acc = torch.zeros(weight_sum.numel(), dtype=torch.float64, device=zw.device)
        acc.index_add_(0, flat, w.reshape(-1).double())
        weight_sum += acc.view_as(weight_sum).float()
    if prob_sum is not None or entropy_sum is not None:
        q = dense_distribution(zw, score)
        if prob_sum is not None:
            acc = torch.zeros(prob_sum.shape, dtype=torch.float64, device=zw.device)
            acc.index_add_(0, g, q.double())
            prob_sum += acc.float()
        if entropy_sum is not None:
            h = torch.special.entr(q).sum(-1).double()
            acc = torch.zeros(entropy_sum.shape, dtype=torch.float64, device=zw.device)
            entropy_sum += acc.index_add_(0, g, h).float()
    if coact is not None:
        pairs = (ids[:, :, None] * E + ids[:, None, :]).reshape(-1)
        coact.view(-1).index_add_(0, pairs, torch.ones_like(pairs))


# --------------------------------------------------------------------------------------------------
# Dispatch: plan, permute, unpermute.
#
# A plan sorts the T*k (token, slot) pairs by expert with a stable counting sort: inside an expert,
# rows keep slot order s = t*k + j. Outputs are sized for the worst case, so nothing reads back to
# the host: R = T*k + E*(block_size - 1) rows, each expert's segment padded to a multiple of
# block_size. Ids outside [0, E) (expert-parallel sentinels, -1 padding) get no row.
#   row_slot       [R] int64   slot feeding each row; -1 for padding and unused tail rows
#   expert_offsets [E+1] int64 first row of each expert; expert_offsets[E] = rows in use
#   counts         [E] int64   real (unpadded) rows per expert
#   slot_row       [T*k] int64 row of each slot; -1 for dropped ids
# permute(x, row_slot, k)[r] = x[row_slot[r] // k], zero rows where row_slot[r] == -1. (The op
# also takes the plan's slot_row, through which the CUDA kernel reads each token row once, and
# optionally its expert_offsets: then rows r >= expert_offsets[E], the unused tail, are left
# unwritten, and only rows before it are specified. The reference zeroes them either way.)
# unpermute(y, slot_row, weights)[t] = sum_j weights[t, j] * y[slot_row[t*k + j]] over valid slots,
# accumulated in fp32 in j order, returned in y's dtype.
# --------------------------------------------------------------------------------------------------


def dispatch_rows(num_tokens: int, k: int, num_experts: int, block_size: int = 1) -> int:
    """Worst-case row count R of a plan."""
    return num_tokens * k + num_experts * (block_size - 1)


def check_dispatch_args(ids, num_experts, block_size):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"dispatch_plan: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"dispatch_plan: ids must be 2-D [T, k], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"dispatch_plan: ids must be torch.int32 or torch.int64, got {ids.dtype}")
    if ids.shape[1] < 1:
        raise ValueError(f"dispatch_plan: ids must have k >= 1 columns, got shape "
                         f"{tuple(ids.shape)}")
    for name, value in (("num_experts", num_experts), ("block_size", block_size)):
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"dispatch_plan: {name} must be an int, got {type(value).__name__}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"dispatch_plan: num_experts={num_experts} must be in [1, {MAX_EXPERTS}]")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"dispatch_plan: block_size={block_size} must be in "
                         f"[1, {MAX_BLOCK_SIZE}]")


def dispatch_plan(ids, num_experts, block_size=1):
    """Reference plan: ``(row_slot, expert_offsets, counts, slot_row)`` (see above)."""
    check_dispatch_args(ids, num_experts, block_size)
    T, k = ids.shape
    E = num_experts
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    counts = torch.bincount(flat[valid], minlength=E)
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = padded.cumsum(0)
    R = dispatch_rows(T, k, E, block_size)
    row_slot = torch.full((R,), -1, dtype=torch.int64, device=ids.device)
    slot_row = torch.full((T * k,), -1, dtype=torch.int64, device=ids.device)
    slots = torch.arange(T * k, device=ids.device)[valid]
    experts = flat[valid]
    order = torch.sort(experts, stable=True).indices
    slots, experts = slots[order], experts[order]
    # rank of each pair inside its expert = position - first position of that expert
    first = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    first[1:] = counts.cumsum(0)
    rank = torch.arange(slots.numel(), device=ids.device) - first[experts]
    rows = offsets[experts] + rank
    row_slot[rows] = slots
    slot_row[slots] = rows
    return row_slot, offsets, counts, slot_row


def _index_range(index: torch.Tensor) -> tuple:
    """(min, max) of a plan's index tensor, (-1, -1) when empty."""
    if index.numel() == 0:
        return -1, -1
    return int(index.min()), int(index.max())


def permute(x, row_slot, k):
    """Reference: expert-contiguous rows ``[R, H]`` of ``x [T, H]``; zero rows for padding.
    A ``row_slot`` outside [-1, T*k) (the plan of other tokens) raises ValueError."""
    lo, hi = _index_range(row_slot)
    if lo < -1 or hi >= x.shape[0] * k:
        raise ValueError(f"permute: row_slot holds slots in [{lo}, {hi}], but x has "
                         f"T={x.shape[0]} rows and k={k}, so T*k={x.shape[0] * k} slots: "
                         f"row_slot must be the plan of x's tokens")
    valid = row_slot >= 0
    out = x.new_zeros((row_slot.numel(), x.shape[1]))
    out[valid] = x[row_slot[valid] // k]
    return out


def unpermute(y, slot_row, weights):
    """Reference: weighted k-way sum back to ``[T, H]``, fp32 accumulation in slot order.
    A ``slot_row`` outside [-1, R) (y not the plan's rows) raises ValueError."""
    lo, hi = _index_range(slot_row)
    if lo < -1 or hi >= y.shape[0]:
        raise ValueError(f"unpermute: slot_row holds rows in [{lo}, {hi}], but y has "
                         f"{y.shape[0]} rows: y must be [R, H], one row per row of the plan "
                         f"(permute's output rows)")
    T, k = weights.shape
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    rows = slot_row.view(T, k)
    for j in range(k):
        r = rows[:, j]
        ok = r >= 0
        contrib = y[r.clamp(min=0)].float() * weights[:, j:j + 1].float()
        acc += torch.where(ok[:, None], contrib, torch.zeros_like(contrib))
    return acc.to(y.dtype)
