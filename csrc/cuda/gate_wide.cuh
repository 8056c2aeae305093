// topk_gate on CUDA for more than 1024 experts (Doge's product keys: 16384 by default): one CTA
// per token. gate.cuh is the warp-per-token kernel for E <= 1024; this one takes the same
// GateParams, computes the same keys and the same formulas, and gives the same ids and weights.
//
// Thread mapping: a CTA of kWideThreads threads routes the tokens of a contiguous range one after
// the other (a persistent grid of one wave, as in gate.cuh). Thread x holds experts i*512 + x
// (slot i < VPT, a tier 4, 8, 16 or 32, so E <= 16384) in registers; loads are coalesced. The
// row's reductions (softmax, std steering, forcing, entropy) are a warp butterfly followed by the
// sum (or max) of the 16 warps' results in warp order, so every thread ends with the same bits.
//
// Selection in two stages, with gate.cuh's packed keys. (1) Each warp lists its own best keys
// in descending order in shared memory, a round of "warp max of the lanes' heads" a key, each
// lane holding its best few remaining keys sorted in registers and rescanning its VPT slots only
// when they run out. (2) Every listed key is ranked among all the listed keys: its position in
// its own list plus, for each other list, how many of that list's keys are above it (a binary
// search: the lists are sorted and the keys distinct). The key of rank r < k is the r-th pick.
// A warp lists a few keys more than its share of k at first (wide_list_step). Where its last
// key ranks above the k-th, a key it has not listed yet might too: it lists more, and all are
// ranked again, after a barrier. So the result is the exact top k, in the same order, however
// the row's leaders fall across the warps. Each ranking runs on every warp at once, where a
// merge of the lists was k dependent rounds on one warp.
//
// Weights: warp 0, from each selected expert's weight-side logit, recomputed from the logits and
// the steering table by the row's own operations (the same bits), then gate.cuh's formulas.
//
// Statistics: counts, weight sums and coact pairs are global atomics per token (k, k and k*k).
// Tokens and entropy (thread 0) and the dense distribution q accumulate while consecutive tokens
// share a group and are flushed with global atomics when it changes and at the end of the range
// (E float atomics per CTA and run of a group). q's accumulator is in shared memory, each thread
// owning its experts' entries: held in registers it took VPT of them for the whole kernel, and
// the VPT 32 build spilled 1104 bytes. At 16384 experts it is 64 KiB, past the 48 KiB default,
// so the launcher opts the build in (wide_opt_in).
//
// Two builds per (VPT, logit type), as in gate.cuh: the full kernel, and a plain one compiled
// without steering, statistics and replay for calls that use none of them (needs_full_kernel).
// Registers and spills of every build: bench/RESULTS.md (`python bench/kernel_resources.py`).
//
// Limits (gate_launch.h): k <= 256, for the lists' shared memory, and no group limit. No
// transformers family routes over more than 1024 experts in groups.
#pragma once

#include "gate.cuh"

