// topk_gate on CUDA: torch-free device code (moe_route/reference.py is the specification and
// csrc/cpu/gate.cpp the step-by-step twin this file mirrors).
//
// Thread mapping: one warp per token. Lane l holds experts i*32 + l (i < VPT, VPT = ceil(E/32)
// rounded up to a compile-time tier 1, 2, 4, 8, 16, 32, so E <= 1024) in registers; loads are
// coalesced across the warp. More experts run in gate_wide.cuh (a CTA per token), which shares
// this file's row steps (steering, softmax normaliser, dense statistics), and decode-sized calls
// of group-limited routers in gate_grouped.cuh (a CTA per token, a warp per group), which gives
// the same bits as this kernel. Every reduction over experts is a per-lane loop plus a warp-wide
// step (a butterfly of xor shuffles, or REDUX for integer maxima), so all lanes end with
// bit-identical results. Each warp owns a contiguous range of tokens and prefetches the next
// token's row while working on the current one. The grid is persistent: sized from the kernel's
// occupancy (plan_for_device) so that every warp is resident at once, one wave.
//
// Three variants per (VPT, logit type): the full kernel, a plain one compiled without steering,
// the group limit, the statistics and rounded scores (round_scores), for calls that use none of
// them (needs_full_kernel), and
// the full kernel with router replay (kReplay), for calls with replay ids only. Two more, the
// plain kernel on half keys (kHalfKeys, up to VPT 16) without and with the statistics (kStats),
// run the calls that rank fp16/bf16 logits as they are and use nothing else of the full kernel
// (runs_half_build: softmax top-k without a bias, as Mixtral, Qwen-MoE and OLMoE route, or
// select_on="logits"), selecting with 32-bit keys (half_order). Those paths hold
// registers for the whole kernel: with nvcc 13.0 for sm_90a the full kernel needs 113-128
// registers per thread for E <= 256, the plain one 40-80, so an SM holds 16 warps of the former
// and 24-48 of the latter (bench/kernel_resources.py). Inlined into the full kernel, the replay
// check alone made it spill at VPT 8 (128 registers, 8-12 bytes), hence its own variant. Every
// feature a build keeps runs the same code in all of them, but for the half-key builds'
// selection and their reading of the selected logits.
//
// Selection: experts rank by (tier, value, lower index), as on the CPU, whose packed 64-bit key
// (tier | order-preserving value bits | 2^30-1-index) orders them in one comparison. Here a
// lane's keys are 32 bits up to VPT 16, sorted once per token, and each of the k rounds is a
// REDUX (the warp max) and a pop by the winning lane: half keys (exact) in the half-key builds,
// short keys (the value's top bits; checked, and the tied positions selected again on 64-bit
// keys where the check fails, see make_short_key) in the others, but for the full builds past VPT 8
// (uses_short_keys). There, and at VPT 32, every round scans the lane's 64-bit keys
// (select_on_keys64; the warp max is two REDUX: warp_max_key). Experts outside the
// chosen groups or past E get key 0, below every real key. Groups (n_group > 1) are scored from
// a per-warp shared-memory copy of the selection values, one group per lane, or, for groups of
// 32, from warp-wide maxima of register slots; the topk_group groups are picked by the same key
// rule.
//
// Statistics: per-warp accumulators for the current group: the dense distribution q in registers,
// counts and weight sums in per-warp shared memory (touched without atomics: a warp owns its
// slice), token count and entropy in registers. They are flushed with global atomics when the
// group changes. At the end of its range a warp leaves its open run in the CTA's merge area
// instead: its group, tokens and entropy, and q, two warps' q to a slot (its counts and weight
// sums stay where they are). The CTA then flushes the runs of the first group it saw, summed over
// its warps in a fixed order, with one global atomic per expert; a warp whose run is of another
// group flushes it itself. At large T a warp covers only a few tokens, and one flush per warp
// would put E global atomics per warp onto the same E addresses. The merge takes no shared-memory
// atomics: on sm_90 a float or 64-bit add there is a compare-and-swap loop, which the 8 warps of
// a CTA adding to the same E entries at once would send round again and again.
// Where each warp covers one token (GatePlan::direct_sums: T up to about the resident warp count),
// the warp keeps no counts or weight sums: its k selections go straight to global memory, k
// atomics each, where zeroing E entries and scanning or merging them would serve k of them.
// Coact pairs are global atomics per token.
//
// Determinism: ids, weights and the integer statistics are bit-reproducible (warp-local,
// fixed-order arithmetic; integer atomics commute). prob_sum, weight_sum and entropy_sum are
// summed per warp in token order and then combined with float atomics (in the CTA's merge area,
// then in global memory), whose order varies from run to run (differences at fp32 rounding level;
// the partition into warps and CTAs depends on the SM count).
//
// Numerics: fp32 throughout with the precise libdevice functions (expf, logf, log1pf, sqrtf, IEEE
// division); do not build with --use_fast_math. Elementwise steps whose rounding the reference pins
// (steering, variance terms) use __fadd_rn/__fmul_rn so that nvcc does not fuse them into FMAs.
// Against the CPU kernels, two things differ: reductions (softmax sums, the std of std steering;
// not the renormalisation of score "none" weights, see finish_weights) add in another order, and
// expf/logf/log1pf are within CUDA's documented 2 ulp, not always the C library's bits. Weights and
// statistics thus agree to rounding. Ids agree exactly where the selection ranks the logits
// themselves (selects_on_logits, with at most add/abs steering); where it ranks computed values
// (sigmoid or sqrtsoftplus scores, probabilities with a selection bias or top2_sum groups, logits
// moved by std steering) two experts within an ulp of each other may be ordered differently.
//
// No host synchronisation and no allocation: the launch is CUDA-graph capturable. In particular
// the kernel cannot raise on groups[t] outside [-1, G); such tokens are skipped for the statistics
// (the CPU path raises instead; the reference only checks CPU tensors).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../gate_params.h"
#include "gate_launch.h"
#include "pdl.cuh"

namespace moe_route {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kFltMax = 3.40282347e38f;
constexpr int kMaxExperts = int(kWarpMaxExperts);  // 32 lanes x VPT 32
constexpr int kMaxWarpsPerBlock = 8;
constexpr int kWarpsPerSm = 32;  // resident warps per SM until the kernel's occupancy is known
constexpr int64_t kSmemPerBlock = 48 * 1024;       // stay under the default dynamic-smem limit
constexpr uint32_t kMaxRunTokens = 1u << 30;       // flush before per-warp uint32 counts overflow

// Per-launch constants computed on the host (plan_topk_gate).
struct GatePlan {
  int64_t chunk = 1;            // tokens per warp (contiguous range)
  int32_t warps_per_block = 1;
  int32_t blocks = 0;
  // Per-warp shared memory, in 32-bit words: [0, stage) staging (group scoring, then the selected
  // ids [k] and weights [k]); the token's selection values [32 * VPT] at vals_off in the builds
  // with short keys (16-byte aligned, as are warp_words; -1: absent); counts [E] at cnt_off,
  // weight sums [E] at wsum_off (-1: absent).
  int32_t warp_words = 0;
  int32_t vals_off = -1, cnt_off = -1, wsum_off = -1;
  // The CTA's merge area after the warps' (words from the start of shared memory, 16-byte
  // aligned; -1: none): 4 words a warp, its open run's group (i64, -1: none), tokens (u32) and
  // entropy sum, then, at cta_prob within the area (-1: absent), q [E] for each of
  // ceil(warps_per_block / 2) slots (see topk_gate_body's merge).
  int32_t cta_off = -1, cta_prob = -1;
  // One token a warp (chunk 1): its counts and weight sums go straight to global memory, k
  // atomics each, and the warp keeps no counts or weight sums (cnt_off = wsum_off = -1).
  bool direct_sums = false;
  size_t smem_bytes = 0;
};

// ---------------------------------------------------------------------------------------------
// Scalar helpers (identical formulas to csrc/cpu/gate.cpp, with the precise CUDA math functions).

__device__ __forceinline__ float sanitize(float x) {
  // Comparisons are false for NaN, which therefore lands on -FLT_MAX.
  return x >= -kFltMax ? (x <= kFltMax ? x : kFltMax) : -kFltMax;
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float softplus_f(float x) {
  // torch.nn.functional.softplus uses threshold 20.
  return x > 20.f ? x : log1pf(expf(x));
}

__device__ __forceinline__ float sqrt_softplus_f(float x) { return sqrtf(softplus_f(x)); }

// x rounded to nearest even in the logits' half precision LT and back, sanitised
// (round_scores): what a PyTorch op on fp16/bf16 tensors does to its fp32 result.
template <LogitType LT>
__device__ __forceinline__ float round_half(float x) {
  if constexpr (LT == LogitType::BF16) {  // the values are finite: no NaN case
    const uint32_t u = __float_as_uint(x);
    return sanitize(__uint_as_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u));
  } else if constexpr (LT == LogitType::F16) {
    return sanitize(__half2float(__float2half_rn(x)));
  } else {
    return x;
  }
}

__device__ __forceinline__ float score_of(Score s, float z) {
  switch (s) {
    case Score::Sigmoid: return sigmoid_f(z);
    case Score::SqrtSoftplus: return sqrt_softplus_f(z);
    default: return z;
  }
}

// A selection score, rounded as the router's half-precision ops round it when `round`:
// sqrt(softplus) is two ops, each rounded; the others one.
template <LogitType LT>
__device__ __forceinline__ float selection_score(Score s, float z, bool round) {
  if (s == Score::SqrtSoftplus) {
    if (!round) return sqrt_softplus_f(z);
    return round_half<LT>(sqrtf(round_half<LT>(softplus_f(z))));
  }
  const float v = score_of(s, z);
  return round ? round_half<LT>(v) : v;
}

// Asks for the line holding *ptr in L1 without waiting for it (a hint: no register, no fault).
__device__ __forceinline__ void prefetch_l1(const void* ptr) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L1 [%0];" ::"l"(ptr));
#else
  (void)ptr;
#endif
}

