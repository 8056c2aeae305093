// topk_gate on the CPU: one pass per token (load, steer, score, group-limit, select, weigh,
// accumulate statistics), tokens split into fixed chunks that run in parallel.
//
// Determinism: chunks have a fixed size, independent of the thread count. Each chunk sums its
// statistics into private "runs" (consecutive tokens of one group), and the runs are merged in chunk
// order afterwards, so float statistics are bit-identical across runs and thread counts. Reductions
// inside a row use 8 fixed partial sums, so the ISA variant (isa.h) does not change results;
// the file is built with -ffp-contract=off for the same reason.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../gate_op.h"
#include "isa.h"
#include "vec.h"

namespace moe_route {

#if MOE_ROUTE_SEPARATE_BASE || MOE_ROUTE_GATE_BASE_UNIT
// The whole gate in the baseline variant, from gate_base.cpp's unit (isa.h).
void run_gate_cpu_base(const GateParams& p);
#endif

namespace {

constexpr float kFltMax = 3.40282347e38f;
// Tokens per parallel work item: 128, smaller for small T so that both threads get work. A
// function of T alone, so float statistics never depend on the thread count.
inline int64_t chunk_size(int64_t T) { return T >= 1024 ? 128 : std::max<int64_t>(16, (T + 7) / 8); }
// Up to this k: select_untiered, and the group limit's own selection; above: select_many, or
// nth_element over every key with a group limit.
constexpr int64_t kInsertMaxK = 16;
constexpr int64_t kRankMaxCandidates = 32;  // select_untiered: ranks up to this many candidates

MOE_ROUTE_INLINE float sanitize(float x) {
  // Comparisons are false for NaN, which therefore lands on -FLT_MAX.
  return x >= -kFltMax ? (x <= kFltMax ? x : kFltMax) : -kFltMax;
}

// n vectors as 8n floats in memory order, for loops over a block's every lane (Clang, unlike
// GCC, does not take the address of a vector's element).
MOE_ROUTE_INLINE float* flat(f32x8* v) { return reinterpret_cast<float*>(v); }
MOE_ROUTE_INLINE const float* flat(const f32x8* v) { return reinterpret_cast<const float*>(v); }

// x in every lane, by a shuffle: GCC built f32x8{x, x, ...} of a runtime x from 8 inserts in
// some loops (as it did splat8i's in lane_select's tier setup).
MOE_ROUTE_INLINE f32x8 splat8(float x) {
  const f32x8 v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
}

MOE_ROUTE_INLINE i32x8 splat8i(int32_t x) {  // as splat8
  const i32x8 v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
}

// What the exp and log below need beyond arithmetic, for one float and for 8 or 16 lanes.
MOE_ROUTE_INLINE int32_t to_int(float x) { return static_cast<int32_t>(x); }
MOE_ROUTE_INLINE i32x8 to_int(f32x8 x) { return __builtin_convertvector(x, i32x8); }
MOE_ROUTE_INLINE i32x16 to_int(f32x16 x) { return __builtin_convertvector(x, i32x16); }
MOE_ROUTE_INLINE float at_least(float x, float lo) { return std::max(x, lo); }
MOE_ROUTE_INLINE f32x8 at_least(f32x8 x, float lo) {
  return vsel(vlt(x, splat8(lo)), splat8(lo), x);
}
MOE_ROUTE_INLINE f32x16 at_least(f32x16 x, float lo) {
  const f32x16 l = f32x16{} + lo;
  return vsel(vlt(x, l), l, x);
}
MOE_ROUTE_INLINE float bits_to_float(int32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
MOE_ROUTE_INLINE f32x8 bits_to_float(i32x8 u) { return __builtin_bit_cast(f32x8, u); }
MOE_ROUTE_INLINE f32x16 bits_to_float(i32x16 u) { return __builtin_bit_cast(f32x16, u); }
MOE_ROUTE_INLINE int32_t float_to_bits(float x) { return __builtin_bit_cast(int32_t, x); }
MOE_ROUTE_INLINE i32x8 float_to_bits(f32x8 x) { return __builtin_bit_cast(i32x8, x); }
MOE_ROUTE_INLINE i32x16 float_to_bits(f32x16 x) { return __builtin_bit_cast(i32x16, x); }
MOE_ROUTE_INLINE float to_float(int32_t x) { return static_cast<float>(x); }
MOE_ROUTE_INLINE f32x8 to_float(i32x8 x) { return __builtin_convertvector(x, f32x8); }

MOE_ROUTE_INLINE f32x8 sanitize8(f32x8 x) {
  const f32x8 hi = splat8(kFltMax), lo = splat8(-kFltMax);
  return vsel(vge(x, lo), vsel(vle(x, hi), x, hi), lo);
}

MOE_ROUTE_INLINE f32x8 abs8(f32x8 x) {
  return bits_to_float(__builtin_bit_cast(i32x8, x) & splat8i(0x7fffffff));
}

// The same for two experts' 8 lanes in one 16-lane vector (lane_exps, lane_steer).
MOE_ROUTE_INLINE f32x16 sanitize8(f32x16 x) {
  const f32x16 hi = f32x16{} + kFltMax, lo = f32x16{} - kFltMax;
  return vsel(vge(x, lo), vsel(vle(x, hi), x, hi), lo);
}

MOE_ROUTE_INLINE f32x16 abs8(f32x16 x) { return bits_to_float(float_to_bits(x) & 0x7fffffff); }

// {a, b}: lanes 0-7 of a 16-lane vector from a, lanes 8-15 from b.
MOE_ROUTE_INLINE f32x16 pair16(f32x8 a, f32x8 b) {
  if constexpr (kPieces) {  // as by_pieces: the shuffle would be lowered lane by lane
    f32x16 r;
    std::memcpy(&r, &a, sizeof a);
    std::memcpy(reinterpret_cast<char*>(&r) + sizeof a, &b, sizeof b);
    return r;
  } else {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
}

// exp(x) = 2^n * q: n = round(x / ln2), q = exp(x - n ln2) by a two-part reduction and the
// degree-5 Cephes polynomial. For x in [-104, 88.72]; F is float or f32x8.
template <typename F>
MOE_ROUTE_INLINE void exp_reduce(F x, F& n, F& q) {
  n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  q = r * 1.9875691500e-4f + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * (r * r) + r + 1.f;
}

// 2^e for a normal exponent e in [-126, 127] (int32_t or i32x8).
template <typename I>
MOE_ROUTE_INLINE auto pow2i(I e) { return bits_to_float((e + 127) << 23); }

// exp(x) to about 1 ulp, denormal results included (Cephes expf: n = round(x/ln2), two-part
// reduction, degree-5 polynomial), written without calls or branches so the row loops vectorise.
// 2^n, n in [-150, 128], is not always a normal float, so q takes it in two exact steps,
// 2^(n>>1) and 2^(n - (n>>1)), the second rounding once into the denormals as IEEE exp does (a
// softmax probability below 1.2e-38 is not 0: renormalised among the chosen experts it can be
// most of the weight). Like IEEE exp it overflows to +inf above ln(FLT_MAX), and is 0 below -104.
MOE_ROUTE_INLINE float exp_fast(float x) {
  const float xc = std::min(std::max(x, -104.f), 88.72f);
  float n, q;
  exp_reduce(xc, n, q);
  const int32_t ni = static_cast<int32_t>(n), half = ni >> 1;
  const float y = (q * pow2i(half)) * pow2i(ni - half);
  return x > 88.7228394f ? INFINITY : y;
}

// exp(x) for x <= 0 (softmax numerators exp(z - max)), n in [-150, 0]: q * 2^(n+64), then
// 2^-64. F is float or f32x8.
template <typename F>
MOE_ROUTE_INLINE F exp_nonpos(F x) {
  F n, q;
  exp_reduce(at_least(x, -104.f), n, q);
  return (q * pow2i(to_int(n) + 64)) * 0x1p-64f;
}

MOE_ROUTE_INLINE float sigmoid(float x) { return 1.f / (1.f + exp_fast(-x)); }

// log(x) for finite x > 0 to about 1 ulp (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// degree-8 polynomial in m - 1), branch-free so entropy loops vectorise. Denormal inputs are
// treated as 0 by the callers' x > 0 guards only approximately; they never reach here from
// normalised probabilities above 1e-38. F is float or f32x8.
template <typename F>
MOE_ROUTE_INLINE F log_fast(F x) {
  auto u = float_to_bits(x);  // x > 0: the sign bit is clear
  auto e = ((u >> 23) & 0xff) - 126;
  F m = bits_to_float((u & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const auto small = vlt(m, F{} + 0.707106781186547524f);
  e = vsel(small, e - 1, e);
  m = vsel(small, (m + m) - 1.f, m - 1.f);
  const F z = m * m;
  F y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const F fe = to_float(e);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

// softplus(x) = log1p(exp(x)), x itself above torch's threshold of 20; branch-free so that row
// loops vectorise (std::log1p and std::exp kept DeepSeek-V4's E-wide loops scalar). log1p(y) is
// log(u) * y / (u - 1) with u = 1 + y, exact where u rounds to 1 (x below about -17), where
// log(1 + y) alone would give 0.
MOE_ROUTE_INLINE float softplus_fast(float x) {
  const float y = exp_fast(std::min(x, 20.f));
  const float u = 1.f + y;
  const float l = u == 1.f ? y : log_fast(u) * (y / (u - 1.f));
  return x > 20.f ? x : l;
}

MOE_ROUTE_INLINE float sqrt_softplus(float x) { return std::sqrt(softplus_fast(x)); }

// x rounded to nearest even in the logits' half precision and back, sanitised (round_scores):
// what a PyTorch op on fp16/bf16 tensors does to its fp32 result. Overflow goes to +-FLT_MAX.
// Branch-free (selects), so that the rounding loops vectorise.
template <int kDrop>  // mantissa bits dropped: 16 for bf16, 13 for fp16's normal numbers
MOE_ROUTE_INLINE float round_mantissa(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u = (u + ((1u << (kDrop - 1)) - 1u) + ((u >> kDrop) & 1u)) & ~((1u << kDrop) - 1u);
  float y;
  std::memcpy(&y, &u, sizeof y);
  return y;
}

MOE_ROUTE_INLINE float round_bf16(float x) { return sanitize(round_mantissa<16>(x)); }

MOE_ROUTE_INLINE float round_fp16(float x) {
  const float y = round_mantissa<13>(x);
  const float a = std::fabs(x);
  const float sub = std::rint(x * 16777216.f) * 5.9604644775390625e-08f;  // steps of 2^-24
  const float big = x > 0.f ? kFltMax : -kFltMax;                          // past 65504
  return a >= 65520.f ? big : (a < 6.103515625e-05f ? sub : y);
}

MOE_ROUTE_INLINE float round_half(float x, LogitType t) {
  return t == LogitType::BF16 ? round_bf16(x) : round_fp16(x);
}

// x[0..n) rounded as one op in the logits' half precision (round_half) into out, a loop per
// precision, so that each vectorises.
template <float (*Round)(float)>
MOE_ROUTE_INLINE void round_n(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Round(x[i]);
}

MOE_ROUTE_INLINE void round_half_n(LogitType t, const float* x, int64_t n, float* out) {
  if (t == LogitType::BF16) round_n<round_bf16>(x, n, out);
  else round_n<round_fp16>(x, n, out);
}

// DeepSeek-V4's selection scores of n logits z into rounded: softplus and sqrt as two ops in the
// router's half precision, each rounded. With `sc`, also the fp32 scores sqrt_softplus(z) (the
// statistics'), from the same softplus. A loop per precision, so that each vectorises.
template <float (*Round)(float)>
MOE_ROUTE_INLINE void rounded_sqrt_softplus_n(const float* z, int64_t n, float* rounded,
                                              float* sc) {
  if (sc) {
    for (int64_t i = 0; i < n; ++i) {
      const float sp = softplus_fast(z[i]);
      sc[i] = std::sqrt(sp), rounded[i] = Round(std::sqrt(Round(sp)));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) rounded[i] = Round(std::sqrt(Round(softplus_fast(z[i]))));
  }
}

MOE_ROUTE_INLINE void rounded_sqrt_softplus(LogitType t, const float* z, int64_t n, float* rounded,
                                            float* sc = nullptr) {
  if (t == LogitType::BF16) rounded_sqrt_softplus_n<round_bf16>(z, n, rounded, sc);
  else rounded_sqrt_softplus_n<round_fp16>(z, n, rounded, sc);
}

MOE_ROUTE_INLINE float score_of(Score s, float z) {
  switch (s) {
    case Score::Sigmoid: return sigmoid(z);
    case Score::SqrtSoftplus: return sqrt_softplus(z);
    default: return z;
  }
}

// Whether the scores are a function of each logit other than the logit itself (sigmoid,
// sqrt-softplus): worth computing once (scores_of) for selection, weights and statistics.
MOE_ROUTE_INLINE bool elementwise_scores(const GateParams& p) {
  return p.score == Score::Sigmoid || p.score == Score::SqrtSoftplus;
}

// The elementwise scores of n logits z (a token's E, or a lane block's 8E) into sc, a loop per
// score so that each vectorises.
MOE_ROUTE_INLINE void scores_of(const GateParams& p, const float* z, int64_t n, float* sc) {
  if (p.score == Score::Sigmoid) {
    for (int64_t i = 0; i < n; ++i) sc[i] = sigmoid(z[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) sc[i] = sqrt_softplus(z[i]);
  }
}

MOE_ROUTE_INLINE f32x8 load8(const float* x) {
  f32x8 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// The max (kMax) or min of r, the extreme of a scalar tail, and the 8 lanes of m, keeping the
// first of equal values (+0 or -0) in the order r, lane 0, ..., lane 7 as a scan would. A tree
// of shuffles in registers, each pair keeping its left one on a tie (element access spills the
// vector to the stack and reloads it lane by lane).
template <bool kMax>
MOE_ROUTE_INLINE float fold_extreme(f32x8 m, float r) {
  auto pick = [](f32x8 left, f32x8 right) {
    return vsel(kMax ? vgt(right, left) : vlt(right, left), right, left);
  };
  m = pick(m, shuffle<1, 0, 3, 2, 5, 4, 7, 6>(m, m));  // lanes 0, 2, 4, 6
  m = pick(m, shuffle<2, 3, 0, 1, 6, 7, 4, 5>(m, m));  // lanes 0, 4
  m = pick(m, shuffle<4, 5, 6, 7, 0, 1, 2, 3>(m, m));  // lane 0
  return (kMax ? m[0] > r : m[0] < r) ? m[0] : r;
}

// Max of x[0..n) over 8 lanes (values are sanitised, so there is no NaN to order).
MOE_ROUTE_INLINE float max_of(const float* x, int64_t n) {
  f32x8 m = splat8(-kFltMax);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x8 v = load8(x + i);
    m = vsel(vgt(v, m), v, m);
  }
  float r = -kFltMax;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return fold_extreme<true>(m, r);
}

// Selection key (gate_params.h): tier | order-preserving fp32 bits | inverted index, so one
// unsigned comparison orders by tier, then value, then lower index.
MOE_ROUTE_INLINE uint64_t make_key(int32_t tier, float v, int64_t e) {
  float canon = v + 0.f;  // -0.0 -> +0.0, so that equal values tie
  uint32_t u;
  std::memcpy(&u, &canon, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(tier) << 62) | (uint64_t(u) << kIndexBits) | (kIndexMask - uint64_t(e));
}

MOE_ROUTE_INLINE int32_t key_index(uint64_t key) {
  return int32_t(kIndexMask - (key & kIndexMask));
}

// Key of an untiered expert: what the tier-free selection compares.
MOE_ROUTE_INLINE uint64_t key_normal(float v, int32_t e) { return make_key(kTierNormal, v, e); }

// The two largest values of x[0..n) in each of 8 lanes, lane l holding x[l], x[l + 8], ...
// (-FLT_MAX for what a lane lacks; equal values count twice). Independent lanes keep
// the dependency chains short.
MOE_ROUTE_INLINE void top2_lanes(const float* x, int64_t n, f32x8& a, f32x8& b) {
  a = splat8(-kFltMax), b = a;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x8 v = load8(x + i);
    b = vsel(vgt(v, a), a, vsel(vgt(v, b), v, b));
    a = vsel(vgt(v, a), v, a);
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float v = x[i];
    b[l] = v > a[l] ? a[l] : (v > b[l] ? v : b[l]);
    a[l] = v > a[l] ? v : a[l];
  }
}

// r[j] = column j of the 8x8 block whose row i is r[i] (three rounds of shuffles). V is f32x8
// or i32x8.
template <typename V>
MOE_ROUTE_INLINE void transpose8(V* r) {
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = shuffle<0, 8, 1, 9, 4, 12, 5, 13>(r[i], r[i + 1]);
    t[i + 1] = shuffle<2, 10, 3, 11, 6, 14, 7, 15>(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)  // then pairs of pairs: columns c and c + 4 of four rows
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = shuffle<0, 1, 8, 9, 4, 5, 12, 13>(t[i + h], t[i + h + 2]);
      u[i + 2 * h + 1] =
          shuffle<2, 3, 10, 11, 6, 7, 14, 15>(t[i + h], t[i + h + 2]);
    }
  for (int c = 0; c < 4; ++c) {  // then the two halves of the rows
    r[c] = shuffle<0, 1, 2, 3, 8, 9, 10, 11>(u[c], u[c + 4]);
    r[c + 4] = shuffle<4, 5, 6, 7, 12, 13, 14, 15>(u[c], u[c + 4]);
  }
}

// ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) by shuffles, in registers (element access
// spills the vector to the stack and reloads it lane by lane).
MOE_ROUTE_INLINE float hsum8(f32x8 a) {
  const f32x8 pairs = a + shuffle<1, 0, 3, 2, 5, 4, 7, 6>(a, a);
  const f32x8 quads = pairs + shuffle<2, 3, 0, 1, 6, 7, 4, 5>(pairs, pairs);
  return quads[0] + quads[4];
}

// Sum of up to kSumBlock values with 8 fixed partial sums (a fixed order, whatever the vector
// width).
constexpr int64_t kSumBlock = 128;
MOE_ROUTE_INLINE float block_sum8(const float* x, int64_t n) {
  f32x8 acc = splat8(0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(x + i);
  for (int j = 0; i < n; ++i, ++j) acc[j] += x[i];
  return hsum8(acc);
}

// Sum of n values: block_sum8 of each block of kSumBlock, the block totals added in double. A
// lane adds at most 16 values in fp32, so the rounding error does not grow with n as one running
// sum per lane's does (2e-5 relative over 3000 equal exps); up to kSumBlock values, the bits are
// block_sum8's.
MOE_ROUTE_INLINE float sum8(const float* x, int64_t n) {
  if (n <= kSumBlock) return block_sum8(x, n);
  double total = 0.0;
  for (int64_t i = 0; i < n; i += kSumBlock)
    total += static_cast<double>(block_sum8(x + i, std::min(kSumBlock, n - i)));
  return static_cast<float>(total);
}

// x[0..n) /= den, 8 lanes at a time (one vector division instead of 8 scalar ones).
MOE_ROUTE_INLINE void divide_by(float* x, int64_t n, float den) {
  const f32x8 d = splat8(den);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x8 q = load8(x + i) / d;
    std::memcpy(x + i, &q, sizeof q);
  }
  for (; i < n; ++i) x[i] = x[i] / den;
}

// Statistics of a softmax row from its numerators ew = exp(z - max) and their sum S: adds
// q = ew / S into `prob` (if given) and returns the entropy log S - sum(ew (z - max)) / S. The
// sum uses 8 fixed lanes, like sum8.
MOE_ROUTE_INLINE float softmax_stats(const float* ew, const float* z, float z_max, float ew_sum,
                                     int64_t n, float* prob) {
  const f32x8 inv = splat8(1.f / ew_sum), top = splat8(z_max), zero = splat8(0.f);
  f32x8 acc = zero;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x8 x = load8(ew + i);
    const f32x8 t = x * (load8(z + i) - top);
    acc += vsel(vgt(x, zero), t, zero);  // ew = 0 where z - max may be -inf
    if (prob) {
      f32x8 pv = load8(prob + i);
      pv += x * inv;
      std::memcpy(prob + i, &pv, sizeof pv);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc[j] += ew[i] > 0.f ? ew[i] * (z[i] - z_max) : 0.f;
    if (prob) prob[i] += ew[i] * inv[0];
  }
  return log_fast(ew_sum) - hsum8(acc) / ew_sum;
}

// Softmax numerators exp(x - m) into dst for a known row max m; returns their sum.
MOE_ROUTE_INLINE float softmax_exps_from(const float* x, float* dst, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) dst[i] = exp_nonpos(x[i] - m);
  return sum8(dst, n);
}

// Softmax numerators exp(x - max) into dst; returns the sum. `max_out` receives the max.
MOE_ROUTE_INLINE float softmax_exps(const float* x, float* dst, int64_t n, float& max_out) {
  max_out = max_of(x, n);
  return softmax_exps_from(x, dst, n, max_out);
}

// Keeps the `k` largest keys seen, sorted descending (k <= kInsertMaxK).
struct TopK {
  uint64_t best[kInsertMaxK];
  int64_t k, filled = 0;
  explicit TopK(int64_t k_) : k(k_) {}
  inline void push(uint64_t key) {
    if (filled == k && key <= best[k - 1]) return;
    int64_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && best[pos - 1] < key) {
      best[pos] = best[pos - 1];
      --pos;
    }
    best[pos] = key;
  }
};

// Per-call facts derived once from the arguments.
struct Prep {
  std::vector<float> bias;  // sanitised selection bias
  bool has_std = false, has_force = false;
  std::vector<int8_t> tier;     // per expert, from the force row
  std::vector<int32_t> forced;  // the experts forced on or off
  std::vector<uint8_t> group_on;  // with a group limit: whether a group holds an expert forced on
  CpuIsa isa = CpuIsa::Base;    // the variant this call runs (cpu_isa(), read once)
  bool lanes = false;           // few experts: eight tokens at a time (gate_lanes)
  // The lanes select forced experts by value, without tiers (lane_select): forced on as +inf,
  // forced off as taken; first_on is the lowest expert forced on (-1: none).
  bool force_as_values = false;
  int32_t first_on = -1;
};

// Statistics of consecutive tokens of one group ("a run") are summed in thread-local scratch
// (RunAcc) and flushed when the group changes or the chunk ends: into chunk-private Runs, merged in
// chunk order after the parallel loop, or straight into the caller's buffers when the call is one
// chunk. Either way the order of float additions depends only on T, and no two threads write
// near each other per token. Counts and weight sums go by the experts the run selected (a few
// k per token, where E cells per run made statistics by sequence cost 2.6x statistics of one
// group at E=16384, bench/RESULTS.md); the probabilities' sums are dense.
struct RunAcc {
  int64_t group = -1, tokens = 0;
  float entropy = 0.f;
  // By expert (padded to a multiple of 8): the run's selections (at most a chunk's 128 tokens
  // each) and their weights' sum, zero outside the experts it selected (flush_run zeroes those
  // back); its probabilities' sum.
  std::vector<int32_t> counts;
  std::vector<float> weight, prob;

  // Before a call's first run. Between runs counts and weight are zero already; they are
  // zeroed again only for another E, or after a call that stopped inside a run.
  void reset(int64_t E) {
    const int64_t padded = (E + 7) & ~int64_t(7);
    if (group < 0 && int64_t(counts.size()) == padded) return;
    group = -1;
    counts.assign(padded, 0), weight.assign(padded, 0.f), prob.assign(padded, 0.f);
  }
  void start(const GateParams& p, int64_t g) {
    group = g, tokens = 0, entropy = 0.f;
    if (p.prob_sum) std::fill(prob.begin(), prob.end(), 0.f);
  }
};

// Eight experts' cells of a run, from expert e0 on (fewer past E): how often each was selected
// and the sum of its weights.
struct Cells8 {
  int64_t e0;
  int32_t count[8];
  float weight[8];
};

struct Runs {
  // The call's groups ascend (check_groups): only the chunk's first run is kept here, the
  // others go straight to the caller's buffers (flush_run).
  bool ascending = false;
  std::vector<int64_t> group, tokens;
  std::vector<float> entropy;
  std::vector<int64_t> cells_end;  // run r's cells are [cells_end[r - 1], cells_end[r]), from 0
  std::vector<Cells8> cells;
  std::vector<float> prob;  // [runs, E]
};

// Adds the cells c of a run of group g to the caller's counts and weight sums.
MOE_ROUTE_INLINE void add_cells(const GateParams& p, int64_t g, const Cells8& c) {
  const int64_t n = std::min<int64_t>(8, p.E - c.e0), row = g * p.E + c.e0;
  if (p.counts)
    for (int64_t i = 0; i < n; ++i) p.counts[row + i] += c.count[i];
  if (p.weight_sum)
    for (int64_t i = 0; i < n; ++i) p.weight_sum[row + i] += c.weight[i];
}

// Ends the current run: into `runs`, or into the caller's buffers when `runs` is null or the
// groups ascend and the run is not its chunk's first. Such a run's group has no run in an
// earlier chunk and no other in this one: added now, it comes first, as in merge_runs' order,
// and no other thread adds to its group before merge_runs. (With 5-token groups at E=16384,
// copying each run's probabilities into `runs` and merging them took a third of the call.)
void flush_run(const GateParams& p, RunAcc& a, Runs* runs) {
  if (a.group < 0) return;
  if (runs && runs->ascending && !runs->group.empty()) runs = nullptr;
  const int64_t g = a.group, E = p.E;
  if (runs) {
    runs->group.push_back(g), runs->tokens.push_back(a.tokens), runs->entropy.push_back(a.entropy);
  } else {
    if (p.tokens) p.tokens[g] += a.tokens;
    if (p.entropy_sum) p.entropy_sum[g] += a.entropy;
  }
  // The cells of the experts selected, eight at a time: the eights with a selection (at large E
  // a few, so the scan skips most of them; at small E all, so it does not branch per expert)
  int32_t* counts = a.counts.data();
  float* weight = a.weight.data();
  for (int64_t e0 = 0; e0 < E; e0 += 8) {
    Cells8 c;
    std::memcpy(c.count, counts + e0, sizeof c.count);
    uint64_t w[4];
    std::memcpy(w, c.count, sizeof w);
    if ((w[0] | w[1] | w[2] | w[3]) == 0) continue;
    c.e0 = e0;
    std::memcpy(c.weight, weight + e0, sizeof c.weight);
    std::memset(counts + e0, 0, sizeof c.count), std::memset(weight + e0, 0, sizeof c.weight);
    if (runs) runs->cells.push_back(c);
    else add_cells(p, g, c);
  }
  if (runs) runs->cells_end.push_back(int64_t(runs->cells.size()));
  if (p.prob_sum) {
    if (runs) runs->prob.insert(runs->prob.end(), a.prob.begin(), a.prob.begin() + E);
    else
      for (int64_t e = 0; e < E; ++e) p.prob_sum[g * E + e] += a.prob[e];
  }
  a.group = -1;
}

constexpr int kRowBlock = 8;  // rows of the per-token pass whose stds are taken together

struct Scratch {
  std::vector<float> z0, z, v, ew, sc, dense, work;  // rows padded to a multiple of 8
  std::vector<float> block;  // kRowBlock rows like z0 (load_block)
  float block_sd[kRowBlock] = {};  // their stds
  std::vector<uint64_t> keys;
  std::vector<uint64_t> forced_keys;  // select_tiered's, one per expert at most
  std::vector<uint8_t> group_ok;
  std::vector<uint64_t> group_keys;
  std::vector<int32_t> group_list, group_slot;
  RunAcc run;
  // Sizes the rows for E experts and sets the padding of the rows that selection reads whole
  // 8-lane blocks of (z0, z, v, sc) to -inf, below every sanitised value.
  void prepare(int64_t E, int64_t n_group) {
    const int64_t padded = (E + 7) & ~int64_t(7);
    if (int64_t(z0.size()) < padded) {
      for (auto* row : {&z0, &z, &v, &ew, &sc, &dense, &work}) row->resize(padded);
      keys.resize(padded), forced_keys.resize(padded);
    }
    for (auto* row : {&z0, &z, &v, &sc}) std::fill(row->data() + E, row->data() + padded, -INFINITY);
    block.resize(kRowBlock * padded);
    for (int r = 0; r < kRowBlock; ++r)
      std::fill(block.data() + r * padded + E, block.data() + (r + 1) * padded, -INFINITY);
    if (int64_t(group_ok.size()) < n_group) {
      group_ok.resize(n_group), group_keys.resize(n_group);
      group_list.resize(n_group), group_slot.resize(n_group);
    }
    run.reset(E);
  }
};

MOE_ROUTE_INLINE void load_row(const GateParams& p, int64_t t, float* z) {
  const int64_t off = t * p.row_stride, E = p.E;
  switch (p.logit_type) {
    case LogitType::F32: {
      const float* r = static_cast<const float*>(p.logits) + off;
      for (int64_t e = 0; e < E; ++e) z[e] = sanitize(r[e]);
      break;
    }
    case LogitType::BF16: {
      const uint16_t* r = static_cast<const uint16_t*>(p.logits) + off;
      for (int64_t e = 0; e < E; ++e) {
        const uint32_t bits = uint32_t(r[e]) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        z[e] = sanitize(f);
      }
      break;
    }
    case LogitType::F16: {
      const uint16_t* r = static_cast<const uint16_t*>(p.logits) + off;
      for (int64_t e = 0; e < E; ++e) z[e] = sanitize(c10::detail::fp16_ieee_to_fp32_value(r[e]));
      break;
    }
  }
}

// Eight rows' logit std (population, or unbiased) from the sums of their squared deviations,
// one row per lane. A NaN std (overflow: inf or NaN by summation order) is +inf, as in the
// reference.
MOE_ROUTE_INLINE f32x8 std_of(const GateParams& p, f32x8 var) {
  const int64_t dof = p.std_unbiased ? p.E - 1 : p.E;
  if (dof <= 0) return splat8(0.f);
  f32x8 sd = var / float(dof);
  for (int l = 0; l < 8; ++l) sd[l] = std::sqrt(sd[l]);
  return vsel(veq(sd, sd), sd, splat8(INFINITY));
}

// sum8 of term(x) over each of kRowBlock rows of n values, `stride` apart: row r's in lane r.
// The rows' sums advance together, kRowBlock independent chains, where one row's sum is a chain
// of n / 8 additions.
template <typename Term>
MOE_ROUTE_INLINE f32x8 rows_sum8(const float* rows, int64_t stride, int64_t n, Term term) {
  typedef double f64x8 __attribute__((vector_size(64)));
  f64x8 total = {};
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    f32x8 acc[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) acc[r] = splat8(0.f);
    int64_t i = b0;
    for (; i + 8 <= b1; i += 8)
      for (int r = 0; r < kRowBlock; ++r) acc[r] += term(load8(rows + r * stride + i), r);
    for (int r = 0; r < kRowBlock; ++r)
      for (int64_t e = i, j = 0; e < b1; ++e, ++j) acc[r][j] += term(rows[r * stride + e], r);
    transpose8(acc);  // then hsum8 of each row, lane by lane
    const f32x8 sum =
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    if (n <= kSumBlock) return sum;
    total += __builtin_convertvector(sum, f64x8);
  }
  return __builtin_convertvector(total, f32x8);
}

// Tokens [t, t + n), n <= kRowBlock, loaded into s.block (load_row) with their stds in
// s.block_sd, as steer_row takes them: the mean by sum8, then sum8 of the squared deviations.
// Taken one token at a time, before its steering, these were two dependent sums, a division and
// a square root on each token's critical path. Rows past n (a chunk's last block) are zeroed:
// what they held, perhaps of another E, is not summed.
MOE_ROUTE_INLINE void load_block(const GateParams& p, int64_t t, int n, Scratch& s) {
  const int64_t E = p.E, stride = (E + 7) & ~int64_t(7);
  float* rows = s.block.data();
  for (int r = 0; r < kRowBlock; ++r) {
    if (r < n) load_row(p, t + r, rows + r * stride);
    else std::fill(rows + r * stride, rows + r * stride + E, 0.f);
  }
  float mean[kRowBlock];
  const f32x8 sums = rows_sum8(rows, stride, E, [](auto x, int) { return x; }) / float(E);
  std::memcpy(mean, &sums, sizeof mean);
  const f32x8 var = rows_sum8(rows, stride, E, [&mean](auto x, int r) {
    return (x - mean[r]) * (x - mean[r]);
  });
  const f32x8 sd = std_of(p, var);
  std::memcpy(s.block_sd, &sd, sizeof sd);
}

// One token's steered logits z from its logits z0 and their std sd (load_block; reference:
// steer_logits). With experts forced on or off, returns the max of z as max_of gives it, or one
// of its equal values (+0 for -0: the softmax shifted by either is the same), found in the same
// pass as the row's min; else 0.
MOE_ROUTE_INLINE float steer_row(const GateParams& p, const Prep& prep, const float* z0, float sd,
                                 float* z) {
  const int64_t E = p.E;
  const float* add = p.steer + kSteerAdd * E;
  const float* lam = p.steer + kSteerStd * E;
  const float* mul = p.steer + kSteerAbs * E;
  const float* force = p.steer + kSteerForce * E;
  auto steered = [&](int64_t e) {
    float y = z0[e] + add[e];
    y = y + (lam[e] != 0.f ? lam[e] * sd : 0.f);
    y = y + mul[e] * std::fabs(z0[e]);
    return sanitize(y);
  };
  if (!prep.has_force) {  // a loop the compiler vectorises at its widest width
    for (int64_t e = 0; e < E; ++e) z[e] = steered(e);
    return 0.f;
  }
  // `steered` 8 experts at a time, with the row's max as max_of takes it and its min likewise.
  const f32x8 sd8 = splat8(sd), zero = splat8(0.f);
  f32x8 hi = splat8(-kFltMax), lo = splat8(kFltMax);
  int64_t e = 0;
  for (; e + 8 <= E; e += 8) {
    const f32x8 x = load8(z0 + e), l = load8(lam + e);
    f32x8 y = x + load8(add + e);
    y = y + vsel(vne(l, zero), l * sd8, zero);
    y = sanitize8(y + load8(mul + e) * abs8(x));
    std::memcpy(z + e, &y, sizeof y);
    hi = vsel(vgt(y, hi), y, hi);
    lo = vsel(vlt(y, lo), y, lo);
  }
  float top = -kFltMax, bottom = kFltMax;
  for (; e < E; ++e) {
    z[e] = steered(e);
    top = z[e] > top ? z[e] : top;
    bottom = z[e] < bottom ? z[e] : bottom;
  }
  top = fold_extreme<true>(hi, top), bottom = fold_extreme<false>(lo, bottom);
  for (const int32_t f : prep.forced) z[f] = force[f] > 0.f ? top : bottom;
  // Experts forced on hold the max; with only experts forced off, it may have been one of them.
  return prep.first_on >= 0 ? top : max_of(z, E);
}

// Marks the topk_group best groups of one token in s.group_ok.
MOE_ROUTE_INLINE void choose_groups(const GateParams& p, const Prep& prep, const float* v, Scratch& s) {
  const int64_t gsize = p.E / p.n_group;
  TopK top(std::min<int64_t>(p.topk_group, kInsertMaxK));
  const bool use_insert = p.topk_group <= kInsertMaxK;
  f32x8 first, second;  // the two largest values of the 8 groups from g & ~7 on, one per lane
  for (int64_t g = 0; g < p.n_group; ++g) {
    const int64_t lane = g & 7;
    if (lane == 0) {
      // Each group's pairs of its 8 lanes, transposed so that a vector holds one lane of 8
      // groups, merged lane by lane: the group's pair is the larger a and the larger of the
      // other a and both b.
      f32x8 a[8], b[8];
      for (int64_t i = 0; i < 8; ++i) {
        if (g + i < p.n_group) top2_lanes(v + (g + i) * gsize, gsize, a[i], b[i]);
        else a[i] = b[i] = splat8(-kFltMax);
      }
      transpose8(a), transpose8(b);
      first = a[0], second = b[0];
      for (int l = 1; l < 8; ++l) {
        const f32x8 low = vsel(vlt(first, a[l]), first, a[l]);
        first = vsel(vlt(first, a[l]), a[l], first);
        second = vsel(vlt(second, b[l]), b[l], second);
        second = vsel(vlt(second, low), low, second);
      }
    }
    const float a = first[lane], b = second[lane];
    float score = p.group_score == GroupScore::Max ? a : sanitize(gsize > 1 ? a + b : a);
    if (p.group_score == GroupScore::Top2Sum && gsize > 1 && rounds_half_sums(p))
      score = round_half(score, p.logit_type);
    const int32_t tier = prep.group_on.empty() || !prep.group_on[g] ? kTierNormal : kTierForcedOn;
    const uint64_t key = make_key(tier, score, g);
    s.group_ok[g] = 0;
    if (use_insert) top.push(key);
    else s.group_keys[g] = key;
  }
  if (use_insert) {
    for (int64_t j = 0; j < top.filled; ++j) s.group_ok[key_index(top.best[j])] = 1;
  } else {
    auto* begin = s.group_keys.data();
    std::nth_element(begin, begin + p.topk_group - 1, begin + p.n_group, std::greater<uint64_t>());
    for (int64_t j = 0; j < p.topk_group; ++j) s.group_ok[key_index(begin[j])] = 1;
  }
}

// Bit l set where lane l of the comparison mask m (all ones or zero per lane) is set.
MOE_ROUTE_INLINE uint32_t mask_bits(i32x8 m) {
#if defined(__SSE__)
  const f32x8 f = reinterpret_cast<f32x8>(m);
  const f32x4 lo = __builtin_shufflevector(f, f, 0, 1, 2, 3);
  const f32x4 hi = __builtin_shufflevector(f, f, 4, 5, 6, 7);
  return uint32_t(__builtin_ia32_movmskps(lo)) | uint32_t(__builtin_ia32_movmskps(hi)) << 4;
#else
  uint32_t bits = 0;
  for (int l = 0; l < 8; ++l) bits |= uint32_t(m[l] != 0) << l;
  return bits;
#endif
}

// Keys of the values of v[0..padded) at or above tau into keys, in index order; returns how many.
MOE_ROUTE_INLINE int64_t keys_at_least(const float* v, int64_t padded, float tau, uint64_t* keys) {
  const f32x8 tau8 = splat8(tau);
  int64_t n = 0;
  for (int64_t e = 0; e < padded; e += 64) {  // 64 values a word: one unpredictable exit a word
    uint64_t bits = 0;
    for (int64_t b = 0; b < 8 && e + 8 * b < padded; ++b)
      bits |= uint64_t(mask_bits(vge(load8(v + e + 8 * b), tau8))) << (8 * b);
    for (; bits; bits &= bits - 1) {
      const int64_t i = e + __builtin_ctzll(bits);
      keys[n++] = key_normal(v[i], int32_t(i));
    }
  }
  return n;
}

// The ids of the k largest of n distinct keys (k <= n <= kMax), in descending order, by rank:
// a key's rank is the number of larger keys, counted by key j against all at once (this
// vectorises, with no sum across lanes), and the key of rank r < k is the r-th id. Sets the keys
// past n, up to a multiple of 8, to 0, below every key (the tier is >= 1): `keys` has room.
template <int64_t kMax>
MOE_ROUTE_INLINE void rank_keys(uint64_t* keys, int64_t n, int64_t k, int32_t* ids) {
  static_assert(kMax % 8 == 0, "whole vectors of ranks");
  const int64_t n8 = (n + 7) & ~int64_t(7);
  for (int64_t i = n; i < n8; ++i) keys[i] = 0;
  uint64_t rank[kMax] = {};
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t key = keys[j];
    for (int64_t i = 0; i < n8; ++i) rank[i] += key > keys[i];
  }
  int32_t ranked[kMax];  // slot r < k: the key of rank r; the rest unused
  for (int64_t i = 0; i < n; ++i) ranked[rank[i]] = key_index(keys[i]);
  std::memcpy(ids, ranked, sizeof(int32_t) * k);
}

// The k largest of v[0..padded) (k <= kInsertMaxK, no tiers), in descending order with the lower
// index first on ties, into ids. Chosen and ineligible experts hold -inf, below every sanitised
// value, so at least k values must be finite; rows are padded with -inf (Scratch::prepare).
// 1. The maxima of 16 disjoint lanes: k of them are k distinct values, so the k-th largest
//    maximum, tau, is at most the k-th largest value, and every pick is >= tau.
// 2. The values >= tau, as keys into `keys` (room for `padded`): about k to 2k of them for
//    random logits, every value when all are equal.
// 3. Each candidate's rank is the number of larger keys (keys are distinct: each holds its
//    index), and the k of rank < k are the ids, in rank order; past kRankMaxCandidates
//    candidates (ties), top-k by insertion.
// Steps 1 and 3 are branch-free and vectorise; step 2 branches once a candidate and once per 64
// values. Every result is that of k rounds of (largest key) over all E.
MOE_ROUTE_INLINE void select_untiered(const float* v, int64_t padded, int64_t k, uint64_t* keys,
                                      int32_t* ids) {
  const f32x8 ninf = splat8(-INFINITY);
  f32x8 m[4] = {ninf, ninf, ninf, ninf};  // four chains; lanes merge by max below, still disjoint
  int64_t e = 0;
  for (; e + 32 <= padded; e += 32)
    for (int c = 0; c < 4; ++c) {
      const f32x8 x = load8(v + e + 8 * c);
      m[c] = vsel(vgt(x, m[c]), x, m[c]);
    }
  for (int c = 0; e < padded; e += 8, ++c) {
    const f32x8 x = load8(v + e);
    m[c] = vsel(vgt(x, m[c]), x, m[c]);
  }
  const f32x8 a = vsel(vgt(m[0], m[2]), m[0], m[2]), b = vsel(vgt(m[1], m[3]), m[1], m[3]);
  i32x8 above_a = {}, above_b = {};  // per maximum, how many of the 16 are larger
  for (int l = 0; l < 8; ++l) {
    const f32x8 pa = splat8(a[l]), pb = splat8(b[l]);
    above_a -= vgt(pa, a) + vgt(pb, a);
    above_b -= vgt(pa, b) + vgt(pb, b);
  }
  // tau: the least maximum with fewer than k larger ones
  const f32x8 pinf = splat8(INFINITY);
  const i32x8 below_k = splat8i(int32_t(k));
  const f32x8 ta = vsel(vlt(above_a, below_k), a, pinf);
  const f32x8 tb = vsel(vlt(above_b, below_k), b, pinf);
  const float tau = fold_extreme<false>(vsel(vlt(ta, tb), ta, tb), INFINITY);
  const int64_t n = keys_at_least(v, padded, tau, keys);
  if (n > kRankMaxCandidates) {
    TopK top(k);
    for (int64_t i = 0; i < n; ++i) top.push(keys[i]);
    for (int64_t j = 0; j < k; ++j) ids[j] = key_index(top.best[j]);
    return;
  }
  rank_keys<kRankMaxCandidates>(keys, n, k, ids);
}

// The k largest of v[0..padded) for k > kInsertMaxK (no tiers, no group limit), in
// select_untiered's order, from a threshold as there: the k-th largest of the maxima of 8C >= 2k
// disjoint lanes (lane 8c + l holds the values at 8c + l + 8Ci). Up to kCountMax maxima it is
// the least maximum with fewer than k larger ones (counted as select_untiered counts), past
// that nth_element's; up to kCountMax values at or above it are ordered by rank_keys, more by
// nth_element and a sort of the first k. A row of fewer than 2k values (rounded up to 8) has no
// such lanes: all of its values are ordered. `maxima` has room for padded floats, `keys` for
// padded keys.
constexpr int64_t kCountMax = 128;
MOE_ROUTE_INLINE void select_many(const float* v, int64_t padded, int64_t k, float* maxima,
                                  uint64_t* keys, int32_t* ids) {
  const int64_t C = (2 * k + 7) / 8, M = 8 * C;
  int64_t n = padded;
  if (M <= padded) {
    const f32x8 ninf = splat8(-INFINITY), pinf = splat8(INFINITY);
    for (int64_t c = 0; c < C; ++c) std::memcpy(maxima + 8 * c, &ninf, sizeof ninf);
    for (int64_t e0 = 0; e0 < padded; e0 += M) {
      for (int64_t c = 0; c < C && e0 + 8 * c < padded; ++c) {
        const f32x8 x = load8(v + e0 + 8 * c), m = load8(maxima + 8 * c);
        const f32x8 r = vsel(vgt(x, m), x, m);
        std::memcpy(maxima + 8 * c, &r, sizeof r);
      }
    }
    float tau;
    if (M <= kCountMax) {
      const i32x8 below_k = splat8i(int32_t(k));
      f32x8 t = pinf;
      for (int64_t c = 0; c < C; ++c) {
        const f32x8 m = load8(maxima + 8 * c);
        i32x8 above = {};  // per maximum, how many of the M are larger
        for (int64_t j = 0; j < M; ++j) above -= vgt(splat8(maxima[j]), m);
        const f32x8 cand = vsel(vlt(above, below_k), m, pinf);
        t = vsel(vlt(cand, t), cand, t);
      }
      tau = fold_extreme<false>(t, INFINITY);
    } else {
      std::nth_element(maxima, maxima + k - 1, maxima + M, std::greater<float>());
      tau = maxima[k - 1];
    }
    n = keys_at_least(v, padded, tau, keys);
    if (n <= kCountMax) return rank_keys<kCountMax>(keys, n, k, ids);
  } else {
    for (int64_t i = 0; i < padded; ++i) keys[i] = key_normal(v[i], int32_t(i));
  }
  std::nth_element(keys, keys + k - 1, keys + n, std::greater<uint64_t>());
  std::sort(keys, keys + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) ids[j] = key_index(keys[j]);
}

// Selection with tiers (forced experts) from a working copy `work` of the n_eligible values that
// may be picked (padded with -inf): every forced-on expert ranks above every other and every
// forced-off one below. The forced experts (a few per call) are ranked by key within their tier
// and held at -inf in work; the rest go through the untiered selection (select_untiered, or
// select_many with kMany). The ids are the forced-on ones, then the best of the rest, then the
// forced-off ones, the first k of them. `at(e)` is expert e's position in work (-1: not
// eligible), `expert(i)` the expert at position i. Uses s.forced_keys, s.keys and s.dense.
template <bool kMany, typename At, typename Expert>
MOE_ROUTE_INLINE void select_tiered(const GateParams& p, const Prep& prep, const float* v,
                                    float* work, int64_t padded, int64_t n_eligible, At at,
                                    Expert expert, Scratch& s, int32_t* ids) {
  const int64_t k = p.k;
  // The eligible forced-on keys from the front of s.forced_keys, the forced-off ones from its back
  uint64_t* const on = s.forced_keys.data();
  uint64_t* const back = on + prep.forced.size();
  int64_t n_on = 0, n_off = 0;
  for (const int32_t e : prep.forced) {
    const int64_t i = at(e);
    if (i < 0) continue;
    const uint64_t key = make_key(prep.tier[e], v[e], e);
    if (prep.tier[e] == kTierForcedOn) on[n_on++] = key;
    else back[-++n_off] = key;
    work[i] = -INFINITY;
  }
  auto take = [&](uint64_t* keys, int64_t n, int64_t m, int32_t* out) {  // the best m of n keys
    if (n <= kInsertMaxK) {  // a few: by insertion
      for (int64_t i = 1; i < n; ++i)
        for (int64_t j = i; j > 0 && keys[j - 1] < keys[j]; --j) std::swap(keys[j - 1], keys[j]);
    } else {
      std::partial_sort(keys, keys + m, keys + n, std::greater<uint64_t>());
    }
    for (int64_t j = 0; j < m; ++j) out[j] = key_index(keys[j]);
  };
  const int64_t j = std::min(n_on, k);
  take(on, n_on, j, ids);
  const int64_t n_rest = std::min(k - j, n_eligible - n_on - n_off);  // >= 0
  if (n_rest > 0) {
    if (kMany) select_many(work, padded, n_rest, s.dense.data(), s.keys.data(), ids + j);
    else select_untiered(work, padded, n_rest, s.keys.data(), ids + j);
    for (int64_t i = j; i < j + n_rest; ++i) ids[i] = expert(ids[i]);
  }
  take(back - n_off, n_off, k - j - n_rest, ids + j + n_rest);
}

// The k ids (k <= kInsertMaxK) of one token of a group-limited router, from its selection values
// v: choose_groups, then the chosen groups side by side in a working copy, in expert order, which
// keeps the lower-index rule among equal values. The selection scans topk_group groups, not all
// of them, and its picks are mapped back to experts.
MOE_ROUTE_INLINE void select_in_groups_body(const GateParams& p, const Prep& prep, const float* v,
                                            Scratch& s, int32_t* ids) {
  choose_groups(p, prep, v, s);
  const int64_t gsize = p.E / p.n_group;
  float* work = s.work.data();
  int32_t* chosen = s.group_list.data();  // slot -> group
  int32_t* slot = s.group_slot.data();    // group -> slot, -1 if not chosen
  int64_t n = 0, m = 0;
  for (int64_t g = 0; g < p.n_group; ++g) {
    slot[g] = -1;
    if (s.group_ok[g]) {
      std::memcpy(work + n, v + g * gsize, sizeof(float) * gsize);
      n += gsize, slot[g] = int32_t(m), chosen[m++] = int32_t(g);
    }
  }
  const int64_t padded = (n + 7) & ~int64_t(7);
  std::fill(work + n, work + padded, -INFINITY);
  // Division in 32 bits, not 64: DeepSeek-V3's gate ran 1-7% faster (bench/RESULTS.md)
  const uint32_t gs = uint32_t(gsize);
  auto expert = [&](int64_t i) {
    const uint32_t slot = uint32_t(i) / gs;
    return int32_t(uint32_t(chosen[slot]) * gs + (uint32_t(i) - slot * gs));
  };
  if (!prep.has_force) {
    select_untiered(work, padded, p.k, s.keys.data(), ids);
    for (int64_t j = 0; j < p.k; ++j) ids[j] = expert(ids[j]);
    return;
  }
  auto at = [&](int64_t e) {
    const int64_t g = e / gsize;
    return slot[g] < 0 ? int64_t(-1) : slot[g] * gsize + e % gsize;
  };
  select_tiered<false>(p, prep, v, work, padded, n, at, expert, s, ids);
}

// The k ids of one token without a group limit, descending keys: select_untiered, or
// select_many with kMany (k > kInsertMaxK), and select_tiered where experts are forced.
template <bool kMany>
MOE_ROUTE_INLINE void select_ungrouped(const GateParams& p, const Prep& prep, const float* v,
                                       Scratch& s, int32_t* ids) {
  const int64_t padded = (p.E + 7) & ~int64_t(7);
  float* work = s.work.data();
  if (!prep.has_force) {
    if (kMany) select_many(v, padded, p.k, work, s.keys.data(), ids);
    else select_untiered(v, padded, p.k, s.keys.data(), ids);
    return;
  }
  std::memcpy(work, v, sizeof(float) * padded);
  select_tiered<kMany>(p, prep, v, work, padded, p.E, [](int64_t e) { return e; },
                       [](int64_t i) { return int32_t(i); }, s, ids);
}

// The k ids (k > kInsertMaxK) of one token from its selection values v, group-limited or not.
MOE_ROUTE_INLINE void select_many_body(const GateParams& p, const Prep& prep, const float* v,
                                       Scratch& s, int32_t* ids) {
  const int64_t E = p.E, k = p.k;
  if (p.n_group == 1) return select_ungrouped<true>(p, prep, v, s, ids);
  // Every eligible expert's key, ordered: no transformers family limits groups past k = 16.
  choose_groups(p, prep, v, s);
  const int64_t gsize = E / p.n_group;
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e)
    if (s.group_ok[e / gsize])
      s.keys[n++] = make_key(prep.has_force ? prep.tier[e] : kTierNormal, v[e], e);
  auto* begin = s.keys.data();
  std::nth_element(begin, begin + k - 1, begin + n, std::greater<uint64_t>());
  std::sort(begin, begin + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) ids[j] = int32_t(key_index(begin[j]));
}

// The selections the per-token pass calls out of line, one function per instruction-set
// variant: group limits (select_in_groups_body) and k > kInsertMaxK (select_many_body). Inlined
// into the per-token pass, the group limit's code changed the register allocation of the routers
// without groups (their replay 10% slower, bench/RESULTS.md), and select_many_body's made the
// steered top-8 of 256 5-9% slower.
MOE_ROUTE_INLINE void select_out_of_line_body(const GateParams& p, const Prep& prep,
                                              const float* v, Scratch& s, int32_t* ids) {
  if (p.k > kInsertMaxK) return select_many_body(p, prep, v, s, ids);
  select_in_groups_body(p, prep, v, s, ids);
}
typedef void (*SelectOutOfLine)(const GateParams&, const Prep&, const float*, Scratch&, int32_t*);
#if !MOE_ROUTE_SEPARATE_BASE
__attribute__((noinline)) void select_out_of_line_base(const GateParams& p, const Prep& prep,
                                                       const float* v, Scratch& s, int32_t* ids) {
  select_out_of_line_body(p, prep, v, s, ids);
}
#endif
#if MOE_ROUTE_X86_VARIANTS
MOE_ROUTE_TARGET_AVX512 __attribute__((noinline)) void select_out_of_line_avx512(
    const GateParams& p, const Prep& prep, const float* v, Scratch& s, int32_t* ids) {
  select_out_of_line_body(p, prep, v, s, ids);
}
MOE_ROUTE_TARGET_AVX2 __attribute__((noinline)) void select_out_of_line_avx2(
    const GateParams& p, const Prep& prep, const float* v, Scratch& s, int32_t* ids) {
  select_out_of_line_body(p, prep, v, s, ids);
}
#endif

// Selection values of one token's steered logits z (reference: selection_values), the group
// limit, then its k ids. `ew` and `ew_sum` are the softmax numerators of z and their sum when
// `have_ew` (the weight side computed them already), else ignored. `sc`, when not null, holds
// the sigmoid or sqrt-softplus scores of z (scores_of; for the sqrt-softplus that rounds,
// rounded_sqrt_softplus), which this then does not compute again.
// `out_of_line` is select_out_of_line_body's function for the caller's instruction set.
MOE_ROUTE_INLINE void select_row(const GateParams& p, const Prep& prep, const float* z,
                                 const float* ew, float ew_sum, bool have_ew, const float* sc,
                                 SelectOutOfLine out_of_line, Scratch& s, int32_t* ids) {
  const int64_t E = p.E;
  const float* v = z;
  if (!selects_on_logits(p)) {
    float* sv = s.v.data();
    v = sv;
    if (p.score == Score::Softmax) {
      float sum = ew_sum, unused;
      if (!have_ew) sum = softmax_exps(z, sv, E, unused);
      const float* src = have_ew ? ew : sv;
      for (int64_t e = 0; e < E; ++e) sv[e] = src[e] / sum;
    } else if (sc) {
      v = sc;
    } else if (p.score == Score::SqrtSoftplus && rounds_scores(p)) {
      rounded_sqrt_softplus(p.logit_type, z, E, sv);
    } else if (elementwise_scores(p)) {
      scores_of(p, z, p.E, sv);
    } else {
      std::memcpy(sv, z, sizeof(float) * E);
    }
    if (rounds_scores(p) && p.score != Score::SqrtSoftplus) {  // one op in half precision
      round_half_n(p.logit_type, v, E, sv);
      v = sv;
    }
  }
  if (p.selection_bias) {
    const float* bias = prep.bias.data();
    float* sv = s.v.data();
    for (int64_t e = 0; e < E; ++e) sv[e] = sanitize(v[e] + bias[e]);
    v = sv;
  }
  if (p.n_group > 1 || p.k > kInsertMaxK) return out_of_line(p, prep, v, s, ids);
  select_ungrouped<false>(p, prep, v, s, ids);
}

// Renormalises and scales one token's k weights as the router asks.
MOE_ROUTE_INLINE void finish_weights(const GateParams& p, float* w) {
  const int64_t k = p.k;
  if (p.renormalize) {
    // Scores (>= 0, at most sqrt(FLT_MAX)) add in double, whose error does not grow with k;
    // logits (score "none") in order in fp32, so that a sum of huge ones overflows as the
    // reference's does.
    float sum = 0.f;
    if (p.score == Score::None) {
      for (int64_t j = 0; j < k; ++j) sum += w[j];
    } else {
      double exact = 0.0;
      for (int64_t j = 0; j < k; ++j) exact += w[j];
      sum = static_cast<float>(exact);
    }
    const float den = sum + p.renorm_eps;
    if (den != 0.f) divide_by(w, k, den);
  }
  if (p.scale != 1.f)
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] * p.scale;
}

