// topk_gate on CUDA for decode-sized calls of group-limited routers (DeepSeek-V3: 256 experts in
// 8 groups of 32, the 4 best groups kept, top 8 of their experts): one CTA per token, one warp
// per group. It takes the same GateParams as gate.cuh's warp-per-token kernel, computes the same
// keys with the same formulas, and gives the same ids and weights, bit for bit.
//
// Why: at T <= 1024 the warp kernel gives each token one warp, and that warp's instructions one
// after another set the call's time. DeepSeek-V3 took 9.1 us at T=1, 9.6 at T=64 and 10.3 at
// T=1024 on an H200 (bench/RESULTS.md, 2026-11-26), where softmax top-8 of 256 took about 3 us:
// the sigmoids, the 8 group scores and the top 8 of 128 all ran on one warp. Here the groups' work
// runs on their own warps at once, and one warp merges: the longest chain is one expert's score,
// one group's score and best experts, then the groups' and the experts' selection.
//
// Per token: warp g loads group g's logits (lane l: expert g * gsize + l, gsize <= 32), computes
// the selection values and the group's score (its largest value, or the sum of its two largest),
// and lists the group's best min(k, gsize) experts by 64-bit key (make_key: the selection can
// take no more of one group), in order. After a barrier, warp 0 picks the topk_group groups by
// their scores' keys, holds the kept groups' listed keys one a lane (topk_group * min(k, gsize)
// <= 32), and takes the k best in k rounds. The weights follow from the selected logits as in
// gate.cuh (selection_weight, finish_weights). A second barrier keeps the next token's writes
// after warp 0's reads.
//
// Calls it takes (runs_grouped_build): a group limit (n_group <= 32 groups of <= 32 experts),
// T <= kGroupedMaxTokens, no steering, statistics or replay, and a score other than softmax unless
// the selection ranks the logits (a softmax's weights need the whole row's normaliser).
#pragma once

#include "gate.cuh"

