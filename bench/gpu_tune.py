"""A/B builds of the CUDA tuning levers that bench/RESULTS.md leaves to a GPU session.

    python bench/gpu_tune.py OUT_DIR [--variants NAME ...] [--budget SECONDS] [--arch 9.0a]
    python bench/gpu_tune.py OUT_DIR --build-only --work DIR [--variants NAME ...] [--budget S]
    python bench/gpu_tune.py OUT_DIR --time-only --work DIR [--budget S]
    python bench/gpu_tune.py --list

Run it after ``bench/gpu_check.sh``, which builds this tree in place: that build is the "base".
Each variant is a copy of the tree with a few constants or attributes changed (``VARIANTS``), built
in parallel with the others, or the base build timed with an environment variable set. A copy
compiles only the sources its changes reach and links the base's objects for the rest (ninja's
record of the files each object was compiled from), so a gate variant compiles the gate's units
alone. The cases (``CASES``: the gate, the dispatch plan, permute
and unpermute at issue 6's shapes, bf16) of the kernels a variant changes (its ``kernels``: the
warp-per-token gate, the CTA-per-token gate, dispatch) are then timed against its build and the
base's, one process per build, so each variant's time sits next to the base's. The base is timed
first and again last. A variant changes kernels that no other case reads where possible, so one
build answers several questions. Timing is ``moe_route.benchmark``'s: CUDA-graph replay below
20 us, events with the L2 flushed above.

The builds and the timing can run apart: ``--build-only`` leaves the builds in ``--work`` and
``--time-only`` times them later. ``gpu_check.sh`` does that (``GPU_TUNE``): the variants build
while its tests run, and are timed after its benchmarks, on an idle machine.

OUT_DIR gets gpu_tune.txt (the table: median us, and each variant's ratio to the base) and
gpu_tune.json (every summary, the variants' changes, build times and logs' tails). The whole run
keeps within ``--budget`` seconds (default 540), so it fits one 10-minute device call.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
BASE, BASE_AGAIN = "base", "base_again"

# The kernels a case times, and so the cases a variant needs: the warp-per-token gate (E <= 1024),
# the CTA-per-token gate (E > 1024) and the dispatch kernels.
KERNELS = ("warp", "wide", "dispatch")


class Variant(NamedTuple):
    what: str  # the question it answers
    changes: list  # (file, text in the base, text in the variant)
    kernels: tuple  # of KERNELS: those the changes reach, whose cases it is timed on
    env: tuple = ()  # (name, value) set for its timing; with no changes, the base is timed so


DISPATCH = "csrc/cuda/dispatch.cuh"
GATE = "csrc/cuda/gate.cuh"
GROUPED = "csrc/cuda/gate_grouped.cuh"
GATE_KERNEL = "__launch_bounds__(kMaxWarpsPerBlock * 32)\n    topk_gate_kernel"
# The scoring of groups of 32 experts in the warp kernel, now and before b418c73.
GROUPS_OF_32_NOW = """          float mine = 0.f;
          if (p.group_score == GroupScore::Max) {
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
              const float score = from_order_bits(warp_max_u32(order_bits(v[i])));
              mine = lane == i ? score : mine;
            }
          } else {
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
              const uint32_t o = order_bits(v[i]);
              const uint32_t a = warp_max_u32(o);
              const int owner = __ffs(__ballot_sync(kFullMask, o == a)) - 1;
              const uint32_t b = warp_max_u32(lane == owner ? 0u : o);
              float score = sanitize(from_order_bits(a) + from_order_bits(b));
              if (round_sums) score = round_half<LT>(score);
              mine = lane == i ? score : mine;
            }
          }
          if (lane < n_group) gscore[lane] = mine;"""
GROUPS_OF_32_BEFORE = """#pragma unroll
          for (int i = 0; i < VPT; ++i) {
            if (i < n_group) {
              const uint32_t o = order_bits(v[i]);
              const uint32_t a = warp_max_u32(o);
              float score = from_order_bits(a);
              if (p.group_score != GroupScore::Max) {
                const int owner = __ffs(__ballot_sync(kFullMask, o == a)) - 1;
                score = sanitize(score + from_order_bits(warp_max_u32(lane == owner ? 0u : o)));
                if (round_sums) score = round_half<LT>(score);
              }
              if (lane == i) gscore[i] = score;
            }
          }"""
# The warp kernel's selection in its plain and full builds before short keys (ac9aef5): 64-bit
# keys, cached and sorted once up to VPT 8, scanned every round at VPT 16.
KEYS64_BEFORE = """        uint32_t ord[VPT];
#pragma unroll
        for (int i = 0; i < VPT; ++i) ord[i] = order_bits(v[i]);
        uint64_t keys[kCacheKeys ? VPT : 1];
        if constexpr (kCacheKeys) {
#pragma unroll
          for (int i = 0; i < VPT; ++i)
            keys[i] = ((avail >> i) & 1u)
                          ? make_key(masks.tier(i), ord[i], uint32_t(i * 32 + lane))
                          : 0;
          if constexpr (kSortKeys) sort_descending(keys);
        }
        for (int j = 0; j < k; ++j) {
          uint64_t best = 0;
          if constexpr (kSortKeys) {
            best = keys[0];
          } else {
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
              if ((avail >> i) & 1u) {
                uint64_t key;
                if constexpr (kCacheKeys) key = keys[i];
                else key = make_key(masks.tier(i), ord[i], uint32_t(i * 32 + lane));
                best = key > best ? key : best;
              }
            }
          }
          const int idx = key_index(warp_max_key(best));
          if ((idx & 31) == lane) {
            if constexpr (kSortKeys) {
#pragma unroll
              for (int i = 0; i + 1 < VPT; ++i) keys[i] = keys[i + 1];
              keys[VPT - 1] = 0;
            } else {
              avail &= ~(1u << (idx >> 5));
            }
          }
          if (lane == 0) sel_id[j] = idx;
        }"""
# The short-key selection's ties now and as at 168d049: a tie noted as the span of its values,
# and the whole token selected again on 64-bit keys (gpu_tune's gate_ties_before); the old
# functions go before resolve_short_ties, which the variant leaves uncalled.
TIES_NOW = """        uint32_t prev = 0, tied = 0;
        for (int j = 0; j < k; ++j) {
          const uint32_t best = pop_warp_max(skeys);
          if ((best >> IB) == (prev >> IB)) tied |= tie_bit(j - 1) | tie_bit(j);
          prev = best;
          if (lane == 0) sel_id[j] = int((1u << IB) - 1u - (best & ((1u << IB) - 1u)));
        }
        if ((warp_max_u32(skeys[0]) >> IB) == (prev >> IB)) tied |= tie_bit(k - 1);
        if constexpr (kFull) {
          if (tied != 0u)  // warp-uniform
            resolve_short_ties<VPT, IB, TB, true>(vsm, lane, avail, masks, k, sel_id, tied);
        } else if (tied != 0u && short_keys_lossy<VPT>(vsm, lane, avail, TB + IB)) {
          resolve_short_ties<VPT, IB, TB, false>(vsm, lane, avail, masks, k, sel_id, tied);
        }