// The k weights of one token with ids `ids` into w. `ew(e)` and `zw(e)` read expert e's softmax
// numerator and weight-side logit, w_sum is the numerators' sum (softmax scores only). `sc`, when
// not null, holds the elementwise scores of the weight-side logits (scores_of).
template <typename EwAt, typename ZwAt>
MOE_ROUTE_INLINE void weigh(const GateParams& p, const int32_t* ids, EwAt ew, ZwAt zw, float w_sum,
                            const float* sc, float* w) {
  const int64_t k = p.k;
  if (!p.select_on_logits) {
    if (p.score == Score::Softmax) {
      for (int64_t j = 0; j < k; ++j) w[j] = ew(ids[j]);
      divide_by(w, k, w_sum);
    } else if (sc) {
      for (int64_t j = 0; j < k; ++j) w[j] = sc[ids[j]];
    } else {
      for (int64_t j = 0; j < k; ++j) w[j] = score_of(p.score, zw(ids[j]));
    }
  } else if (p.score == Score::Softmax) {
    // the sum of the k exps (each in (0, 1]) runs in double: a running fp32 sum's error grows
    // with k
    float m = -kFltMax;
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) m = std::max(m, zw(ids[j]));
    for (int64_t j = 0; j < k; ++j) sum += (w[j] = exp_nonpos(zw(ids[j]) - m));
    divide_by(w, k, static_cast<float>(sum));
  } else if (sc) {
    for (int64_t j = 0; j < k; ++j) w[j] = sc[ids[j]];
  } else {
    for (int64_t j = 0; j < k; ++j) w[j] = score_of(p.score, zw(ids[j]));
  }
  finish_weights(p, w);
}