namespace moe_route {
namespace cuda {
namespace detail {

// The most tokens a call may have to run here: up to about there the warp kernel gives each
// token a warp of its own, so one warp's latency sets its time. A guess, not yet timed
// (2026-11-30): bench/gpu_tune.py's variants gate_grouped_off and gate_grouped_all compare.
constexpr int64_t kGroupedMaxTokens = 1024;

inline bool runs_grouped_build(const GateParams& p) {
  if (!limits_groups(p) || p.n_group > 32 || p.T > kGroupedMaxTokens) return false;
  if (p.steer != nullptr || p.any_stats() || p.replay != nullptr) return false;
  if (p.score == Score::Softmax && !p.select_on_logits) return false;
  const int64_t gsize = p.E / p.n_group;
  const int64_t listed = p.k < gsize ? p.k : gsize;
  return gsize <= 32 && p.topk_group * listed <= 32;
}

// Per-launch constants. Shared memory, in 32-bit words: the token's logits [E], the groups'
// scores [n_group], the groups' listed keys [n_group][listed] (u64, from an even word), then the
// selected ids [k] and weights [k].
struct GroupedPlan {
  int32_t blocks = 0;
  int32_t listed = 0;  // keys each group lists: min(k, gsize)
  int32_t keys_off = 0, sel_off = 0;
  size_t smem_bytes = 0;
};

// The shared-memory layout of a call runs_grouped_build takes (blocks left at 0): at most
// 12.4 KiB (E = 1024, k = 32).
inline GroupedPlan grouped_layout(const GateParams& p) {
  GroupedPlan c;
  const int64_t gsize = p.E / p.n_group;
  c.listed = int32_t(p.k < gsize ? p.k : gsize);
  c.keys_off = int32_t((p.E + p.n_group + 1) / 2 * 2);
  c.sel_off = c.keys_off + 2 * int32_t(p.n_group) * c.listed;
  c.smem_bytes = size_t(c.sel_off + 2 * p.k) * sizeof(uint32_t);
  return c;
}

// The plan for a call runs_grouped_build takes: a CTA of n_group warps per token, as many CTAs
// as tokens up to what the SMs hold at once (`blocks_per_sm`, 0 if unknown: one each), each
// then taking every gridDim-th token.
inline GroupedPlan plan_topk_gate_grouped(const GateParams& p, int sm_count, int blocks_per_sm) {
  GroupedPlan c = grouped_layout(p);
  const int64_t resident =
      int64_t(sm_count > 0 ? sm_count : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  c.blocks = int32_t(p.T < resident ? p.T : resident);
  return c;
}

template <LogitType LT>
__global__ void __launch_bounds__(1024)
    topk_gate_grouped_kernel(const GateParams p, const GroupedPlan plan) {
  extern __shared__ __align__(16) uint32_t gate_smem[];
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();

  const int lane = int(threadIdx.x & 31u);
  const int g = int(threadIdx.x >> 5);  // the warp's group
  const int E = int(p.E), k = int(p.k), n_group = int(p.n_group), gsize = E / n_group;
  const int listed = plan.listed, topk_group = int(p.topk_group);
  const int e = g * gsize + lane;  // the lane's expert
  const bool valid = lane < gsize;
  float* const zsm = reinterpret_cast<float*>(gate_smem);  // [E]
  float* const gscore = zsm + E;                           // [n_group]
  uint64_t* const keys = reinterpret_cast<uint64_t*>(gate_smem + plan.keys_off);
  int32_t* const sel_id = reinterpret_cast<int32_t*>(gate_smem + plan.sel_off);  // [k]
  float* const sel_w = reinterpret_cast<float*>(sel_id + k);                      // [k]

  // As the warp kernel's full builds: only those of 16-bit logits may round.
  constexpr bool kRounds = LT != LogitType::F32;
  const bool round = kRounds && rounds_scores(p);
  const bool round_sums = kRounds && rounds_half_sums(p);
  const bool on_logits = selects_on_logits(p, kRounds);
  const bool softmax = p.score == Score::Softmax;  // then on_logits: a softmax of the selected
  const float bias = valid && p.selection_bias ? sanitize(__ldg(p.selection_bias + e)) : 0.f;

  for (int64_t t = blockIdx.x; t < p.T; t += gridDim.x) {
    // ---- The group's selection values (reference: selection_values) and score ----
    uint32_t o = 0;  // the value's order image; 0, below every real one: no expert
    if (valid) {
      const float z = sanitize(raw_to_float<LT>(load_raw<LT>(p.logits, t * p.row_stride + e)));
      zsm[e] = z;
      float v = on_logits ? z : selection_score<LT>(p.score, z, round);
      if (p.selection_bias) v = sanitize(v + bias);
      o = order_bits(v);
    }
    const uint32_t best = warp_max_u32(o);
    float score = from_order_bits(best);
    if (p.group_score == GroupScore::Top2Sum && gsize > 1) {
      // The second largest: the largest without the lowest lane holding the first (a multiset).
      const int owner = __ffs(__ballot_sync(kFullMask, o == best)) - 1;
      score = sanitize(score + from_order_bits(warp_max_u32(lane == owner ? 0u : o)));
      if (round_sums) score = round_half<LT>(score);
    }
    if (lane == 0) gscore[g] = score;

    // ---- The group's best `listed` experts, by (value, lower index) ----
    uint64_t key = valid ? make_key(kTierNormal, o, uint32_t(e)) : 0;
    for (int r = 0; r < listed; ++r) {
      const uint64_t top = warp_max_key(key);
      if (key == top) key = 0;  // keys are distinct: their indices are
      if (lane == 0) keys[g * listed + r] = top;
    }
    __syncthreads();

    if (g == 0) {
      // ---- The topk_group groups (reference: eligible_tiers): bit i, group i kept ----
      uint64_t gkey =
          lane < n_group ? make_key(kTierNormal, order_bits(gscore[lane]), uint32_t(lane)) : 0;
      uint32_t kept = 0;
      for (int r = 0; r < topk_group; ++r) {
        const uint64_t top = warp_max_key(gkey);
        kept |= 1u << key_index(top);
        if (gkey == top) gkey = 0;
      }
      // ---- Top k of the kept groups' lists: lane q * listed + r holds key r of the q-th ----
      const int q = lane / listed;
      uint64_t ck = 0;
      if (q < topk_group) {
        uint32_t rest = kept;
        for (int s = 0; s < q; ++s) rest &= rest - 1u;  // drop the q lowest kept groups
        ck = keys[(__ffs(int(rest)) - 1) * listed + (lane - q * listed)];
      }
      for (int j = 0; j < k; ++j) {
        const uint64_t top = warp_max_key(ck);
        if (ck == top) ck = 0;
        if (lane == 0) sel_id[j] = key_index(top);
      }
      __syncwarp();  // publish sel_id

      // ---- Weights (lane j: selection j < k <= 32), as in the warp kernel ----
      float part_max = -kFltMax;
      if (lane < k) {
        const float w = selection_weight(p, softmax, zsm[sel_id[lane]], 0.f, 1.f);
        sel_w[lane] = w;
        part_max = w;
      }
      finish_weights(p, softmax, sel_w, k, 1, lane, part_max);
      if (lane < k) {
        float w = sel_w[lane];
        if (p.scale != 1.f) w = w * p.scale;
        p.weights[t * k + lane] = w;
        p.ids[t * k + lane] = sel_id[lane];
      }
    }
    __syncthreads();  // warp 0's reads before the next token's writes
  }
}

using GroupedKernel = void (*)(const GateParams, const GroupedPlan);

inline GroupedKernel grouped_kernel_for_type(LogitType lt) {
  switch (lt) {
    case LogitType::F16: return &topk_gate_grouped_kernel<LogitType::F16>;
    case LogitType::BF16: return &topk_gate_grouped_kernel<LogitType::BF16>;
    default: return &topk_gate_grouped_kernel<LogitType::F32>;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace moe_route