namespace moe_route {
namespace cuda {
namespace detail {

constexpr int kWideThreads = kWideWarps * 32;  // kWideWarps: gate_launch.h
static_assert(kWideMaxExperts == kWideThreads * 32, "VPT 32 covers kWideMaxExperts");

struct WidePlan {
  int64_t chunk = 1;  // tokens per CTA (contiguous range)
  int32_t blocks = 0;
  size_t smem_bytes = 0;
};

// Shared memory in 32-bit words: [0, 16) the warps' partial reductions, [16] the replay flag
// ([17] unused, so that the lists start 8-byte aligned), [18, 34) the keys each warp's list
// holds, sel_id [k] from word 34, sel_w [k] after it, the 16 lists of k keys (u64) from an even
// word, then, for calls that sum prob_sum, q's accumulator [E].
constexpr int64_t kWideListedOffset = kWideWarps + 2;
constexpr int64_t kWideSelOffset = kWideListedOffset + kWideWarps;
__host__ __device__ constexpr int64_t wide_lists_offset(int64_t k) {
  return kWideSelOffset + 2 * k;
}
__host__ __device__ constexpr int64_t wide_q_offset(int64_t k) {
  return wide_lists_offset(k) + 2 * kWideWarps * k;
}
inline size_t wide_smem_bytes(const GateParams& p) {
  return size_t(wide_q_offset(p.k) + (p.prob_sum ? p.E : 0)) * sizeof(uint32_t);
}
static_assert(kWideSelOffset % 2 == 0, "the lists start 8-byte aligned");
static_assert(wide_q_offset(kWideMaxK) * 4 <= kSmemPerBlock,
              "without prob_sum, k <= kWideMaxK fits the default dynamic shared memory");
// The most a call takes (k = 256, 16384 experts, prob_sum): 100,488 bytes, within the opt-in
// limit of sm_80 (163 KiB), sm_86 and sm_89 (99 KiB) and sm_90 (227 KiB).
constexpr size_t kWideMaxSmemBytes = size_t(wide_q_offset(kWideMaxK) + kWideMaxExperts) * 4;
static_assert(kWideMaxSmemBytes <= 99 * 1024, "fits every arch from sm_80 on");

struct FAdd {
  __device__ __forceinline__ float operator()(float x, float y) const { return x + y; }
};
struct FMax {  // warp_max's rule
  __device__ __forceinline__ float operator()(float x, float y) const { return y > x ? y : x; }
};
struct FMin {
  __device__ __forceinline__ float operator()(float x, float y) const { return y < x ? y : x; }
};

// A row held by the whole CTA: base = threadIdx.x. Every reduction is a barrier: all threads
// call it, with block-uniform control flow.
struct BlockRow {
  static constexpr int kStride = kWideThreads;
  int base;
  float* red;  // [kWideWarps] in shared memory

  template <class Op>
  __device__ __forceinline__ float reduce(float x, Op op) const {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(kFullMask, x, o));
    if ((base & 31) == 0) red[base >> 5] = x;
    __syncthreads();
    float r = red[0];
#pragma unroll
    for (int w = 1; w < kWideWarps; ++w) r = op(r, red[w]);
    __syncthreads();  // every thread has read red before the next reduction writes it
    return r;
  }
  __device__ __forceinline__ float sum(float x) const { return reduce(x, FAdd{}); }
  __device__ __forceinline__ float max(float x) const { return reduce(x, FMax{}); }
  __device__ __forceinline__ float min(float x) const { return reduce(x, FMin{}); }
  __device__ __forceinline__ bool any(bool x) const { return max(x ? 1.f : 0.f) > 0.f; }
};

// Two CTAs an SM for the plain builds up to VPT 8: ptxas fits them in 64 registers (VPT 8: 8
// bytes spilled, reloaded once a token). The others need more than 64 and run one.
template <int VPT, LogitType LT, bool kFull>
__global__ void __launch_bounds__(kWideThreads, kFull || VPT > 8 ? 1 : 2)
    topk_gate_wide_kernel(const GateParams p, const WidePlan plan) {
  static_assert(VPT >= 1 && VPT <= 32, "VPT tier out of range");
  extern __shared__ __align__(16) uint32_t gate_smem[];
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();

  const int tid = int(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int E = int(p.E);
  const int k = int(p.k);
  // The plan gives every CTA at least one token; all threads run the same range (barriers).
  const int64_t t_begin = int64_t(blockIdx.x) * plan.chunk;
  const int64_t t_end = p.T - t_begin < plan.chunk ? p.T : t_begin + plan.chunk;
  const BlockRow row{tid, reinterpret_cast<float*>(gate_smem)};
  uint32_t* const replay_flag = gate_smem + kWideWarps;
  uint32_t* const listed_words = gate_smem + kWideListedOffset;  // [kWideWarps]
  int32_t* const sel_id = reinterpret_cast<int32_t*>(gate_smem + kWideSelOffset);  // [k]
  float* const sel_w = reinterpret_cast<float*>(sel_id + k);                        // [k]
  uint64_t* const lists = reinterpret_cast<uint64_t*>(gate_smem + wide_lists_offset(k));
  // q's accumulator: entry i * kWideThreads + tid is this thread's alone (no barrier needed).
  float* const q_acc =
      kFull && p.prob_sum ? reinterpret_cast<float*>(gate_smem + wide_q_offset(k)) : nullptr;

  uint32_t valid = 0;  // bit i: expert i*512 + tid exists
#pragma unroll
  for (int i = 0; i < VPT; ++i) valid |= (i * kWideThreads + tid < E ? 1u : 0u) << i;

  // ---- Per-call constants of the steering table (gate.cuh's) ----
  const float* steer = kFull ? p.steer : nullptr;
  const SteerMasks masks = steer ? steer_masks<VPT>(row, steer, E, valid) : SteerMasks{};
  const bool zw_is_z0 = steer != nullptr && p.steer_select_only;
  const bool softmax = p.score == Score::Softmax;
  const bool any_stats = kFull && p.any_stats();
  const bool dense = kFull && p.dense_stats();
  const bool dense_softmax = softmax || p.score == Score::None;

  // ---- The open run of one statistics group: tokens and entropy (thread 0), q (q_acc) ----
  using u64 = unsigned long long;
  if (q_acc) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if ((valid >> i) & 1u) q_acc[i * kWideThreads + tid] = 0.f;
  }
  int64_t run_g = -1;
  uint32_t run_tokens = 0;
  float run_entropy = 0.f;
  auto flush = [&]() {
    if (tid == 0) {
      if (p.tokens) atomicAdd(reinterpret_cast<u64*>(p.tokens + run_g), (u64)run_tokens);
      if (p.entropy_sum) atomicAdd(p.entropy_sum + run_g, run_entropy);
    }
    run_tokens = 0;
    run_entropy = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = i * kWideThreads + tid;
      if (q_acc && ((valid >> i) & 1u)) {
        if (q_acc[e] != 0.f) atomicAdd(p.prob_sum + run_g * E + e, q_acc[e]);
        q_acc[e] = 0.f;
      }
    }
  };