"""
TIES_BEFORE = """        uint32_t prev = 0, tie_lo = ~0u, tie_hi = 0;
        bool tie = false;
        auto note_tie = [&](uint32_t key) {
          if constexpr (kFull) {
            if ((key >> IB) == (prev >> IB)) {
              tie_lo = key >> IB;
              tie_hi = tie_hi ? tie_hi : tie_lo;
            }
          } else {
            tie = tie || (key >> IB) == (prev >> IB);
          }
        };
        for (int j = 0; j < k; ++j) {
          const uint32_t best = pop_warp_max(skeys);
          note_tie(best);
          prev = best;
          if (lane == 0) sel_id[j] = int((1u << IB) - 1u - (best & ((1u << IB) - 1u)));
        }
        note_tie(warp_max_u32(skeys[0]));
        if constexpr (kFull) {
          if (tie_lo <= tie_hi)  // warp-uniform
            recheck_short_ties_call<VPT, IB, TB>(vsm, lane, avail, masks, k, sel_id, tie_lo,
                                                 tie_hi);
        } else if (tie && short_keys_lossy<VPT>(vsm, lane, avail, TB + IB)) {  // warp-uniform
          select_stored_on_keys64<VPT>(vsm, lane, avail, masks, k, sel_id);
        }
"""
TIES_BEFORE_FUNCTIONS = (
    "// The selection again on 64-bit keys, from the values a lane stored (store_values).\n"
    """template <int VPT>
__device__ __forceinline__ void select_stored_on_keys64(const float* vsm, int lane,
                                                        uint32_t avail, const SteerMasks& masks,
                                                        int k, int32_t* sel_id) {
  select_on_keys64<VPT>([&](int i) { return value_at<VPT>(vsm, lane, i); }, avail, masks, k,
                        lane, sel_id);
}

// A full build's short-key selection whose ties span [lo, hi] checked, and made again on 64-bit
// keys where those ties may hide the values' order. Out of line: inlined into the full builds,
// the 64-bit selection made ptxas spill 16-56 bytes (VPT 2 to 8, nvcc 13.0, sm_90a); called, it
// makes a plain build spill, which inlines it.
template <int VPT, int IB, int TB>
__device__ __noinline__ void recheck_short_ties_call(const float* vsm, int lane, uint32_t avail,
                                                     SteerMasks masks, int k, int32_t* sel_id,
                                                     uint32_t lo, uint32_t hi) {
  if (short_ties_lossy<VPT, IB, TB>(vsm, lane, avail, masks, lo, hi))  // warp-uniform
    select_stored_on_keys64<VPT>(vsm, lane, avail, masks, k, sel_id);
}

""")
# Stage 2 of the gate past 1024 experts as at 9e33c6f: warp 0 merges the 16 lists, k dependent
# rounds, pausing where a list runs out (gpu_tune's wide_merge). The ranking is compiled out.
WIDE_MERGE_STATE = """      bool dry = true;
      bool ended = false;
      constexpr uint64_t kPending = ~0ull;  // a key not listed yet: wins the warp max
      const uint64_t* const mine = lists + int64_t(lane) * k;
      const uint64_t* ahead = mine;
      uint64_t head = lane < kWideWarps ? kPending : 0, next = head;
      int picked = 0;
"""
WIDE_MERGE = """        if (warp == 0) {
          const uint64_t* const lim = mine + (lane < kWideWarps ? listed_words[lane] : 0);
          const auto take = [&]() { return ahead < lim ? *ahead++ : kPending; };
          if (head == kPending) head = take();
          if (next == kPending) next = take();
          for (; picked < k; ++picked) {
            const uint64_t best = warp_max_key(head);
            if (best == kPending) break;
            const int idx = key_index(best);
            if (lane == (idx % kWideThreads) >> 5) {
              head = next;
              next = take();
            }
            if (lane == 0) sel_id[picked] = idx;
          }
          const uint32_t ask = __ballot_sync(
              kFullMask, picked < k && (head == kPending || (head != 0 && next == kPending)));
          if (lane == 0) replay_flag[1] = ask;  // word 17, unused otherwise
        }
#if 0  // the ranking
"""
WIDE_RANKS_END = (
    "        const bool needs_more = __any_sync(kFullMask, short_list);  // warp-uniform\n"
    "        if (!__syncthreads_or(needs_more)) break;  // block-uniform; sel_id written\n"
    "        if (needs_more) goal = goal + step < k ? goal + step : k;\n")
WIDE_MERGE_END = """#endif
        __syncthreads();
        const uint32_t ask = replay_flag[1];  // block-uniform
        if (ask == 0) break;
        if ((ask >> warp) & 1u) goal = goal + step < k ? goal + step : k;
"""

# The CTA's merge of its warps' statistics (gate.cuh), now and as before: each warp added its run
# into one shared set of sums with shared-memory atomics (compare-and-swap loops on sm_90).
# A warp of one token adds its counts and weight sums straight to global memory (GatePlan).
DIRECT_SUMS_NOW = "  c.direct_sums = c.chunk == 1;\n"
DIRECT_SUMS_OFF = "  c.direct_sums = false;\n"
MERGE_FIELDS_NOW = "  int32_t cta_off = -1, cta_prob = -1;\n"
MERGE_FIELDS_BEFORE = """  int32_t cta_off = -1, cta_words = 0;
  int32_t cta_cnt = -1, cta_prob = -1, cta_wsum = -1;