// Order-preserving unsigned image of a float; -0.0 maps like +0.0 so that equal values tie.
__device__ __forceinline__ uint32_t order_bits(float v) {
  uint32_t b = __float_as_uint(v);
  b = b == 0x80000000u ? 0u : b;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The float whose order image is u (the image of -0.0 comes back as +0.0).
__device__ __forceinline__ float from_order_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ uint64_t make_key(uint32_t tier, uint32_t ord, uint32_t index) {
  return (uint64_t(tier) << 62) | (uint64_t(ord) << kIndexBits) | (kIndexMask - uint64_t(index));
}

__device__ __forceinline__ int key_index(uint64_t key) {
  return int(kIndexMask - (key & kIndexMask));
}

// ---------------------------------------------------------------------------------------------
// Warp reductions (xor butterflies: every lane gets the same bits).

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(kFullMask, x, o);
    x = y > x ? y : x;
  }
  return x;
}

__device__ __forceinline__ float warp_min(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(kFullMask, x, o);
    x = y < x ? y : x;
  }
  return x;
}

// The largest value of the warp: one REDUX instruction from sm_80 on, else a butterfly.
__device__ __forceinline__ uint32_t warp_max_u32(uint32_t x) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, x);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t y = __shfl_xor_sync(kFullMask, x, o);
    x = y > x ? y : x;
  }
  return x;
#endif
}

// The largest key of the warp: the largest high word, then the largest low word among the lanes
// that hold it. That is the 64-bit maximum, and from sm_80 on it is two REDUX instructions
// instead of 5 butterfly stages of 6 (two shuffles, a 64-bit compare, two selects); it runs k
// times per token.
__device__ __forceinline__ uint64_t warp_max_key(uint64_t x) {
  const uint32_t hi = warp_max_u32(uint32_t(x >> 32));
  const uint32_t lo = warp_max_u32(uint32_t(x >> 32) == hi ? uint32_t(x) : 0u);
  return (uint64_t(hi) << 32) | lo;
}

// Sorts a lane's keys in descending order in registers (bitonic network; N a power of two).
template <class Key, int N>
__device__ __forceinline__ void sort_descending(Key (&a)[N]) {
#pragma unroll
  for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          // Runs of `size` alternate direction; the last merge (size == N) is descending.
          const bool descending = (i & size) == 0;
          const Key x = a[i], y = a[j];
          const Key hi = x > y ? x : y, lo = x > y ? y : x;
          a[i] = descending ? hi : lo;
          a[j] = descending ? lo : hi;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Logit loads: raw bits first (kept in registers as the prefetch of the next row), converted when
// the row is used so that the load latency overlaps the previous token's work.

template <LogitType LT>
__device__ __forceinline__ uint32_t load_raw(const void* base, int64_t idx) {
  if constexpr (LT == LogitType::F32) {
    return __float_as_uint(__ldg(static_cast<const float*>(base) + idx));
  } else {
    return uint32_t(__ldg(static_cast<const unsigned short*>(base) + idx));
  }
}

template <LogitType LT>
__device__ __forceinline__ float raw_to_float(uint32_t r) {
  if constexpr (LT == LogitType::F32) {
    return __uint_as_float(r);
  } else if constexpr (LT == LogitType::BF16) {
    return __uint_as_float(r << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(r)));
  }
}

// Half keys: the selection key of a 16-bit logit (fp16 or bf16 bits h) ranked as it is, in 32 bits:
// the order image of its sanitised value in 16 bits | 2^16-1-index. One REDUX finds a round's
// winner instead of two, and the winner's logit decodes from its key. NaN takes -inf's image (both
// sanitise to -FLT_MAX), -0 takes +0's, and +-inf stay above and below every finite value, as
// +-FLT_MAX do: the order and ties are those of the 64-bit keys.
template <LogitType LT>
__device__ __forceinline__ uint32_t half_order(uint32_t h) {
  constexpr uint32_t kInf = LT == LogitType::BF16 ? 0x7f80u : 0x7c00u;
  const uint32_t mag = h & 0x7fffu;
  h = mag > kInf ? (0x8000u | kInf) : mag == 0u ? 0u : h;
  return (h & 0x8000u) ? (~h & 0xffffu) : (h | 0x8000u);
}

// The sanitised logit whose half_order image is o.
template <LogitType LT>
__device__ __forceinline__ float half_order_value(uint32_t o) {
  return sanitize(raw_to_float<LT>((o & 0x8000u) ? (o & 0x7fffu) : (~o & 0xffffu)));
}

__device__ __forceinline__ uint32_t make_half_key(uint32_t order, int index) {
  return (order << 16) | (0xffffu - uint32_t(index));
}

// Short keys: the other builds' selection key in 32 bits, up to VPT 16: tier (TB bits: 2 where
// steering forces experts on and off, else none) | the top 32-TB-IB bits of the value's order
// image | 2^IB-1-index, with IB = log2(32 * VPT) index bits (short_index_bits). One REDUX finds
// a round's winner, as with half keys, but the key drops the value's low TB+IB bits: two
// experts whose values differ only there tie on it, and the lower index wins where the value
// should decide. The selection is exact all the same when its k + 1 best short keys have
// distinct (tier, top bits): the first k then rank in their exact order, and every other expert
// sits below the (k+1)-th, so below the k-th, in the exact order too. Where two of them tie, it
// is exact when every value with the tied (tier, top bits) loses nothing (short_ties_lossy; the
// experts a tie holds are in the same order both ways, and so are all those outside it).
// Otherwise the tied positions are selected again on 64-bit keys (resolve_short_ties).
__host__ __device__ constexpr int short_index_bits(int vpt) {
  return vpt <= 1 ? 5 : vpt <= 2 ? 6 : vpt <= 4 ? 7 : vpt <= 8 ? 8 : 9;
}

// The largest VPT whose plain (full = false) or full and replay builds select on short keys: the
// kernel's kShortKeys and the plan's values copy (uses_short_keys, which says why full builds stop
// at 8) read it both.
__host__ __device__ constexpr int short_keys_max_vpt(bool full) { return full ? 8 : 16; }

template <int IB, int TB>
__device__ __forceinline__ uint32_t make_short_key(uint32_t tier, uint32_t ord, int index) {
  const uint32_t key = ((ord >> (TB + IB)) << IB) | ((1u << IB) - 1u - uint32_t(index));
  if constexpr (TB == 0) {
    return key;
  } else {
    return (tier << (32 - TB)) | key;
  }
}

// A short key's (tier, top bits): the key without its index field, what a tie compares.
template <int IB, int TB>
__device__ __forceinline__ uint32_t short_top(uint32_t tier, uint32_t ord) {
  return make_short_key<IB, TB>(tier, ord, (1 << IB) - 1) >> IB;
}

// A lane's selection values to its slice of the warp's shared memory, in 16-byte vectors where
// VPT allows (slots 4g..4g+3 of lane l at vector g*32 + l: conflict-free), and slot i back.
template <int VPT>
__device__ __forceinline__ void store_values(float* vsm, int lane, const float (&v)[VPT]) {
  if constexpr (VPT >= 4) {
#pragma unroll
    for (int g = 0; g < VPT / 4; ++g)
      reinterpret_cast<float4*>(vsm)[g * 32 + lane] =
          make_float4(v[4 * g], v[4 * g + 1], v[4 * g + 2], v[4 * g + 3]);
  } else if constexpr (VPT == 2) {
    reinterpret_cast<float2*>(vsm)[lane] = make_float2(v[0], v[1]);
  } else {
    vsm[lane] = v[0];
  }
}

template <int VPT>
__device__ __forceinline__ float value_at(const float* vsm, int lane, int i) {
  constexpr int kVec = VPT >= 4 ? 4 : VPT;
  return vsm[((i / kVec) * 32 + lane) * kVec + i % kVec];
}

// The largest of the lanes' best keys, each lane's keys sorted in descending order: every lane
// gets it, and the lane that holds it pops it (the keys are distinct). One REDUX.
template <int VPT>
__device__ __forceinline__ uint32_t pop_warp_max(uint32_t (&keys)[VPT]) {
  const uint32_t best = warp_max_u32(keys[0]);
  if (keys[0] == best) {
#pragma unroll
    for (int i = 0; i + 1 < VPT; ++i) keys[i] = keys[i + 1];
    keys[VPT - 1] = 0u;
  }
  return best;
}