// The statistics group of token t (0 without groups; -1 skips the token).
MOE_ROUTE_INLINE int64_t group_of(const GateParams& p, int64_t t) {
  if (!p.groups) return 0;
  return p.groups_int64 ? static_cast<const int64_t*>(p.groups)[t]
                        : int64_t(static_cast<const int32_t*>(p.groups)[t]);
}

// The run that tokens of group g >= 0 add to: the current one, or a new one once that is flushed.
MOE_ROUTE_INLINE RunAcc& run_for(const GateParams& p, int64_t g, Scratch& s, Runs* runs) {
  if (g != s.run.group) {
    flush_run(p, s.run, runs);
    s.run.start(p, g);
  }
  return s.run;
}

// Counts every ordered pair of one token's k ids (itself included) in coact.
MOE_ROUTE_INLINE void add_coact(const GateParams& p, const int32_t* ids) {
  for (int64_t a = 0; a < p.k; ++a)
    for (int64_t b = 0; b < p.k; ++b)
      __atomic_fetch_add(p.coact + int64_t(ids[a]) * p.E + ids[b], 1, __ATOMIC_RELAXED);
}

// One token's count, its k ids' counts and weights, and their co-activations, into run.
MOE_ROUTE_INLINE void add_token(const GateParams& p, RunAcc& run, const int32_t* ids,
                                const float* w) {
  run.tokens += 1;
  for (int64_t j = 0; j < p.k; ++j) run.counts[ids[j]] += 1;
  for (int64_t j = 0; j < p.k; ++j) run.weight[ids[j]] += w[j];
  if (p.coact) add_coact(p, ids);
}

