// ATen side of topk_gate shared by the CPU and CUDA implementations: argument checks (messages
// mirror moe_route/reference.py:check_gate_args), output allocation and GateParams assembly.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <optional>
#include <tuple>

#include "gate_params.h"

namespace moe_route {

using OptTensor = std::optional<at::Tensor>;

// Keeps alive the contiguous copies prepare_gate makes of inputs that were not contiguous.
struct GateHold {
  at::Tensor logits, selection_bias, steer, groups, replay;
};

// Checks every argument, allocates weights [T,k] fp32 and ids [T,k] int32 on the logits' device
// and fills `p`. Read-only inputs that are not contiguous are copied into `hold`; the statistics
// buffers are written in place and must be contiguous.
void prepare_gate(const at::Tensor& logits, int64_t k, c10::string_view score,
                  c10::string_view select_on, const OptTensor& selection_bias, int64_t n_group,
                  int64_t topk_group, c10::string_view group_score, bool renormalize,
                  double renorm_eps, double scale, bool round_scores, const OptTensor& steer,
                  bool steer_select_only, bool std_unbiased, const OptTensor& groups,
                  const OptTensor& replay,
                  const OptTensor& tokens,
                  const OptTensor& counts, const OptTensor& prob_sum, const OptTensor& weight_sum,
                  const OptTensor& entropy_sum, const OptTensor& coact, GateHold& hold,
                  at::Tensor& weights, at::Tensor& ids, GateParams& p);

// The gate's kernels compute no gradient: raises when autograd would need one from this call
// (grad mode on and the logits, selection bias or steer table require grad).
void check_no_grad(const at::Tensor& logits, const OptTensor& selection_bias,
                   const OptTensor& steer);

}  // namespace moe_route
