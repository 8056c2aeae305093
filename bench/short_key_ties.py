"""How often the CUDA gate's short keys send a token back to 64-bit keys; no GPU needed.

    python bench/short_key_ties.py [--rows 200000] [--k 8] [--seed 0]

The warp kernel's plain and full builds (up to 512 experts) select on 32-bit keys that keep the
top bits of each value's order image (csrc/cuda/gate.cuh, make_short_key). A token is selected
again on 64-bit keys when two of its k + 1 best short keys share their top bits and a value loses
bits in them: any value of the row in the plain builds (short_keys_lossy), one whose top bits lie
in the span of such ties in the full builds (short_ties_lossy). This script applies that rule, in
numpy, to random rows:

- fp32 logits ~ N(0, 1), ranked as they are (softmax top-k without a bias);
- the same in a full build, whose keys keep 2 bits for the steering tier;
- sigmoid scores plus a bias ~ N(0, 0.1) (DeepSeek-V3's values, in the plain build);
- fp32 logits that hold bf16 values (a router computed in bf16, then cast): never;
- the same with one expert steered by half the row's std (a full-precision value among them, in
  a full build): only where that expert's top bits fall in the ties' span.

It prints the fraction of rows per E, and then the 64-bit rounds such a row costs: one per
selection that ties with its neighbour (resolve_short_ties), where until 2026-11-30 it took k. The
rows are random, so these are the rates for logits without structure; real routers' near ties may
be more or less frequent.
"""
from __future__ import annotations

import argparse

import numpy as np


def index_bits(E: int) -> int:
    """log2(32 * VPT) for E experts (gate.cuh, short_index_bits)."""
    vpt = 1
    while 32 * vpt < E:
        vpt *= 2
    return (32 * vpt).bit_length() - 1


def order_bits(v: np.ndarray) -> np.ndarray:
    """The order-preserving uint32 image of fp32 values (-0 as +0), as uint64."""
    b = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = np.where(b == 0x80000000, 0, b)
    return np.where(b & 0x80000000, (~b) & 0xFFFFFFFF, b | 0x80000000)


def rerun_rate(v: np.ndarray, k: int, tier_bits: int = 0) -> tuple[float, float]:
    """The fraction of rows of ``v`` [rows, E] (one tier) that the check sends to 64-bit keys,
    and the mean number of 64-bit rounds those rows take. Sent back are the rows whose k + 1 best
    keys tie on their top bits somewhere and where a value loses bits. In the plain builds (no
    tier bits) any value of the row counts (short_keys_lossy); in the full builds (2 tier bits)
    only values whose top bits lie in the ties' span (short_ties_lossy). A round is taken per
    selection whose key ties with the one before or after it (the (k+1)-th counts as after); past
    32 selections, a tie from the 32nd on sends every selection from the 32nd on (tie_bit)."""
    dropped = index_bits(v.shape[1]) + tier_bits
    o = order_bits(v)
    tops = o >> dropped
    best = np.sort(tops, axis=1)[:, ::-1][:, :k + 1]
    tied = best[:, 1:] == best[:, :-1]
    mask = (1 << dropped) - 1
    loses = (o & mask) != np.where(o >> 31, 0, mask)
    if tier_bits:
        lo = np.where(tied, best[:, 1:], np.iinfo(np.uint64).max).min(axis=1, keepdims=True)
        hi = np.where(tied, best[:, 1:], 0).max(axis=1, keepdims=True)
        loses &= (tops >= lo) & (tops <= hi)
    again = tied.any(axis=1) & loses.any(axis=1)
    # selection j ties with j + 1 (tied[:, j]) or with j - 1 (tied[:, j - 1])
    at = tied | np.pad(tied[:, :-1], ((0, 0), (1, 0)))
    rounds = at[:, :31].sum(axis=1) + at[:, 31:].any(axis=1) * max(k - 31, 0)
    return float(again.mean()), float(rounds[again].mean()) if again.any() else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    names = ("fp32 logits", "full build", "sigmoid+bias", "bf16 in fp32", "bf16, steered")
    header = f"{'E':>5}" + "".join(f"{n:>15}" for n in names)
    rates = {}
    for E in (64, 128, 256, 512):
        z = rng.standard_normal((args.rows, E)).astype(np.float32)
        bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
        scores = (1 / (1 + np.exp(-z)) + bias).astype(np.float32)
        bf16 = (z.view(np.uint32) & 0xFFFF0000).view(np.float32)
        steered = bf16.copy()
        steered[:, 4] += np.float32(0.5) * bf16.std(axis=1)
        rates[E] = [rerun_rate(z, args.k), rerun_rate(z, args.k, tier_bits=2),
                    rerun_rate(scores, args.k), rerun_rate(bf16, args.k),
                    rerun_rate(steered, args.k, tier_bits=2)]
    print(f"rows selected again on 64-bit keys, of {args.rows} random rows, k={args.k}")
    print(header)
    for E, cells in rates.items():
        print(f"{E:>5}" + "".join(f"{c[0]:>15.3%}" for c in cells))
    print(f"\nmean 64-bit rounds of such a row (k={args.k} before 2026-11-30)")
    print(header)
    for E, cells in rates.items():
        print(f"{E:>5}" + "".join(f"{c[1]:>15.2f}" if c[0] else f"{'-':>15}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