template <int VPT, LogitType LT>
__device__ __forceinline__ void load_row(const void* logits, int64_t off, int lane, uint32_t valid,
                                         uint32_t (&raw)[VPT]) {
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    raw[i] = ((valid >> i) & 1u) ? load_raw<LT>(logits, off + i * 32 + lane) : 0u;
}

// Router replay: whether token t's replay row is a selection (k distinct ids in [0, E)); if so,
// its ids are in sel_id[0, k) for the whole warp. Any other row is selected as usual: the kernel
// cannot raise, and such ids are only compared here, never used as an index. Warp-uniform.
__device__ __forceinline__ bool replay_row(const GateParams& p, int64_t t, int k, int lane,
                                           int32_t* sel_id) {
  bool ok = true;
  for (int j = lane; j < k; j += 32) {
    const int64_t e = p.replay_id(t, j);
    ok = ok && e >= 0 && e < p.E;
    sel_id[j] = int32_t(e);
  }
  __syncwarp();  // every lane's entries are written before any lane compares them
  for (int j = lane; j < k; j += 32)
    for (int i = 0; i < j && ok; ++i) ok = sel_id[i] != sel_id[j];
  const bool all = __ballot_sync(kFullMask, !ok) == 0u;
  __syncwarp();  // the comparisons finish before a selection overwrites the stage
  return all;
}

// ---------------------------------------------------------------------------------------------
// Rows of experts spread over threads: a thread holds experts i * Row::kStride + row.base (register
// slot i < VPT), and bit i of `valid` says whether that expert exists. The row's reductions give
// every thread the same bits. The warp kernel's rows are WarpRow; the CTA kernel of gate_wide.cuh
// has its own. The steps below are the reference's, shared by both kernels.

// A row held by one warp: base = lane.
struct WarpRow {
  static constexpr int kStride = 32;
  int base;
  __device__ __forceinline__ float sum(float x) const { return warp_sum(x); }
  __device__ __forceinline__ float max(float x) const { return warp_max(x); }
  __device__ __forceinline__ float min(float x) const { return warp_min(x); }
  __device__ __forceinline__ bool any(bool x) const { return __any_sync(kFullMask, x); }
};

// What a call's steering table says about a row's experts, beyond their terms: bit i of on / off,
// the expert of slot i is forced on / off (tiers as in the reference: force > 0 on, < 0 off, 0
// and NaN normal), and whether any expert of the row has a std term (NaN counts, as on the CPU)
// or is forced.
struct SteerMasks {
  uint32_t on = 0, off = 0;
  bool has_std = false, has_force = false;
  __device__ __forceinline__ uint32_t tier(int i) const {
    return ((on >> i) & 1u) ? kTierForcedOn : (((off >> i) & 1u) ? kTierForcedOff : kTierNormal);
  }
};

template <int VPT, class Row>
__device__ __forceinline__ SteerMasks steer_masks(const Row& row, const float* steer, int E,
                                                  uint32_t valid) {
  SteerMasks m;
  bool any_std = false;
  // Up to VPT 16 every slot reads (absent ones expert 0's entries, then masked), as in steer_row.
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const bool here = (valid >> i) & 1u;
    if (VPT <= 16 || here) {
      const int e = here ? i * Row::kStride + row.base : 0;
      const float lam = __ldg(steer + kSteerStd * E + e), f = __ldg(steer + kSteerForce * E + e);
      any_std = any_std || (here && lam != 0.f);
      m.on |= (here && f > 0.f ? 1u : 0u) << i;
      m.off |= (here && f < 0.f ? 1u : 0u) << i;
    }
  }
  m.has_std = row.any(any_std);
  m.has_force = row.any((m.on | m.off) != 0u);
  return m;
}

// Whether a short key's dropped bits (the low `dropped` of the order image) can tell two of a
// row's available values apart: they can unless each value's are those of its sign (all zero
// for + and all one for -, as an fp32 holding a bf16 value has), for then equal top bits mean
// equal values. Warp-uniform.
template <int VPT>
__device__ __forceinline__ bool short_keys_lossy(const float* vsm, int lane, uint32_t avail,
                                                 int dropped) {
  const uint32_t mask = (1u << dropped) - 1u;
  bool lossy = false;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const uint32_t o = order_bits(value_at<VPT>(vsm, lane, i));
    lossy = lossy || (((avail >> i) & 1u) && (o & mask) != ((o >> 31) ? 0u : mask));
  }
  return __any_sync(kFullMask, lossy);
}

// The same for the experts that tie on their (tier, top bits) at a value in [lo, hi], the span
// of the ties the selection saw (see the top-k below). Experts outside the span are ranked by
// their top bits alone, exactly. Warp-uniform. (Called with [0, ~0u] in place of
// short_keys_lossy, it made the plain bf16 and fp16 VPT 8 builds spill 36 bytes, nvcc 13.0.)
template <int VPT, int IB, int TB>
__device__ __forceinline__ bool short_ties_lossy(const float* vsm, int lane, uint32_t avail,
                                                 const SteerMasks& masks, uint32_t lo,
                                                 uint32_t hi) {
  constexpr uint32_t kMask = (1u << (TB + IB)) - 1u;
  bool lossy = false;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const uint32_t o = order_bits(value_at<VPT>(vsm, lane, i));
    const uint32_t top = short_top<IB, TB>(masks.tier(i), o);
    lossy = lossy || (((avail >> i) & 1u) && top >= lo && top <= hi &&
                      (o & kMask) != ((o >> 31) ? 0u : kMask));
  }
  return __any_sync(kFullMask, lossy);
}

// The top k of a warp's available experts (bit i of avail: slot i) by (tier, value, lower index)
// on 64-bit keys, every round a scan of the lane's slots: value(i) is slot i's value. The ids go
// to sel_id (lane 0 writes them). k <= the number of available experts (prepare_gate checks it),
// so every round has a winner.
template <int VPT, class Value>
__device__ __forceinline__ void select_on_keys64(Value&& value, uint32_t avail,
                                                 const SteerMasks& masks, int k, int lane,
                                                 int32_t* sel_id) {
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if ((avail >> i) & 1u) {
        const uint64_t key = make_key(masks.tier(i), order_bits(value(i)), uint32_t(i * 32 + lane));
        best = key > best ? key : best;
      }
    }
    const int idx = key_index(warp_max_key(best));
    if ((idx & 31) == lane) avail &= ~(1u << (idx >> 5));
    if (lane == 0) sel_id[j] = idx;
  }
}

// Bit j of the short-key selection's `tied` mask: selection j is one of a tie (positions from 31
// on share bit 31).
__device__ __forceinline__ uint32_t tie_bit(int j) { return 1u << (j < 31 ? j : 31); }

// The (tier, top bits) of selection j's short key, for every lane: its value is in the warp's
// stored values, its tier in its lane's masks.
template <int VPT, int IB, int TB>
__device__ __forceinline__ uint32_t selected_short_top(const float* vsm, const SteerMasks& masks,
                                                       const int32_t* sel_id, int j) {
  const int e = sel_id[j];
  const uint32_t tier = __shfl_sync(kFullMask, masks.tier(e >> 5), e & 31);
  return short_top<IB, TB>(tier, order_bits(value_at<VPT>(vsm, e & 31, e >> 5)));
}

// The short-key selection made exact where it has ties (bit j of tied: selection j shares its
// (tier, top bits) with another available expert; see make_short_key). Both orders rank experts
// of different (tier, top bits) alike, so a tie's positions hold the right experts but for their
// order and, at the cut, the choice among the tie's experts; every other position is right. Each
// tied position is selected again on 64-bit keys among the experts of its (tier, top bits) that
// earlier positions did not take: popc(tied) rounds, mostly 2, not k. kSpanCheck: first check that
// a value in the ties' span loses bits (short_ties_lossy); the plain builds check the whole row
// before the call (short_keys_lossy). Bit 31 stands for every selection from 31 on: past 32
// selections, all of those are selected again. Warp-uniform: tied, k and the checks are.
template <int VPT, int IB, int TB, bool kSpanCheck>
__device__ __forceinline__ void resolve_short_ties(const float* vsm, int lane, uint32_t avail,
                                                   const SteerMasks& masks, int k,
                                                   int32_t* sel_id, uint32_t tied) {
  __syncwarp();  // lane 0's sel_id and every lane's stored values are visible to the warp
  // The first tie holds the highest (tier, top bits) of the span, the last the lowest.
  const int first = __ffs(tied) - 1, last = (tied >> 31) ? k - 1 : 31 - __clz(int(tied));
  if constexpr (kSpanCheck) {
    const uint32_t hi = selected_short_top<VPT, IB, TB>(vsm, masks, sel_id, first);
    const uint32_t lo = selected_short_top<VPT, IB, TB>(vsm, masks, sel_id, last);
    if (!short_ties_lossy<VPT, IB, TB>(vsm, lane, avail, masks, lo, hi)) return;
  }
  uint32_t taken = 0;  // bit i: slot i went to an earlier tied position
  for (int j = first; j <= last; ++j) {
    if ((tied & tie_bit(j)) == 0u) continue;  // past 31, every position is selected again
    const uint32_t top = selected_short_top<VPT, IB, TB>(vsm, masks, sel_id, j);
    uint64_t best = 0;
    // One slot at a time: unrolled, this rare path took the plain bf16/fp16 VPT 4 builds from 48 to
    // 58 registers (40 to 32 warps per SM) and the fp32 VPT 8 one from 4 to 16 bytes of spills
    // (nvcc 13.0, sm_90a).
#pragma unroll 1
    for (int i = 0; i < VPT; ++i) {
      const uint32_t o = order_bits(value_at<VPT>(vsm, lane, i));
      const uint32_t tier = masks.tier(i);
      const bool mine = ((avail & ~taken) >> i) & 1u;
      if (mine && short_top<IB, TB>(tier, o) == top) {
        const uint64_t key = make_key(tier, o, uint32_t(i * 32 + lane));
        best = key > best ? key : best;
      }
    }
    const int idx = key_index(warp_max_key(best));
    if ((idx & 31) == lane) taken |= 1u << (idx >> 5);
    __syncwarp();  // every lane's read of sel_id[j] (selected_short_top) comes before the write
    if (lane == 0) sel_id[j] = idx;
  }
}