// Adds token t's statistics (ids, weights w; softmax numerators ew of the weight-side logits zw,
// their max and sum; their elementwise scores sc, or null) to the current run, starting a new run
// when the token's group changes.
MOE_ROUTE_INLINE void token_stats(const GateParams& p, int64_t t, const int32_t* ids,
                                  const float* w, const float* ew, const float* zw, float w_max,
                                  float w_sum, const float* sc, Scratch& s, Runs* runs) {
  const int64_t E = p.E;
  const int64_t g = group_of(p, t);
  if (g < 0) return;
  RunAcc& run = run_for(p, g, s, runs);
  add_token(p, run, ids, w);
  if (p.dense_stats()) {
    if (p.score == Score::Softmax || p.score == Score::None) {
      // One pass: prob += ew / S, and H = log S - sum_e q_e (z_e - max)
      // = log S - (sum_e ew_e (z_e - max)) / S: one log and one division per token.
      run.entropy += softmax_stats(ew, zw, w_max, w_sum, E, p.prob_sum ? run.prob.data() : nullptr);
    } else {
      float* q = s.dense.data();
      if (!sc) scores_of(p, zw, p.E, q), sc = q;
      const float total = sum8(sc, E);
      const float inv = total > 0.f ? 1.f / total : 0.f, uniform = 1.f / float(E);
      for (int64_t e = 0; e < E; ++e) q[e] = total > 0.f ? sc[e] * inv : uniform;
      for (int64_t e = 0; e < E; ++e) s.v[e] = q[e] > 0.f ? q[e] * log_fast(q[e]) : 0.f;
      run.entropy += -sum8(s.v.data(), E);
      if (p.prob_sum)
        for (int64_t e = 0; e < E; ++e) run.prob[e] += q[e];
    }
  }
}