"""
MERGE_AREA_NOW = " : nullptr;\n  float prob_acc[VPT];\n"
MERGE_AREA_BEFORE = """ : nullptr;
  if (cta != nullptr) {
    for (int i = int(threadIdx.x); i < plan.cta_words; i += int(blockDim.x))
      cta[i] = i == 0 ? 0xffffffffu : 0u;
    __syncthreads();
  }
  float prob_acc[VPT];
"""
MERGE_START_NOW = ("    return;\n  }\n"
                   "  // The open run into the CTA's merge area (see the header). q goes there in "
                   "two steps, half the\n")
MERGE_BEFORE = """    return;
  }
  if (run_g >= 0) {
    const bool fits = run_g <= int64_t(0x7fffffff);  // the area holds the group as an int
    int claimed = -2;
    if (fits && lane == 0) claimed = atomicCAS(reinterpret_cast<int*>(cta), -1, int(run_g));
    claimed = __shfl_sync(kFullMask, claimed, 0);
    if (!fits || (claimed != -1 && claimed != run_g)) {
      flush();
    } else {  // the run into the area, as flush() adds it to the global statistics
      if (lane == 0) {
        atomicAdd(reinterpret_cast<u64*>(cta + 2), (u64)run_tokens);
        atomicAdd(reinterpret_cast<float*>(cta + 4), run_entropy);
      }
      auto* prob = reinterpret_cast<float*>(cta + plan.cta_prob);
      auto* cnt = reinterpret_cast<u64*>(cta + plan.cta_cnt);
      auto* wsum = reinterpret_cast<float*>(cta + plan.cta_wsum);
#pragma unroll
      for (int i = 0; i < VPT; ++i)
        if (plan.cta_prob >= 0 && ((valid >> i) & 1u) && prob_acc[i] != 0.f)
          atomicAdd(prob + i * 32 + lane, prob_acc[i]);
      __syncwarp();  // the entries were scattered by other lanes
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int e = i * 32 + lane;
        if (!((valid >> i) & 1u)) continue;
        if (cnt_s && cnt_s[e]) atomicAdd(cnt + e, (u64)cnt_s[e]);
        if (wsum_s && wsum_s[e] != 0.f) atomicAdd(wsum + e, wsum_s[e]);
      }
    }
  }
  __syncthreads();
  const int merged = int(cta[0]);
  if (merged < 0) return;
  const int64_t row = int64_t(merged) * E;
  if (threadIdx.x == 0) {
    if (p.tokens)
      atomicAdd(reinterpret_cast<u64*>(p.tokens + merged), *reinterpret_cast<const u64*>(cta + 2));
    if (p.entropy_sum) atomicAdd(p.entropy_sum + merged, *reinterpret_cast<const float*>(cta + 4));
  }
  for (int e = int(threadIdx.x); e < E; e += int(blockDim.x)) {
    if (plan.cta_prob >= 0) {
      const float v = reinterpret_cast<const float*>(cta + plan.cta_prob)[e];
      if (v != 0.f) atomicAdd(p.prob_sum + row + e, v);
    }
    if (plan.cta_cnt >= 0) {
      const auto* counts = reinterpret_cast<const u64*>(cta + plan.cta_cnt);
      if (counts[e] != 0ull) atomicAdd(reinterpret_cast<u64*>(p.counts + row + e), counts[e]);
    }
    if (plan.cta_wsum >= 0) {
      const float w = reinterpret_cast<const float*>(cta + plan.cta_wsum)[e];
      if (w != 0.f) atomicAdd(p.weight_sum + row + e, w);
    }
  }
#if 0  // the merge as it is now
  // The open run into the CTA's merge area (see the header). q goes there in two steps, half the
"""
MERGE_END_NOW = "atomicAdd(p.weight_sum + row + e, wsum);\n  }\n}\n"
# The plan of the merge area: its size in words, and the offsets the old merge read.
MERGE_PLAN_NOW = ("  const auto area_words = [&](int64_t w) { return 4 * w + "
                  "(p.prob_sum ? (w + 1) / 2 * p.E : 0); };\n")
MERGE_PLAN_BEFORE = """  int64_t cta_words = 8;
  const int32_t cnt = p.counts ? int32_t(cta_words) : -1;
  if (p.counts) cta_words += 2 * p.E;
  const int32_t prob = p.prob_sum ? int32_t(cta_words) : -1;
  if (p.prob_sum) cta_words += p.E;
  const int32_t wsum = p.weight_sum ? int32_t(cta_words) : -1;
  if (p.weight_sum) cta_words += p.E;
  const auto area_words = [&](int64_t) { return cta_words; };
"""
MERGE_OFFSETS_NOW = "    c.cta_prob = p.prob_sum ? int32_t(4 * wpb) : -1;\n"
MERGE_OFFSETS_BEFORE = """    c.cta_words = int32_t(cta_words);
    c.cta_cnt = cnt, c.cta_prob = prob, c.cta_wsum = wsum;