// Softmax normaliser of a row: max over the valid values and sum of exp(x - max). The exps stay
// in ex (every slot's, absent ones too), for the callers that need them again.
template <int VPT, class Row>
__device__ __forceinline__ void softmax_norm(const Row& row, const float (&x)[VPT],
                                             uint32_t valid, float& max_out, float& sum_out,
                                             float (&ex)[VPT]) {
  float m = -kFltMax;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if ((valid >> i) & 1u) m = x[i] > m ? x[i] : m;
  max_out = row.max(m);
  // exp of every slot, then a select: a conditional exp compiles to a branch around each one, and
  // the VPT exps then run one after another instead of overlapping. An absent slot holds 0
  // (both kernels), so its exp is harmless.
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    ex[i] = expf(x[i] - max_out);
    s += ((valid >> i) & 1u) ? ex[i] : 0.f;
  }
  sum_out = row.sum(s);
}

template <int VPT, class Row>
__device__ __forceinline__ void softmax_norm(const Row& row, const float (&x)[VPT],
                                             uint32_t valid, float& max_out, float& sum_out) {
  float ex[VPT];
  softmax_norm<VPT>(row, x, valid, max_out, sum_out, ex);
}

// Expert e's steered logit before forcing (reference: steer_logits), with the same association:
// ((z0 + add) + std term) + abs term, each step rounded on its own.
__device__ __forceinline__ float steered_logit(const float* steer, int E, int e, float z0,
                                               float sd) {
  const float add = __ldg(steer + kSteerAdd * E + e);
  const float lam = __ldg(steer + kSteerStd * E + e);
  const float mul = __ldg(steer + kSteerAbs * E + e);
  float y = __fadd_rn(z0, add);
  y = __fadd_rn(y, lam != 0.f ? __fmul_rn(lam, sd) : 0.f);
  y = __fadd_rn(y, __fmul_rn(mul, fabsf(z0)));
  return sanitize(y);
}

// What steering a row needs besides the table: the std of its logits (0 without std terms) and
// the values forced experts take, its largest and smallest steered logit.
struct RowSteer {
  float sd = 0.f, top = 0.f, bottom = 0.f;
};

// Steers a row (z from z0; the same array steers in place) with the table p.steer and its masks.
template <int VPT, class Row>
__device__ __forceinline__ RowSteer steer_row(const Row& row, const GateParams& p,
                                              const float (&z0)[VPT], uint32_t valid,
                                              const SteerMasks& masks, float (&z)[VPT]) {
  const int E = int(p.E);
  RowSteer rs;
  if (masks.has_std) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) s += ((valid >> i) & 1u) ? z0[i] : 0.f;
    const float mean = row.sum(s) / float(E);
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const float d = z0[i] - mean;
      q += ((valid >> i) & 1u) ? __fmul_rn(d, d) : 0.f;
    }
    const float var = row.sum(q);
    const int dof = p.std_unbiased ? E - 1 : E;
    const float sd = dof > 0 ? sqrtf(var / float(dof)) : 0.f;
    rs.sd = sd != sd ? INFINITY : sd;  // overflow: inf or NaN by summation order (reference)
  }
  // Up to VPT 16 every slot is steered, then masked (absent slots read expert 0's entries). With a
  // branch around each slot, its three table reads waited out their latency before the next
  // slot's began: VPT round trips to L2 a token, which a decode-sized call waits on (sm_90a). At
  // VPT 32 the overlapping reads' registers made ptxas spill 40-56 bytes in the full builds.
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const bool here = (valid >> i) & 1u;
    float y = 0.f;
    if (VPT <= 16 || here)
      y = steered_logit(p.steer, E, here ? i * Row::kStride + row.base : 0, z0[i], rs.sd);
    z[i] = here ? y : 0.f;
  }
  if (masks.has_force) {
    float hi = -kFltMax, lo = kFltMax;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if ((valid >> i) & 1u) {
        hi = z[i] > hi ? z[i] : hi;
        lo = z[i] < lo ? z[i] : lo;
      }
    }
    rs.top = row.max(hi);
    rs.bottom = row.min(lo);
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      z[i] = ((masks.on >> i) & 1u) ? rs.top : (((masks.off >> i) & 1u) ? rs.bottom : z[i]);
  }
  return rs;
}

// Adds a token's dense routing distribution q to an accumulator, add(i, q_i) for each valid
// slot i, and returns its entropy (nats). Softmax and "none" weights: from the weight-side logits
// zw, their softmax normaliser (w_max, w_sum) and exp_of(i) = exp(zw_i - w_max). As on the CPU,
// q = e * (1/S) and H = log S - (sum_e e (zw_e - max)) / S, so one log and two divisions per
// token instead of E of each.
template <int VPT, class Row, class Exp, class Add>
__device__ __forceinline__ float add_dense_softmax(const Row& row, const float (&zw)[VPT],
                                                   uint32_t valid, float w_max, float w_sum,
                                                   Exp&& exp_of, Add&& add) {
  const float inv = 1.f / w_sum;
  float h_part = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if ((valid >> i) & 1u) {
      const float e = exp_of(i);
      add(i, __fmul_rn(e, inv));
      h_part += e > 0.f ? __fmul_rn(e, zw[i] - w_max) : 0.f;
    }
  }
  return logf(w_sum) - row.sum(h_part) / w_sum;
}

// The same for the other scores, from the scores sc of the weight-side logits (absent slots: any
// finite value): q = s / sum(s), uniform when the sum is 0.
template <int VPT, class Row, class Add>
__device__ __forceinline__ float add_dense_scores(const Row& row, int E, const float (&sc)[VPT],
                                                  uint32_t valid, Add&& add) {
  float tp = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) tp += ((valid >> i) & 1u) ? sc[i] : 0.f;
  const float total = row.sum(tp);
  const float inv = total > 0.f ? 1.f / total : 0.f, uniform = 1.f / float(E);
  float h_part = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if ((valid >> i) & 1u) {
      const float q = total > 0.f ? __fmul_rn(sc[i], inv) : uniform;
      add(i, q);
      h_part += q > 0.f ? __fmul_rn(q, logf(q)) : 0.f;
    }
  }
  return -row.sum(h_part);
}

// Counts the k x k pairs of a token's selection in p.coact (one warp).
__device__ __forceinline__ void add_coact(const GateParams& p, const int32_t* sel_id, int lane) {
  const int k = int(p.k);
  for (int q = lane; q < k * k; q += 32) {
    const int a = q / k, b = q - a * k;
    atomicAdd(reinterpret_cast<unsigned long long*>(p.coact + int64_t(sel_id[a]) * p.E + sel_id[b]),
              1ull);
  }
}

// A selected expert's weight from its weight-side logit x, before the steps over all k: its score
// (a softmax's from the row's max and sum), or, for a softmax over the selected logits, x itself.
__device__ __forceinline__ float selection_weight(const GateParams& p, bool softmax, float x,
                                                  float w_max, float w_sum) {
  if (!p.select_on_logits) return softmax ? expf(x - w_max) / w_sum : score_of(p.score, x);
  return softmax ? x : score_of(p.score, x);
}