// Whether the gate needs the softmax numerators of the weight-side logits: for softmax weights,
// and for dense statistics of a softmax (or plain logits) distribution.
MOE_ROUTE_INLINE bool wants_exps(const GateParams& p) {
  return (!p.select_on_logits && p.score == Score::Softmax) ||
         (p.dense_stats() && (p.score == Score::Softmax || p.score == Score::None));
}

// ---- Few experts: eight tokens at a time --------------------------------------------------------
//
// With a few experts a row fills a few 8-lane vectors at most, and the per-token pass above is
// mostly fixed per-token work: about 100 ns a token at E=8, where PyTorch's softmax and topk take
// about 55 (bench/RESULTS.md). Here the lanes are tokens instead: a block holds the rows of 8
// tokens transposed, one vector per expert with token t0 + l in lane l, and each step of the pass
// runs on all 8 at once. Every lane does the per-token pass's operations in its order (the same 8
// partial sums, the same pick among equal maxima, the same selection order), so the outputs and
// statistics are bit-identical to it (tests/test_cpu_isa.py runs both). Up to E = 128 this is
// the faster of the two for a full block (1.1-1.6x at E=128, 1.5-2.9x at E=64, T=1024, one
// thread); the selection's k rounds over all E lose to the per-token pass's from about E=160 at
// k=4 to 8. Group limits, and the last tokens of a chunk when fewer than lane_min_tokens, take
// the per-token pass. Statistics are added in its order (lane_stats): a block of one
// group at once, a block spanning groups token by token, from terms computed in the lanes.
constexpr int64_t kLaneMaxE = 128;
constexpr int kLanes = 8;
static_assert(kLaneMaxE <= kSumBlock, "a lane's sums are sum8's only up to kSumBlock values");

// Whether the lanes beat the per-token pass for p (E <= kLaneMaxE) in variant `isa`. With 8-lane
// registers (the AVX2 and AVX-512 variants) they always do. The baseline variant has 16-byte
// registers, and where the lanes pay there depends on the compiler (each limit measured at
// T = 64 and 1024 on x86-64, bench/RESULTS.md):
// - GCC splits compares and shuffles into 16-byte pieces there (kPieces: on aarch64, and in
//   gate_base.cpp's unit on x86-64): the lanes win up to E = 64 whatever k (1.2-1.4x at E = 64,
//   k = 6 to 16), and up to E = 128 with k <= 4 (1.2-3.4x; 0.99x at k = 6, 0.9x at k = 8).
//   Without the split, GCC built each compare of 8 lanes as 8 scalar ones and the lanes lost
//   past E = 8.
// - Clang splits such compares and shuffles itself, and vectorises the per-token pass better:
//   its lanes win up to E = 48 (1.07-1.5x), at E = 64 up to k = 4, and up to E = 128 with
//   k <= 2 (1.2-1.4x); they lose at E = 56 and 64 with k = 8 (0.86-0.99x) and at E = 128 with
//   k >= 3.
MOE_ROUTE_INLINE bool lanes_pay(const GateParams& p, CpuIsa isa) {
#if defined(__clang__)
  return isa != CpuIsa::Base || p.E <= 48 || (p.E <= 64 && p.k <= 4) || p.k <= 2;
#else
  return isa != CpuIsa::Base || !kPieces || p.E <= 64 || p.k <= 4;
#endif
}

// The fewest tokens a block takes in lanes: a block costs about the same however few lanes are
// used, the per-token pass in proportion. At E=32, 1 or 2 tokens take 5-10% longer in lanes; 4
// at E=64 and 6 at E=128 up to 1.6x and 1.2x longer (softmax top-8, T=4 and 6, whole calls).
MOE_ROUTE_INLINE int lane_min_tokens(int64_t E) { return E <= 32 ? 4 : E <= 64 ? 6 : kLanes; }

// A block's arrays of vectors hold kLaneSlots, not kLaneMaxE: at 4096 bytes apart, a few
// experts' accesses to two arrays alias in the store-to-load check (renormalised top-2 of 8 4%
// slower than with arrays of 32; 1-2% with the padding).
constexpr int64_t kLaneSlots = kLaneMaxE + 8;

struct LaneBlock {
  f32x8 z0[kLaneSlots], z[kLaneSlots], v[kLaneSlots], ew[kLaneSlots], work[kLaneSlots];
  f32x8 w_max, w_sum;
  f32x8 q[kLaneSlots];              // lane_stats: each lane's probabilities
  float rows[kLanes][kLaneMaxE];  // lane_stats of a block spanning groups: each token's q
  i32x8 ids[kLaneSlots];     // ids[j]: each token's j-th pick
  f32x8 picked[kLaneSlots];  // picked[j]: its selection value (lane_select)
  f32x8 w[kLaneSlots];       // weights[j], where the lanes compute them
};

// finish_weights of each lane's k weights w[0..k), which are scores (not plain logits): the
// same operations in the same order.
MOE_ROUTE_INLINE void lane_finish_weights(const GateParams& p, f32x8* w) {
  typedef double f64x8 __attribute__((vector_size(64)));
  const int64_t k = p.k;
  if (p.renormalize) {
    f64x8 exact = {};
    for (int64_t j = 0; j < k; ++j) exact += __builtin_convertvector(w[j], f64x8);
    const f32x8 den = __builtin_convertvector(exact, f32x8) + p.renorm_eps;
    for (int64_t j = 0; j < k; ++j) w[j] = vsel(vne(den, splat8(0.f)), w[j] / den, w[j]);
  }
  if (p.scale != 1.f)
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] * p.scale;
}

// Each of the block's n tokens' k values, x[0..k) of its lane, to its row of out (row length
// k). A full block with k = 1, 2, 4 or a multiple of 8 goes as whole vectors: 8k values read
// lane by lane and written one by one took a tenth of a top-2-of-16 gate with steering. V is
// f32x8 or i32x8.
template <typename V, typename T>
MOE_ROUTE_INLINE void store_lanes(const V* x, int64_t k, int n, T* out) {
  static_assert(sizeof(V) == kLanes * sizeof(T), "a lane per token");
  if (n == kLanes && k == 1) {
    std::memcpy(out, &x[0], sizeof(V));
    return;
  }
  if (n == kLanes && (k == 2 || k == 4)) {
    V r[4];  // tokens 0-3, then 4-7, of x[0] and x[1] interleaved; then of x[2] and x[3]
    for (int64_t j = 0; j < k; j += 2) {
      r[j] = shuffle<0, 8, 1, 9, 2, 10, 3, 11>(x[j], x[j + 1]);
      r[j + 1] = shuffle<4, 12, 5, 13, 6, 14, 7, 15>(x[j], x[j + 1]);
    }
    if (k == 2) {
      std::memcpy(out, r, 2 * sizeof(V));
      return;
    }
    for (int h = 0; h < 2; ++h) {  // two tokens per vector: their pairs from r[h] and r[h + 2]
      const V a = shuffle<0, 1, 8, 9, 2, 3, 10, 11>(r[h], r[h + 2]);
      const V c = shuffle<4, 5, 12, 13, 6, 7, 14, 15>(r[h], r[h + 2]);
      std::memcpy(out + 16 * h, &a, sizeof a);
      std::memcpy(out + 16 * h + 8, &c, sizeof c);
    }
    return;
  }
  if (n == kLanes && k % 8 == 0) {
    for (int64_t j0 = 0; j0 < k; j0 += 8) {
      V r[8];
      std::memcpy(r, x + j0, sizeof r);
      transpose8(r);
      for (int l = 0; l < kLanes; ++l) std::memcpy(out + l * k + j0, &r[l], sizeof(V));
    }
    return;
  }
  for (int l = 0; l < n; ++l)
    for (int64_t j = 0; j < k; ++j) out[l * k + j] = x[j][l];
}