"""

VARIANTS = {
    "dispatch_alt": Variant(
        ("plan: three launches at every size; permute: 8 vectors per copy step instead of 4; "
         "unpermute: 4 slots held in registers instead of 8"),
        [(DISPATCH, "kOneCtaMaxSlots = 2048;", "kOneCtaMaxSlots = -1;"),
         (DISPATCH, "kCopyUnroll = 4;", "kCopyUnroll = 8;"),
         (DISPATCH, "kSlotsInRegs = 8;", "kSlotsInRegs = 4;")],
        ("dispatch",)),
    "dispatch_alt2": Variant(
        ("plan: one CTA up to R = 65536 rows; permute: 2 vectors per copy step; "
         "unpermute: 2 slots held in registers"),
        [(DISPATCH, "kOneCtaMaxRows = 32768;", "kOneCtaMaxRows = 65536;"),
         (DISPATCH, "kCopyUnroll = 4;", "kCopyUnroll = 2;"),
         (DISPATCH, "kSlotsInRegs = 8;", "kSlotsInRegs = 2;")],
        ("dispatch",)),
    "plan_hist64": Variant(
        "plan: the one-CTA kernel counts its histogram with 64-bit shared atomics, as before "
        "(a compare-and-swap loop on sm_90), not 32-bit ones on the entries' low words",
        [(DISPATCH, "    if (key >= 0) atomicAdd(reinterpret_cast<unsigned int*>(h + key), 1u);",
          "    if (key < 0) continue;\n"
          "    if constexpr (sizeof(C) == 8) "
          "atomicAdd(reinterpret_cast<unsigned long long*>(h + key), 1ull);\n"
          "    else atomicAdd(reinterpret_cast<unsigned int*>(h + key), 1u);")],
        ("dispatch",)),
    "permute_as_before": Variant(
        ("permute as at d8153dc: a work item per token at every T (no item per slot below 32 "
         "tokens: the T=1 cases), a group of threads for each of the R rows (the fill's grid "
         "uncapped: T=4096)"),
        [(DISPATCH, "kPermuteSplitBelow = 32;", "kPermuteSplitBelow = 0;"),
         (DISPATCH, "kPermuteFillCtas = 4096;", "kPermuteFillCtas = 1 << 20;")],
        ("dispatch",)),
    "no_pdl": Variant(
        "every kernel a plain launch (MOE_ROUTE_PDL=0), not a programmatic dependent launch that "
        "may start while the kernel before it runs (csrc/cuda/pdl.cuh)",
        [], ("warp", "wide", "dispatch"), (("MOE_ROUTE_PDL", "0"),)),
    "gate_grouped_off": Variant(
        "gate: decode-sized calls of group-limited routers (DeepSeek-V3) on the warp kernel, a "
        "warp per token, as before, not a CTA per token with a warp per group "
        "(gate_grouped.cuh)",
        [(GROUPED, "kGroupedMaxTokens = 1024;", "kGroupedMaxTokens = 0;")],
        ("warp",)),
    "gate_grouped_all": Variant(
        "gate: group-limited calls on the CTA-per-token grouped kernel at every T, not only up "
        "to 1024 tokens",
        [(GROUPED, "kGroupedMaxTokens = 1024;", "kGroupedMaxTokens = int64_t(1) << 62;")],
        ("warp",)),
    "gate_3_blocks": Variant(
        "gate: __launch_bounds__ asks for 3 CTAs per SM (80 registers at most: the full kernel "
        "spills)",
        [("csrc/cuda/gate.cuh", GATE_KERNEL, GATE_KERNEL.replace("* 32)", "* 32, 3)"))],
        ("warp",)),
    "gate_keys64": Variant(
        "gate: calls ranking 16-bit logits run the plain and full builds (short keys, checked), "
        "as before the half-key builds (whose keys are exact: no check; 64 registers instead of "
        "80 at VPT 8 without statistics)",
        [("csrc/cuda/gate.cuh", "Score::None && vpt_for(p.E) <= 16 &&",
          "Score::None && vpt_for(p.E) <= 0 &&")],
        ("warp",)),
    "gate_keys64_before": Variant(
        "gate: the plain and full builds select on 64-bit keys as before ac9aef5 (two REDUX a "
        "round, sorted up to VPT 8, scanned at VPT 16), without short keys, their check and the "
        "values' copy in shared memory",
        [("csrc/cuda/gate.cuh",
          "constexpr bool kShortKeys = !kHalfKeys && VPT <= short_keys_max_vpt(kFull);",
          "constexpr bool kShortKeys = false;\n  constexpr bool kCacheKeys = VPT <= 16;\n"
          "  constexpr bool kSortKeys = VPT <= 8;"),
         ("csrc/cuda/gate.cuh",
          "        select_on_keys64<VPT>([&](int i) { return v[i]; }, avail, masks, k, lane, "
          "sel_id);",
          KEYS64_BEFORE),
         ("csrc/cuda/gate.cuh", "if (runs_half_build(p)) return false;",
          "return false;")],
        ("warp",)),
    "gate_ties_rowwide": Variant(
        "gate: a tie among the short keys sends the token back to 64-bit keys wherever any of "
        "its values loses bits, as before, not only where one in the ties' span does (a steered "
        "expert among bf16 logits sent every token with a tie back)",
        [("csrc/cuda/gate.cuh", "(vsm, lane, avail, masks, lo, hi)) return;",
          "(vsm, lane, avail, masks, 0u, ~0u)) return;")],
        ("warp",)),
    "gate_ties_before": Variant(
        "gate: a token whose short keys tie (and may hide its values' order) is selected again "
        "on 64-bit keys in k rounds, as at 168d049, not only at its tied positions (one such "
        "token set the time of fp32 and DeepSeek-V3 calls at T=1024 on 2026-11-29); the full "
        "builds call that selection out of line",
        [("csrc/cuda/gate.cuh", TIES_NOW, TIES_BEFORE),
         ("csrc/cuda/gate.cuh", "// Bit j of the short-key selection's `tied` mask",
          TIES_BEFORE_FUNCTIONS + "// Bit j of a short-key selection's `tied` mask")],
        ("warp",)),
    "gate_exp_branches": Variant(
        "gate: the softmax normaliser's exps each behind a branch on the slot's validity, as "
        "before (they then run one after another)",
        [("csrc/cuda/gate.cuh", """    ex[i] = expf(x[i] - max_out);
    s += ((valid >> i) & 1u) ? ex[i] : 0.f;""",
          """    ex[i] = ((valid >> i) & 1u) ? expf(x[i] - max_out) : 0.f;
    s += ex[i];""")],
        ("warp", "wide")),
    "gate_merge_atomics": Variant(
        "gate: a CTA merges its warps' statistics with shared-memory atomics (compare-and-swap "
        "loops) into one set of sums, zeroed at the start behind a block barrier, as before, "
        "not by summing the runs its warps leave in shared memory, in a fixed order; and a warp "
        "of one token keeps its counts and weight sums in shared memory, as then",
        [(GATE, MERGE_FIELDS_NOW, MERGE_FIELDS_BEFORE),
         (GATE, MERGE_AREA_NOW, MERGE_AREA_BEFORE),
         (GATE, MERGE_START_NOW, MERGE_BEFORE),
         (GATE, MERGE_END_NOW, MERGE_END_NOW.replace("}\n}", "}\n#endif\n}")),
         (GATE, MERGE_PLAN_NOW, MERGE_PLAN_BEFORE),
         (GATE, MERGE_OFFSETS_NOW, MERGE_OFFSETS_BEFORE),
         (GATE, DIRECT_SUMS_NOW, DIRECT_SUMS_OFF)],
        ("warp",)),
    "gate_direct_sums_off": Variant(
        "gate: a warp of one token keeps its counts and weight sums in E-wide shared arrays, "
        "zeroed first and scanned (or merged by the CTA) at the end, as before, not k global "
        "atomics each",
        [(GATE, DIRECT_SUMS_NOW, DIRECT_SUMS_OFF)],
        ("warp",)),
    "gate_direct_sums_all": Variant(
        "gate: every warp adds its counts and weight sums with k global atomics a token, also "
        "where it covers several tokens (T past about the resident warps), instead of keeping "
        "them in shared memory for its run",
        [(GATE, DIRECT_SUMS_NOW, "  c.direct_sums = true;\n")],
        ("warp",)),
    "gate_steer_branches": Variant(
        "gate: each slot's steering-table reads behind a branch on the slot's validity, as "
        "before, so that they wait one after another, not all read at once up to VPT 16",
        [(GATE, "    if (VPT <= 16 || here) {\n      const int e",
          "    if (here) {\n      const int e"),
         (GATE, "    if (VPT <= 16 || here)\n      y = steered_logit",
          "    if (here)\n      y = steered_logit")],
        ("warp",)),
    "gate_merge_off": Variant(
        "gate: no CTA merges its warps' statistics; each warp adds its own run to the "
        "statistics with global atomics",
        [(GATE, "const bool merges = sums && merge_wpb > 1;", "const bool merges = false;")],
        ("warp",)),
    "gate_stats_full": Variant(
        "gate: statistics calls on 16-bit logits ranked as they are run the full kernel, as "
        "before the half-key statistics build",
        [("csrc/cuda/gate.cuh", "p.any_stats() ? half_kernel_for_tier<true>(vpt, lt)",
          "p.any_stats() ? full_kernel_for_tier(vpt, lt)")],
        ("warp",)),
    "gate_stats_bounds_off": Variant(
        "gate: the half-key statistics build without its launch bounds (68 and 99 registers "
        "at VPT 2 and 4: 24 and 16 warps per SM instead of 32 and 24)",
        [("csrc/cuda/gate.cuh", "32, VPT <= 2 ? 4 : VPT <= 4 ? 3 : 1)", "32, 1)")],
        ("warp",)),
    "gate_stats_vpt8_3_blocks": Variant(
        "gate: the half-key statistics build asks for 3 CTAs per SM at VPT 8 too (24 warps "
        "instead of 16, 40 bytes spilled)",
        [("csrc/cuda/gate.cuh", "VPT <= 4 ? 3 : 1)", "VPT <= 8 ? 3 : 1)")],
        ("warp",)),
    "gate_stats_exps_again": Variant(
        "gate: the dense statistics take their own exps (softmax) or scores (sigmoid, "
        "sqrt(softplus)) after the selection, as before, instead of the softmax normaliser's "
        "and the selection's",
        [("csrc/cuda/gate.cuh", "constexpr bool kDenseFirst = VPT < 32;",
          "constexpr bool kDenseFirst = false;")],
        ("warp",)),
    "gate_groups_branches": Variant(
        "gate: groups of 32 scored one group at a time behind a branch each, as before "
        "(a decode-sized DeepSeek-V3 call waits on that chain)",
        [("csrc/cuda/gate.cuh", GROUPS_OF_32_NOW, GROUPS_OF_32_BEFORE)],
        ("warp",)),
    "wide_k_rounds": Variant(
        "gate past 1024 experts: every warp lists k keys before they are ranked, as before "
        "wide_list_step (k = 64: 64 rounds a warp, not 12)",
        [("csrc/cuda/gate_launch.h", "return step < k ? step : k;", "return k;")],
        ("wide",)),
    "wide_merge": Variant(
        "gate past 1024 experts: warp 0 merges the warps' lists in k dependent rounds, as at "
        "9e33c6f, instead of every warp ranking its keys at once",
        [("csrc/cuda/gate_wide.cuh", "      bool dry = true, ended = false;\n", WIDE_MERGE_STATE),
         ("csrc/cuda/gate_wide.cuh",
          "        // ---- Stage 2: each listed key's rank, and the top k in order ----\n",
          WIDE_MERGE),
         ("csrc/cuda/gate_wide.cuh", WIDE_RANKS_END, WIDE_MERGE_END)],
        ("wide",)),
    "wide_cache8": Variant(
        "gate past 1024 experts: each lane caches its 8 best remaining keys instead of 4 (fewer "
        "rescans of its VPT slots; 46 us a token on the H200 of 2026-11-26)",
        [("csrc/cuda/gate_wide.cuh", "constexpr int kCache = 4;", "constexpr int kCache = 8;")],
        ("wide",)),
}


def _gate(semantics: str, T: int, E: int, k: int, kind: str, device,
          dtype: str = "bfloat16") -> Callable:
    from moe_route import benchmark as B
    import torch

    return B.gate_and_baseline(B.Case(semantics, T, E, k, getattr(torch, dtype)), device)[kind]


def _plan(T: int, E: int, k: int, block: int, device) -> Callable:
    import torch
    from moe_route import dispatch_plan

    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(0)).to(device)
    return lambda: dispatch_plan(ids, E, block)


def _dispatch(op: str, T: int, k: int, H: int, E: int, device) -> Callable:
    from moe_route import benchmark as B
    import torch

    return B.dispatch_callables(B.DispatchCase(T, k, H, E, torch.bfloat16), device)[op][2]


# name: builder(device) -> the callable timed. R = T*k + E*(block - 1) rows for the plans.
CASES = {
    "gate T=1 E=128 k=8": lambda d: _gate("softmax_topk", 1, 128, 8, "gate", d),
    "gate T=64 E=256 k=8": lambda d: _gate("softmax_topk", 64, 256, 8, "gate", d),
    # one token: statistics cost 2.2x the plain gate on 2026-11-29 (8.3 against 3.8 us)
    "gate T=1 E=512 k=8": lambda d: _gate("softmax_topk", 1, 512, 8, "gate", d),
    "gate+stats T=1 E=512 k=8": lambda d: _gate("softmax_topk", 1, 512, 8, "gate_stats", d),
    # the worst statistics ratio of the H200 run: 2.59x the plain gate
    "gate topk_softmax T=1024 E=128 k=4": lambda d: _gate("topk_softmax", 1024, 128, 4, "gate", d),
    "gate+stats topk_softmax T=1024 E=128 k=4":
        lambda d: _gate("topk_softmax", 1024, 128, 4, "gate_stats", d),
    "gate T=16384 E=128 k=8": lambda d: _gate("softmax_topk", 16384, 128, 8, "gate", d),
    "gate+stats T=16384 E=128 k=8": lambda d: _gate("softmax_topk", 16384, 128, 8, "gate_stats", d),
    "gate T=16384 E=256 k=8": lambda d: _gate("softmax_topk", 16384, 256, 8, "gate", d),
    "gate+stats T=16384 E=256 k=8": lambda d: _gate("softmax_topk", 16384, 256, 8, "gate_stats", d),
    "gate T=16384 E=512 k=8": lambda d: _gate("softmax_topk", 16384, 512, 8, "gate", d),
    # bf16 logits steered (bench_steer): 1.1-1.6x slower on 2026-11-29 than on 2026-11-26
    # steering at T=1 cost 4.7x the plain gate on 2026-11-29 (13.8 against 2.9 us)
    "gate+steer T=1 E=256 k=8": lambda d: _gate("softmax_topk", 1, 256, 8, "gate_steer", d),
    "gate+steer T=1024 E=128 k=8": lambda d: _gate("softmax_topk", 1024, 128, 8, "gate_steer", d),
    "gate+steer T=16384 E=256 k=8":
        lambda d: _gate("softmax_topk", 16384, 256, 8, "gate_steer", d),
    "gate T=16384 E=256 k=8 fp32":
        lambda d: _gate("softmax_topk", 16384, 256, 8, "gate", d, "float32"),
    # the worst statistics ratio of 2026-11-29: 3.17x (fp32 statistics run the full build)
    "gate T=1024 E=256 k=4 fp32":
        lambda d: _gate("softmax_topk", 1024, 256, 4, "gate", d, "float32"),
    "gate+stats T=1024 E=256 k=4 fp32":
        lambda d: _gate("softmax_topk", 1024, 256, 4, "gate_stats", d, "float32"),
    # a token with tied short keys sets the call's time (2026-11-29: 1.3-1.9x the first run)
    "gate T=1024 E=256 k=8 fp32":
        lambda d: _gate("softmax_topk", 1024, 256, 8, "gate", d, "float32"),
    "gate deepseek_v3 T=1024": lambda d: _gate("deepseek_v3", 1024, 256, 8, "gate", d),
    "gate deepseek_v3 T=16384": lambda d: _gate("deepseek_v3", 16384, 256, 8, "gate", d),
    "gate deepseek_v3 T=1": lambda d: _gate("deepseek_v3", 1, 256, 8, "gate", d),
    "gate deepseek_v3 T=64": lambda d: _gate("deepseek_v3", 64, 256, 8, "gate", d),
    "gate+stats deepseek_v3 T=16384":
        lambda d: _gate("deepseek_v3", 16384, 256, 8, "gate_stats", d),
    "gate topk_softmax T=1 E=16384 k=64": lambda d: _gate("topk_softmax", 1, 16384, 64, "gate", d),
    "gate topk_softmax T=1024 E=16384 k=64":
        lambda d: _gate("topk_softmax", 1024, 16384, 64, "gate", d),
    "plan T=1 E=256 k=8 block=1": lambda d: _plan(1, 256, 8, 1, d),
    "plan T=64 E=256 k=8 block=1": lambda d: _plan(64, 256, 8, 1, d),
    "plan T=64 E=256 k=8 block=64": lambda d: _plan(64, 256, 8, 64, d),
    "plan T=64 E=256 k=8 block=128": lambda d: _plan(64, 256, 8, 128, d),
    "plan T=256 E=256 k=8 block=1": lambda d: _plan(256, 256, 8, 1, d),
    "plan T=4096 E=256 k=8 block=1": lambda d: _plan(4096, 256, 8, 1, d),
    "permute T=1 k=8 H=7168": lambda d: _dispatch("permute", 1, 8, 7168, 256, d),
    "permute T=64 k=8 H=7168": lambda d: _dispatch("permute", 64, 8, 7168, 256, d),
    "permute T=4096 k=8 H=7168": lambda d: _dispatch("permute", 4096, 8, 7168, 256, d),
    "permute64 T=1 k=8 H=7168, tail left": lambda d: _dispatch("permute64", 1, 8, 7168, 256, d),
    "unpermute T=4096 k=8 H=7168": lambda d: _dispatch("unpermute", 4096, 8, 7168, 256, d),
}


def case_kernel(name: str) -> str:
    """The one of ``KERNELS`` that case ``name`` times."""
    if not name.startswith("gate"):
        return "dispatch"
    return "wide" if "E=16384" in name else "warp"


def cases_for(variants) -> list:
    """The cases (in ``CASES`` order) that time the kernels of the named variants."""
    kernels = {kernel for name in variants for kernel in VARIANTS[name].kernels}
    return [name for name in CASES if case_kernel(name) in kernels]


def apply_changes(tree: Path, changes: list) -> None:
    """Each (file, old, new) of a variant into ``tree``; ``old`` must occur exactly once."""
    for rel, old, new in changes:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise ValueError(f"gpu_tune: {rel} holds {text.count(old)} copies of {old!r}, "
                             "expected exactly 1 (the variant is out of date with the source)")
        path.write_text(text.replace(old, new))


def measure(device: str, names, min_time: float) -> dict:
    """``{case: summary}`` of ``moe_route.benchmark.time_fn`` for the named cases, in this
    process (whose ``moe_route`` is the build under test)."""
    from moe_route import benchmark as B

    results = {}
    for name in names:
        fn = CASES[name](device)
        method, _ = B.pick_method(fn, device)
        results[name] = B.time_fn(fn, device, min_time=min_time, method=method)
    return results


def _copy_tree(dst: Path) -> None:
    skip = shutil.ignore_patterns(".git", "build", "__pycache__", "*.so", "*.egg-info", ".whl",
                                  ".pytest_cache", ".hypothesis")
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)


def base_temp(arch: str, tree: Path = ROOT) -> Path | None:
    """The temp folder of ``tree``'s in-place build (``setup.py build_ext --inplace``) if that
    build is a CUDA build for ``arch`` whose objects a variant may link; else None."""
    try:
        info = json.loads((tree / "moe_route" / "_build_info.json").read_text())
    except (OSError, ValueError):
        return None
    if not info.get("cuda_built") or info.get("cuda_archs") != arch or info.get("debug"):
        return None
    temps = [t for t in (tree / "build").glob(f"temp.*-{sys.implementation.cache_tag}")
             if (t / ".ninja_deps").is_file()]
    return max(temps, key=lambda t: (t / ".ninja_deps").stat().st_mtime, default=None)


def parse_ninja_deps(text: str, temp: Path) -> dict:
    """``{object, relative to temp: set of the files it was compiled from}`` out of ``ninja -t
    deps`` (real paths: ninja keeps them as the compiler named them, relative to ``temp`` or
    through links). An object whose record is stale (a file changed after it was built) is left
    out."""
    deps, current = {}, None
    for line in text.splitlines():
        if line.startswith("    "):
            if current is not None:
                current.add(os.path.realpath(os.path.join(temp, line.strip())))
        elif line.strip():
            obj, _, state = line.partition(": #deps")
            current = None
            if state.rstrip().endswith("(VALID)"):
                current = deps[Path(obj).relative_to(temp).as_posix()] = set()
    return deps


def object_deps(temp: Path) -> dict:
    """``parse_ninja_deps`` of the build in ``temp``; empty if ninja cannot be asked."""
    ninja = shutil.which("ninja")
    if ninja is None:
        return {}
    proc = subprocess.run([ninja, "-C", str(temp), "-t", "deps"], capture_output=True, text=True)
    return parse_ninja_deps(proc.stdout, temp) if proc.returncode == 0 else {}


def link_unchanged(deps: dict, temp: Path, changed, dst: Path) -> list:
    """Links (in ``dst``, laid out as ``temp``) the base's objects that no file in ``changed``
    (paths relative to the tree) went into, for setup.py's MOE_ROUTE_LINK_OBJECTS; returns them."""
    gone = {os.path.realpath(ROOT / rel) for rel in changed}
    kept = sorted(obj for obj, files in deps.items() if not files & gone)
    for obj in kept:
        (dst / obj).parent.mkdir(parents=True, exist_ok=True)
        (dst / obj).symlink_to(temp / obj)
    return kept