// The steps over a token's k weights in sel_w, by one warp (lane j handles selections
// j = m*32 + lane, kpl = ceil(k / 32) rounds): the softmax over the k selected logits when the
// row selects on logits with softmax weights (part_max: the lane's largest), then the
// renormalisation. Both kernels finish their weights here, so they compute the same bits.
// The renormalisation sums scores (>= 0, at most sqrt(FLT_MAX)) as a tree, and logits (score
// "none") in rank order in fp32, as the reference and the CPU kernel: near FLT_MAX their sum
// overflows to +inf (weights of 0) in that order, and may stay finite or cancel to exactly 0 in
// another.
__device__ __forceinline__ void finish_weights(const GateParams& p, bool softmax, float* sel_w,
                                               int k, int kpl, int lane, float part_max) {
  if (p.select_on_logits && softmax) {
    const float m_sel = warp_max(part_max);
    float s = 0.f;
    for (int m = 0; m < kpl; ++m) {
      const int j = m * 32 + lane;
      if (j < k) {
        const float e = expf(sel_w[j] - m_sel);
        sel_w[j] = e;
        s += e;
      }
    }
    const float total = warp_sum(s);
    for (int m = 0; m < kpl; ++m) {
      const int j = m * 32 + lane;
      if (j < k) sel_w[j] = sel_w[j] / total;
    }
  }
  if (p.renormalize) {
    float sum = 0.f;
    if (p.score == Score::None) {
      // Every lane adds all k (broadcast reads of the same words) and gets the same bits.
      __syncwarp();  // the other lanes' weights are written
      for (int j = 0; j < k; ++j) sum += sel_w[j];
      __syncwarp();  // every lane has read them before the lanes divide their own
    } else {
      float s = 0.f;
      for (int m = 0; m < kpl; ++m) {
        const int j = m * 32 + lane;
        if (j < k) s += sel_w[j];
      }
      sum = warp_sum(s);
    }
    const float den = sum + p.renorm_eps;
    if (den != 0.f) {
      for (int m = 0; m < kpl; ++m) {
        const int j = m * 32 + lane;
        if (j < k) sel_w[j] = sel_w[j] / den;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel.

// The kernel's body, shared by its builds (the __global__ functions below, which differ in their
// launch bounds). The parameters come by value: taken by reference from the kernel's, they made
// ptxas spill 4-20 bytes in builds that spill nothing this way (nvcc 13.0, sm_90a).
template <int VPT, LogitType LT, bool kFull, bool kReplay, bool kHalfKeys, bool kStats>
__device__ __forceinline__ void topk_gate_body(const GateParams p, const GatePlan plan) {
  static_assert(VPT >= 1 && VPT <= 32, "VPT tier out of range");
  static_assert(kFull || !kReplay, "replay runs in a full kernel");
  static_assert(!kHalfKeys || (!kFull && LT != LogitType::F32 && VPT <= 16),
                "half keys: a plain kernel of 16-bit logits, VPT <= 16");
  static_assert(!kStats || kHalfKeys, "the statistics outside the full kernel: half keys only");
  constexpr bool kAnyStats = kFull || kStats;
  // Prefetching the next row costs VPT registers; the largest tier is already register-heavy.
  constexpr bool kPrefetch = VPT <= 16;
  // Selection keys of 32 bits, cached in registers and sorted once per token (a bitonic network:
  // 0, 1, 6, 24, 80 compare-exchanges of 2 instructions for VPT 1 to 16), so that each round is
  // a REDUX and a pop: half keys (see half_order) in the kHalfKeys builds, short keys (see
  // make_short_key) in the others up to VPT 16, 8 in the full builds (uses_short_keys). The
  // others scan 64-bit keys every round.
  constexpr bool kShortKeys = !kHalfKeys && VPT <= short_keys_max_vpt(kFull);

  extern __shared__ __align__(16) uint32_t gate_smem[];
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();

  const int lane = int(threadIdx.x & 31u);
  const int warp = int(threadIdx.x >> 5);
  const int64_t t_begin = (int64_t(blockIdx.x) * plan.warps_per_block + warp) * plan.chunk;
  // Idle warps may leave unless the CTA merges statistics (its two block barriers need them).
  if (t_begin >= p.T && plan.cta_off < 0) return;
  const int64_t t_end = t_begin >= p.T          ? t_begin
                        : p.T - t_begin < plan.chunk ? p.T
                                                     : t_begin + plan.chunk;
  uint32_t* wsm = gate_smem + int64_t(warp) * plan.warp_words;
  float* const vsm = kShortKeys ? reinterpret_cast<float*>(wsm + plan.vals_off) : nullptr;

  const int E = int(p.E);
  const int k = int(p.k);
  const Score score = p.score;
  const bool softmax = score == Score::Softmax;

  const WarpRow warp_row{lane};
  uint32_t valid = 0;  // bit i: expert i*32 + lane exists
#pragma unroll
  for (int i = 0; i < VPT; ++i) valid |= (i * 32 + lane < E ? 1u : 0u) << i;

  // ---- Per-call constants derived from the steering table (the CPU's Prep) ----
  const float* steer = kFull ? p.steer : nullptr;
  const SteerMasks masks = steer ? steer_masks<VPT>(warp_row, steer, E, valid) : SteerMasks{};
  const bool zw_is_z0 = steer != nullptr && p.steer_select_only;

  // Groups: lane owns groups g = m*32 + lane (m < gpl <= 32).
  const int n_group = int(p.n_group);
  const bool group_limited = kFull && limits_groups(p);
  // round_scores: the selection ranks scores rounded to the logits' half precision (full builds
  // of fp16/bf16 logits only: the others never run such a call)
  constexpr bool kRounds = kFull && LT != LogitType::F32;
  const bool round = kRounds && rounds_scores(p);
  const bool round_sums = kRounds && rounds_half_sums(p);
  const int gsize = E / n_group;
  const int gpl = (n_group + 31) >> 5;
  // e / gsize as (e * magic) >> 20 with magic = ceil(2^20 / gsize): exact for e < 2^10 and
  // gsize <= 2^10, since the error e * (magic - 2^20/gsize) / 2^20 < 2^-10 <= 1/gsize.
  const uint32_t gmagic = ((1u << 20) + uint32_t(gsize) - 1u) / uint32_t(gsize);
  // Staggered scan start per lane: conflict-free shared-memory reads when gsize % 32 == 0.
  const int grot = lane % gsize;
  uint32_t gon = 0;  // bit m: group m*32 + lane holds a forced-on expert
  if (group_limited && masks.has_force) {
    for (int m = 0; m < gpl; ++m) {
      const int g = m * 32 + lane;
      if (g < n_group) {
        bool any_on = false;
        for (int j = 0; j < gsize && !any_on; ++j)
          any_on = __ldg(steer + kSteerForce * E + g * gsize + j) > 0.f;
        gon |= (any_on ? 1u : 0u) << m;
      }
    }
  }

  // ---- Statistics state ----
  const bool any_stats = kAnyStats && p.any_stats();
  const bool dense = kAnyStats && p.dense_stats();
  const bool dense_softmax = softmax || score == Score::None;
  uint32_t* cnt_s = kAnyStats && plan.cnt_off >= 0 ? wsm + plan.cnt_off : nullptr;
  float* wsum_s =
      kAnyStats && plan.wsum_off >= 0 ? reinterpret_cast<float*>(wsm + plan.wsum_off) : nullptr;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if ((valid >> i) & 1u) {
      if (cnt_s) cnt_s[i * 32 + lane] = 0u;
      if (wsum_s) wsum_s[i * 32 + lane] = 0.f;
    }
  }
  uint32_t* const cta = kAnyStats && plan.cta_off >= 0 ? gate_smem + plan.cta_off : nullptr;
  float prob_acc[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) prob_acc[i] = 0.f;
  int64_t run_g = -1;        // group of the open run (-1: none)
  uint32_t run_tokens = 0;   // tokens in the open run
  float run_entropy = 0.f;

  // Adds the open run to the global statistics of its group and empties it (warp-uniform call).
  using u64 = unsigned long long;
  auto flush = [&]() {
    const int64_t row = run_g * int64_t(E);
    if (lane == 0) {
      if (p.tokens) atomicAdd(reinterpret_cast<u64*>(p.tokens + run_g), (u64)run_tokens);
      if (p.entropy_sum) atomicAdd(p.entropy_sum + run_g, run_entropy);
    }
    run_tokens = 0;
    run_entropy = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (p.prob_sum && ((valid >> i) & 1u) && prob_acc[i] != 0.f)
        atomicAdd(p.prob_sum + row + i * 32 + lane, prob_acc[i]);
      prob_acc[i] = 0.f;
    }
    if (cnt_s || wsum_s) {
      __syncwarp();  // the entries were scattered by other lanes
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if ((valid >> i) & 1u) {
          const int e = i * 32 + lane;
          if (cnt_s) {
            if (cnt_s[e]) atomicAdd(reinterpret_cast<u64*>(p.counts + row + e), (u64)cnt_s[e]);
            cnt_s[e] = 0u;
          }
          if (wsum_s) {
            if (wsum_s[e] != 0.f) atomicAdd(p.weight_sum + row + e, wsum_s[e]);
            wsum_s[e] = 0.f;
          }
        }
      }
      __syncwarp();  // before other lanes scatter into the emptied entries
    }
  };

  int32_t* sel_id = reinterpret_cast<int32_t*>(wsm);      // [k], valid after the rounds
  float* sel_w = reinterpret_cast<float*>(wsm) + k;       // [k], lane j's own entries only
  const int kpl = (k + 31) >> 5;

  uint32_t raw[VPT];
  if constexpr (kPrefetch) {
    if (t_begin < t_end) load_row<VPT, LT>(p.logits, t_begin * p.row_stride, lane, valid, raw);
  }
  // Each token reads the selection bias after its softmax. Asking for it now lets the first
  // token's read hit L1 instead of waiting for L2 in the middle of the token (decode: T = 1).
  if (p.selection_bias != nullptr && t_begin < t_end) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if ((valid >> i) & 1u) prefetch_l1(p.selection_bias + i * 32 + lane);
  }

  for (int64_t t = t_begin; t < t_end; ++t) {
    // Orders this token's shared-memory writes after every lane's reads of the previous token.
    __syncwarp();
    if constexpr (!kPrefetch) load_row<VPT, LT>(p.logits, t * p.row_stride, lane, valid, raw);

    // ---- Load and sanitise: z0 ----
    float z0[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      z0[i] = ((valid >> i) & 1u) ? sanitize(raw_to_float<LT>(raw[i])) : 0.f;
    uint32_t hkeys[kHalfKeys ? VPT : 1];  // absent experts: 0, below every real half key
    if constexpr (kHalfKeys) {
      // Masked rather than chosen: a conditional key compiles to a branch around each slot.
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const uint32_t key = make_half_key(half_order<LT>(raw[i]), i * 32 + lane);
        hkeys[i] = key & (0u - ((valid >> i) & 1u));
      }
    }
    if constexpr (kPrefetch) {
      if (t + 1 < t_end) load_row<VPT, LT>(p.logits, (t + 1) * p.row_stride, lane, valid, raw);
    }

    // The statistics group of this token (warp-uniform). Out-of-range ids cannot raise here.
    int64_t g = 0;
    if (any_stats && p.groups)
      g = p.groups_int64 ? static_cast<const int64_t*>(p.groups)[t]
                         : int64_t(static_cast<const int32_t*>(p.groups)[t]);
    const bool counted = any_stats && g >= 0 && g < p.G;
    const bool tok_dense = counted && dense;

    // ---- Steering: z ----
    float z[VPT];
    if (steer) {
      steer_row<VPT>(warp_row, p, z0, valid, masks, z);
    } else {
#pragma unroll
      for (int i = 0; i < VPT; ++i) z[i] = z0[i];
    }

    // Weight-side logits.
    float zw[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) zw[i] = zw_is_z0 ? z0[i] : z[i];

    // ---- Statistics: the token opens or extends its group's run ----
    if (counted) {
      if (g != run_g || run_tokens == kMaxRunTokens) {
        if (run_g >= 0) flush();
        run_g = g;
      }
      run_tokens += 1;
    }
    // The dense distribution q and its entropy: from the exps of the weight-side logits' softmax
    // (q is a softmax or "none"'s: dense_softmax) or from their scores (sigmoid, sqrt(softplus)).
    // Below VPT 32 they are added here, the exps being the normaliser's own, and a selection on
    // the same scores takes those over. At VPT 32 they wait until after the selection and compute
    // the exps again: kept along with z, zw and q's accumulator, they made ptxas spill 90-100
    // bytes more in the full builds (nvcc 13.0, sm_90a).
    constexpr bool kDenseFirst = VPT < 32;
    const auto add_q = [&](int i, float q) { prob_acc[i] += q; };
    // q's scores (sigmoid, sqrt(softplus)) go to sc, which a selection on the same scores reads.
    float sc[VPT] = {};  // initialised for the compilers, which cannot tell when it is read
    const auto add_scores_q = [&]() {
#pragma unroll
      for (int i = 0; i < VPT; ++i) sc[i] = score_of(score, zw[i]);
      run_entropy += add_dense_scores<VPT>(warp_row, E, sc, valid, add_q);
    };

    // Softmax of zw (max and sum of exp(zw - max)), shared by the weights and the statistics.
    const bool want_ew = (!p.select_on_logits && softmax) || (tok_dense && dense_softmax);
    float w_max = 0.f, w_sum = 1.f;
    if (want_ew) {
      float ex[VPT];
      softmax_norm<VPT>(warp_row, zw, valid, w_max, w_sum, ex);
      if (kDenseFirst && tok_dense && dense_softmax)
        run_entropy += add_dense_softmax<VPT>(warp_row, zw, valid, w_max, w_sum,
                                              [&](int i) { return ex[i]; }, add_q);
    }
    const bool dense_scores = kDenseFirst && tok_dense && !dense_softmax;
    if (dense_scores) add_scores_q();

    // ---- Router replay: a row of k distinct ids in [0, E) is the selection ----
    const bool replayed = kReplay && replay_row(p, t, k, lane, sel_id);
    if constexpr (kHalfKeys) {
      // ---- Top-k by (logit, lower index) on half keys: the winners' keys to sel_id, which the
      // weights below turn into ids ----
      sort_descending(hkeys);
      for (int j = 0; j < k; ++j) {
        const uint32_t best = pop_warp_max(hkeys);
        if (lane == 0) sel_id[j] = int(best);
      }
    } else if (!replayed) {
      // ---- Selection values v (reference: selection_values) ----
      const float* bias = p.selection_bias;
      float v[VPT];
      if (selects_on_logits(p, kRounds) || (score == Score::None && !round)) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) v[i] = z[i];
      } else if (softmax) {
        float sm_max = w_max, sm_sum = w_sum;
        if (!want_ew || zw_is_z0) softmax_norm<VPT>(warp_row, z, valid, sm_max, sm_sum);
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          v[i] = expf(z[i] - sm_max) / sm_sum;
          if (round) v[i] = round_half<LT>(v[i]);
        }
      } else if (dense_scores && !zw_is_z0 && !round) {  // zw is z: q's scores
#pragma unroll
        for (int i = 0; i < VPT; ++i) v[i] = sc[i];
      } else {
#pragma unroll
        for (int i = 0; i < VPT; ++i) v[i] = selection_score<LT>(score, z[i], round);
      }
      if (bias) {
#pragma unroll
        for (int i = 0; i < VPT; ++i)
          if ((valid >> i) & 1u) v[i] = sanitize(v[i] + sanitize(__ldg(bias + i * 32 + lane)));
      }

      // ---- Group limit (reference: eligible_tiers) ----
      uint32_t avail = valid;  // bit i: expert i*32 + lane may still be selected
      if (group_limited) {
        float* vbuf = reinterpret_cast<float*>(wsm);  // [E]
        float* gscore = vbuf + E;                     // [n_group], read back by the owner only
        if (gsize == 32) {
          // Group i is register slot i of every lane (DeepSeek-V3: 256 experts in 8 groups). Its
          // largest value is a warp max of the order images; the second largest, a warp max
          // without the lowest lane that holds the first (a multiset result, as in the scan).
          // Image 0 stands for "left out": every real image is larger.
          // Every slot is scored, also those past n_group (absent experts: a score nobody reads),
          // and lane g keeps group g's: without a branch per group the groups' reductions
          // overlap instead of running one after another (what a decode-sized call waits on).
          float mine = 0.f;
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
          if (lane < n_group) gscore[lane] = mine;
        } else {
#pragma unroll
          for (int i = 0; i < VPT; ++i)
            if ((valid >> i) & 1u) vbuf[i * 32 + lane] = v[i];
          __syncwarp();
          for (int m = 0; m < gpl; ++m) {
            const int g2 = m * 32 + lane;
            if (g2 < n_group) {
              // The two largest values (a multiset result, so the scan order does not matter).
              const float* gv = vbuf + g2 * gsize;
              float a = -kFltMax, b = -kFltMax;
              int j = grot;
              for (int n = 0; n < gsize; ++n) {
                const float x = gv[j];
                if (x > a) {
                  b = a;
                  a = x;
                } else if (x > b) {
                  b = x;
                }
                j = j + 1 == gsize ? 0 : j + 1;
              }
              float score = p.group_score == GroupScore::Max ? a : sanitize(gsize > 1 ? a + b : a);
              if (round_sums && p.group_score != GroupScore::Max && gsize > 1)
                score = round_half<LT>(score);
              gscore[g2] = score;
            }
          }
        }
        uint32_t taken = 0;  // bit m: group m*32 + lane chosen
        for (int r = 0; r < int(p.topk_group); ++r) {
          uint64_t best = 0;  // every real key is > 0 (its index field is >= 2^30 - 1024)
          for (int m = 0; m < gpl; ++m) {
            const int g2 = m * 32 + lane;
            if (g2 < n_group && !((taken >> m) & 1u)) {
              const uint32_t tier = ((gon >> m) & 1u) ? kTierForcedOn : kTierNormal;
              const uint64_t key = make_key(tier, order_bits(gscore[g2]), uint32_t(g2));
              best = key > best ? key : best;
            }
          }
          const int gi = key_index(warp_max_key(best));
          if ((gi & 31) == lane) taken |= 1u << (gi >> 5);
        }
        uint32_t elig = 0;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const uint32_t ge = (uint32_t(i * 32 + lane) * gmagic) >> 20;  // group of the expert
          const uint32_t word = __shfl_sync(kFullMask, taken, int(ge & 31u));
          elig |= ((word >> (ge >> 5)) & 1u) << i;
        }
        avail &= elig;
        __syncwarp();  // vbuf/gscore reads finish before the selected ids overwrite the stage
      }

      // ---- Top-k by (tier, v, lower index) ----
      if constexpr (kShortKeys) {
        constexpr int IB = short_index_bits(VPT), TB = kFull ? 2 : 0;
        store_values(vsm, lane, v);  // for the 64-bit keys if the short ones tie, read back below
        // Unavailable experts get key 0, below every real key (whose top bits are not all 0).
        uint32_t skeys[VPT];
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const uint32_t key =
              make_short_key<IB, TB>(masks.tier(i), order_bits(v[i]), i * 32 + lane);
          skeys[i] = key & (0u - ((avail >> i) & 1u));
        }
        sort_descending(skeys);
        // k + 1 rounds, the last only to compare the (k+1)-th key with the k-th (after the
        // available experts run out it is 0, which ties with nothing). A tie is two keys in a
        // row with the same (tier, top bits); tied marks their positions (tie_bit), and only
        // those are selected again, where a value may have lost its order (resolve_short_ties).
        // The full builds check the values in the ties' span: steering mixes values that lose
        // bits (std-steered ones) with bf16 logits that lose none, and in a row-wide check every
        // exact tie of two bf16 logits sent the token back (bench/RESULTS.md, 2026-11-29). The
        // plain builds, which run no steering, check the whole row: with the span check their
        // VPT 4 builds took 60 registers instead of 48, and the bf16/fp16 VPT 8 ones 99 instead
        // of 80 (nvcc 13.0, sm_90a).
        uint32_t prev = 0, tied = 0;
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
      } else {
        select_on_keys64<VPT>([&](int i) { return v[i]; }, avail, masks, k, lane, sel_id);
      }
    }
    __syncwarp();  // publish sel_id

    // ---- Weights (lane j handles selections j = m*32 + lane) ----
    float part_max = -kFltMax;
    for (int m = 0; m < kpl; ++m) {
      const int j = m * 32 + lane;
      float x = 0.f;
      if constexpr (kHalfKeys) {
        if (j < k) {  // selection j's key: its logit and its id (lane j's own entry from now on)
          const uint32_t key = uint32_t(sel_id[j]);
          x = half_order_value<LT>(key >> 16);
          sel_id[j] = int(0xffffu - (key & 0xffffu));
        }
      } else {
        const int id = j < k ? sel_id[j] : 0;
        // zw[id] lives in lane id & 31, slot id >> 5.
        const int src = id & 31, slot = id >> 5;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const float y = __shfl_sync(kFullMask, zw[i], src);
          x = i == slot ? y : x;
        }
      }
      if (j < k) {
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
        sel_w[j] = w;
        p.weights[out + j] = w;
        p.ids[out + j] = sel_id[j];
      }
    }

    // ---- Statistics: q at VPT 32, and the selection's counts, weight sums and co-activations ----
    if (!counted) continue;
    if (!kDenseFirst && tok_dense) {
      if (dense_softmax) {
        run_entropy += add_dense_softmax<VPT>(warp_row, zw, valid, w_max, w_sum,
                                              [&](int i) { return expf(zw[i] - w_max); }, add_q);
      } else {
        add_scores_q();
      }
    }
    if (cnt_s || wsum_s) {
      // The k ids of one token are distinct, so the lanes touch distinct entries.
      for (int m = 0; m < kpl; ++m) {
        const int j = m * 32 + lane;
        if (j < k) {
          const int id = sel_id[j];
          if (cnt_s) cnt_s[id] += 1u;
          if (wsum_s) wsum_s[id] += sel_w[j];
        }
      }
    } else if (plan.direct_sums) {
      const int64_t row = g * int64_t(E);
      for (int m = 0; m < kpl; ++m) {
        const int j = m * 32 + lane;
        if (j < k) {
          const int64_t at = row + sel_id[j];
          if (p.counts) atomicAdd(reinterpret_cast<u64*>(p.counts + at), 1ull);
          if (p.weight_sum && sel_w[j] != 0.f) atomicAdd(p.weight_sum + at, sel_w[j]);
        }
      }
    }
    if (p.coact) {
      if constexpr (kHalfKeys) __syncwarp();  // each lane turned its own entries' keys into ids
      add_coact(p, sel_id, lane);
    }
  }
  __syncwarp();  // the last token's scatter happened in other lanes
  if (cta == nullptr) {
    if (run_g >= 0) flush();
    return;
  }
  // The open run into the CTA's merge area (see the header). q goes there in two steps, half the
  // warps at a time, so that the area holds half the warps' q: the upper half's now, and after the
  // barrier each warp w of the lower half adds its own (where the CTA merges it) to warp w +
  // half's (likewise) in slot w.
  const int wpb = int(plan.warps_per_block), half = (wpb + 1) / 2;
  uint32_t* const head = cta + 4 * warp;
  if (lane == 0) {
    *reinterpret_cast<int64_t*>(head) = run_g;
    head[2] = run_tokens;
    reinterpret_cast<float*>(head)[3] = run_entropy;
  }
  float* const parked_q = plan.cta_prob >= 0 ? reinterpret_cast<float*>(cta + plan.cta_prob)
                                             : nullptr;
  if (parked_q != nullptr && warp >= half && run_g >= 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if ((valid >> i) & 1u) parked_q[int64_t(warp - half) * E + i * 32 + lane] = prob_acc[i];
  }
  __syncthreads();
  // The warps whose runs the CTA merges: those of the first group it saw (bit w: warp w).
  int64_t merged = -1;
  uint32_t members = 0;
  for (int w = 0; w < wpb; ++w) {
    const int64_t g = *reinterpret_cast<const int64_t*>(cta + 4 * w);
    if (merged < 0) merged = g;
    if (g >= 0 && g == merged) members |= 1u << w;
  }
  if (run_g >= 0 && run_g != merged) flush();
  if (merged < 0) return;  // block-uniform
  if (parked_q != nullptr && warp < half) {
    const bool mine = (members >> warp) & 1u;
    const bool theirs = warp + half < wpb && ((members >> (warp + half)) & 1u);
    float* const slot = parked_q + int64_t(warp) * E;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if ((valid >> i) & 1u) {
        const int e = i * 32 + lane;
        slot[e] = (mine ? prob_acc[i] : 0.f) + (theirs ? slot[e] : 0.f);
      }
    }
  }
  __syncthreads();
  const int64_t row = merged * E;
  if (threadIdx.x == 0) {
    u64 tokens = 0;
    float entropy = 0.f;
    for (uint32_t m = members; m != 0u; m &= m - 1u) {
      const int w = __ffs(int(m)) - 1;
      tokens += cta[4 * w + 2];
      entropy += reinterpret_cast<const float*>(cta)[4 * w + 3];
    }
    if (p.tokens) atomicAdd(reinterpret_cast<u64*>(p.tokens + merged), tokens);
    if (p.entropy_sum) atomicAdd(p.entropy_sum + merged, entropy);
  }
  for (int e = int(threadIdx.x); e < E; e += int(blockDim.x)) {
    float q = 0.f, wsum = 0.f;
    u64 count = 0;
    if (parked_q)
      for (int w = 0; w < half; ++w) q += parked_q[int64_t(w) * E + e];
    for (uint32_t m = (cnt_s || wsum_s) ? members : 0u; m != 0u; m &= m - 1u) {
      const int w = __ffs(int(m)) - 1;
      const uint32_t* wsm_w = gate_smem + int64_t(w) * plan.warp_words;
      if (cnt_s) count += wsm_w[plan.cnt_off + e];
      if (wsum_s) wsum += reinterpret_cast<const float*>(wsm_w)[plan.wsum_off + e];
    }
    if (q != 0.f) atomicAdd(p.prob_sum + row + e, q);
    if (count != 0) atomicAdd(reinterpret_cast<u64*>(p.counts + row + e), count);
    if (wsum != 0.f) atomicAdd(p.weight_sum + row + e, wsum);
  }
}

