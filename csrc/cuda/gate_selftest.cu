// Standalone self-test of the CUDA topk_gate kernel (torch-free): builds GateParams on the host,
// runs launch_topk_gate and compares with a plain host re-implementation of
// moe_route/reference.py written independently of the kernel.
//
//   nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_90a,code=sm_90a
//        csrc/cuda/gate_selftest.cu csrc/cuda/gate.cu csrc/cuda/gate_replay.cu
//        csrc/cuda/gate_wide.cu -o /tmp/gate_selftest
//   /tmp/gate_selftest            # every case
//   /tmp/gate_selftest wide       # the cases whose name contains "wide"
//
// Exit status 0 when every case passes. Ids must match exactly, except where two experts' distinct
// selection values lie within fp32 rounding of each other (device expf vs host std::exp); such
// swaps are counted and reported, and the weights are then checked for the device's ids.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gate.cuh"
#include "gate_launch.h"
#include "selftest_util.h"

using moe_route::GateParams;
using moe_route::GroupScore;
using moe_route::LogitType;
using moe_route::Score;

namespace {

using namespace selftest;  // NOLINT: the test helpers of selftest_util.h

struct Case {
  std::string name;
  int64_t T = 64, E = 64, k = 8;
  LogitType lt = LogitType::F32;
  int64_t row_pad = 0;  // row_stride = E + row_pad
  Score score = Score::Softmax;
  bool select_on_logits = false, bias = false;
  int64_t n_group = 1, topk_group = 1;
  GroupScore group_score = GroupScore::Max;
  bool renormalize = false;
  float renorm_eps = 0.f, scale = 1.f;
  bool round_scores = false;  // scores rounded to the half-precision logits' dtype
  bool steer = false, steer_std = false, steer_force = false, steer_select_only = false,
       std_unbiased = false;
  bool stats = false, groups = false, groups_int64 = false;
  bool coact = true;  // with stats: the [E, E] pair counts too (2 GiB at E = 16384)
  int64_t G = 1;
  bool specials = false;  // NaN / +-inf logits
  // Router replay rows: valid selections, rows of -1 and invalid rows (selected as usual).
  bool replay = false, replay_int64 = false;
  bool ties = false;      // logits on a coarse grid: many exact ties
  // Logits a few ulps from a coarse grid: values that differ only in the low bits a short key
  // drops (gate.cuh, make_short_key), and exact ties.
  bool near_ties = false;
  // With near_ties: the low `extreme_bits` bits all 0 or all 1 instead. Where a short key drops
  // that many, what it drops is all 0 or all 1, but not always as the value's sign has it: such
  // values lose bits all the same.
  int extreme_bits = 0;
  // Every id as the reference's: for selection values computed the same way on both sides
  // (logits, plus a bias or add/abs steering), where no near tie may swap.
  bool exact_ids = false;
  // fp32 logits ranked as they are (v = z): in each row the experts ranked k and k + 1 become
  // a near tie, the one with the higher index a few ulps ahead. No other pair of the row is
  // that close, so only the comparison of the k-th and (k+1)-th short keys can notice it.
  bool tie_at_cut = false;
  // With ties: expert off_grid (>= 0) a few ulps off the grid in every row, the one value that
  // loses bits to a short key. A full build must select again on 64-bit keys the rows where it
  // lies in the span of the ties (gate.cuh, short_ties_lossy); a plain build, every row with a
  // tie.
  int off_grid = -1;
  float spread = 1.f;     // the logits' standard deviation (small: crowded probabilities)
  // Experts e with e % 512 == 5 lead every row (+8): one thread of the CTA kernel, one lane of
  // the warp kernel, holds the first min(k, its experts) winners.
  bool one_lane_leads = false;
  // Experts held by the CTA kernel's warps in this mask (bit (e % 512) / 32) lead every row (+8):
  // the merge needs more of those warps' lists than they list at first (wide_list_step).
  uint32_t leading_warps = 0;
  // Doge's product keys: expert i * n + j of E = n * n scores x_i + y_j, and one x_i is well
  // ahead, so the row's winners share it and crowd into 4 warps of the CTA kernel.
  bool product_keys = false;
  // Warp 0 of the CTA kernel holds the row's top k but the one ranked wide_list_step(k) - 1,
  // which warp 5 holds. Warp 0's first list then ends with the key ranked wide_list_step(k):
  // with k = wide_list_step(k) + 2, the (k-1)-th, so that its next key is the k-th.
  bool cut_after_step = false;
  // Every row: these logits first, then -3.4e38 (below them all) for the other experts.
  std::vector<float> head;
  // Weights bit for bit as the reference's (signed zeros too), not just to rounding.
  bool exact_weights = false;
  uint32_t seed = 1;
};

// ---- host reference (moe_route/reference.py, token by token) ----

float san(float x) {
  if (std::isnan(x)) return -FLT_MAX;
  if (std::isinf(x)) return x > 0 ? FLT_MAX : -FLT_MAX;
  return x;
}

float host_score(Score s, float z) {
  switch (s) {
    case Score::Sigmoid: return 1.f / (1.f + std::exp(-z));
    case Score::SqrtSoftplus: return std::sqrt(z > 20.f ? z : std::log1p(std::exp(z)));
    default: return z;
  }
}

// x to the nearest (ties to even) value of a half-precision type and back, by counting steps:
// bf16 keeps 8 significant bits, fp16 11 and steps of 2^-24 below 2^-14, overflowing at 65520.
float host_round(float x, LogitType lt) {
  if (lt == LogitType::F32 || x == 0.f) return x;
  const int bits = lt == LogitType::BF16 ? 8 : 11;
  int e;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  if (lt == LogitType::F16) {
    if (std::fabs(x) >= 65520.f) return x > 0 ? FLT_MAX : -FLT_MAX;
    e = std::max(e, -13);  // the subnormals' fixed step
  }
  const double step = std::ldexp(1.0, e - bits);
  const double r = std::nearbyint(double(x) / step) * step;  // nearest, ties to even
  return std::fabs(r) > double(FLT_MAX) ? (r > 0 ? FLT_MAX : -FLT_MAX) : float(r);
}

bool rounds(const Case& c) {
  return c.round_scores && !c.select_on_logits && c.lt != LogitType::F32;
}

struct HostToken {
  std::vector<float> zw, v;
  std::vector<int> tier;       // 2 on, 1 normal, 0 off, -1 ineligible
  std::vector<int> ids;        // reference selection (the replay row when replayed)
  bool replayed = false;
  float w_max = 0.f, w_sum = 1.f;
};

// (tier, value, lower index) order; -0.0 == +0.0 through the float comparison.
bool better(const HostToken& h, int a, int b) {
  if (h.tier[a] != h.tier[b]) return h.tier[a] > h.tier[b];
  if (h.v[a] != h.v[b]) return h.v[a] > h.v[b];
  return a < b;
}

HostToken host_token(const Case& c, const std::vector<float>& logit_row,
                     const std::vector<float>& bias, const std::vector<float>& steer,
                     const int64_t* replay) {
  const int E = int(c.E);
  HostToken h;
  std::vector<float> z0(E), z(E);
  for (int e = 0; e < E; ++e) z0[e] = san(logit_row[e]);
  h.tier.assign(E, 1);
  if (c.steer) {
    float sum = 0.f;
    for (int e = 0; e < E; ++e) sum += z0[e];
    const float mean = sum / float(E);
    float var = 0.f;
    for (int e = 0; e < E; ++e) var += (z0[e] - mean) * (z0[e] - mean);
    const int dof = c.std_unbiased ? E - 1 : E;
    float sd = dof > 0 ? std::sqrt(var / float(dof)) : 0.f;
    sd = std::isnan(sd) ? INFINITY : sd;
    for (int e = 0; e < E; ++e) {
      const float add = steer[e], lam = steer[E + e], mul = steer[2 * E + e];
      float y = z0[e] + add;
      y = y + (lam != 0.f ? lam * sd : 0.f);
      y = y + mul * std::fabs(z0[e]);
      z[e] = san(y);
    }
    const float top = *std::max_element(z.begin(), z.end());
    const float bottom = *std::min_element(z.begin(), z.end());
    for (int e = 0; e < E; ++e) {
      const float f = steer[3 * E + e];
      if (f > 0.f) z[e] = top, h.tier[e] = 2;
      else if (f < 0.f) z[e] = bottom, h.tier[e] = 0;
    }
  } else {
    z = z0;
  }
  h.zw = c.steer && c.steer_select_only ? z0 : z;
  h.w_max = *std::max_element(h.zw.begin(), h.zw.end());
  // Normalisers summed in double: a float sum in expert order drifts by more than the kernels'
  // tree sums at thousands of experts (2.6e-5 relative at E=4000 with a few dominant terms).
  double w_sum = 0.0;
  for (int e = 0; e < E; ++e) w_sum += std::exp(h.zw[e] - h.w_max);
  h.w_sum = float(w_sum);

  h.v.resize(E);
  if (c.select_on_logits || (c.score == Score::Softmax && !c.bias && !rounds(c) &&
                             (c.n_group == 1 || c.group_score == GroupScore::Max))) {
    h.v = z;
  } else if (c.score == Score::Softmax) {
    const float m = *std::max_element(z.begin(), z.end());
    double s = 0.0;
    for (int e = 0; e < E; ++e) s += std::exp(z[e] - m);
    for (int e = 0; e < E; ++e) h.v[e] = std::exp(z[e] - m) / float(s);
  } else {
    for (int e = 0; e < E; ++e) h.v[e] = host_score(c.score, z[e]);
  }
  if (rounds(c)) {  // sqrt(softplus) is two half-precision ops, each rounded
    for (int e = 0; e < E; ++e)
      h.v[e] = c.score == Score::SqrtSoftplus
                   ? host_round(std::sqrt(host_round(z[e] > 20.f ? z[e]
                                                                 : std::log1p(std::exp(z[e])),
                                                     c.lt)),
                                c.lt)
                   : host_round(h.v[e], c.lt);
  }
  if (c.bias)
    for (int e = 0; e < E; ++e) h.v[e] = san(h.v[e] + san(bias[e]));

  if (c.n_group > 1) {
    const int ng = int(c.n_group), gs = E / ng;
    std::vector<float> gscore(ng);
    std::vector<int> gtier(ng, 1), order(ng);
    for (int g = 0; g < ng; ++g) {
      std::vector<float> vals(h.v.begin() + g * gs, h.v.begin() + (g + 1) * gs);
      std::sort(vals.begin(), vals.end(), std::greater<float>());
      gscore[g] = c.group_score == GroupScore::Max ? vals[0]
                                                   : san(gs > 1 ? vals[0] + vals[1] : vals[0]);
      if (c.group_score == GroupScore::Top2Sum && gs > 1 && rounds(c) && !c.bias)
        gscore[g] = host_round(gscore[g], c.lt);  // a half-precision sum of two scores
      for (int i = 0; i < gs; ++i)
        if (h.tier[g * gs + i] == 2) gtier[g] = 2;
      order[g] = g;
    }
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      if (gtier[a] != gtier[b]) return gtier[a] > gtier[b];
      if (gscore[a] != gscore[b]) return gscore[a] > gscore[b];
      return a < b;
    });
    std::vector<char> keep(ng, 0);
    for (int r = 0; r < c.topk_group; ++r) keep[order[r]] = 1;
    for (int e = 0; e < E; ++e)
      if (!keep[e / gs]) h.tier[e] = -1;
  }
  std::vector<int> cand;
  for (int e = 0; e < E; ++e)
    if (h.tier[e] >= 0) cand.push_back(e);
  std::sort(cand.begin(), cand.end(), [&](int a, int b) { return better(h, a, b); });
  h.ids.assign(cand.begin(), cand.begin() + c.k);
  if (replay != nullptr) {  // a row of k distinct ids in [0, E) replaces the selection
    std::vector<char> seen(size_t(E), 0);
    bool ok = true;
    for (int64_t j = 0; j < c.k && ok; ++j) {
      ok = replay[j] >= 0 && replay[j] < E && !seen[size_t(replay[j])];
      if (ok) seen[size_t(replay[j])] = 1;
    }
    if (ok) {
      h.replayed = true;
      h.ids.assign(replay, replay + c.k);
    }
  }
  return h;
}