// sum8 of each lane's row (E <= kSumBlock): 8 partial sums over e = j, j + 8, ..., added as
// hsum8 adds them. Whole groups of 8 index the sums by a constant, which keeps them in registers
// (`acc[e & 7]` alone kept them on the stack: a store and a reload per expert).
MOE_ROUTE_INLINE f32x8 lane_sum(const f32x8* x, int64_t E) {
  f32x8 acc[8] = {};
  int64_t e = 0;
  for (; e + 8 <= E; e += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[e + j];
  for (int j = 0; j < 8; ++j)
    if (e + j < E) acc[j] += x[e + j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The max of each lane's row into top and, with kMin, its min into bottom (one pass for both),
// taking the same one of equal values (+0 or -0) as max_of and steer_row do: the scalar tail's
// first, then their 8 vector lanes' in lane order.
template <bool kMin>
MOE_ROUTE_INLINE void lane_extremes(const f32x8* x, int64_t E, f32x8& top, f32x8& bottom) {
  const auto higher = [](f32x8 a, f32x8 b) { return vsel(vgt(a, b), a, b); };
  const auto lower = [](f32x8 a, f32x8 b) { return vsel(vlt(a, b), a, b); };
  const f32x8 lowest = splat8(-kFltMax), highest = splat8(kFltMax);
  const int64_t full = E & ~int64_t(7);
  top = lowest, bottom = highest;
  for (int64_t e = full; e < E; ++e) {
    top = higher(x[e], top);
    if (kMin) bottom = lower(x[e], bottom);
  }
  for (int64_t j = 0; j < 8 && j < full; ++j) {
    f32x8 hi = lowest, lo = highest;
    for (int64_t e = j; e < full; e += 8) {
      hi = higher(x[e], hi);
      if (kMin) lo = lower(x[e], lo);
    }
    top = higher(hi, top);
    if (kMin) bottom = lower(lo, bottom);
  }
}

MOE_ROUTE_INLINE f32x8 lane_max(const f32x8* x, int64_t E) {
  f32x8 top, unused;
  lane_extremes<false>(x, E, top, unused);
  return top;
}

// Softmax numerators ew[e] = exp(x[e] - m) of each lane; returns their sums (softmax_exps_from).
// With kPairs two experts at a time, 16 lanes in one AVX-512 register. AVX2 has no 16-lane
// registers, and GCC 12 turns a compare of 16 lanes there into 16 scalar compares and branches:
// pairs made AVX2's gate at E=64 twice as slow as single experts, so its variant takes them one
// at a time. The baseline's compares of 8 lanes are scalar too in GCC's x86-64 build (not
// kPieces), and pairs are its faster way.
template <bool kPairs>
MOE_ROUTE_INLINE f32x8 lane_exps(const f32x8* x, f32x8* ew, int64_t E, f32x8 m) {
  if constexpr (kPairs) {
    const f32x16 m2 = pair16(m, m);
    int64_t e = 0;
    for (; e + 2 <= E; e += 2) {
      f32x16 pair;
      std::memcpy(&pair, x + e, sizeof pair);
      pair = exp_nonpos(pair - m2);
      std::memcpy(ew + e, &pair, sizeof pair);
    }
    if (e < E) ew[e] = exp_nonpos(x[e] - m);
  } else {
    for (int64_t e = 0; e < E; ++e) ew[e] = exp_nonpos(x[e] - m);
  }
  return lane_sum(ew, E);
}

// Each lane's x[ids[l]]: up to 32 experts by a compare and blend per expert, past that by 8
// loads (k gathers by blends over 64 or 128 experts made replay 12-23% slower than the per-token
// pass). Ids outside [0, E) (lanes of no token after an all-replayed block) read x[E - 1].
MOE_ROUTE_INLINE f32x8 lane_gather(const f32x8* x, int64_t E, i32x8 ids) {
  if (E > 32) {
    f32x8 r;
    for (int l = 0; l < kLanes; ++l)
      r[l] = x[std::min(uint32_t(ids[l]), uint32_t(E - 1))][l];
    return r;
  }
  f32x8 r = x[0];
  i32x8 ev = splat8i(0);  // e in every lane, counted up (a splat per e costs 8 inserts)
  for (int64_t e = 1; e < E; ++e) ev += 1, r = vsel(veq(ids, ev), x[e], r);
  return r;
}

// steer_row for the block's tokens: b.z from b.z0. kPairs: as lane_exps.
template <bool kPairs>
MOE_ROUTE_INLINE void lane_steer(const GateParams& p, const Prep& prep, LaneBlock& b) {
  const int64_t E = p.E;
  const float* add = p.steer + kSteerAdd * E;
  const float* lam = p.steer + kSteerStd * E;
  const float* mul = p.steer + kSteerAbs * E;
  const float* force = p.steer + kSteerForce * E;
  f32x8 sd = splat8(0.f);
  if (prep.has_std) {
    const f32x8 mean = lane_sum(b.z0, E) / float(E);
    for (int64_t e = 0; e < E; ++e) b.z[e] = (b.z0[e] - mean) * (b.z0[e] - mean);
    sd = std_of(p, lane_sum(b.z, E));
  }
  // steer_row's three terms, with kPairs two experts per 16-lane vector: {c[e] in 8 lanes,
  // c[e + 1] in 8} from two splats.
  auto one = [&](int64_t e) {
    f32x8 y = b.z0[e] + add[e];
    y = y + (lam[e] != 0.f ? lam[e] * sd : splat8(0.f));
    y = y + mul[e] * abs8(b.z0[e]);
    b.z[e] = sanitize8(y);
  };
  if constexpr (kPairs) {
    auto both = [](const float* c, int64_t e) { return pair16(splat8(c[e]), splat8(c[e + 1])); };
    const f32x16 sd2 = pair16(sd, sd), zero = {};
    int64_t e = 0;
    for (; e + 2 <= E; e += 2) {
      f32x16 z0;
      std::memcpy(&z0, b.z0 + e, sizeof z0);
      const f32x16 l = both(lam, e);
      f32x16 y = z0 + both(add, e);
      y = y + vsel(vne(l, zero), l * sd2, zero);
      y = y + both(mul, e) * abs8(z0);
      y = sanitize8(y);
      std::memcpy(b.z + e, &y, sizeof y);
    }
    if (e < E) one(e);
  } else {
    for (int64_t e = 0; e < E; ++e) one(e);
  }
  if (prep.has_force) {
    f32x8 top, bottom;
    lane_extremes<true>(b.z, E, top, bottom);
    for (const int32_t e : prep.forced) b.z[e] = force[e] > 0.f ? top : bottom;
  }
}

// One round of lane_select: each lane's best of work (with its tier) into at and pick; with
// kClear, the previous round's pick `at` is taken out first (set to -inf in tier -1).
template <int kChains, bool kTiers, bool kClear>
MOE_ROUTE_INLINE void lane_round(f32x8* work, i32x8* tier, int64_t seg, i32x8 seg8, i32x8& at,
                                 f32x8& pick) {
  const f32x8 taken = splat8(-INFINITY);
  f32x8 best[kChains];
  i32x8 best_at[kChains], best_tier[kChains], ev[kChains];  // ev: e in every lane
  // ev[c] starts at c * seg, stepped by seg8 (seg in every lane): GCC built splat8i(c * seg)
  // from 8 inserts per chain and round, even by a shuffle.
  for (int c = 0; c < kChains; ++c)
    best[c] = taken, best_at[c] = splat8i(0), best_tier[c] = splat8i(-1),
    ev[c] = c == 0 ? splat8i(0) : ev[c - 1] + seg8;
  for (int64_t i = 0; i < seg; ++i) {
    for (int c = 0; c < kChains; ++c) {
      const int64_t e = c * seg + i;
      f32x8 x = work[e];
      i32x8 hit = {};
      if (kClear) {
        hit = veq(at, ev[c]);
        x = vsel(hit, taken, x);
        work[e] = x;
      }
      i32x8 take = vgt(x, best[c]);
      if (kTiers) {
        if (kClear) tier[e] = vsel(hit, splat8i(-1), tier[e]);
        take = vgt(tier[e], best_tier[c]) | (veq(tier[e], best_tier[c]) & take);
        best_tier[c] = vsel(take, tier[e], best_tier[c]);
      }
      best[c] = vsel(take, x, best[c]);
      best_at[c] = vsel(take, ev[c], best_at[c]);
      ev[c] += 1;
    }
  }
  for (int c = 1; c < kChains; ++c) {
    i32x8 take = vgt(best[c], best[0]);
    if (kTiers) {
      take = vgt(best_tier[c], best_tier[0]) | (veq(best_tier[c], best_tier[0]) & take);
      best_tier[0] = vsel(take, best_tier[c], best_tier[0]);
    }
    best[0] = vsel(take, best[c], best[0]);
    best_at[0] = vsel(take, best_at[c], best_at[0]);
  }
  at = best_at[0];
  pick = best[0];
}

// Each lane's k best of v into b.ids and their values into b.picked, in descending order of
// (tier, value) with the lower index first on ties (select_ungrouped): k rounds of
// a strict-greater scan, each taking its pick out of b.work. A round scans the experts in
// kChains consecutive runs at once (one dependency chain of compare and blend each, where one
// chain over all E was the gate's critical path) and merges the runs' bests in run order, so the
// lower index still wins a tie. Four runs where E > 16, one up to 16 experts (runs of two or
// four experts measured up to 13% slower than one chain at E=8 and 16, single-threaded; eight
// runs 7-12% slower than four at E=48 to 128). Run c
// starts at expert c * seg; the experts past E (up to kChains * seg <= kLaneMaxE) hold -inf in
// the lowest tier and are never picked (values are sanitised, so a real expert always beats
// them). Each round after the first takes the previous round's pick out as it reads an expert.
// Forced experts without kTiers (prep.force_as_values): those forced on enter at +inf, ahead of
// every value and in index order among themselves as in their tier, and get their value back
// once picked; those forced off enter as taken. The scan with tiers (kTiers) is about half of
// a steered gate's time (GPT-OSS, T=8192).
template <int kChains, bool kTiers>
MOE_ROUTE_INLINE void lane_select(const Prep& prep, const f32x8* v, int64_t E, int64_t k,
                                  LaneBlock& b) {
  const int64_t seg = (E + kChains - 1) / kChains;
  i32x8 tier[kLaneMaxE];  // -1 once taken
  for (int64_t e = 0; e < kChains * seg; ++e) {
    b.work[e] = e < E ? v[e] : splat8(-INFINITY);
    if (kTiers) tier[e] = splat8i(e < E ? prep.tier[e] : -1);
  }
  const bool forced = !kTiers && prep.force_as_values;
  if (forced)
    for (const int32_t e : prep.forced)
      b.work[e] = splat8(prep.tier[e] == kTierForcedOn ? INFINITY : -INFINITY);
  i32x8 at;
  const i32x8 seg8 = splat8i(int32_t(seg));
  lane_round<kChains, kTiers, false>(b.work, tier, seg, seg8, at, b.picked[0]);
  b.ids[0] = at;
  for (int64_t j = 1; j < k; ++j) {
    lane_round<kChains, kTiers, true>(b.work, tier, seg, seg8, at, b.picked[j]);
    b.ids[j] = at;
  }
  if (forced && prep.first_on >= 0) {  // an expert forced on was picked at +inf: its value
    const f32x8 on = v[prep.first_on];
    for (int64_t j = 0; j < k; ++j)
      b.picked[j] = vsel(veq(b.picked[j], splat8(INFINITY)), on, b.picked[j]);
  }
}

// Logits of experts [e0, e0 + 8) of token t, unsanitised (fp32 or bf16).
MOE_ROUTE_INLINE f32x8 load_logits8(const GateParams& p, int64_t t, int64_t e0) {
  const int64_t off = t * p.row_stride + e0;
  if (p.logit_type == LogitType::F32) return load8(static_cast<const float*>(p.logits) + off);
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  u16x8 h;
  std::memcpy(&h, static_cast<const uint16_t*>(p.logits) + off, sizeof h);
  return bits_to_float(__builtin_convertvector(h, i32x8) << 16);
}

// The block's logits, sanitised, into b.z0 (load_row for 8 tokens, transposed). Rows of whole
// 8-expert vectors of fp32 or bf16 go through 8x8 transposes, others element by element. Lanes
// past n get zeros.
MOE_ROUTE_INLINE void lane_load(const GateParams& p, int64_t t0, int n, Scratch& s, LaneBlock& b) {
  const int64_t E = p.E;
  if (E % 8 == 0 && p.logit_type != LogitType::F16) {
    for (int64_t e0 = 0; e0 < E; e0 += 8) {
      f32x8 r[8];
      for (int l = 0; l < kLanes; ++l) r[l] = l < n ? load_logits8(p, t0 + l, e0) : splat8(0.f);
      transpose8(r);
      for (int j = 0; j < 8; ++j) b.z0[e0 + j] = sanitize8(r[j]);
    }
    return;
  }
  float* row = s.z0.data();
  for (int l = 0; l < kLanes; ++l) {
    if (l < n) load_row(p, t0 + l, row);
    else std::fill(row, row + E, 0.f);
    for (int64_t e = 0; e < E; ++e) b.z0[e][l] = row[e];
  }
}

constexpr int64_t kMixedGroups = -2;

// The statistics group that tokens [t0, t0 + n) all belong to (-1: all skipped), or
// kMixedGroups.
MOE_ROUTE_INLINE int64_t block_group(const GateParams& p, int64_t t0, int n) {
  const int64_t g = std::max<int64_t>(group_of(p, t0), -1);
  for (int l = 1; l < n; ++l)
    if (std::max<int64_t>(group_of(p, t0 + l), -1) != g) return kMixedGroups;
  return g;
}

// x[0..8) * scale back in rows: q[l] holds lane l's eight values.
MOE_ROUTE_INLINE void lane_rows8(const f32x8* x, f32x8 scale, f32x8* q) {
  for (int j = 0; j < 8; ++j) q[j] = x[j] * scale;
  transpose8(q);
}

// token_stats for tokens [t0, t0 + n), whose ids and weights are written, all of group g >= 0
// or of several (g == kMixedGroups): the same additions in the same order, the dense ones
// (softmax, plain-logit, sigmoid or sqrt-softplus scores) computed in the lanes. `sc`, when not
// null, holds the sigmoid or sqrt-softplus scores of zw (from selection). Uses b.work, b.q and
// b.rows.
MOE_ROUTE_INLINE void lane_stats(const GateParams& p, int64_t t0, int n, int64_t g,
                                 const f32x8* zw, const f32x8* sc, LaneBlock& b, Scratch& s,
                                 Runs* runs) {
  const int64_t E = p.E, k = p.k;
  const int32_t* ids = p.ids + t0 * k;
  const float* w = p.weights + t0 * k;
  const bool dense = p.dense_stats(), prob_sum = dense && p.prob_sum;
  // Each lane's entropy, and its probabilities qs[e] * scale (prob_sum; x * 1 is x exactly).
  f32x8 entropy = {}, scale = splat8(1.f);
  const f32x8* qs = b.q;
  if (dense && elementwise_scores(p)) {
    // token_stats' distribution of sigmoid or sqrt-softplus scores: q = score(z) / sum (uniform
    // where the sum is 0), H = -sum_e q_e log q_e. The scores as one loop over the block's 8E
    // logits, which GCC vectorises at its widest width (an f32x8 exp_fast and sigmoid measured
    // 3-5% slower than the compiler's 8-lane loop, bench/RESULTS.md).
    const f32x8 zero = splat8(0.f);
    if (!sc) scores_of(p, flat(zw), E * kLanes, flat(b.q)), sc = b.q;
    const f32x8 total = lane_sum(sc, E);
    const f32x8 inv = vsel(vgt(total, zero), splat8(1.f) / total, zero);
    const f32x8 uniform = splat8(1.f / float(E));
    for (int64_t e = 0; e < E; ++e) b.q[e] = vsel(vgt(total, zero), sc[e] * inv, uniform);
    const float* q = flat(b.q);
    float* terms = flat(b.work);
    for (int64_t i = 0; i < E * kLanes; ++i) terms[i] = q[i] > 0.f ? q[i] * log_fast(q[i]) : 0.f;
    entropy = -lane_sum(b.work, E);
  } else if (dense) {
    // softmax_stats: H = log S - (sum_e ew_e (z_e - max)) / S, and q = ew / S
    const f32x8 zero = splat8(0.f);
    for (int64_t e = 0; e < E; ++e)
      b.work[e] = vsel(vgt(b.ew[e], zero), b.ew[e] * (zw[e] - b.w_max), zero);
    entropy = log_fast(b.w_sum) - lane_sum(b.work, E) / b.w_sum;
    qs = b.ew, scale = splat8(1.f) / b.w_sum;
  }
  if (g == kMixedGroups) {
    // Token by token, each into its group's run as token_stats adds it; its probabilities are
    // row l of b.rows.
    if (prob_sum) {
      if (E % 8 == 0) {
        for (int64_t e0 = 0; e0 < E; e0 += 8) {
          f32x8 q[8];
          lane_rows8(qs + e0, scale, q);
          for (int l = 0; l < n; ++l) std::memcpy(b.rows[l] + e0, &q[l], sizeof q[l]);
        }
      } else {
        for (int64_t e = 0; e < E; ++e) {
          const f32x8 q = qs[e] * scale;
          for (int l = 0; l < n; ++l) b.rows[l][e] = q[l];
        }
      }
    }
    for (int l = 0; l < n; ++l) {
      const int64_t gl = group_of(p, t0 + l);
      if (gl < 0) continue;
      RunAcc& run = run_for(p, gl, s, runs);
      add_token(p, run, ids + l * k, w + l * k);
      if (!dense) continue;
      run.entropy += entropy[l];
      if (prob_sum)
        for (int64_t e = 0; e < E; ++e) run.prob[e] += b.rows[l][e];
    }
    return;
  }
  RunAcc& run = run_for(p, g, s, runs);
  run.tokens += n;
  for (int64_t i = 0; i < n * k; ++i) run.counts[ids[i]] += 1;  // flush_run's cells
  if (p.weight_sum)
    for (int64_t i = 0; i < n * k; ++i) run.weight[ids[i]] += w[i];
  if (p.coact)
    for (int64_t l = 0; l < n; ++l) add_coact(p, ids + l * k);
  if (!dense) return;
  for (int l = 0; l < n; ++l) run.entropy += entropy[l];
  if (!prob_sum) return;
  float* prob = run.prob.data();
  if (E % 8 == 0) {
    for (int64_t e0 = 0; e0 < E; e0 += 8) {
      f32x8 q[8];
      lane_rows8(qs + e0, scale, q);
      f32x8 acc = load8(prob + e0);
      for (int l = 0; l < n; ++l) acc += q[l];
      std::memcpy(prob + e0, &acc, sizeof acc);
    }
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const f32x8 q = qs[e] * scale;
      for (int l = 0; l < n; ++l) prob[e] += q[l];
    }
  }
}

// select_row for the block's tokens: selection values of the steered logits z, then each lane's
// k ids into b.ids. b.ew and b.w_sum hold the softmax numerators of z and their sums when
// `have_ew`. Returns whether b.v holds the elementwise (fp32, unrounded) scores of z. With
// `sc_out`, the sqrt-softplus that rounds also writes the fp32 scores of z there, from the same
// softplus.
template <bool kPairs>
MOE_ROUTE_INLINE bool lane_select_row(const GateParams& p, const Prep& prep, const f32x8* z,
                                      bool have_ew, LaneBlock& b, f32x8* sc_out = nullptr) {
  const int64_t E = p.E, k = p.k;
  const f32x8* v = z;
  if (!selects_on_logits(p)) {
    f32x8* sv = b.v;
    if (p.score == Score::Softmax) {
      const f32x8* src = b.ew;
      f32x8 sum = b.w_sum;
      if (!have_ew) sum = lane_exps<kPairs>(z, sv, E, lane_max(z, E)), src = sv;
      for (int64_t e = 0; e < E; ++e) sv[e] = src[e] / sum;
    } else if (p.score == Score::SqrtSoftplus && rounds_scores(p)) {
      rounded_sqrt_softplus(p.logit_type, flat(z), E * kLanes, flat(sv),
                            sc_out ? flat(sc_out) : nullptr);
    } else if (elementwise_scores(p)) {  // one loop over the block's 8E logits
      scores_of(p, flat(z), E * kLanes, flat(sv));
    } else {
      for (int64_t e = 0; e < E; ++e) sv[e] = z[e];
    }
    if (rounds_scores(p) && p.score != Score::SqrtSoftplus)
      round_half_n(p.logit_type, flat(sv), E * kLanes, flat(sv));
    v = sv;
  }
  if (p.selection_bias) {  // into b.q, free until lane_stats: b.v keeps the scores
    const float* bias = prep.bias.data();
    for (int64_t e = 0; e < E; ++e) b.q[e] = sanitize8(v[e] + bias[e]);
    v = b.q;
  }
  const bool tiers = prep.has_force && !prep.force_as_values;
  if (E <= 16) {
    if (tiers) lane_select<1, true>(prep, v, E, k, b);
    else lane_select<1, false>(prep, v, E, k, b);
  } else {
    if (tiers) lane_select<4, true>(prep, v, E, k, b);
    else lane_select<4, false>(prep, v, E, k, b);
  }
  return !selects_on_logits(p) && elementwise_scores(p) && !rounds_scores(p);
}

// Tokens [t0, t0 + n), n <= 8, through the pass of gate_tokens_body, a step for all at once.
// Lanes past n compute on zero logits and are not written.
template <bool kPairs>
MOE_ROUTE_INLINE void gate_lanes(const GateParams& p, const Prep& prep, int64_t t0, int n,
                                 Scratch& s, bool stats, Runs* runs, LaneBlock& b) {
  const int64_t E = p.E, k = p.k;
  lane_load(p, t0, n, s, b);
  f32x8* z = b.z0;
  if (p.steer) {
    lane_steer<kPairs>(p, prep, b);
    z = b.z;
  }
  const f32x8* zw = p.steer_select_only ? b.z0 : z;
  // Replayed rows (check_replay: each is all -1 or a selection) take their ids from the table;
  // a block of replayed rows selects nothing.
  int replayed = 0;
  for (int l = 0; l < n && p.replay; ++l) replayed += p.replay_id(t0 + l, 0) >= 0;
  const bool any_replayed = replayed > 0, all_replayed = replayed == n;
  const bool want_ew = wants_exps(p);
  const bool max_from_pick = want_ew && zw == z && selects_on_logits(p) && !p.selection_bias &&
                             !prep.has_force && !any_replayed;
  b.w_max = splat8(0.f), b.w_sum = splat8(1.f);
  if (want_ew && !max_from_pick) {
    b.w_max = lane_max(zw, E);
    b.w_sum = lane_exps<kPairs>(zw, b.ew, E, b.w_max);
  }

  // The elementwise scores of zw, where selection computed them: for weights and statistics.
  // The sqrt-softplus that rounds ranks values of its own; its dense statistics take the fp32
  // scores, from selection's softplus into b.ew (which only softmax scores use).
  const bool round_sp_stats = stats && p.dense_stats() && p.score == Score::SqrtSoftplus &&
                              rounds_scores(p) && !selects_on_logits(p) && zw == z &&
                              !all_replayed;
  bool z_scores = false;
  if (!all_replayed)
    z_scores = lane_select_row<kPairs>(p, prep, z, want_ew && zw == z, b,
                                       round_sp_stats ? b.ew : nullptr);
  const f32x8* sc = z_scores && zw == z ? b.v : nullptr;
  if (any_replayed)
    for (int l = 0; l < n; ++l)
      if (p.replay_id(t0 + l, 0) >= 0)
        for (int64_t j = 0; j < k; ++j) b.ids[j][l] = int32_t(p.replay_id(t0 + l, j));

  // Where the selection values are the weight-side logits themselves, b.picked[j] is each
  // lane's zw[ids[j]], bit for bit: no gather over E needed.
  const bool picked_zw = !any_replayed && zw == z && selects_on_logits(p) && !p.selection_bias;
  if (max_from_pick) {
    b.w_max = b.picked[0];
    b.w_sum = lane_exps<kPairs>(zw, b.ew, E, b.w_max);
  }
  // weigh's softmax step in the lanes, the rest (finish_weights) per token: ew[id] / sum for a
  // softmax over all experts; for a softmax over the k picked logits, their exps from their
  // max, summed in double in pick order. Those logits are gathered where the selection did not
  // leave them in b.picked (replayed rows, select-only steering, a selection bias): per token,
  // weigh's k scalar exps took about a third of GPT-OSS's replay. Elementwise scores (sigmoid,
  // sqrt-softplus) likewise: the picked experts' scores from selection's where it computed them,
  // else from one loop over all lanes' k picked logits.
  const bool lane_weights = p.score == Score::Softmax;
  if (lane_weights && !p.select_on_logits) {
    // ew[ids[j]] is exp_nonpos(zw[ids[j]] - w_max) as lane_exps computed it (lane for lane the
    // same operations): past 16 experts from the picked logits where they are zw's, k exps
    // instead of k gathers (the gathers took 28% of OLMoE's top-8 of 64; at E=8 the exps cost
    // 10% more than the gathers).
    const bool exps = picked_zw && E > 16;
    for (int64_t j = 0; j < k; ++j)
      b.w[j] = (exps ? exp_nonpos(b.picked[j] - b.w_max) : lane_gather(b.ew, E, b.ids[j])) /
               b.w_sum;
  } else if (lane_weights) {
    if (!picked_zw)
      for (int64_t j = 0; j < k; ++j) b.picked[j] = lane_gather(zw, E, b.ids[j]);
    typedef double f64x8 __attribute__((vector_size(64)));
    f32x8 m = splat8(-kFltMax);
    for (int64_t j = 0; j < k; ++j) m = vsel(vlt(m, b.picked[j]), b.picked[j], m);  // std::max
    f64x8 sum = {};
    for (int64_t j = 0; j < k; ++j) {
      b.w[j] = exp_nonpos(b.picked[j] - m);
      sum += __builtin_convertvector(b.w[j], f64x8);
    }
    const f32x8 den = __builtin_convertvector(sum, f32x8);
    for (int64_t j = 0; j < k; ++j) b.w[j] = b.w[j] / den;
  } else if (sc) {  // the picked experts' scores (weigh's sc[ids[j]]): selection's values
    const bool picked_sc = !any_replayed && !p.selection_bias;  // sc ranked as they are
    for (int64_t j = 0; j < k; ++j) b.w[j] = picked_sc ? b.picked[j] : lane_gather(sc, E, b.ids[j]);
  } else if (elementwise_scores(p)) {  // the scores of the picked logits, one loop for all
    for (int64_t j = 0; j < k; ++j)
      b.w[j] = picked_zw ? b.picked[j] : lane_gather(zw, E, b.ids[j]);
    scores_of(p, flat(b.w), k * kLanes, flat(b.w));
  }

  store_lanes(b.ids, k, n, p.ids + t0 * k);
  if (lane_weights || elementwise_scores(p)) {
    lane_finish_weights(p, b.w);
    store_lanes(b.w, k, n, p.weights + t0 * k);
  } else {
    for (int l = 0; l < n; ++l)
      weigh(p, p.ids + (t0 + l) * k, [&b, l](int32_t e) { return b.ew[e][l]; },
            [zw, l](int32_t e) { return zw[e][l]; }, b.w_sum[l], nullptr,
            p.weights + (t0 + l) * k);
  }
  if (!stats) return;
  const int64_t g = block_group(p, t0, n);
  if (g != -1) lane_stats(p, t0, n, g, zw, round_sp_stats ? b.ew : sc, b, s, runs);
}

// gate_lanes over the blocks of a chunk of tokens [t0, t1); returns the first token left to the
// per-token pass: fewer than lane_min_tokens cost less one by one than in a block of 8 lanes.
template <bool kPairs>  // lane_exps
MOE_ROUTE_INLINE int64_t lane_blocks_body(const GateParams& p, const Prep& prep, int64_t t0,
                                          int64_t t1, Scratch& s, bool stats, Runs* runs) {
  LaneBlock b;
  int64_t t = t0;
  const int min_tokens = lane_min_tokens(p.E);
  for (int n; (n = int(std::min<int64_t>(kLanes, t1 - t))) >= min_tokens; t += n)
    gate_lanes<kPairs>(p, prep, t, n, s, stats, runs, b);
  return t;
}

// lane_blocks_body out of line per instruction-set variant, as select_out_of_line_*: in one
// function with the per-token pass, the lanes' register allocation moved with its code (a change
// to the per-token steering made GPT-OSS's plain gate and replay 3-5% slower, spilling a
// constant of lane_round).
typedef int64_t (*LaneBlocks)(const GateParams&, const Prep&, int64_t, int64_t, Scratch&, bool,
                              Runs*);
#if !MOE_ROUTE_SEPARATE_BASE
__attribute__((noinline)) int64_t lane_blocks_base(const GateParams& p, const Prep& prep,
                                                   int64_t t0, int64_t t1, Scratch& s, bool stats,
                                                   Runs* runs) {
  return lane_blocks_body<true>(p, prep, t0, t1, s, stats, runs);
}
#endif
#if MOE_ROUTE_X86_VARIANTS
MOE_ROUTE_TARGET_AVX512 __attribute__((noinline)) int64_t lane_blocks_avx512(
    const GateParams& p, const Prep& prep, int64_t t0, int64_t t1, Scratch& s, bool stats,
    Runs* runs) {
  return lane_blocks_body<true>(p, prep, t0, t1, s, stats, runs);
}
MOE_ROUTE_TARGET_AVX2 __attribute__((noinline)) int64_t lane_blocks_avx2(
    const GateParams& p, const Prep& prep, int64_t t0, int64_t t1, Scratch& s, bool stats,
    Runs* runs) {
  return lane_blocks_body<false>(p, prep, t0, t1, s, stats, runs);
}
#endif

// One chunk of tokens [t0, t1). With statistics, they go into `runs` or, when it is null, straight
// into the caller's buffers. `out_of_line` and `lanes` are the out-of-line parts for the caller's
// instruction set.
MOE_ROUTE_INLINE void gate_tokens_body(const GateParams& p, const Prep& prep, int64_t t0,
                                       int64_t t1, Scratch& s, bool stats, Runs* runs,
                                       SelectOutOfLine out_of_line, LaneBlocks lanes) {
  int64_t t = prep.lanes ? lanes(p, prep, t0, t1, s, stats, runs) : t0;
  const int64_t E = p.E, k = p.k;
  const bool want_ew = wants_exps(p);

  // Steering by the logits' std loads the rows kRowBlock at a time, with their stds.
  const bool blocks = p.steer && prep.has_std;
  const int64_t stride = (E + 7) & ~int64_t(7);
  for (const int64_t tb = t; t < t1; ++t) {
    const int r = blocks ? int((t - tb) % kRowBlock) : 0;
    if (blocks && r == 0) load_block(p, t, int(std::min<int64_t>(kRowBlock, t1 - t)), s);
    const float* z0 = blocks ? s.block.data() + r * stride : s.z0.data();
    if (!blocks) load_row(p, t, s.z0.data());
    const float* z = z0;
    float z_max = 0.f;  // of the steered logits, where experts are forced
    if (p.steer) {
      z_max = steer_row(p, prep, z0, s.block_sd[r], s.z.data());
      z = s.z.data();
    }
    const float* zw = p.steer_select_only ? z0 : z;
    // A replayed row skips selection (check_replay: every row is all -1 or a valid selection).
    int32_t* ids = p.ids + t * k;
    const bool replayed = p.replay && p.replay_id(t, 0) >= 0;

    // Softmax numerators of the weight-side logits, shared by weights and statistics. When the
    // selection runs on these very logits with no tiers or groups, the first pick is their max:
    // the numerators are then computed after selection, without a separate max pass.
    const bool max_from_pick = want_ew && zw == z && selects_on_logits(p) && !p.selection_bias &&
                               !prep.has_force && p.n_group == 1 && !replayed;
    float w_max = 0.f, w_sum = 1.f;
    if (want_ew && !max_from_pick) {
      if (prep.has_force && zw == z)
        w_max = z_max, w_sum = softmax_exps_from(zw, s.ew.data(), E, w_max);
      else w_sum = softmax_exps(zw, s.ew.data(), E, w_max);
    }
    const float* ew = s.ew.data();
    // Elementwise scores of the weight-side logits, once for selection, weights and statistics
    // where the selection ranks them or dense statistics take them all (for the k weights alone,
    // weigh computes k). The sqrt-softplus that rounds to the logits' half precision ranks
    // values of its own; with dense statistics, both come from one softplus, the rounded ones
    // into s.v (select_row's buffer).
    const bool round_sp = p.score == Score::SqrtSoftplus && rounds_scores(p);
    const bool select_sc = !replayed && !selects_on_logits(p) && zw == z;
    const float* sc = nullptr;
    const float* select_values = nullptr;
    if (elementwise_scores(p) && ((select_sc && !round_sp) || (stats && p.dense_stats()))) {
      if (round_sp && select_sc) {
        rounded_sqrt_softplus(p.logit_type, zw, E, s.v.data(), s.sc.data());
        select_values = s.v.data();
      } else {
        scores_of(p, zw, E, s.sc.data());
        if (select_sc) select_values = s.sc.data();
      }
      sc = s.sc.data();
    }

    if (replayed) {
      for (int64_t j = 0; j < k; ++j) ids[j] = static_cast<int32_t>(p.replay_id(t, j));
    } else {
      select_row(p, prep, z, ew, w_sum, want_ew && zw == z, select_values, out_of_line, s, ids);
    }
    if (max_from_pick) {
      w_max = zw[ids[0]];
      w_sum = softmax_exps_from(zw, s.ew.data(), E, w_max);
    }

    float* w = p.weights + t * k;
    weigh(p, ids, [ew](int32_t e) { return ew[e]; }, [zw](int32_t e) { return zw[e]; }, w_sum, sc,
          w);
    if (stats) token_stats(p, t, ids, w, ew, zw, w_max, w_sum, sc, s, runs);
  }
  if (stats) flush_run(p, s.run, runs);
}

#if MOE_ROUTE_X86_VARIANTS
MOE_ROUTE_TARGET_AVX512 void gate_tokens_avx512(const GateParams& p, const Prep& prep, int64_t t0,
                                                int64_t t1, Scratch& s, bool stats, Runs* runs) {
  gate_tokens_body(p, prep, t0, t1, s, stats, runs, select_out_of_line_avx512,
                   lane_blocks_avx512);
}
MOE_ROUTE_TARGET_AVX2 void gate_tokens_avx2(const GateParams& p, const Prep& prep, int64_t t0,
                                            int64_t t1, Scratch& s, bool stats, Runs* runs) {
  gate_tokens_body(p, prep, t0, t1, s, stats, runs, select_out_of_line_avx2,
                   lane_blocks_avx2);
}
#endif

void gate_tokens(const GateParams& p, const Prep& prep, int64_t t0, int64_t t1, Scratch& s,
                 bool stats, Runs* runs) {
#if MOE_ROUTE_X86_VARIANTS
  switch (prep.isa) {
    case CpuIsa::Avx512: return gate_tokens_avx512(p, prep, t0, t1, s, stats, runs);
    case CpuIsa::Avx2: return gate_tokens_avx2(p, prep, t0, t1, s, stats, runs);
    case CpuIsa::Base: break;
  }
#endif
#if MOE_ROUTE_SEPARATE_BASE
  __builtin_unreachable();  // run_gate_cpu gave the baseline to gate_base.cpp's unit
#else
  gate_tokens_body(p, prep, t0, t1, s, stats, runs, select_out_of_line_base, lane_blocks_base);
#endif
}

// Checks that the group ids are in [-1, G), and returns whether those of the tokens counted
// (ids >= 0) never decrease: then a group's tokens in a chunk are one run (Runs::ascending).
bool check_groups(const GateParams& p) {
  if (!p.groups || p.T == 0 || !p.per_group_stats()) return !p.groups;
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  bool ascending = true;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t g = group_of(p, t);
    ascending &= g < 0 || g >= hi;
    lo = std::min(lo, g), hi = std::max(hi, g);
  }
  TORCH_CHECK_VALUE(lo >= -1 && hi < p.G, "topk_gate: groups must be in [-1, ", p.G,
                    ") (the statistics' group count), got values in [", lo, ", ", hi, "]");
  return ascending;
}

// Whether a replay row of k ids is a selection (k distinct ids in [0, E)) or all -1. `seen` is a
// zeroed bitset of E bits (used when E > 64), zeroed again on return.
template <typename I>
MOE_ROUTE_INLINE bool replay_row_ok(const I* row, int64_t k, int64_t E, uint64_t* seen) {
  if (row[0] == -1) {
    bool all = true;
    for (int64_t j = 1; j < k; ++j) all &= row[j] == -1;
    return all;
  }
  bool in_range = true;
  for (int64_t j = 0; j < k; ++j) in_range &= row[j] >= 0 && int64_t(row[j]) < E;
  if (!in_range) return false;
  if (E <= 64) {  // the set in a register: no store-to-load chain through one word, and no
                  // popcount (a libgcc call in the baseline build this check is compiled in)
    uint64_t set = 0, repeated = 0;
    for (int64_t j = 0; j < k; ++j) {
      const uint64_t bit = uint64_t(1) << row[j];
      repeated |= set & bit;
      set |= bit;
    }
    return repeated == 0;
  }
  uint64_t repeated = 0;
  for (int64_t j = 0; j < k; ++j) {
    const uint64_t id = uint64_t(row[j]), bit = uint64_t(1) << (id & 63);
    repeated |= seen[id >> 6] & bit;
    seen[id >> 6] |= bit;
  }
  for (int64_t j = 0; j < k; ++j) seen[uint64_t(row[j]) >> 6] = 0;
  return repeated == 0;
}

template <typename I>
void find_bad_replay_row(const GateParams& p, std::atomic<int64_t>& bad) {
  const I* ids = static_cast<const I*>(p.replay);
  at::parallel_for(0, p.T, 4096, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> seen((p.E + 63) / 64, 0);
    for (int64_t t = t0; t < t1 && t < bad.load(std::memory_order_relaxed); ++t) {
      if (replay_row_ok(ids + t * p.k, p.k, p.E, seen.data())) continue;
      int64_t cur = bad.load(std::memory_order_relaxed);
      while (t < cur && !bad.compare_exchange_weak(cur, t)) {
      }
      break;
    }
  });
}

