// Every op schema of the moe_route namespace: the contract. Implementations register per backend
// (cpu/gate.cpp, cuda/gate_glue.cpp); fake kernels and the dispatch ops' autograd formulas live in
// moe_route/ops.py and moe_route/dispatch.py. topk_gate's autograd kernel is here.
// at::AutoDispatchBelowADInplaceOrView: torch 2.11's headers need it named.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "gate_op.h"

TORCH_LIBRARY(moe_route, m) {
  // Fused top-k gate with steering and in-place routing statistics (moe_route/reference.py).
  // The statistics buffers are mutated, never returned. `replay` [T, k] gives tokens their ids
  // (router replay): those rows skip selection; rows of -1 select as usual.
  m.def(
      "topk_gate(Tensor logits, int k, str score=\"softmax\", str select_on=\"scores\", "
      "Tensor? selection_bias=None, int n_group=1, int topk_group=1, str group_score=\"max\", "
      "bool renormalize=False, float renorm_eps=0.0, float scale=1.0, bool round_scores=False, "
      "Tensor? steer=None, "
      "bool steer_select_only=False, bool std_unbiased=False, Tensor? groups=None, "
      "Tensor? replay=None, "
      "Tensor(a!)? tokens=None, Tensor(b!)? counts=None, Tensor(c!)? prob_sum=None, "
      "Tensor(d!)? weight_sum=None, Tensor(e!)? entropy_sum=None, Tensor(f!)? coact=None) "
      "-> (Tensor weights, Tensor ids)");

  // Dispatch (moe_route/reference.py, "Dispatch"): a stable counting sort of the T*k (token, slot)
  // pairs by expert, sized for the worst case so nothing reads back to the host.
  m.def(
      "dispatch_plan(Tensor ids, int num_experts, int block_size=1) "
      "-> (Tensor row_slot, Tensor expert_offsets, Tensor counts, Tensor slot_row)");
  // Expert-contiguous rows [R, H] of x [T, H]; zero rows where row_slot is -1. Given the plan's
  // expert_offsets, rows at and past expert_offsets[E] (the unused tail) are not written.
  m.def(
      "permute(Tensor x, Tensor row_slot, Tensor slot_row, int k, "
      "Tensor? expert_offsets=None) -> Tensor");
  // Weighted k-way sum back to [T, H], fp32 accumulation in slot order, no atomics.
  m.def("unpermute(Tensor y, Tensor slot_row, Tensor weights) -> Tensor");
}


namespace moe_route {
namespace {

// topk_gate mutates its statistics buffers, so torch.library cannot attach a backward formula to
// it. Without a kernel here, autograd's fallback would hand back weights whose backward silently
// yields no gradient; this one refuses instead (moe_route.topk_gate differentiates the weights
// itself), then runs the op below autograd and bumps the written buffers' version counters.
std::tuple<at::Tensor, at::Tensor> topk_gate_autograd(
    const at::Tensor& logits, int64_t k, c10::string_view score, c10::string_view select_on,
    const OptTensor& selection_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, bool renormalize, double renorm_eps, double scale,
    bool round_scores, const OptTensor& steer, bool steer_select_only, bool std_unbiased,
    const OptTensor& groups, const OptTensor& replay, const OptTensor& tokens,
    const OptTensor& counts, const OptTensor& prob_sum, const OptTensor& weight_sum,
    const OptTensor& entropy_sum, const OptTensor& coact) {
  check_no_grad(logits, selection_bias, steer);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_route::topk_gate", "")
                       .typed<decltype(topk_gate_autograd)>();
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op.call(logits, k, score, select_on, selection_bias, n_group, topk_group, group_score,
                  renormalize, renorm_eps, scale, round_scores, steer, steer_select_only,
                  std_unbiased, groups, replay, tokens, counts, prob_sum, weight_sum,
                  entropy_sum, coact);
  }
  for (const OptTensor* b : {&tokens, &counts, &prob_sum, &weight_sum, &entropy_sum, &coact})
    if (b->has_value() && (*b)->defined()) torch::autograd::impl::bump_version(**b);
  return out;
}

}  // namespace
}  // namespace moe_route

TORCH_LIBRARY_IMPL(moe_route, Autograd, m) {
  m.impl("topk_gate", &moe_route::topk_gate_autograd);
}