  for (int64_t t = t_begin; t < t_end; ++t) {
    __syncthreads();  // the previous token's shared-memory reads are done
    const int64_t off = t * p.row_stride;
    // One array of logits, z0 as loaded, then steered in place: at VPT 32 a second (and a
    // third for the weight side) is what made ptxas spill.
    float z[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      z[i] = ((valid >> i) & 1u)
                 ? sanitize(raw_to_float<LT>(load_raw<LT>(p.logits, off + i * kWideThreads + tid)))
                 : 0.f;
    }

    // The statistics group of this token (block-uniform). Out-of-range ids cannot raise here.
    int64_t g = 0;
    if (any_stats && p.groups)
      g = p.groups_int64 ? static_cast<const int64_t*>(p.groups)[t]
                         : int64_t(static_cast<const int32_t*>(p.groups)[t]);
    const bool counted = any_stats && g >= 0 && g < p.G;
    const bool tok_dense = counted && dense;

    // ---- The weight side: softmax normaliser of the weight-side logits zw, and the run's
    // per-group sums (before the selection, so that zw is not kept past them) ----
    const bool want_ew = (!p.select_on_logits && softmax) || (tok_dense && dense_softmax);
    float w_max = 0.f, w_sum = 1.f;
    auto weight_side = [&](const float(&zw)[VPT]) {
      if (want_ew) softmax_norm<VPT>(row, zw, valid, w_max, w_sum);
      if (!counted) return;
      if (g != run_g || run_tokens == kMaxRunTokens) {
        if (run_g >= 0) flush();
        run_g = g;
      }
      run_tokens += 1;
      if (!tok_dense) return;
      const auto add_q = [&](int i, float q) {
        if (q_acc) q_acc[i * kWideThreads + tid] += q;
      };
      if (dense_softmax) {
        // The exps again: kept across the normaliser's block-wide sums, they made ptxas spill
        // (VPT 16 and 32, nvcc 13.0, sm_90a).
        run_entropy += add_dense_softmax<VPT>(
            row, zw, valid, w_max, w_sum, [&](int i) { return expf(zw[i] - w_max); }, add_q);
      } else {
        float sc[VPT];
#pragma unroll
        for (int i = 0; i < VPT; ++i) sc[i] = score_of(p.score, zw[i]);
        run_entropy += add_dense_scores<VPT>(row, E, sc, valid, add_q);
      }
    };
    if (zw_is_z0) weight_side(z);  // select-only steering: the weights see the plain logits

    // ---- Steering ----
    RowSteer rs;
    if (steer) rs = steer_row<VPT>(row, p, z, valid, masks, z);
    if (!zw_is_z0) weight_side(z);

    // ---- Router replay: a row of k distinct ids in [0, E) is the selection ----
    bool replayed = false;
    if (kFull && p.replay) {
      if (warp == 0) {
        const bool ok = replay_row(p, t, k, lane, sel_id);
        if (lane == 0) *replay_flag = ok ? 1u : 0u;
      }
      __syncthreads();
      replayed = *replay_flag != 0u;
    }

    if (!replayed) {
      // ---- Selection values v ----
      // This repeats gate.cuh's inline steps. As a helper shared with the warp kernel it changed
      // that kernel's register allocation (nvcc 13.0, sm_90a: the plain E=256 fp32 build went
      // from 80 registers and no spill to 64 and 32 bytes spilled). The weights' steps are
      // shared (selection_weight, finish_weights).
      float v[VPT];
      constexpr bool kRounds = kFull && LT != LogitType::F32;  // gate.cuh's round_scores
      const bool round = kRounds && rounds_scores(p);
      if (selects_on_logits(p, kRounds) || (p.score == Score::None && !round)) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) v[i] = z[i];
      } else if (softmax) {
        float sm_max = w_max, sm_sum = w_sum;
        if (!want_ew || zw_is_z0) softmax_norm<VPT>(row, z, valid, sm_max, sm_sum);
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          v[i] = expf(z[i] - sm_max) / sm_sum;
          if (round) v[i] = round_half<LT>(v[i]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VPT; ++i) v[i] = selection_score<LT>(p.score, z[i], round);
      }
      if (p.selection_bias) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if ((valid >> i) & 1u)
            v[i] = sanitize(v[i] + sanitize(__ldg(p.selection_bias + i * kWideThreads + tid)));
        }
      }

      // ---- Stage 1: this warp's best keys, descending, ended by a 0 if it runs out ----
      // Each lane keeps its kCache best remaining keys sorted in registers and rescans its VPT
      // slots (for the next kCache below the last key taken) only when they run out, so a round
      // is a warp max of the lanes' heads: VPT key builds a refill, where a scan in every round
      // made k * VPT (2048 a token at E = 16384, k = 64).
      constexpr int kCache = 4;
      uint32_t ord[VPT];