// Every replay row is a selection or all -1 (reference.check_replay_rows), checked before any
// output or statistic is written; the first bad row is named.
void check_replay(const GateParams& p) {
  std::atomic<int64_t> bad{INT64_MAX};
  if (p.replay_int64) find_bad_replay_row<int64_t>(p, bad);
  else find_bad_replay_row<int32_t>(p, bad);
  const int64_t t = bad.load();
  if (t == INT64_MAX) return;
  std::string row;
  for (int64_t j = 0; j < p.k; ++j) row += (j ? ", " : "") + std::to_string(p.replay_id(t, j));
  TORCH_CHECK_VALUE(false, "topk_gate: replay: row ", t, " must hold ", p.k,
                    " distinct expert ids in [0, ", p.E, ") or be all -1 (route as usual), got [",
                    row, "]");
}

void merge_runs(const GateParams& p, const std::vector<Runs>& chunks) {
  const int64_t E = p.E;
  for (const Runs& rs : chunks)
    for (size_t r = 0; r < rs.group.size(); ++r) {
      if (p.tokens) p.tokens[rs.group[r]] += rs.tokens[r];
      if (p.entropy_sum) p.entropy_sum[rs.group[r]] += rs.entropy[r];
      for (int64_t c = r ? rs.cells_end[r - 1] : 0; c < rs.cells_end[r]; ++c)
        add_cells(p, rs.group[r], rs.cells[c]);
    }
  if (!p.prob_sum) return;
  int64_t total_runs = 0;
  for (const Runs& rs : chunks) total_runs += int64_t(rs.group.size());
  // Columns are independent, so splitting them across threads keeps the per-cell order.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, total_runs));
  at::parallel_for(0, E, grain, [&](int64_t e0, int64_t e1) {
    for (const Runs& rs : chunks)
      for (size_t r = 0; r < rs.group.size(); ++r) {
        const int64_t row = rs.group[r] * E, src = int64_t(r) * E;
        for (int64_t e = e0; e < e1; ++e) p.prob_sum[row + e] += rs.prob[src + e];
      }
  });
}