def _env_for(tree: Path) -> dict:
    """The environment whose ``import moe_route`` finds ``tree``'s package and build."""
    return dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _has_cuda_kernels(tree: Path) -> bool:
    probe = "from moe_route import _loader; assert _loader.has_kernel('topk_gate', 'cuda')"
    return subprocess.run([sys.executable, "-c", probe], cwd=tree, env=_env_for(tree),
                          capture_output=True).returncode == 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_measure(tree: Path, out_json: Path, cases: list, args, timeout: float,
                 env: tuple = ()) -> dict:
    cmd = [sys.executable, str(tree / "bench" / "gpu_tune.py"), "--measure", str(out_json),
           "--device", args.device, "--min-time", str(args.min_time), "--cases", *cases]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=dict(_env_for(tree), **dict(env)),
                              capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(out_json.read_text())


def format_table(results: dict) -> str:
    """Cases down, builds across: the base's median (us), then each variant's with its ratio to
    the base (below 1: the variant is faster)."""
    names = [n for n in results if isinstance(results[n], dict) and "error" not in results[n]]
    cases = [c for c in CASES if any(c in results[n] for n in names)]
    width = max(len(c) for c in cases) + 2
    head = f"{'case':<{width}}" + "".join(f"{n:>22}" for n in names)
    lines = [head, "-" * len(head)]
    for case in cases:
        base = results.get(BASE, {}).get(case)
        row = f"{case:<{width}}"
        for n in names:
            s = results[n].get(case)
            if s is None:
                row += f"{'-':>22}"
                continue
            cell = f"{s['median_us']:.2f}"
            if n != BASE and base:
                cell += f" ({s['median_us'] / base['median_us']:.2f}x)"
            row += f"{cell:>22}"
        lines.append(row)
    for n, r in results.items():
        if not isinstance(r, dict) or "error" in r:
            lines.append(f"{n}: no timings ({r.get('error', r) if isinstance(r, dict) else r})")
    return "\n".join(lines)