std::vector<float> host_weights(const Case& c, const HostToken& h, const std::vector<int>& ids) {
  const int k = int(c.k);
  std::vector<float> w(k);
  if (!c.select_on_logits) {
    for (int j = 0; j < k; ++j)
      w[j] = c.score == Score::Softmax ? std::exp(h.zw[ids[j]] - h.w_max) / h.w_sum
                                       : host_score(c.score, h.zw[ids[j]]);
  } else if (c.score == Score::Softmax) {
    float m = -FLT_MAX, s = 0.f;
    for (int j = 0; j < k; ++j) m = std::max(m, h.zw[ids[j]]);
    for (int j = 0; j < k; ++j) s += (w[j] = std::exp(h.zw[ids[j]] - m));
    for (int j = 0; j < k; ++j) w[j] /= s;
  } else {
    for (int j = 0; j < k; ++j) w[j] = host_score(c.score, h.zw[ids[j]]);
  }
  if (c.renormalize) {
    // In rank order in fp32, as the reference's sum: logits near FLT_MAX (score "none") overflow
    // it, which gives weights of 0.
    float s = 0.f;
    for (float x : w) s += x;
    const float den = s + c.renorm_eps;
    if (den != 0.f)
      for (float& x : w) x /= den;
  }
  for (float& x : w) x *= c.scale;
  return w;
}

// Dense distribution q and its entropy (natural log, 0 log 0 = 0).
void host_dense(const Case& c, const HostToken& h, std::vector<double>& q, double& entropy) {
  const int E = int(c.E);
  q.assign(E, 0.0);
  if (c.score == Score::Sigmoid || c.score == Score::SqrtSoftplus) {
    double total = 0.0;
    for (int e = 0; e < E; ++e) total += (q[e] = host_score(c.score, h.zw[e]));
    for (int e = 0; e < E; ++e) q[e] = total > 0 ? q[e] / total : 1.0 / E;
  } else {
    for (int e = 0; e < E; ++e) q[e] = std::exp(double(h.zw[e]) - h.w_max);
    double s = 0.0;
    for (double x : q) s += x;
    for (double& x : q) x /= s;
  }
  entropy = 0.0;
  for (double x : q)
    if (x > 0) entropy -= x * std::log(x);
}

bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

