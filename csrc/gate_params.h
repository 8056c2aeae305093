// Torch-free description of one topk_gate call: raw pointers, int64 sizes. Shared by the C++ CPU
// kernel and the CUDA kernels, so both read exactly the same contract (moe_route/reference.py).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_ROUTE_HOST_DEVICE __host__ __device__
#else
#define MOE_ROUTE_HOST_DEVICE
#endif

namespace moe_route {

enum class Score : int32_t { Softmax = 0, Sigmoid = 1, SqrtSoftplus = 2, None = 3 };
enum class GroupScore : int32_t { Max = 0, Top2Sum = 1 };
enum class LogitType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// Rows of the [4, E] steering table.
enum SteerRow : int32_t { kSteerAdd = 0, kSteerStd = 1, kSteerAbs = 2, kSteerForce = 3 };

struct GateParams {
  // Input logits [T, E], element (t, e) at logits[t * row_stride + e].
  const void* logits = nullptr;
  LogitType logit_type = LogitType::F32;
  int64_t T = 0, E = 0, row_stride = 0, k = 1;

  Score score = Score::Softmax;
  bool select_on_logits = false;
  const float* selection_bias = nullptr;  // [E] or null
  int64_t n_group = 1, topk_group = 1;
  GroupScore group_score = GroupScore::Max;
  bool renormalize = false;
  float renorm_eps = 0.f, scale = 1.f;
  // The router scores in its logits' half precision: selection ranks scores rounded to the
  // logits' dtype, as PyTorch's fp16/bf16 ops round them (reference.py, "Rounded scores").
  bool round_scores = false;

  const float* steer = nullptr;  // [4, E] or null
  bool steer_select_only = false, std_unbiased = false;

  // Router replay: [T, k] int32 or int64 ids, or null. A row of k distinct ids in [0, E) is the
  // token's selection, in that order; any other row (all -1 by contract) selects as usual.
  const void* replay = nullptr;
  bool replay_int64 = false;

  // Statistics (all optional). groups: [T] int32 or int64, -1 = skip, null = all in group 0.
  // G: rows of the per-group buffers; INT64_MAX when only coact is given (groups then only skip).
  const void* groups = nullptr;
  bool groups_int64 = false;
  int64_t G = 1;
  int64_t* tokens = nullptr;        // [G]
  int64_t* counts = nullptr;        // [G, E]
  float* prob_sum = nullptr;        // [G, E]
  float* weight_sum = nullptr;      // [G, E]
  float* entropy_sum = nullptr;     // [G]
  int64_t* coact = nullptr;         // [E, E]

  // Outputs [T, k], contiguous.
  float* weights = nullptr;
  int32_t* ids = nullptr;

  MOE_ROUTE_HOST_DEVICE bool any_stats() const {
    return tokens || counts || prob_sum || weight_sum || entropy_sum || coact;
  }
  MOE_ROUTE_HOST_DEVICE bool dense_stats() const { return prob_sum || entropy_sum; }
  MOE_ROUTE_HOST_DEVICE int64_t replay_id(int64_t t, int64_t j) const {
    return replay_int64 ? static_cast<const int64_t*>(replay)[t * k + j]
                        : int64_t(static_cast<const int32_t*>(replay)[t * k + j]);
  }
  MOE_ROUTE_HOST_DEVICE bool per_group_stats() const {
    return tokens || counts || prob_sum || weight_sum || entropy_sum;
  }
};

// The group limit excludes experts only when fewer groups are kept than there are.
MOE_ROUTE_HOST_DEVICE inline bool limits_groups(const GateParams& p) {
  return p.n_group > 1 && p.topk_group < p.n_group;
}

// Whether selection rounds its scores to the logits' half precision (round_scores): only scores
// are rounded, never the logits that select_on="logits" ranks.
MOE_ROUTE_HOST_DEVICE inline bool rounds_scores(const GateParams& p) {
  return p.round_scores && !p.select_on_logits && p.logit_type != LogitType::F32;
}

// A top2_sum group score adds two half-precision scores in half precision when the router ranks
// its rounded scores as they are; with a selection bias the values are fp32 and so is the sum.
MOE_ROUTE_HOST_DEVICE inline bool rounds_half_sums(const GateParams& p) {
  return rounds_scores(p) && !p.selection_bias;
}

// Selection values are the steered logits themselves for select_on="logits", and for softmax
// without a bias (same order as the probabilities) unless top2_sum groups must add probabilities
// or rounded probabilities may tie where the logits do not. `may_round`: false in a kernel build
// that never runs a rounding call (it then drops the test).
MOE_ROUTE_HOST_DEVICE inline bool selects_on_logits(const GateParams& p, bool may_round = true) {
  return p.select_on_logits ||
         (p.score == Score::Softmax && !p.selection_bias && !(may_round && rounds_scores(p)) &&
          (p.n_group == 1 || p.group_score == GroupScore::Max));
}

// Selection keys pack (tier, value, index) into one uint64 so that a single unsigned comparison
// orders experts: tier (2 bits) | order-preserving bits of the fp32 value (32) | 2^30-1-index (30).
// Larger key = better; equal values go to the lower index. Needs E < 2^30.
constexpr uint64_t kIndexBits = 30;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
constexpr int32_t kTierForcedOn = 2, kTierNormal = 1, kTierForcedOff = 0;

}  // namespace moe_route