// The plain, full and replay builds, and the half-key build without statistics.
template <int VPT, LogitType LT, bool kFull, bool kReplay, bool kHalfKeys = false>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * 32)
    topk_gate_kernel(const GateParams p, const GatePlan plan) {
  topk_gate_body<VPT, LT, kFull, kReplay, kHalfKeys, false>(p, plan);
}

// The half-key build with the statistics. Its launch bounds ask for what ptxas fits without
// spilling (nvcc 13.0, sm_90a): 4 CTAs of 8 warps per SM up to VPT 2 (64 registers; 68 by
// itself), 3 at VPT 4 (78; 99 by itself). At VPT 8 three CTAs spill 40 bytes and at VPT 16
// 384, so those keep ptxas's choice (116 and 163 registers: 16 and 8 warps).
template <int VPT, LogitType LT>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * 32, VPT <= 2 ? 4 : VPT <= 4 ? 3 : 1)
    topk_gate_kernel_stats(const GateParams p, const GatePlan plan) {
  topk_gate_body<VPT, LT, false, false, true, true>(p, plan);
}

// ---------------------------------------------------------------------------------------------
// Host-side planning and dispatch (shared by the launcher and tests).

inline int vpt_for(int64_t E) {
  return E <= 32 ? 1 : E <= 64 ? 2 : E <= 128 ? 4 : E <= 256 ? 8 : E <= 512 ? 16 : 32;
}

