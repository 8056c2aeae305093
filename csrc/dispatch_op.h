// ATen side of the dispatch ops shared by the CPU implementations: argument checks (messages
// mirror moe_route/reference.py), output allocation and params assembly.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "dispatch_params.h"

namespace moe_route {

// Each returns the output tensor(s) and fills `p`; `keep` holds contiguous copies of inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_plan(
    const at::Tensor& ids, int64_t num_experts, int64_t block_size, at::Tensor& keep,
    PlanParams& p);
at::Tensor prepare_permute(const at::Tensor& x, const at::Tensor& row_slot,
                           const at::Tensor& slot_row, int64_t k,
                           const std::optional<at::Tensor>& expert_offsets, at::Tensor& keep,
                           PermuteParams& p);
at::Tensor prepare_unpermute(const at::Tensor& y, const at::Tensor& slot_row,
                             const at::Tensor& weights, at::Tensor& keep_y,
                             at::Tensor& keep_weights, UnpermuteParams& p);

}  // namespace moe_route
