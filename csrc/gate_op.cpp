#include "gate_op.h"
#include "messages.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <iterator>
#include <sstream>
#include <string>

namespace moe_route {
namespace {


// Checks an optional tensor argument; returns its data pointer or null. A read-only argument
// that is not contiguous is copied into `keep`; a buffer written in place must be contiguous.
template <typename T>
T* check_opt(const OptTensor& t, const char* name, std::initializer_list<int64_t> shape,
             std::initializer_list<at::ScalarType> dtypes, const at::Tensor& logits,
             at::Tensor* keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  const at::Tensor& x = *t;
  const at::IntArrayRef want(shape);
  TORCH_CHECK_VALUE(x.sizes().equals(want), "topk_gate: ", name, " must have shape ",
                    shape_str(want), ", got ", shape_str(x.sizes()));
  bool ok = false;
  for (auto d : dtypes) ok = ok || x.scalar_type() == d;
  if (!ok) {
    std::ostringstream o;
    size_t i = 0;
    for (auto d : dtypes) o << (i++ ? " or " : "") << dtype_name(d);
    TORCH_CHECK_TYPE(false, "topk_gate: ", name, " must be ", o.str(), ", got ",
                     dtype_name(x.scalar_type()));
  }
  TORCH_CHECK_VALUE(x.device() == logits.device(), "topk_gate: ", name,
                    " must be on the logits' device ", logits.device(), ", got ", x.device());
  if (!keep) {
    // Checked before any write: the autograd layer would refuse the in-place update only after
    // the kernel had already accumulated into the buffer.
    TORCH_CHECK_VALUE(!x.is_inference() || c10::InferenceMode::is_enabled(), "topk_gate: ",
                      name, " is an inference tensor (made under torch.inference_mode) and is "
                      "written in place: call the gate under inference_mode too, or make the "
                      "statistics buffers outside it");
    TORCH_CHECK_VALUE(!x.requires_grad(), "topk_gate: ", name, " requires grad and is written "
                      "in place, which autograd would not see: make the statistics buffers "
                      "without requires_grad");
  }
  if (x.is_contiguous()) return static_cast<T*>(x.data_ptr());
  TORCH_CHECK_VALUE(keep, "topk_gate: ", name, " must be contiguous (it is written in place)");
  *keep = x.contiguous();
  return static_cast<T*>(keep->data_ptr());
}

// The addresses a tensor's elements span (reference.py: _shares_memory). A span, not the
// elements: conservative for interleaved views, which no caller needs here. Addresses, not
// storages: two tensors made over the same memory (from_blob, from_numpy) have two storages.
struct Span {
  const char* name = nullptr;
  uintptr_t lo = 0, hi = 0;  // [lo, hi); empty for a tensor without data
};

Span span_of(const char* name, const at::Tensor& t) {
  Span s{name};
  if (!t.defined() || t.numel() == 0 || !t.has_storage()) return s;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();  // no refcount traffic: T=1 calls
  const auto base = reinterpret_cast<uintptr_t>(impl->data());
  if (base == 0) return s;
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < impl->dim(); ++d) {
    const int64_t reach = (impl->size(d) - 1) * impl->stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto size = static_cast<int64_t>(impl->itemsize());
  s.lo = base + lo * size;
  s.hi = base + (hi + 1) * size;
  return s;
}

Span span_of(const char* name, const OptTensor& t) {
  return t.has_value() ? span_of(name, *t) : Span{name};
}

// A statistics buffer is written while the other arguments are read (and while the other
// buffers are written): one that shares memory with any of them changes what the gate reads.
// `spans` lists the n_written buffers first, then the arguments only read; the order of the
// checks, and so the pair an error names, is the reference's.
void check_no_overlap(const Span* spans, size_t n, size_t n_written) {
  auto check = [](const Span& a, const Span& b) {
    TORCH_CHECK_VALUE(!(a.lo < b.hi && b.lo < a.hi), "topk_gate: ", a.name, " shares memory with ",
                      b.name, "; statistics buffers are written in place and must not overlap "
                      "any other argument");
  };
  for (size_t w = 0; w < n_written; ++w) {
    for (size_t r = n_written; r < n; ++r) check(spans[w], spans[r]);
    for (size_t o = 0; o < w; ++o) check(spans[w], spans[o]);
  }
}

}  // namespace

void prepare_gate(const at::Tensor& logits, int64_t k, c10::string_view score,
                  c10::string_view select_on, const OptTensor& selection_bias, int64_t n_group,
                  int64_t topk_group, c10::string_view group_score, bool renormalize,
                  double renorm_eps, double scale, bool round_scores, const OptTensor& steer,
                  bool steer_select_only, bool std_unbiased, const OptTensor& groups,
                  const OptTensor& replay,
                  const OptTensor& tokens,
                  const OptTensor& counts, const OptTensor& prob_sum, const OptTensor& weight_sum,
                  const OptTensor& entropy_sum, const OptTensor& coact, GateHold& hold,
                  at::Tensor& weights, at::Tensor& ids, GateParams& p) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "topk_gate: logits must be 2-D [T, E], got shape ",
                    shape_str(logits.sizes()));
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "topk_gate: logits must be float32, float16 or bfloat16, got ",
                   dtype_name(dt));
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1, "topk_gate: logits must have at least one expert column, got E=0");
  TORCH_CHECK_VALUE(E < (int64_t(1) << kIndexBits), "topk_gate: num_experts=", E,
                    " must be < 2^30");
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "topk_gate: k=", k, " must be in [1, num_experts=", E, "]");

  if (score == "softmax") p.score = Score::Softmax;
  else if (score == "sigmoid") p.score = Score::Sigmoid;
  else if (score == "sqrtsoftplus") p.score = Score::SqrtSoftplus;
  else if (score == "none") p.score = Score::None;
  else TORCH_CHECK_VALUE(false, "topk_gate: score='", std::string(score),
                         "' must be one of ('softmax', 'sigmoid', 'sqrtsoftplus', 'none')");
  if (select_on == "scores") p.select_on_logits = false;
  else if (select_on == "logits") p.select_on_logits = true;
  else TORCH_CHECK_VALUE(false, "topk_gate: select_on='", std::string(select_on),
                         "' must be one of ('scores', 'logits')");
  if (group_score == "max") p.group_score = GroupScore::Max;
  else if (group_score == "top2_sum") p.group_score = GroupScore::Top2Sum;
  else TORCH_CHECK_VALUE(false, "topk_gate: group_score='", std::string(group_score),
                         "' must be one of ('max', 'top2_sum')");
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, "topk_gate: n_group=", n_group,
                    " must be >= 1 and divide num_experts=", E);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, "topk_gate: topk_group=",
                    topk_group, " must be in [1, n_group=", n_group, "]");
  TORCH_CHECK_VALUE(n_group == 1 || k <= topk_group * (E / n_group), "topk_gate: k=", k,
                    " must be <= topk_group * experts_per_group = ", topk_group * (E / n_group));
  // Both are used as fp32: a double beyond FLT_MAX would turn into inf there.
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(renorm_eps)) && renorm_eps >= 0,
                    "topk_gate: renorm_eps=", renorm_eps, " must be finite in float32 and >= 0");
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(scale)), "topk_gate: scale=", scale,
                    " must be finite in float32");

  p.selection_bias = check_opt<const float>(selection_bias, "selection_bias", {E}, {at::kFloat},
                                            logits, &hold.selection_bias);
  p.steer = check_opt<const float>(steer, "steer", {4, E}, {at::kFloat}, logits, &hold.steer);
  p.groups = check_opt<const void>(groups, "groups", {T}, {at::kInt, at::kLong}, logits,
                                   &hold.groups);
  p.groups_int64 = p.groups && groups->scalar_type() == at::kLong;
  p.replay = check_opt<const void>(replay, "replay", {T, k}, {at::kInt, at::kLong}, logits,
                                   &hold.replay);
  p.replay_int64 = p.replay && replay->scalar_type() == at::kLong;

  // The group count G comes from the first per-group buffer present.
  int64_t G = -1;
  for (const OptTensor* b : {&tokens, &counts, &prob_sum, &weight_sum, &entropy_sum}) {
    if (b->has_value() && (*b)->defined() && (*b)->dim() > 0) {
      G = (*b)->size(0);
      break;
    }
  }
  p.tokens = check_opt<int64_t>(tokens, "tokens", {G}, {at::kLong}, logits, nullptr);
  p.counts = check_opt<int64_t>(counts, "counts", {G, E}, {at::kLong}, logits, nullptr);
  p.prob_sum = check_opt<float>(prob_sum, "prob_sum", {G, E}, {at::kFloat}, logits, nullptr);
  p.weight_sum = check_opt<float>(weight_sum, "weight_sum", {G, E}, {at::kFloat}, logits, nullptr);
  p.entropy_sum = check_opt<float>(entropy_sum, "entropy_sum", {G}, {at::kFloat}, logits, nullptr);
  p.coact = check_opt<int64_t>(coact, "coact", {E, E}, {at::kLong}, logits, nullptr);
  TORCH_CHECK_VALUE(G != 0, "topk_gate: statistics buffers need at least one group, got G=0");
  if (p.tokens || p.counts || p.prob_sum || p.weight_sum || p.entropy_sum || p.coact) {
    // The buffers were checked contiguous and of their shapes above: their spans follow from
    // the data pointers without asking the tensors again.
    auto buffer = [](const char* name, const void* data, int64_t numel, int64_t size) {
      const auto lo = reinterpret_cast<uintptr_t>(data);
      return data ? Span{name, lo, lo + static_cast<uintptr_t>(numel * size)} : Span{name};
    };
    const Span spans[] = {
        buffer("tokens", p.tokens, G, 8),
        buffer("counts", p.counts, G * E, 8),
        buffer("prob_sum", p.prob_sum, G * E, 4),
        buffer("weight_sum", p.weight_sum, G * E, 4),
        buffer("entropy_sum", p.entropy_sum, G, 4),
        buffer("coact", p.coact, E * E, 8),
        span_of("logits", logits),
        span_of("selection_bias", selection_bias),
        span_of("steer", steer),
        span_of("groups", groups),
        span_of("replay", replay)};
    check_no_overlap(spans, std::size(spans), 6);
  }
  p.G = G < 0 ? INT64_MAX : G;  // no per-group buffer: groups only mark tokens to skip

  // Unit-stride rows are read in place (a row-sliced view keeps its row stride).
  hold.logits = (E == 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
  p.logits = hold.logits.data_ptr();
  p.logit_type = dt == at::kFloat ? LogitType::F32 : dt == at::kHalf ? LogitType::F16
                                                                     : LogitType::BF16;
  p.T = T;
  p.E = E;
  p.row_stride = T > 1 ? hold.logits.stride(0) : E;
  p.k = k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.renormalize = renormalize;
  p.renorm_eps = static_cast<float>(renorm_eps);
  p.scale = static_cast<float>(scale);
  p.round_scores = round_scores;
  p.steer_select_only = steer_select_only;
  p.std_unbiased = std_unbiased;

  if (logits.is_cpu()) {  // skips two trips through the dispatcher, which show at T=1
    weights = at::detail::empty_cpu({T, k}, at::kFloat, std::nullopt, std::nullopt, std::nullopt,
                                    std::nullopt);
    ids = at::detail::empty_cpu({T, k}, at::kInt, std::nullopt, std::nullopt, std::nullopt,
                                std::nullopt);
  } else {
    weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
    ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  }
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
}

void check_no_grad(const at::Tensor& logits, const OptTensor& selection_bias,
                   const OptTensor& steer) {
  if (!c10::GradMode::is_enabled()) return;
  auto needs = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  TORCH_CHECK_VALUE(!logits.requires_grad() && !needs(selection_bias) && !needs(steer),
                    "torch.ops.moe_route.topk_gate has no backward, and an argument requires "
                    "grad: call moe_route.topk_gate, which recomputes the weights at the chosen "
                    "ids with differentiable PyTorch ops, or pass detached tensors");
}

}  // namespace moe_route