// The full kernel is needed for steering, a group limit, statistics or replay; every other call
// runs the plain one, compiled without those paths (select_kernel first sends the calls it can to
// a half-key build, statistics included: runs_half_build).
inline bool needs_full_kernel(const GateParams& p) {
  return p.steer != nullptr || limits_groups(p) || p.any_stats() || p.replay != nullptr ||
         rounds_scores(p);
}

// A call that ranks 16-bit logits as they are (no bias; not score "none", whose weights are the
// logits themselves: a half key keeps no sign of a zero), up to VPT 16, with nothing of the full
// kernel but statistics, runs a half-key build (with or without the statistics).
inline bool runs_half_build(const GateParams& p) {
  return p.logit_type != LogitType::F32 && selects_on_logits(p, false) &&
         p.selection_bias == nullptr && p.score != Score::None && vpt_for(p.E) <= 16 &&
         p.steer == nullptr && !limits_groups(p) && p.replay == nullptr && !rounds_scores(p);
}

// Whether the warp kernel that runs the call selects on short keys (see make_short_key): the
// plain builds up to VPT 16, the full ones up to VPT 8. At VPT 16 the values' copy would take
// 2 KiB of a warp's shared memory, and with statistics the CTA would then hold 6 warps, not 8: a
// full build's registers allow one CTA per SM there.
inline bool uses_short_keys(const GateParams& p) {
  if (runs_half_build(p)) return false;
  return vpt_for(p.E) <= short_keys_max_vpt(needs_full_kernel(p));
}

