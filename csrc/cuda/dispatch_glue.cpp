// ATen glue of the CUDA dispatch ops (built only with CUDA): argument checks and allocation are
// the prepare_* functions shared with the CPU kernels (csrc/dispatch_op.cpp); the launches are the
// torch-free ones of csrc/cuda/dispatch.cu, on the current stream. No host synchronisation: the
// index values inside row_slot / slot_row cannot be validated here (that would need a device
// read-back), so values outside [-1, T*k) resp. [-1, R) are the caller's contract; dispatch_plan
// produces valid ones. Only c10/cuda headers: ATen/cuda/CUDAContext.h would also pull in the
// cuBLAS/cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../dispatch_op.h"
#include "dispatch_launch.h"

namespace moe_route {
namespace {

// The CUDA key is reached when any tensor argument is on CUDA; the first one must be, so that
// prepare_*'s same-device checks put every argument there.
void check_first_on_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_cuda(
    const at::Tensor& ids, int64_t num_experts, int64_t block_size) {
  check_first_on_cuda("dispatch_plan", "ids", ids);
  TORCH_CHECK_VALUE(num_experts <= cuda::kDispatchMaxExperts, "dispatch_plan: num_experts=",
                    num_experts, " must be <= ", cuda::kDispatchMaxExperts, " on CUDA");
  const c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor keep;
  PlanParams p;
  auto out = prepare_plan(ids, num_experts, block_size, keep, p);
  // Scratch from the caching allocator (stream-ordered, CUDA-graph safe); freed on return, reused
  // by later work on the same stream only after the kernels enqueued here.
  const size_t ws_bytes = cuda::dispatch_plan_workspace_bytes(p);
  at::Tensor ws = at::empty({int64_t(ws_bytes)}, ids.options().dtype(at::kByte));
  check_launch("dispatch_plan",
               cuda::launch_dispatch_plan(p, ws_bytes ? ws.data_ptr() : nullptr, ws_bytes,
                                          c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_slot,
                        const at::Tensor& slot_row, int64_t k,
                        const std::optional<at::Tensor>& expert_offsets) {
  check_first_on_cuda("permute", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor keep;
  PermuteParams p;
  at::Tensor out = prepare_permute(x, row_slot, slot_row, k, expert_offsets, keep, p);
  check_launch("permute", cuda::launch_permute(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& slot_row,
                          const at::Tensor& weights) {
  check_first_on_cuda("unpermute", "y", y);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor keep_y, keep_w;
  UnpermuteParams p;
  at::Tensor out = prepare_unpermute(y, slot_row, weights, keep_y, keep_w, p);
  check_launch("unpermute", cuda::launch_unpermute(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_route, CUDA, m) {
  m.impl("dispatch_plan", &dispatch_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
}

}  // namespace moe_route