def build_variants(names, work: Path, deadline: float, arch: str, report: dict,
                   with_base: bool = True) -> dict:
    """Copies of this tree with each named variant's changes, built in parallel in ``work`` (the
    cores shared out), after, ``with_base``, this tree in place if it has no CUDA build yet (as
    "base"). A variant's build links the base's objects that its changes do not reach, as ninja
    recorded their files, and compiles the others. Returns ``{name: tree}`` of the builds that
    succeeded by ``deadline``; the others get an error in ``report["results"]``, every build its
    time, the objects it reused and its log's tail in ``report["variants"]``."""
    trees, unbuilt = {}, {}
    for name in names:
        report["variants"][name] = VARIANTS[name]._asdict()
        if not VARIANTS[name].changes:  # an environment variable's: the base build, timed so
            unbuilt[name] = ROOT
            continue
        tree = work / name
        _copy_tree(tree)
        try:
            apply_changes(tree, VARIANTS[name].changes)
        except ValueError as exc:
            report["results"][name] = {"error": str(exc)}
            continue
        trees[name] = tree
    env = dict(os.environ, MOE_ROUTE_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch)
    if with_base and not _has_cuda_kernels(ROOT):
        _build_in_place({BASE: ROOT}, work, deadline, env, report, {BASE: []})
    temp = base_temp(arch)
    deps = object_deps(temp) if temp else {}
    reused = {}
    for name in trees:
        changed = {rel for rel, _, _ in VARIANTS[name].changes}
        reused[name] = link_unchanged(deps, temp, changed, work / f"{name}.objects")
        print(f"gpu_tune: {name} links {len(reused[name])} of the base's {len(deps)} objects",
              flush=True)
    return {**unbuilt, **_build_in_place(trees, work, deadline, env, report, reused)}


