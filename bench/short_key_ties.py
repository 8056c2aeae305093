"""How often the CUDA gate's short keys send a token back to 64-bit keys; no GPU needed.

    python bench/short_key_ties.py [--rows 200000] [--k 8] [--seed 0]

The warp kernel's plain and full builds (up to 512 experts) select on 32-bit keys that keep the
top bits of each value's order image (csrc/cuda/gate.cuh, make_short_key). A token is selected
again on 64-bit keys when two of its k + 1 best short keys share their top bits and some value
loses bits in them (short_keys_lossy). This script applies that rule, in numpy, to random rows:

- fp32 logits ~ N(0, 1), ranked as they are (softmax top-k without a bias);
- the same in a full build, whose keys keep 2 bits for the steering tier;
- sigmoid scores plus a bias ~ N(0, 0.1) (DeepSeek-V3's values, in the plain build);
- fp32 logits that hold bf16 values (a router computed in bf16, then cast): never.

It prints the fraction of rows per E. The rows are random, so this is the rate for logits
without structure; real routers' near ties may be more or less frequent.
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


def rerun_fraction(v: np.ndarray, k: int, tier_bits: int = 0) -> float:
    """The fraction of rows of ``v`` [rows, E] (one tier) that the check sends to 64-bit keys."""
    dropped = index_bits(v.shape[1]) + tier_bits
    o = order_bits(v)
    top = np.sort(o >> dropped, axis=1)[:, ::-1][:, :k + 1]
    tie = (top[:, 1:] == top[:, :-1]).any(axis=1)
    mask = (1 << dropped) - 1
    lossy = ((o & mask) != np.where(o >> 31, 0, mask)).any(axis=1)
    return float((tie & lossy).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"rows selected again on 64-bit keys, of {args.rows} random rows, k={args.k}")
    print(f"{'E':>5} {'fp32 logits':>12} {'full build':>11} {'sigmoid+bias':>13} "
          f"{'bf16 in fp32':>13}")
    for E in (64, 128, 256, 512):
        z = rng.standard_normal((args.rows, E)).astype(np.float32)
        bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
        scores = (1 / (1 + np.exp(-z)) + bias).astype(np.float32)
        bf16 = (z.view(np.uint32) & 0xFFFF0000).view(np.float32)
        cells = [rerun_fraction(z, args.k), rerun_fraction(z, args.k, tier_bits=2),
                 rerun_fraction(scores, args.k), rerun_fraction(bf16, args.k)]
        print(f"{E:>5}" + "".join(f"{c:>{w}.3%}" for c, w in zip(cells, (13, 12, 14, 14))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