#pragma unroll
      for (int i = 0; i < VPT; ++i) ord[i] = order_bits(v[i]);
      uint64_t cache[kCache];
      uint64_t below = ~0ull;  // every key is smaller (tier <= 2)
      bool more = true;        // the lane may hold keys below the cache
      auto refill = [&]() {
#pragma unroll
        for (int c = 0; c < kCache; ++c) cache[c] = 0;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if ((valid >> i) & 1u) {
            uint64_t x = make_key(masks.tier(i), ord[i], uint32_t(i * kWideThreads + tid));
            if (x < below && x > cache[kCache - 1]) {  // insert; the smallest falls off
#pragma unroll
              for (int c = 0; c < kCache; ++c) {
                const uint64_t y = cache[c];
                cache[c] = x > y ? x : y;
                x = x > y ? y : x;
              }
            }
          }
        }
        more = cache[kCache - 1] != 0;
      };
      // The lists are filled on demand (wide_list_step): each warp lists `step` keys, then every
      // listed key is ranked among all of them, and a warp whose last key ranks above the k-th
      // (so that a key it has not listed yet might too) lists `step` more, and all are ranked
      // again, after a barrier.
      const int step = wide_list_step(k);
      uint64_t* const list = lists + int64_t(warp) * k;
      int listed = 0, goal = step;  // keys in this warp's list (its ending 0 included)
      bool dry = true, ended = false;
      for (;;) {  // block-uniform: until the top k are among the listed keys
        for (; listed < goal && !ended; ++listed) {  // one call site: refill inlined once
          if (dry) refill();
          const uint64_t best = warp_max_key(cache[0]);  // warp-uniform
          if (lane == 0) list[listed] = best;
          if (best == 0) {
            ended = true;
            continue;  // counts the ending 0
          }
          dry = false;
          if ((key_index(best) & 31) == lane) {  // the winner pops its head
            below = best;
#pragma unroll
            for (int c = 0; c + 1 < kCache; ++c) cache[c] = cache[c + 1];
            cache[kCache - 1] = 0;
            dry = cache[0] == 0 && more;
          }
        }
        if (lane == 0) listed_words[warp] = uint32_t(listed);
        __syncthreads();

        // ---- Stage 2: each listed key's rank, and the top k in order ----
        // A key's rank is the number of listed keys above it: its position in its own list,
        // plus, in each other list, the length of the run of keys above it, by binary search
        // (the lists are sorted, the keys distinct, and an ending 0 is below every key).
        // Lane l ranks its warp's keys l, l + 32, ...; the searches step kWays lists at a time.
        uint32_t longest = 0;
#pragma unroll
        for (int w = 0; w < kWideWarps; ++w)
          if (w != warp && listed_words[w] > longest) longest = listed_words[w];
        uint32_t top = 1;  // the largest power of two <= the longest other list
        while (top * 2 <= longest) top *= 2;
        const int own = listed - (ended ? 1 : 0);  // this warp's keys, its ending 0 left out
        bool short_list = false;
        for (int q = lane; q < own; q += 32) {
          const uint64_t x = list[q];
          uint32_t rank = uint32_t(q);
          constexpr int kWays = 4;  // all 16 lists at once: 32 registers more, and ptxas spilled
#pragma unroll
          for (int w0 = 0; w0 < kWideWarps; w0 += kWays) {
            uint32_t pos[kWays] = {}, len[kWays];
            const uint64_t* at[kWays];  // list w0 + i
#pragma unroll
            for (int i = 0; i < kWays; ++i) {
              len[i] = w0 + i == warp ? 0u : listed_words[w0 + i];
              at[i] = lists + int64_t(w0 + i) * k;
            }
            for (uint32_t half = top; half > 0; half >>= 1) {
#pragma unroll
              for (int i = 0; i < kWays; ++i) {
                const uint32_t to = pos[i] + half;
                if (to <= len[i] && at[i][to - 1] > x) pos[i] = to;
              }
            }
#pragma unroll
            for (int i = 0; i < kWays; ++i) rank += pos[i];
          }
          if (rank < uint32_t(k)) sel_id[rank] = key_index(x);
          // This warp's last key ranks above the k-th: the next one it lists may still beat
          // the k-th, so the top k may not all be listed yet.
          if (q == own - 1 && !ended && rank + 1 < uint32_t(k)) short_list = true;
        }
        const bool needs_more = __any_sync(kFullMask, short_list);  // warp-uniform
        if (!__syncthreads_or(needs_more)) break;  // block-uniform; sel_id written
        if (needs_more) goal = goal + step < k ? goal + step : k;
      }
    }

    if (warp == 0) {
      __syncwarp();  // publish sel_id where replay_row wrote it (the ranks' writes: a barrier)
      const int kpl = (k + 31) >> 5;
      // ---- Weights (lane j handles selections j = m*32 + lane) ----
      float part_max = -kFltMax;
      for (int m = 0; m < kpl; ++m) {
        const int j = m * 32 + lane;
        if (j < k) {
          // The weight-side logit of the expert, by the row's operations (the same bits).
          const int e = sel_id[j];
          const float x0 = sanitize(raw_to_float<LT>(load_raw<LT>(p.logits, off + e)));
          float x = x0;
          if (steer && !zw_is_z0) {
            const float f = __ldg(steer + kSteerForce * E + e);
            x = f > 0.f ? rs.top : f < 0.f ? rs.bottom : steered_logit(steer, E, e, x0, rs.sd);
          }
          const float w = selection_weight(p, softmax, x, w_max, w_sum);
          sel_w[j] = w;
          part_max = w > part_max ? w : part_max;
        }
      }
      finish_weights(p, softmax, sel_w, k, kpl, lane, part_max);
      const int64_t out = t * int64_t(k);
      for (int m = 0; m < kpl; ++m) {
        const int j = m * 32 + lane;
        if (j < k) {
          float w = sel_w[j];
          if (p.scale != 1.f) w = w * p.scale;
          p.weights[out + j] = w;
          p.ids[out + j] = sel_id[j];
          // ---- Per-selection statistics: global atomics ----
          const int64_t at = g * E + sel_id[j];
          if (counted && p.counts) atomicAdd(reinterpret_cast<u64*>(p.counts + at), 1ull);
          if (counted && p.weight_sum) atomicAdd(p.weight_sum + at, w);
        }
      }
      if (counted && p.coact) add_coact(p, sel_id, lane);
    }
  }
  if (run_g >= 0) flush();
}