void run_gate_cpu(const GateParams& p) {
  if (p.T == 0) return;
  const CpuIsa isa = cpu_isa();
#if MOE_ROUTE_SEPARATE_BASE
  if (isa == CpuIsa::Base) return run_gate_cpu_base(p);
#endif
  const bool stats = p.any_stats();
  const bool ascending = stats && check_groups(p);
  if (p.replay) check_replay(p);

  Prep prep;
  if (p.selection_bias) {
    prep.bias.resize(p.E);
    for (int64_t e = 0; e < p.E; ++e) prep.bias[e] = sanitize(p.selection_bias[e]);
  }
  if (p.steer) {
    prep.tier.assign(p.E, int8_t(kTierNormal));
    int64_t off = 0;
    for (int64_t e = 0; e < p.E; ++e) {
      prep.has_std = prep.has_std || p.steer[kSteerStd * p.E + e] != 0.f;
      const float f = p.steer[kSteerForce * p.E + e];
      if (f > 0.f || f < 0.f) {  // NaN forces nothing, as in steer_row and the reference
        prep.has_force = true;
        prep.tier[e] = int8_t(f > 0.f ? kTierForcedOn : kTierForcedOff);
        prep.forced.push_back(int32_t(e));
        off += f < 0.f;
        if (f > 0.f && prep.first_on < 0) prep.first_on = int32_t(e);
      }
    }
    // Experts forced on hold equal values (steer_row gives them the row's maximum) unless a
    // selection bias sets them apart: +inf then orders them as their tier does, by index.
    // Experts forced off are never reached while k others remain.
    prep.force_as_values = prep.has_force && !p.selection_bias && p.E - off >= p.k;
    if (prep.first_on >= 0 && p.n_group > 1) {
      prep.group_on.assign(p.n_group, 0);
      for (const int32_t e : prep.forced)
        if (prep.tier[e] == kTierForcedOn) prep.group_on[e / (p.E / p.n_group)] = 1;
    }
  }

  prep.isa = isa;
  prep.lanes = cpu_gate_lanes() && p.n_group == 1 && p.E <= kLaneMaxE && lanes_pay(p, isa);

  const int64_t chunk = chunk_size(p.T);
  const int64_t n_chunks = (p.T + chunk - 1) / chunk;
  if (n_chunks == 1) {
    thread_local Scratch scratch;
    scratch.prepare(p.E, p.n_group);
    gate_tokens(p, prep, 0, p.T, scratch, stats, nullptr);
    return;
  }
  std::vector<Runs> runs(stats ? n_chunks : 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    thread_local Scratch scratch;
    scratch.prepare(p.E, p.n_group);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, t1 = std::min(p.T, t0 + chunk);
      if (stats) {  // a run's cells: at most k a token and one an eight of experts
        const int64_t kept_runs = ascending ? 1 : t1 - t0;
        runs[c].ascending = ascending;
        runs[c].cells.reserve(std::min((t1 - t0) * p.k, kept_runs * ((p.E + 7) / 8)));
      }
      gate_tokens(p, prep, t0, t1, scratch, stats, stats ? &runs[c] : nullptr);
    }
  });
  if (stats) merge_runs(p, runs);
}

#if !MOE_ROUTE_GATE_BASE_UNIT
std::tuple<at::Tensor, at::Tensor> topk_gate_cpu(
    const at::Tensor& logits, int64_t k, c10::string_view score, c10::string_view select_on,
    const OptTensor& selection_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, bool renormalize, double renorm_eps, double scale,
    bool round_scores, const OptTensor& steer, bool steer_select_only, bool std_unbiased,
    const OptTensor& groups, const OptTensor& replay, const OptTensor& tokens,
    const OptTensor& counts, const OptTensor& prob_sum, const OptTensor& weight_sum,
    const OptTensor& entropy_sum, const OptTensor& coact) {
  GateHold hold;
  at::Tensor weights, ids;
  GateParams p;
  prepare_gate(logits, k, score, select_on, selection_bias, n_group, topk_group, group_score,
               renormalize, renorm_eps, scale, round_scores, steer, steer_select_only,
               std_unbiased, groups, replay, tokens, counts, prob_sum, weight_sum, entropy_sum,
               coact, hold, weights, ids, p);
  run_gate_cpu(p);
  return {weights, ids};
}
#endif

}  // namespace

#if MOE_ROUTE_GATE_BASE_UNIT
void run_gate_cpu_base(const GateParams& p) { run_gate_cpu(p); }
#else
TORCH_LIBRARY_IMPL(moe_route, CPU, m) { m.impl("topk_gate", &topk_gate_cpu); }
#endif

}  // namespace moe_route
