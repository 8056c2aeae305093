// ATen glue of the CUDA topk_gate (built only with CUDA): argument checks and allocation are
// prepare_gate's (shared with the CPU kernel), the launch is the torch-free launch_topk_gate.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would also pull in the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../gate_op.h"
#include "gate_launch.h"

namespace moe_route {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_gate_cuda(
    const at::Tensor& logits, int64_t k, c10::string_view score, c10::string_view select_on,
    const OptTensor& selection_bias, int64_t n_group, int64_t topk_group,
    c10::string_view group_score, bool renormalize, double renorm_eps, double scale,
    bool round_scores, const OptTensor& steer, bool steer_select_only, bool std_unbiased,
    const OptTensor& groups, const OptTensor& replay, const OptTensor& tokens,
    const OptTensor& counts, const OptTensor& prob_sum, const OptTensor& weight_sum,
    const OptTensor& entropy_sum, const OptTensor& coact) {
  // Reached when any tensor argument is on CUDA; when the logits are not, prepare_gate's device
  // checks raise the usual message, so only guard a CUDA device.
  const c10::cuda::OptionalCUDAGuard guard(
      logits.is_cuda() ? std::optional<c10::Device>(logits.device()) : std::nullopt);
  GateHold hold;
  at::Tensor weights, ids;
  GateParams p;
  prepare_gate(logits, k, score, select_on, selection_bias, n_group, topk_group, group_score,
               renormalize, renorm_eps, scale, round_scores, steer, steer_select_only,
               std_unbiased, groups, replay, tokens, counts, prob_sum, weight_sum, entropy_sum,
               coact, hold, weights, ids, p);
  if (p.E > cuda::kWarpMaxExperts) {  // the CTA-per-token kernel's limits (gate_wide.cuh)
    TORCH_CHECK_VALUE(p.E <= cuda::kWideMaxExperts, "topk_gate: num_experts=", p.E,
                      " must be <= ", cuda::kWideMaxExperts, " on CUDA");
    TORCH_CHECK_VALUE(p.k <= cuda::kWideMaxK, "topk_gate: k=", p.k, " must be <= ",
                      cuda::kWideMaxK, " on CUDA when num_experts > ", cuda::kWarpMaxExperts,
                      " (num_experts=", p.E, ")");
    TORCH_CHECK_VALUE(!limits_groups(p), "topk_gate: a group limit (n_group=", p.n_group,
                      ", topk_group=", p.topk_group, ") needs num_experts <= ",
                      cuda::kWarpMaxExperts, " on CUDA, got num_experts=", p.E);
    if (p.prob_sum) {  // its accumulator is in shared memory, which the device caps
      const size_t need = cuda::wide_gate_smem_bytes(p);
      int limit = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                            logits.get_device()));
      TORCH_CHECK(need <= size_t(limit), "topk_gate: prob_sum over num_experts=", p.E,
                  " with k=", p.k, " takes ", need, " bytes of shared memory per block on CUDA, "
                  "and this GPU allows ", limit, "; leave the dense statistics out "
                  "(GateStats.zeros(..., dense=False), record(model, dense=False))");
    }
  }
  const cudaError_t err = cuda::launch_topk_gate(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "topk_gate: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_route, CUDA, m) { m.impl("topk_gate", &topk_gate_cuda); }

}  // namespace moe_route