bool run_case(const Case& c) {
  std::mt19937 rng(c.seed);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::uniform_real_distribution<float> unif(0.f, 1.f);
  const int64_t T = c.T, E = c.E, k = c.k, stride = E + c.row_pad;

  // Logits (as the kernel will read them, i.e. after rounding to the input dtype).
  std::vector<float> logits(size_t(T * stride), 0.f);
  for (auto& x : logits) {
    x = c.ties ? std::round(normal(rng) * 0.5f) / 4.f : normal(rng) * c.spread;
    if (c.near_ties) {
      uint32_t bits;
      const float grid = std::round(normal(rng)) / 2.f;
      std::memcpy(&bits, &grid, 4);
      const uint32_t low = (1u << c.extreme_bits) - 1u;
      if (c.extreme_bits > 0) bits = (bits & ~low) | (unif(rng) < 0.5f ? 0u : low);
      else bits += uint32_t(unif(rng) * 48.f);  // away from 0, by 0 to 47 ulps
      std::memcpy(&x, &bits, 4);
    }
    if (c.specials) {
      const float r = unif(rng);
      if (r < 0.03f) x = NAN;
      else if (r < 0.05f) x = INFINITY;
      else if (r < 0.07f) x = -INFINITY;
    }
  }
  if (c.off_grid >= 0)
    for (int64_t t = 0; t < T; ++t) {
      float& x = logits[size_t(t * stride + c.off_grid)];
      uint32_t bits;
      std::memcpy(&bits, &x, 4);
      bits += 1u + uint32_t(unif(rng) * 40.f);  // 1 to 40 ulps off (+0 becomes a denormal)
      std::memcpy(&x, &bits, 4);
    }
  if (c.one_lane_leads)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 5; e < E; e += 512) logits[size_t(t * stride + e)] += 8.f;
  if (c.leading_warps)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e)
        if ((c.leading_warps >> ((e % 512) / 32)) & 1u) logits[size_t(t * stride + e)] += 8.f;
  if (c.cut_after_step) {
    const int64_t step = moe_route::cuda::wide_list_step(int(k));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < k; ++r)
        logits[size_t(t * stride + (r == step - 1 ? 5 * 32 + 3 : r))] = 50.f - float(r);
  }
  if (c.product_keys) {
    const auto n = int64_t(std::lround(std::sqrt(double(E))));
    std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
    for (int64_t t = 0; t < T; ++t) {
      for (auto& a : x) a = normal(rng);
      for (auto& b : y) b = normal(rng);
      x[size_t(t * 37 % n)] += 8.f;
      for (int64_t e = 0; e < n * n; ++e)
        logits[size_t(t * stride + e)] = x[size_t(e / n)] + y[size_t(e % n)];
    }
  }
  if (c.tie_at_cut && k < E) {
    std::vector<int> order(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
      float* row = logits.data() + t * stride;
      for (int e = 0; e < E; ++e) order[size_t(e)] = e;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
      const int lo = std::min(order[size_t(k - 1)], order[size_t(k)]);
      const int hi = std::max(order[size_t(k - 1)], order[size_t(k)]);
      uint32_t bits;
      std::memcpy(&bits, &row[lo], 4);
      bits = row[lo] >= 0.f ? bits + 1 + uint32_t(unif(rng) * 8.f) : bits - 1;  // toward +inf
      std::memcpy(&row[hi], &bits, 4);
    }
  }
  if (!c.head.empty())
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e)
        logits[size_t(t * stride + e)] = e < int64_t(c.head.size()) ? c.head[size_t(e)] : -3.4e38f;
  if (c.specials && T > 2) {  // one row all NaN, one row with several +inf
    for (int64_t e = 0; e < E; ++e) logits[size_t(0 * stride + e)] = NAN;
    for (int64_t e = 0; e < E; e += 3) logits[size_t(1 * stride + e)] = INFINITY;
  }
  std::vector<uint16_t> half_bits;
  if (c.lt != LogitType::F32) {
    half_bits.resize(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      half_bits[i] = c.lt == LogitType::BF16 ? f32_to_bf16(logits[i]) : f32_to_f16(logits[i]);
      logits[i] = c.lt == LogitType::BF16 ? bf16_to_f32(half_bits[i]) : f16_to_f32(half_bits[i]);
    }
  }
  std::vector<float> bias;
  if (c.bias) {
    bias.resize(size_t(E));
    for (auto& b : bias) b = c.ties ? std::round(unif(rng) * 8.f) / 16.f : unif(rng) - 0.5f;
    if (E > 3) bias[2] = NAN;
  }
  std::vector<float> steer;
  if (c.steer) {
    steer.assign(size_t(4 * E), 0.f);
    for (int64_t e = 0; e < E; ++e) {
      steer[e] = unif(rng) < 0.3f ? unif(rng) - 0.5f : 0.f;
      if (c.steer_std) steer[E + e] = unif(rng) < 0.2f ? unif(rng) - 0.5f : 0.f;
      steer[2 * E + e] = unif(rng) < 0.2f ? 0.5f * (unif(rng) - 0.5f) : 0.f;
    }
    if (c.steer_force) {
      steer[3 * E + (E - 1)] = 1.f;  // forced on, in the last group
      if (E > 8) {
        steer[3 * E + 5] = 2.f;
        steer[3 * E + 0] = -1.f;  // forced off
        steer[3 * E + 7] = -3.f;
      }
    }
  }
  std::vector<int64_t> groups64;
  std::vector<int32_t> groups32;
  if (c.groups) {
    groups64.resize(size_t(T));
    std::uniform_int_distribution<int> gd(-1, int(c.G) - 1);
    for (int64_t t = 0; t < T; ++t) {
      // Runs of equal groups (as in real batches), a few skipped and a few out-of-range ids.
      groups64[t] = (t > 0 && unif(rng) < 0.7f) ? groups64[t - 1] : gd(rng);
      if (unif(rng) < 0.01f) groups64[t] = unif(rng) < 0.5f ? c.G : -7;
    }
    groups32.assign(groups64.begin(), groups64.end());
  }

  std::vector<int64_t> replay64;
  std::vector<int32_t> replay32;
  if (c.replay) {
    replay64.assign(size_t(T * k), -1);
    std::vector<int64_t> perm(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
      int64_t* row = replay64.data() + t * k;
      const float r = unif(rng);
      if (r < 0.2f) continue;  // all -1: selected as usual
      for (int64_t e = 0; e < E; ++e) perm[size_t(e)] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::copy(perm.begin(), perm.begin() + k, row);
      if (r < 0.3f && k > 1) row[k - 1] = row[0];                 // duplicate: invalid
      else if (r < 0.35f) row[k / 2] = unif(rng) < 0.5f ? E : -5;  // out of range: invalid
    }
    replay32.assign(replay64.begin(), replay64.end());
  }

  // Host reference.
  std::vector<HostToken> ref(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> row(logits.begin() + t * stride, logits.begin() + t * stride + E);
    ref[t] = host_token(c, row, bias, steer, c.replay ? replay64.data() + t * k : nullptr);
  }

  // Device run.
  GateParams p;
  void* d_logits = c.lt == LogitType::F32 ? static_cast<void*>(to_device(logits))
                                          : static_cast<void*>(to_device(half_bits));
  p.logits = d_logits;
  p.logit_type = c.lt;
  p.T = T, p.E = E, p.row_stride = stride, p.k = k;
  p.score = c.score;
  p.select_on_logits = c.select_on_logits;
  float* d_bias = c.bias ? to_device(bias) : nullptr;
  p.selection_bias = d_bias;
  p.n_group = c.n_group, p.topk_group = c.topk_group, p.group_score = c.group_score;
  p.renormalize = c.renormalize, p.renorm_eps = c.renorm_eps, p.scale = c.scale;
  p.round_scores = c.round_scores;
  float* d_steer = c.steer ? to_device(steer) : nullptr;
  p.steer = d_steer;
  p.steer_select_only = c.steer_select_only, p.std_unbiased = c.std_unbiased;
  void* d_groups = nullptr;
  if (c.groups) {
    d_groups = c.groups_int64 ? static_cast<void*>(to_device(groups64))
                              : static_cast<void*>(to_device(groups32));
  }
  p.groups = d_groups;
  p.groups_int64 = c.groups_int64;
  void* d_replay = nullptr;
  if (c.replay) {
    d_replay = c.replay_int64 ? static_cast<void*>(to_device(replay64))
                              : static_cast<void*>(to_device(replay32));
  }
  p.replay = d_replay;
  p.replay_int64 = c.replay_int64;
  const int64_t G = c.stats ? c.G : 1;
  p.G = G;
  // Statistics start from non-zero values: the kernel must add, not overwrite.
  std::vector<int64_t> tokens0(size_t(G), 3), counts0(size_t(G * E), 1),
      coact0(size_t(c.coact ? E * E : 0), 2);
  std::vector<float> prob0(size_t(G * E), 0.5f), wsum0(size_t(G * E), 0.25f),
      ent0(size_t(G), 1.f);
  int64_t *d_tokens = nullptr, *d_counts = nullptr, *d_coact = nullptr;
  float *d_prob = nullptr, *d_wsum = nullptr, *d_ent = nullptr;
  if (c.stats) {
    p.tokens = d_tokens = to_device(tokens0);
    p.counts = d_counts = to_device(counts0);
    if (c.coact) p.coact = d_coact = to_device(coact0);
    p.prob_sum = d_prob = to_device(prob0);
    p.weight_sum = d_wsum = to_device(wsum0);
    p.entropy_sum = d_ent = to_device(ent0);
  }
  // Outputs with a guard zone behind them.
  const size_t n_out = size_t(T * k), guard = 64;
  std::vector<float> w_init(n_out + guard, -12345.f);
  std::vector<int32_t> id_init(n_out + guard, -777);
  float* d_w = to_device(w_init);
  int32_t* d_ids = to_device(id_init);
  p.weights = d_w;
  p.ids = d_ids;

  CHECK_CUDA(moe_route::cuda::launch_topk_gate(p, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto w = to_host(d_w, n_out + guard);
  const auto ids = to_host(d_ids, n_out + guard);

  // ---- compare ----
  int failures = 0, near_ties = 0;
  double max_werr = 0.0;
  auto fail = [&](const char* what, int64_t t, int64_t j, double got, double want) {
    if (failures++ < 8)
      std::printf("  MISMATCH %s t=%lld j=%lld got=%.9g want=%.9g\n", what, (long long)t,
                  (long long)j, got, want);
  };
  for (size_t i = n_out; i < n_out + guard; ++i)
    if (w[i] != -12345.f || ids[i] != -777) fail("guard zone written", int64_t(i), 0, 0, 0);

  std::vector<double> tokens_ref(tokens0.begin(), tokens0.end());
  std::vector<double> counts_ref(counts0.begin(), counts0.end()),
      coact_ref(coact0.begin(), coact0.end());
  std::vector<double> prob_ref(prob0.begin(), prob0.end()), wsum_ref(wsum0.begin(), wsum0.end()),
      ent_ref(ent0.begin(), ent0.end());
  std::vector<double> q;
  for (int64_t t = 0; t < T; ++t) {
    const HostToken& h = ref[t];
    std::vector<int> dev(ids.begin() + t * k, ids.begin() + (t + 1) * k);
    bool ok_ids = true;
    std::vector<char> seen(size_t(E), 0);
    for (int64_t j = 0; j < k && h.replayed; ++j) {
      if (dev[j] != h.ids[j]) {
        ok_ids = false;
        fail("replayed id", t, j, dev[j], h.ids[j]);
        break;
      }
    }
    for (int64_t j = 0; j < k && !h.replayed; ++j) {
      const int d = dev[j];
      if (d < 0 || d >= E || seen[d] || h.tier[d] < 0) {
        ok_ids = false;
        fail("invalid id", t, j, d, h.ids[j]);
        break;
      }
      seen[d] = 1;
      if (d != h.ids[j]) {
        const int r = h.ids[j];
        // Equal values (-0.0 == +0.0 included) must follow the lower-index rule exactly; only
        // values apart by less than fp32 rounding of the transcendental functions may swap
        // (rounded scores: one step of the half precision, where that rounding fell the other
        // way of a rounding boundary).
        const float rel = !rounds(c) ? 2e-6f : c.lt == LogitType::BF16 ? 1.f / 128 : 1.f / 1024;
        const float tol = rel * std::max(1.f, std::fabs(h.v[r]));
        if (!c.exact_ids && h.tier[d] == h.tier[r] && h.v[d] != h.v[r] &&
            std::fabs(h.v[d] - h.v[r]) <= tol) {
          ++near_ties;
        } else {
          ok_ids = false;
          fail("id", t, j, d, r);
        }
      }
    }
    if (!ok_ids) continue;
    const auto want = host_weights(c, h, dev);
    for (int64_t j = 0; j < k; ++j) {
      const double got = w[size_t(t * k + j)];
      if (c.exact_weights ? std::memcmp(&w[size_t(t * k + j)], &want[j], sizeof(float)) != 0 &&
                                !(std::isnan(got) && std::isnan(want[j]))
                          : !close(got, want[j], 1e-5, 1e-7))
        fail("weight", t, j, got, want[j]);
      if (std::isfinite(want[j]) && want[j] != 0)
        max_werr = std::max(max_werr, std::fabs(got - want[j]) / std::fabs(want[j]));
    }
    if (!c.stats) continue;
    const int64_t g = c.groups ? groups64[t] : 0;
    if (g < 0 || g >= G) continue;
    tokens_ref[g] += 1;
    for (int64_t j = 0; j < k; ++j) {
      counts_ref[g * E + dev[j]] += 1;
      wsum_ref[g * E + dev[j]] += w[size_t(t * k + j)];
      for (int64_t j2 = 0; j2 < k && c.coact; ++j2) coact_ref[dev[j] * E + dev[j2]] += 1;
    }
    double ent;
    host_dense(c, h, q, ent);
    for (int64_t e = 0; e < E; ++e) prob_ref[g * E + e] += q[e];
    ent_ref[g] += ent;
  }
  if (c.stats) {
    const auto tokens = to_host(d_tokens, tokens0.size());
    const auto counts = to_host(d_counts, counts0.size());
    const auto coact = c.coact ? to_host(d_coact, coact0.size()) : std::vector<int64_t>();
    const auto prob = to_host(d_prob, prob0.size());
    const auto wsum = to_host(d_wsum, wsum0.size());
    const auto ent = to_host(d_ent, ent0.size());
    // Integer statistics are exact.
    auto exact = [&](const char* what, const std::vector<int64_t>& got,
                     const std::vector<double>& want) {
      for (size_t i = 0; i < got.size(); ++i)
        if (double(got[i]) != want[i]) fail(what, int64_t(i), 0, double(got[i]), want[i]);
    };
    exact("tokens", tokens, tokens_ref);
    exact("counts", counts, counts_ref);
    exact("coact", coact, coact_ref);
    // Float statistics: fp32 sums in another order than the host's fp64 ones.
    auto near = [&](const char* what, const std::vector<float>& got,
                    const std::vector<double>& want, double atol) {
      for (size_t i = 0; i < got.size(); ++i)
        if (!close(got[i], want[i], 1e-4, atol)) fail(what, int64_t(i), 0, got[i], want[i]);
    };
    near("prob_sum", prob, prob_ref, 1e-4);
    near("weight_sum", wsum, wsum_ref, 1e-4);
    near("entropy_sum", ent, ent_ref, 1e-3);
  }

  cudaFree(d_logits);
  cudaFree(d_bias);
  cudaFree(d_steer);
  cudaFree(d_groups);
  cudaFree(d_replay);
  cudaFree(d_tokens);
  cudaFree(d_counts);
  cudaFree(d_coact);
  cudaFree(d_prob);
  cudaFree(d_wsum);
  cudaFree(d_ent);
  cudaFree(d_w);
  cudaFree(d_ids);
  // With rounded scores a swap within one half-precision step is allowed only where an fp32
  // rounding fell the other way of a rounding boundary: rare. Ranking unrounded scores instead
  // swaps every near pair (5 to 128 per case here).
  if (rounds(c) && near_ties > 1 + T * k / 4000) {
    std::printf("  %d near-tie swaps of rounded scores, more than %lld\n", near_ties,
                (long long)(1 + T * k / 4000));
    ++failures;
  }
  std::printf("%-4s %-44s T=%-5lld E=%-4lld k=%-3lld near-tie swaps=%d max weight rel err=%.2e\n",
              failures ? "FAIL" : "ok", c.name.c_str(), (long long)T, (long long)E, (long long)k,
              near_ties, max_werr);
  return failures == 0;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  {
    Case c;
    c.name = "softmax E=64 k=8 fp32";
    c.T = 1000, c.E = 64, c.k = 8;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "sigmoid+bias groups top2_sum renorm scale bf16";
    c.T = 64, c.E = 256, c.k = 8, c.lt = LogitType::BF16;
    c.score = Score::Sigmoid, c.bias = true;
    c.n_group = 8, c.topk_group = 4, c.group_score = GroupScore::Top2Sum;
    c.renormalize = true, c.renorm_eps = 1e-20f, c.scale = 2.5f, c.seed = 2;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "steer add/std/abs/force groups max fp16";
    c.T = 300, c.E = 128, c.k = 6, c.lt = LogitType::F16;
    c.steer = c.steer_std = c.steer_force = true, c.std_unbiased = true;
    c.n_group = 4, c.topk_group = 2, c.seed = 3;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "steer_select_only force softmax+bias";
    c.T = 200, c.E = 96, c.k = 5, c.row_pad = 7;
    c.steer = c.steer_std = c.steer_force = c.steer_select_only = true;
    c.bias = true, c.seed = 4;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "stats+groups softmax (int32 groups)";
    c.T = 3000, c.E = 64, c.k = 4, c.stats = true, c.groups = true, c.G = 5, c.seed = 5;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "stats+groups sqrtsoftplus renorm (int64 groups)";
    c.T = 1500, c.E = 160, c.k = 6, c.score = Score::SqrtSoftplus, c.renormalize = true;
    c.stats = true, c.groups = true, c.groups_int64 = true, c.G = 3, c.seed = 6;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "stats no groups sigmoid groups=8/3 bf16";
    c.T = 999, c.E = 256, c.k = 8, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.bias = true, c.n_group = 8, c.topk_group = 3, c.stats = true, c.seed = 7;
    v.push_back(c);
  }
  {
    Case c;  // the statistics' scores are of z0, the selection's of the steered logits
    c.name = "stats sigmoid+bias steer_select_only bf16";
    c.T = 300, c.E = 128, c.k = 6, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.bias = true, c.steer = c.steer_force = c.steer_select_only = true, c.stats = true;
    c.seed = 71;
    v.push_back(c);
  }
  {
    Case c;  // the statistics' exps are of z0, the selection's probabilities of the steered logits
    c.name = "stats softmax+bias steer_select_only std";
    c.T = 300, c.E = 64, c.k = 5, c.bias = true, c.steer = c.steer_std = true;
    c.steer_select_only = true, c.stats = true, c.seed = 72;
    v.push_back(c);
  }
  // One token a warp (GatePlan::direct_sums: counts and weight sums by global atomics, no per-warp
  // arrays): the emulator's 2 SMs give every warp one token up to T = 16; 8 warps a CTA, merged.
  {
    Case c;
    c.name = "stats one token a warp, groups, fp32 softmax E=64 k=8";
    c.T = 16, c.E = 64, c.k = 8, c.stats = true, c.groups = true, c.G = 3, c.seed = 80;
    v.push_back(c);
    c.name = "stats one token a warp, steer, fp32 sigmoid+bias E=160 k=6";
    c.E = 160, c.k = 6, c.score = Score::Sigmoid, c.bias = true, c.groups = false;
    c.steer = c.steer_std = c.steer_force = true, c.seed = 81;
    v.push_back(c);
    c = Case{};
    c.name = "half keys stats one token bf16 softmax E=512 k=8 (decode)";
    c.T = 1, c.E = 512, c.k = 8, c.lt = LogitType::BF16, c.stats = true, c.seed = 82;
    v.push_back(c);
    c.name = "half keys stats one token a warp, int64 groups, fp16 E=40 k=33";
    c.T = 11, c.E = 40, c.k = 33, c.lt = LogitType::F16, c.groups = c.groups_int64 = true;
    c.G = 4, c.seed = 83;
    v.push_back(c);
    c = Case{};
    c.name = "stats one token a warp E=1000 k=40 (VPT 32), groups 10/7";
    c.T = 14, c.E = 1000, c.k = 40, c.stats = true, c.groups = true, c.G = 2;
    c.n_group = 10, c.topk_group = 7, c.seed = 84;
    v.push_back(c);
  }
  // The cases above and below without steering, group limit or statistics run the plain kernel.
  {
    Case c;
    c.name = "plain sigmoid+bias groups=8/8 renorm bf16";
    c.T = 700, c.E = 256, c.k = 8, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.bias = true, c.n_group = 8, c.topk_group = 8, c.group_score = GroupScore::Top2Sum;
    c.renormalize = true, c.renorm_eps = 1e-20f, c.scale = 2.5f, c.seed = 15;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "plain sqrtsoftplus renorm fp16";
    c.T = 400, c.E = 128, c.k = 6, c.lt = LogitType::F16, c.score = Score::SqrtSoftplus;
    c.renormalize = true, c.row_pad = 3, c.seed = 16;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "plain E=8 k=2 softmax renorm (Mixtral)";
    c.T = 300, c.E = 8, c.k = 2, c.renormalize = true, c.seed = 18;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "plain E=1000 k=8 (VPT 32) softmax";
    c.T = 60, c.E = 1000, c.k = 8, c.seed = 17;
    v.push_back(c);
  }
  // Plain calls ranking 16-bit logits as they are run the half-key build (VPT 1 to 16).
  {
    Case c;
    c.name = "half keys bf16 softmax E=128 k=8";
    c.T = 1000, c.E = 128, c.k = 8, c.lt = LogitType::BF16, c.seed = 41;
    v.push_back(c);
  }
  {
    Case c;  // +-0 and many exact ties; softmax over the selected logits, renormalised
    c.name = "half keys bf16 ties select_on=logits E=256 k=8 renorm scale";
    c.T = 600, c.E = 256, c.k = 8, c.lt = LogitType::BF16, c.ties = true;
    c.select_on_logits = true, c.renormalize = true, c.scale = 2.5f, c.seed = 42;
    v.push_back(c);
  }
  {
    Case c;  // a third of the logits are +-0, and the k-th largest is one of them: -0 ties +0
    c.name = "half keys bf16 +-0 ties at the cut E=40 k=20";
    c.T = 300, c.E = 40, c.k = 20, c.lt = LogitType::BF16, c.ties = true, c.seed = 48;
    v.push_back(c);
  }
  // ... and with statistics (nothing else of the full kernel), the half-key statistics build.
  {
    Case c;
    c.name = "half keys stats+groups bf16 softmax E=128 k=8";
    c.T = 2000, c.E = 128, c.k = 8, c.lt = LogitType::BF16, c.stats = true, c.groups = true;
    c.G = 4, c.seed = 49;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "half keys stats fp16 NaN/inf ties select_on=logits E=200 k=6 renorm";
    c.T = 700, c.E = 200, c.k = 6, c.lt = LogitType::F16, c.select_on_logits = true;
    c.specials = true, c.ties = true, c.renormalize = true, c.stats = true, c.seed = 50;
    v.push_back(c);
  }
  {
    Case c;  // sigmoid weights and their dense distribution; int64 statistics groups
    c.name = "half keys stats+groups bf16 sigmoid select_on=logits E=512 k=10";
    c.T = 400, c.E = 512, c.k = 10, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.select_on_logits = true, c.stats = true, c.groups = true, c.groups_int64 = true;
    c.G = 3, c.seed = 51;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "half keys stats bf16 E=40 k=33 (two selections a lane)";
    c.T = 300, c.E = 40, c.k = 33, c.lt = LogitType::BF16, c.stats = true, c.seed = 52;
    v.push_back(c);
  }
  {
    Case c;  // NaN and -inf share an image; +inf is above every finite value
    c.name = "half keys fp16 NaN/inf E=40 k=7";
    c.T = 400, c.E = 40, c.k = 7, c.lt = LogitType::F16, c.specials = true, c.seed = 43;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "half keys bf16 NaN/inf ties sigmoid select_on=logits E=500 k=12";
    c.T = 300, c.E = 500, c.k = 12, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.select_on_logits = true, c.specials = true, c.ties = true, c.row_pad = 5, c.seed = 44;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "half keys fp16 E=8 k=2 renorm, one lane leads";
    c.T = 300, c.E = 8, c.k = 2, c.lt = LogitType::F16, c.renormalize = true;
    c.one_lane_leads = true, c.seed = 45;
    v.push_back(c);
  }
  {
    Case c;  // two selections per lane in the weights; E past a VPT tier's multiple of 32
    c.name = "half keys bf16 E=300 k=40 sqrtsoftplus select_on=logits";
    c.T = 200, c.E = 300, c.k = 40, c.lt = LogitType::BF16, c.score = Score::SqrtSoftplus;
    c.select_on_logits = true, c.spread = 3.f, c.seed = 46;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "half keys fp16 crowded E=64 k=6";
    c.T = 500, c.E = 64, c.k = 6, c.lt = LogitType::F16, c.spread = 0.01f, c.seed = 47;
    v.push_back(c);
  }
  // Short keys (the plain and full builds up to VPT 16) on values that differ below the bits
  // they keep: the selection must notice and select those tokens on 64-bit keys.
  {
    Case c;
    c.name = "short keys near ties fp32 softmax E=256 k=8";
    c.T = 800, c.E = 256, c.k = 8, c.near_ties = true, c.exact_ids = true, c.seed = 60;
    v.push_back(c);
  }
  {
    Case c;  // VPT 16: 9 index bits
    c.name = "short keys near ties fp32 select_on=logits+bias E=500 k=12 renorm";
    c.T = 400, c.E = 500, c.k = 12, c.near_ties = true, c.exact_ids = true;
    c.select_on_logits = true, c.bias = true, c.renormalize = true, c.seed = 61;
    v.push_back(c);
  }
  {
    Case c;  // the full build's keys keep 2 bits for the tier
    c.name = "short keys near ties fp32 steer add/abs/force groups E=128 k=6";
    c.T = 500, c.E = 128, c.k = 6, c.near_ties = true, c.exact_ids = true;
    c.steer = c.steer_force = true, c.n_group = 4, c.topk_group = 2, c.seed = 62;
    v.push_back(c);
  }
  {
    Case c;  // the last key compared is the (k+1)-th: k = E - 1 leaves one expert out
    c.name = "short keys near ties fp32 stats E=32 k=31, one lane leads";
    c.T = 600, c.E = 32, c.k = 31, c.near_ties = true, c.exact_ids = true, c.stats = true;
    c.one_lane_leads = true, c.seed = 63;
    v.push_back(c);
  }
  {
    Case c;  // selection 31, the last with a tie bit of its own (gate.cuh, tie_bit)
    c.name = "short keys near ties fp32 E=64 k=32";
    c.T = 400, c.E = 64, c.k = 32, c.near_ties = true, c.exact_ids = true, c.seed = 75;
    v.push_back(c);
  }
  {
    Case c;  // past 32 selections the whole selection is made again (resolve_short_ties)
    c.name = "short keys near ties fp32 E=128 k=36";
    c.T = 200, c.E = 128, c.k = 36, c.near_ties = true, c.exact_ids = true, c.seed = 77;
    v.push_back(c);
  }
  {
    Case c;  // the same in a full build
    c.name = "short keys near ties fp32 stats E=128 k=40";
    c.T = 300, c.E = 128, c.k = 40, c.near_ties = true, c.exact_ids = true, c.stats = true;
    c.seed = 76;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "short keys fp32 dropped bits all 0 or all 1, E=64 k=6";
    c.T = 600, c.E = 64, c.k = 6, c.near_ties = true, c.extreme_bits = 6;  // VPT 2, plain
    c.exact_ids = true, c.seed = 66;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "short keys fp32 tie at the cut only, softmax E=128 k=8";
    c.T = 500, c.E = 128, c.k = 8, c.tie_at_cut = true, c.exact_ids = true, c.spread = 4.f;
    c.seed = 65;
    v.push_back(c);
  }
  {
    Case c;  // the plain build: VPT 4 drops 7 bits
    c.name = "short keys fp32 exact ties, one expert off the grid, E=128 k=8";
    c.T = 800, c.E = 128, c.k = 8, c.ties = true, c.off_grid = 37, c.exact_ids = true;
    c.seed = 67;
    v.push_back(c);
  }
  {
    Case c;  // the full build (statistics): 2 tier bits, VPT 8 drops 10 bits
    c.name = "short keys fp32 exact ties, one expert off the grid, stats E=256 k=8";
    c.T = 800, c.E = 256, c.k = 8, c.ties = true, c.off_grid = 200, c.exact_ids = true;
    c.stats = true, c.seed = 68;
    v.push_back(c);
  }
  {
    Case c;  // NaN and +-inf sanitise to +-FLT_MAX, whose dropped bits are not their sign's
    c.name = "short keys fp16 NaN/inf ties score=none+bias E=64 k=4";
    c.T = 500, c.E = 64, c.k = 4, c.lt = LogitType::F16, c.score = Score::None;
    c.bias = true, c.specials = true, c.exact_ids = true, c.ties = true, c.seed = 64;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "NaN/inf logits, select_on=logits softmax";
    c.T = 400, c.E = 40, c.k = 7, c.select_on_logits = true, c.specials = true, c.seed = 8;
    v.push_back(c);
  }
  {
    Case c;  // row 0 is all NaN: sigmoid scores all 0, so the dense q is uniform
    c.name = "NaN/inf logits, sigmoid+bias stats";
    c.T = 300, c.E = 72, c.k = 5, c.score = Score::Sigmoid, c.bias = true, c.specials = true;
    c.stats = true, c.groups = true, c.G = 2, c.seed = 14;
    v.push_back(c);
  }
  {
    Case c;  // rows holding +-FLT_MAX: the std term's sum overflows, so sd is +inf (reference)
    c.name = "NaN/inf logits, std steering";
    c.T = 300, c.E = 40, c.k = 4, c.specials = true, c.steer = c.steer_std = true, c.seed = 21;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "exact ties, score=none, renorm";
    c.T = 500, c.E = 48, c.k = 6, c.score = Score::None, c.ties = true, c.bias = true;
    c.renormalize = true, c.stats = true, c.seed = 9;
    v.push_back(c);
  }
  {
    Case c;  // round() of small negatives gives -0.0, which must tie with +0.0 (lower index wins)
    c.name = "exact ties incl. -0.0/+0.0, select_on=logits";
    c.T = 500, c.E = 80, c.k = 40, c.select_on_logits = true, c.ties = true, c.seed = 13;
    v.push_back(c);
  }
  {
    Case c;  // groups of 32 (one register slot each), top-2 sums with tied maxima
    c.name = "exact ties, top2_sum groups of 32";
    c.T = 64, c.E = 256, c.k = 8, c.score = Score::None, c.ties = true, c.renormalize = true;
    c.n_group = 8, c.topk_group = 3, c.group_score = GroupScore::Top2Sum, c.seed = 19;
    v.push_back(c);
  }
  // Score "none", renormalised: the k logits add in rank order in fp32, as in the reference. Near
  // FLT_MAX that sum overflows to +inf (weights of 0) where another order gives a finite sum, or
  // exactly 0 (weights left as they are).
  {
    Case c;
    c.name = "score=none renorm, sum overflows, E=8 k=3";
    c.T = 4, c.E = 8, c.k = 3, c.score = Score::None, c.renormalize = true;
    c.head = {3e38f, 3e38f, -3e38f}, c.exact_ids = c.exact_weights = true, c.seed = 73;
    v.push_back(c);
    c.name = "score=none renorm, sum overflows (tree: 0), E=8 k=4 select_on=logits";
    c.k = 4, c.head = {3e38f, 3e38f, -3e38f, -3e38f}, c.select_on_logits = true;
    v.push_back(c);
    c.name = "score=none renorm, sum overflows, E=64 k=40 (two selections a lane)";
    c.E = 64, c.k = 40, c.select_on_logits = false, c.head.assign(40, 1.f);
    c.head[0] = c.head[1] = 3e38f, c.head[2] = c.head[3] = -3e38f;
    v.push_back(c);
    c.name = "half keys bf16 score=none renorm, sum overflows, E=8 k=3";
    c.E = 8, c.k = 3, c.lt = LogitType::BF16, c.head = {3e38f, 3e38f, -3e38f};
    v.push_back(c);
  }
  {
    Case c;  // groups summing two probabilities: selection values must be softmax, not logits
    c.name = "softmax top2_sum groups renorm (Mistral 4)";
    c.T = 300, c.E = 64, c.k = 6, c.n_group = 8, c.topk_group = 3;
    c.group_score = GroupScore::Top2Sum, c.renormalize = true, c.stats = true, c.seed = 14;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "E=1000 k=40 (VPT 32, k > 32) stats";
    c.T = 70, c.E = 1000, c.k = 40, c.stats = true, c.n_group = 10, c.topk_group = 7;
    c.group_score = GroupScore::Top2Sum, c.score = Score::Sigmoid, c.seed = 10;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "replay (int32) stats+groups softmax steer";
    c.T = 900, c.E = 64, c.k = 8, c.replay = true, c.stats = true, c.groups = true, c.G = 4;
    c.steer = c.steer_std = true, c.seed = 20;
    v.push_back(c);
  }
  {
    Case c;  // replayed ids may lie in groups the limit would exclude
    c.name = "replay (int64) sigmoid+bias groups renorm bf16";
    c.T = 500, c.E = 256, c.k = 8, c.lt = LogitType::BF16, c.replay = true;
    c.replay_int64 = true, c.score = Score::Sigmoid, c.bias = true, c.n_group = 8;
    c.topk_group = 4, c.group_score = GroupScore::Top2Sum, c.renormalize = true;
    c.scale = 2.5f, c.stats = true, c.seed = 21;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "replay select_on=logits k > 32 forced steering";
    c.T = 80, c.E = 700, c.k = 40, c.replay = true, c.select_on_logits = true;
    c.steer = c.steer_force = true, c.stats = true, c.seed = 22;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "E=1 k=1 steer std";
    c.T = 33, c.E = 1, c.k = 1, c.steer = c.steer_std = true, c.std_unbiased = true;
    c.stats = true, c.seed = 11;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "E=512 n_group=512 (one expert per group)";
    c.T = 40, c.E = 512, c.k = 8, c.n_group = 512, c.topk_group = 100, c.seed = 12;
    c.score = Score::Sigmoid, c.bias = true, c.steer = c.steer_force = true;
    v.push_back(c);
  }
  // round_scores: selection on scores rounded to the half-precision logits' dtype (LFM2 and
  // DeepSeek-V4 sigmoid or sqrt(softplus) plus a bias, Zaya softmax plus a bias, Mistral-4's
  // half-precision top-2 group sums); ties on the coarse grid test the lower-index rule.
  {
    Case c;
    c.name = "round sigmoid+bias bf16 ties";
    c.T = 700, c.E = 32, c.k = 4, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.bias = true, c.round_scores = true, c.renormalize = true, c.ties = true, c.seed = 40;
    v.push_back(c);
    c.name = "round sqrtsoftplus+bias fp16 stats";
    c.E = 384, c.k = 6, c.lt = LogitType::F16, c.score = Score::SqrtSoftplus, c.ties = false;
    c.stats = true, c.groups = true, c.G = 3, c.scale = 1.5f, c.seed = 41;
    v.push_back(c);
    c.name = "round sqrtsoftplus+bias bf16 steer";
    c.lt = LogitType::BF16, c.stats = false, c.steer = c.steer_std = c.steer_force = true;
    c.seed = 42;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "round softmax+bias bf16 (Zaya)";
    c.T = 500, c.E = 65, c.k = 4, c.lt = LogitType::BF16, c.bias = true, c.round_scores = true;
    c.seed = 43;
    v.push_back(c);
    c.name = "round softmax no bias bf16 (probabilities, not logits)";
    c.bias = false, c.E = 128, c.spread = 0.05f, c.seed = 44;  // crowded: rounded ties
    v.push_back(c);
    c.name = "round softmax groups top2_sum bf16 (Mistral-4)";
    c.spread = 1.f, c.n_group = 8, c.topk_group = 4;
    c.group_score = GroupScore::Top2Sum, c.renormalize = true, c.seed = 45;
    v.push_back(c);
    c.name = "round softmax groups top2_sum bf16 gsize 32, replay";
    c.E = 256, c.k = 8, c.replay = true, c.stats = true, c.seed = 46;
    v.push_back(c);
    c.name = "round none+bias fp16 steer, and logits unaffected";
    c.E = 64, c.k = 8, c.n_group = 1, c.score = Score::None, c.bias = true, c.replay = false;
    c.stats = false, c.steer = c.steer_std = true, c.lt = LogitType::F16, c.seed = 47;
    v.push_back(c);
    c.name = "round select_on=logits bf16 (nothing to round)";
    c.select_on_logits = true, c.score = Score::Softmax, c.steer = false, c.seed = 48;
    v.push_back(c);
  }
  // Group-limited calls of at most 1024 tokens, without steering, statistics or replay: a CTA
  // per token, a warp per group (gate_grouped.cuh); above 1024 tokens, the warp kernel. Few
  // tokens each: the emulator runs a CTA's 256 threads as OS threads, about 50 ms a token.
  {
    Case c;
    c.name = "grouped DeepSeek-V3 fp32 T=1";
    c.T = 1, c.E = 256, c.k = 8, c.score = Score::Sigmoid, c.bias = true;
    c.n_group = 8, c.topk_group = 4, c.group_score = GroupScore::Top2Sum;
    c.renormalize = true, c.renorm_eps = 1e-20f, c.scale = 2.5f, c.seed = 80;
    v.push_back(c);
  }
  {
    Case c;  // more tokens than the emulated SMs hold CTAs (2): each CTA takes 24
    c.name = "grouped DeepSeek-V3 bf16 T=48 near ties, specials";
    c.T = 48, c.E = 256, c.k = 8, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.bias = true, c.n_group = 8, c.topk_group = 4, c.group_score = GroupScore::Top2Sum;
    c.renormalize = true, c.renorm_eps = 1e-20f, c.scale = 2.5f, c.near_ties = true;
    c.specials = true, c.seed = 81;
    v.push_back(c);
  }
  {
    Case c;  // the same call past kGroupedMaxTokens: the warp kernel
    c.name = "grouped, past its tokens: DeepSeek-V3 bf16 T=1025 (warp kernel)";
    c.T = 1025, c.E = 256, c.k = 8, c.lt = LogitType::BF16, c.score = Score::Sigmoid;
    c.bias = true, c.n_group = 8, c.topk_group = 4, c.group_score = GroupScore::Top2Sum;
    c.renormalize = true, c.renorm_eps = 1e-20f, c.scale = 2.5f, c.seed = 82;
    v.push_back(c);
  }
  {
    Case c;  // groups of 20: lanes 20-31 hold no expert
    c.name = "grouped exact ties score=none, groups of 20 by max, renorm";
    c.T = 60, c.E = 160, c.k = 6, c.score = Score::None, c.ties = true, c.renormalize = true;
    c.n_group = 8, c.topk_group = 3, c.exact_ids = true, c.seed = 83;
    v.push_back(c);
  }
  {
    Case c;  // top2_sum of rounded scores, rounded again (rounds_half_sums; crowded scores, so
             // that the rounding of the sums decides between groups); a row stride
    c.name = "grouped round sigmoid fp16 top2_sum, row_pad";
    c.T = 100, c.E = 128, c.k = 8, c.lt = LogitType::F16, c.score = Score::Sigmoid;
    c.round_scores = true, c.n_group = 4, c.topk_group = 2, c.row_pad = 3;
    c.group_score = GroupScore::Top2Sum, c.spread = 0.02f, c.seed = 84;
    v.push_back(c);
  }
  {
    Case c;  // every kept group's 4 experts listed, 8 groups: one key a lane
    c.name = "grouped k=10 > groups of 4, sigmoid+bias top2_sum";
    c.T = 40, c.E = 64, c.k = 10, c.score = Score::Sigmoid, c.bias = true;
    c.n_group = 16, c.topk_group = 8, c.group_score = GroupScore::Top2Sum, c.seed = 85;
    v.push_back(c);
  }
  {
    Case c;  // top2_sum of a group of one is its value
    c.name = "grouped one expert a group, sqrtsoftplus top2_sum";
    c.T = 30, c.E = 16, c.k = 3, c.score = Score::SqrtSoftplus, c.n_group = 16;
    c.topk_group = 5, c.group_score = GroupScore::Top2Sum, c.seed = 86;
    v.push_back(c);
  }
  {
    Case c;  // the softmax of the selected logits (finish_weights)
    c.name = "grouped softmax select_on=logits renorm, specials, exact ties";
    c.T = 60, c.E = 128, c.k = 4, c.select_on_logits = true, c.renormalize = true;
    c.n_group = 8, c.topk_group = 2, c.ties = true, c.specials = true, c.exact_ids = true;
    c.seed = 87;
    v.push_back(c);
  }
  // More than 1024 experts: the CTA-per-token kernel (gate_wide.cuh), each VPT tier.
  {
    Case c;  // Doge's default product keys
    c.name = "wide E=16384 k=64 softmax renorm bf16 stats (no coact)";
    c.T = 6, c.E = 16384, c.k = 64, c.lt = LogitType::BF16, c.renormalize = true;
    c.stats = true, c.coact = false, c.groups = true, c.G = 2, c.seed = 30;
    v.push_back(c);
  }
  {
    Case c;  // a 4-warp tail: warps whose experts run out before k
    c.name = "wide E=1100 k=200 steer force std, specials";
    c.T = 9, c.E = 1100, c.k = 200, c.steer = c.steer_std = c.steer_force = true;
    c.specials = true, c.stats = true, c.seed = 31;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide E=3000 sigmoid+bias renorm scale fp16, steer_select_only";
    c.T = 8, c.E = 3000, c.k = 8, c.lt = LogitType::F16, c.score = Score::Sigmoid;
    c.bias = true, c.renormalize = true, c.scale = 2.5f, c.row_pad = 5;
    c.steer = c.steer_force = c.steer_select_only = true, c.stats = true, c.seed = 32;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide E=5000 select_on=logits ties, replay";
    c.T = 10, c.E = 5000, c.k = 40, c.select_on_logits = true, c.ties = true, c.replay = true;
    c.stats = true, c.groups = true, c.groups_int64 = true, c.G = 3, c.seed = 33;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide E=2048 k=256 sqrtsoftplus (the largest k)";
    c.T = 3, c.E = 2048, c.k = 256, c.score = Score::SqrtSoftplus, c.seed = 34;
    v.push_back(c);
  }
  {
    Case c;  // the plain build (no steering, statistics or replay) at VPT 32
    c.name = "wide plain E=16384 k=64 softmax renorm bf16, one thread leads";
    c.T = 5, c.E = 16384, c.k = 64, c.lt = LogitType::BF16, c.renormalize = true;
    c.one_lane_leads = true, c.seed = 35;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide plain E=8192 k=48 sigmoid+bias ties";
    c.T = 7, c.E = 8192, c.k = 48, c.score = Score::Sigmoid, c.bias = true, c.ties = true;
    c.renormalize = true, c.seed = 36;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide round E=2048 sqrtsoftplus+bias bf16 stats";
    c.T = 6, c.E = 2048, c.k = 16, c.lt = LogitType::BF16, c.score = Score::SqrtSoftplus;
    c.bias = true, c.round_scores = true, c.stats = true, c.seed = 38;
    v.push_back(c);
  }
  {
    Case c;  // winners crowd into two warps, whose 64 experts run out (their lists end)
    c.name = "wide E=1100 k=200 warps 3 and 9 lead, steer";
    c.T = 4, c.E = 1100, c.k = 200, c.leading_warps = (1u << 3) | (1u << 9);
    c.steer = c.steer_force = true, c.seed = 67;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide plain E=16384 k=64 topk-softmax bf16, Doge's product keys";
    c.T = 6, c.E = 16384, c.k = 64, c.lt = LogitType::BF16, c.select_on_logits = true;
    c.product_keys = true, c.seed = 68;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide plain E=2048 k=8 select_on=logits, the k-th not yet listed";
    c.T = 3, c.E = 2048, c.k = 8, c.select_on_logits = true, c.cut_after_step = true;
    c.exact_ids = true, c.seed = 69;
    v.push_back(c);
  }
  {
    Case c;  // one key a warp lists and ranks (wide_list_step(1) = 1)
    c.name = "wide plain E=1025 k=1 fp16";
    c.T = 5, c.E = 1025, c.k = 1, c.lt = LogitType::F16, c.seed = 70;
    v.push_back(c);
  }
  {
    Case c;  // the sum of score "none" weights in rank order, as in the warp kernel
    c.name = "wide plain score=none renorm, sum overflows, E=1100 k=3";
    c.T = 3, c.E = 1100, c.k = 3, c.score = Score::None, c.renormalize = true;
    c.head = {3e38f, 3e38f, -3e38f}, c.exact_ids = c.exact_weights = true, c.seed = 74;
    v.push_back(c);
    c.name = "wide plain score=none renorm, sum overflows (tree: 0), E=1100 k=4 select_on=logits";
    c.k = 4, c.head = {3e38f, 3e38f, -3e38f, -3e38f}, c.select_on_logits = true;
    v.push_back(c);
    c.name = "wide score=none renorm stats, sum overflows, E=1100 k=40";
    c.k = 40, c.select_on_logits = false, c.head.assign(40, 1.f), c.stats = true;
    c.head[0] = c.head[1] = 3e38f, c.head[2] = c.head[3] = -3e38f;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "wide E=4000 k=100 stats, one thread leads, ties";
    c.T = 12, c.E = 4000, c.k = 100, c.ties = true, c.one_lane_leads = true, c.stats = true;
    c.groups = true, c.G = 2, c.seed = 37;
    v.push_back(c);
  }
  return v;
}

// plan_for_device against an occupancy bound by registers (16 to 48 warps an SM) and by shared
// memory (an H100 SM's 228 KiB): every plan's warps are resident at once. A plan for 32 warps an
// SM can give each warp one token (no counts or weight sums in shared memory); a plan for fewer
// can give each warp two, and the arrays back, which can leave fewer warps resident again.
bool plans_take_one_wave() {
  using namespace moe_route::cuda::detail;
  static int64_t counts[1];
  static float weight_sum[1];
  constexpr int kSms = 132;
  int bad = 0;
  for (const int max_warps : {16, 24, 32, 48}) {
    const auto occupancy = [max_warps](GateKernel, int threads, size_t smem) {
      const int by_regs = max_warps / (threads / 32);
      return smem > 0 ? std::min(by_regs, int(228 * 1024 / smem)) : by_regs;
    };
    for (const int64_t E : {64, 256, 512, 1024})
      for (int64_t T = 500; T <= 20000; T += 125) {
        GateParams p;
        p.T = T, p.E = E, p.k = 8, p.row_stride = E, p.counts = counts, p.weight_sum = weight_sum;
        const GatePlan plan = plan_for_device(p, kSms, nullptr, occupancy);
        const int per_sm = occupancy(nullptr, plan.warps_per_block * 32, plan.smem_bytes);
        if (plan.blocks > int64_t(per_sm) * kSms && bad++ < 5)
          std::printf("  plan T=%lld E=%lld, %d warps an SM: %d CTAs of %d warps, %d a SM\n",
                      static_cast<long long>(T), static_cast<long long>(E), max_warps,
                      plan.blocks, plan.warps_per_block, per_sm);
      }
  }
  std::printf("%s plans in one wave (%d not)\n", bad ? "FAIL" : "ok  ", bad);
  return bad == 0;
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0;
  CHECK_CUDA(cudaGetDeviceCount(&n_dev));
  if (n_dev < 1) {
    std::printf("no CUDA device\n");
    return 2;
  }
  // T == 0 launches nothing (and needs no valid pointers).
  {
    GateParams p;
    p.T = 0, p.E = 8, p.k = 2, p.row_stride = 8;
    CHECK_CUDA(moe_route::cuda::launch_topk_gate(p, nullptr));
  }
  // An argument runs only the cases whose name contains it.
  const std::string only = argc > 1 ? argv[1] : "";
  int failed = 0;
  if (std::string("plans in one wave").find(only) != std::string::npos)
    failed += plans_take_one_wave() ? 0 : 1;
  for (const Case& c : cases())
    if (c.name.find(only) != std::string::npos) failed += run_case(c) ? 0 : 1;
  std::printf("%s: %d case(s) failed\n", failed ? "FAILED" : "PASSED", failed);
  return failed ? 1 : 0;
}