def _build_in_place(trees: dict, work: Path, deadline: float, env: dict, report: dict,
                    reused: dict) -> dict:
    """Builds the trees in place, all at once, each linking the objects ``reused[name]`` in
    ``work/NAME.objects``; returns ``{name: tree}`` of those built by ``deadline``."""
    jobs = max(1, (os.cpu_count() or 2) // max(1, len(trees)))
    builds = {}
    for name, tree in trees.items():
        log = open(work / f"{name}.build.log", "w")
        mine = dict(env, MAX_JOBS=str(jobs))
        if reused[name]:
            mine["MOE_ROUTE_LINK_OBJECTS"] = str(work / f"{name}.objects")
        builds[name] = (subprocess.Popen([sys.executable, "setup.py", "-q", "build_ext",
                                          "--inplace"], cwd=tree, env=mine, stdout=log,
                                         stderr=subprocess.STDOUT), log, time.monotonic())
    print(f"gpu_tune: building {', '.join(builds)} ({jobs} jobs each) in {work}", flush=True)
    built = dict(trees)
    for name, (proc, log, started) in builds.items():
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        log.close()
        report["variants"].setdefault(name, {}).update(
            build_s=round(time.monotonic() - started, 1), reused_objects=reused[name],
            build_log_tail=_tail(work / f"{name}.build.log"))
        if rc != 0:
            why = "build timed out" if rc is None else f"build failed (exit {rc})"
            report["results"][name] = {"error": why}
            built.pop(name)
    return built


def time_builds(trees: dict, cases: list, work: Path, args, deadline: float, report: dict):
    """Times ``cases`` against the base (this tree's in-place build), each variant's build in
    ``trees``, and the base again last: the spread of the two bases is the run-to-run noise to
    hold the variants' ratios against. Each build's summaries pass through a file in ``work``."""
    timed = [(BASE, ROOT)] + [(n, t) for n, t in trees.items() if n != BASE]
    timed.append((BASE_AGAIN, ROOT))
    t0 = time.monotonic()
    for name, tree in timed:
        mine = cases if name in (BASE, BASE_AGAIN) else cases_for([name])
        env = VARIANTS[name].env if name in VARIANTS else ()
        report["results"][name] = _run_measure(tree, work / f"{name}.times.json", mine, args,
                                               deadline - time.monotonic() - 5, env)
        print(f"gpu_tune: {name} timed in {time.monotonic() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="output directory")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--arch", default="9.0a", help="TORCH_CUDA_ARCH_LIST of the variant builds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per case")
    ap.add_argument("--work", metavar="DIR",
                    help="where the variants are built (default: a new temporary folder, "
                         "removed at the end)")
    phase = ap.add_mutually_exclusive_group()
    phase.add_argument("--build-only", action="store_true",
                       help="build the variants in --work and stop (the budget is the builds'); "
                            "the base, this tree's in-place build, is left to the caller")
    phase.add_argument("--time-only", action="store_true",
                       help="time the builds an earlier --build-only left in --work")
    ap.add_argument("--list", action="store_true", help="print the variants and cases")
    ap.add_argument("--measure", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="+", default=list(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name} ({', '.join(variant.kernels)}): {variant.what}")
        print("cases:", "; ".join(CASES))
        return 0
    if args.measure:  # one build's timings, in the process that imported it
        import moe_route
        from moe_route import _loader

        found = Path(moe_route.__file__).resolve().parent
        if found != (ROOT / "moe_route").resolve():  # a variant timed as another build
            print(f"gpu_tune: imported moe_route from {found}, not from this tree ({ROOT})",
                  file=sys.stderr)
            return 1
        if args.device == "cuda" and not _loader.has_kernel("topk_gate", "cuda"):
            print("gpu_tune: this build has no CUDA kernels", file=sys.stderr)
            return 1
        Path(args.measure).write_text(json.dumps(measure(args.device, args.cases,
                                                         args.min_time)))
        return 0
    if not args.out:
        ap.error("OUT_DIR is required")
    if (args.build_only or args.time_only) and not args.work:
        ap.error("--build-only and --time-only need --work")

    sys.path.insert(0, str(ROOT))  # this tree's moe_route for the report's metadata
    deadline = time.monotonic() + args.budget
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(
        prefix="moe_route_tune_"))
    state = work / "builds.json"  # what --build-only leaves for --time-only
    if args.time_only and not state.exists():
        print(f"gpu_tune: {state} is missing: run --build-only first", file=sys.stderr)
        return 1
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.time_only:
        saved = json.loads(state.read_text())
        report, variants = saved["report"], saved["variants"]
        trees = {name: Path(tree) for name, tree in saved["trees"].items()}
    else:
        report, variants = {"variants": {}, "results": {}}, args.variants
        # In one run, the builds leave 120 s of the budget for the timing. --build-only leaves
        # the base to its caller (gpu_check.sh builds it meanwhile, in place).
        trees = build_variants(variants, work, deadline - (0 if args.build_only else 120),
                               args.arch, report, with_base=not args.build_only)
        print(f"gpu_tune: builds done in {args.budget - (deadline - time.monotonic()):.0f} s",
              flush=True)
        if args.build_only:
            state.write_text(json.dumps({"report": report, "variants": variants,
                                         "trees": {n: str(t) for n, t in trees.items()}}))
            return 0 if len(trees) == len(variants) else 1

    time_builds(trees, cases_for(variants), work, args, deadline, report)

    from moe_route import benchmark as B

    report["meta"] = B.run_meta(args.device)
    table = format_table(report["results"])
    legend = "\n".join([f"{BASE}: this tree as built in place; {BASE_AGAIN}: the same, timed last"]
                       + [f"{n}: {VARIANTS[n].what}" for n in variants])
    text = f"{B.format_meta(report['meta'])}\n\n{table}\n\n{legend}\n"
    (out / "gpu_tune.txt").write_text(text)
    (out / "gpu_tune.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, r in report["results"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