// ---------------------------------------------------------------------------------------------
// Host-side planning and dispatch.

inline int wide_vpt_for(int64_t E) { return E <= 2048 ? 4 : E <= 4096 ? 8 : E <= 8192 ? 16 : 32; }

// Launch geometry for a call with p.T > 0 that gate_args_ok takes with p.E > kMaxExperts, for
// `blocks_per_sm` resident CTAs per SM (0 if unknown: one).
inline WidePlan plan_topk_gate_wide(const GateParams& p, int sm_count, int blocks_per_sm) {
  WidePlan c;
  const int64_t ctas =
      int64_t(sm_count > 0 ? sm_count : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  c.chunk = (p.T + ctas - 1) / ctas;
  c.blocks = int32_t((p.T + c.chunk - 1) / c.chunk);
  c.smem_bytes = wide_smem_bytes(p);
  return c;
}

using WideKernel = void (*)(const GateParams, const WidePlan);

// A launch with more than the default 48 KiB of dynamic shared memory needs the kernel's opt-in
// first, within the device's limit (cudaDevAttrMaxSharedMemoryPerBlockOptin; the ATen glue
// refuses a call past it with a clear message). The opt-in is always to the same size, the most
// any call takes (or the device's limit if lower), so that concurrent launches of one build with
// different sizes never lower it under each other, and once is enough: gate.cu's launcher calls
// this once per build and device, since the call has been seen to wait for pending host-device
// copies (oneapi-src/unified-runtime#2678). It sets an attribute of the kernel and enqueues
// nothing, so a stream being captured into a graph is left alone (tests/test_cuda.py captures a
// build's first call).
inline cudaError_t wide_opt_in(WideKernel kernel, size_t smem_bytes, size_t device_limit) {
  if (smem_bytes <= size_t(kSmemPerBlock)) return cudaSuccess;
  if (smem_bytes > device_limit) return cudaErrorInvalidValue;
  const size_t to = kWideMaxSmemBytes < device_limit ? kWideMaxSmemBytes : device_limit;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, int(to));
}

template <int VPT, bool kFull>
inline WideKernel wide_kernel_for_type(LogitType lt) {
  switch (lt) {
    case LogitType::F16: return &topk_gate_wide_kernel<VPT, LogitType::F16, kFull>;
    case LogitType::BF16: return &topk_gate_wide_kernel<VPT, LogitType::BF16, kFull>;
    default: return &topk_gate_wide_kernel<VPT, LogitType::F32, kFull>;
  }
}

// The build for a call (VPT tier, logit type, plain or full as in gate.cuh), instantiated in
// translation units of their own, which nvcc compiles in parallel: gate_wide.cu, and the full
// builds at VPT 32, which compile about as long as the others together, in gate_wide32.cu.
WideKernel select_wide_kernel(const GateParams& p);
WideKernel wide_full_kernel_vpt32(LogitType lt);  // gate_wide32.cu

}  // namespace detail
}  // namespace cuda
}  // namespace moe_route