// Launch geometry for a call with p.T > 0 and 1 <= p.E <= kMaxExperts, for `warps_per_sm`
// resident warps per SM.
inline GatePlan plan_topk_gate(const GateParams& p, int sm_count, int warps_per_sm = kWarpsPerSm) {
  GatePlan c;
  const bool group_limited = limits_groups(p);
  int64_t stage = 2 * p.k;
  if (group_limited && p.E + p.n_group > stage) stage = p.E + p.n_group;
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  const int64_t target_warps = sms * (warps_per_sm > 0 ? warps_per_sm : 1);
  c.chunk = (p.T + target_warps - 1) / target_warps;
  const int64_t warps = (p.T + c.chunk - 1) / c.chunk;
  c.direct_sums = c.chunk == 1;

  int64_t words = stage;
  if (uses_short_keys(p)) {
    words = (words + 3) / 4 * 4;
    c.vals_off = int32_t(words), words += 32 * vpt_for(p.E);
  }
  if (p.counts && !c.direct_sums) c.cnt_off = int32_t(words), words += p.E;
  if (p.weight_sum && !c.direct_sums) c.wsum_off = int32_t(words), words += p.E;
  if (c.vals_off >= 0) words = (words + 3) / 4 * 4;  // the next warp's values stay aligned
  c.warp_words = int32_t(words);
  const int64_t warp_bytes = words * int64_t(sizeof(uint32_t));  // <= 16 KiB

  // Few tokens: spread the warps over the SMs (one small block each) rather than pack them.
  int64_t wpb = (warps + sms - 1) / sms;
  if (wpb > kMaxWarpsPerBlock) wpb = kMaxWarpsPerBlock;
  if (wpb > kSmemPerBlock / warp_bytes) wpb = kSmemPerBlock / warp_bytes;
  if (wpb < 1) wpb = 1;
  // The CTA merges its warps' end-of-range statistics (see the header) when it has two warps or
  // more and room for the merge area.
  const bool sums = p.per_group_stats();
  const auto area_off = [&](int64_t w) { return (w * words + 3) / 4 * 4; };  // 16-byte aligned
  const auto area_words = [&](int64_t w) { return 4 * w + (p.prob_sum ? (w + 1) / 2 * p.E : 0); };
  int64_t merge_wpb = wpb;
  while (merge_wpb > 1 && (area_off(merge_wpb) + area_words(merge_wpb)) * 4 > kSmemPerBlock)
    --merge_wpb;
  const bool merges = sums && merge_wpb > 1;
  if (merges) {
    wpb = merge_wpb;
    c.cta_off = int32_t(area_off(wpb));
    c.cta_prob = p.prob_sum ? int32_t(4 * wpb) : -1;
  }
  c.warps_per_block = int32_t(wpb);
  c.blocks = int32_t((warps + wpb - 1) / wpb);
  c.smem_bytes = size_t(merges ? (area_off(wpb) + area_words(wpb)) * 4 : wpb * warp_bytes);
  return c;
}

using GateKernel = void (*)(const GateParams, const GatePlan);

template <int VPT, bool kFull, bool kReplay>
inline GateKernel kernel_for_type(LogitType lt) {
  switch (lt) {
    case LogitType::F16: return &topk_gate_kernel<VPT, LogitType::F16, kFull, kReplay>;
    case LogitType::BF16: return &topk_gate_kernel<VPT, LogitType::BF16, kFull, kReplay>;
    default: return &topk_gate_kernel<VPT, LogitType::F32, kFull, kReplay>;
  }
}

// The build of a kind for tier `vpt`, one of the tiers kVpts that the calling translation unit
// compiles (nullptr for another).
template <bool kFull, bool kReplay, int... kVpts>
inline GateKernel kernel_for_tier(int vpt, LogitType lt) {
  GateKernel kernel = nullptr;
  ((vpt == kVpts ? (void)(kernel = kernel_for_type<kVpts, kFull, kReplay>(lt)) : void()), ...);
  return kernel;
}

template <int VPT, bool kStats>
inline GateKernel half_kernel_for_type(LogitType lt) {
  if constexpr (kStats) {
    return lt == LogitType::F16 ? &topk_gate_kernel_stats<VPT, LogitType::F16>
                                : &topk_gate_kernel_stats<VPT, LogitType::BF16>;
  } else {
    return lt == LogitType::F16 ? &topk_gate_kernel<VPT, LogitType::F16, false, false, true>
                                : &topk_gate_kernel<VPT, LogitType::BF16, false, false, true>;
  }
}

template <bool kStats>  // a template, as select_kernel below: instantiated only where it is called
inline GateKernel half_kernel_for_tier(int vpt, LogitType lt) {
  switch (vpt) {
    case 1: return half_kernel_for_type<1, kStats>(lt);
    case 2: return half_kernel_for_type<2, kStats>(lt);
    case 4: return half_kernel_for_type<4, kStats>(lt);
    case 8: return half_kernel_for_type<8, kStats>(lt);
    default: return half_kernel_for_type<16, kStats>(lt);
  }
}

// The full and replay builds, instantiated in translation units of their own so that nvcc
// compiles them in parallel with gate.cu's plain and half-key builds; two units per kind, as a
// kind's builds at VPT 32 compile about as long as its lower tiers' together (bench/RESULTS.md,
// "The gate's builds in seven units").
// full_kernel_for_tier and replay_kernel_for_tier take every tier and hand VPT 32 on.
GateKernel full_kernel_for_tier(int vpt, LogitType lt);    // gate_full.cu
GateKernel full_kernel_vpt32(LogitType lt);                // gate_full32.cu
GateKernel replay_kernel_for_tier(int vpt, LogitType lt);  // gate_replay.cu
GateKernel replay_kernel_vpt32(LogitType lt);              // gate_replay32.cu

// A template only so that the translation units that include this header without launching the
// warp kernel (gate_full.cu, gate_replay.cu, gate_wide.cu, ...) do not instantiate and compile
// its plain and half-key builds.
template <class = void>
inline GateKernel select_kernel(const GateParams& p) {
  const int vpt = vpt_for(p.E);
  const LogitType lt = p.logit_type;
  if (runs_half_build(p))
    return p.any_stats() ? half_kernel_for_tier<true>(vpt, lt)
                         : half_kernel_for_tier<false>(vpt, lt);
  if (p.replay != nullptr) return replay_kernel_for_tier(vpt, lt);
  if (needs_full_kernel(p)) return full_kernel_for_tier(vpt, lt);
  return kernel_for_tier<false, false, 1, 2, 4, 8, 16, 32>(vpt, lt);
}

// The plan for the kernel that will run: `blocks_per_sm(kernel, threads, smem_bytes)` is its
// occupancy (0 if unknown). A grid of more warps than are resident would run in waves, the last
// one partly idle (at E=256 the plain kernel holds 24 warps per SM, so 32 would make 1.33 waves);
// planning for the resident count instead gives every warp a longer range in a single wave.
// A plan for another count can take other shared memory (a warp of one token keeps no counts or
// weight sums: GatePlan::direct_sums), and so another occupancy: it plans again until the count
// holds. More resident warps give shorter ranges and never more shared memory a warp, so the
// counts move one way and settle in a step or two (four at most; the last plan is kept).
template <class Occupancy>
inline GatePlan plan_for_device(const GateParams& p, int sm_count, GateKernel kernel,
                                Occupancy&& blocks_per_sm) {
  GatePlan plan = plan_topk_gate(p, sm_count);
  int planned_for = kWarpsPerSm;
  for (int step = 0; step < 4; ++step) {
    if (plan.blocks <= (sm_count > 0 ? sm_count : 1)) break;  // one CTA per SM at most
    const int resident = int(blocks_per_sm(kernel, plan.warps_per_block * 32, plan.smem_bytes)) *
                         plan.warps_per_block;
    if (resident <= 0 || resident == planned_for) break;
    plan = plan_topk_gate(p, sm_count, resident);
    planned_for = resident;
  }
  return plan;
}

}  // namespace detail
}  // namespace cuda
}  // namespace moe_route
