// ATen glue of the CUDA dispatch ops (built only with CUDA): argument checks, allocation and the
// torch-free launches of csrc/cuda/dispatch.cu on the current stream. No host synchronisation:
// the index values inside row_slot / slot_row cannot be validated here (that would need a device
// read-back), so values outside [-1, T*k) resp. [-1, R) are the caller's contract; dispatch_plan
// produces valid ones. Only c10/cuda headers: ATen/cuda/CUDAContext.h would also pull in the
// cuBLAS/cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "../dispatch_params.h"
#include "../messages.h"
#include "dispatch_launch.h"

namespace moe_route {
namespace {

bool is_row_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == dev, op, ": ", name,
                    " must be on the same CUDA device as the first argument (", dev, "), got ",
                    t.device());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_cuda(
    const at::Tensor& ids, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK_VALUE(ids.dim() == 2, "dispatch_plan: ids must be 2-D [T, k], got shape ",
                    shape_str(ids));
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   "dispatch_plan: ids must be torch.int32 or torch.int64, got ",
                   dtype_name(ids.scalar_type()));
  TORCH_CHECK_VALUE(ids.is_cuda(), "dispatch_plan: ids must be a CUDA tensor, got ", ids.device());
  TORCH_CHECK_VALUE(num_experts >= 1, "dispatch_plan: num_experts=", num_experts,
                    " must be >= 1");
  TORCH_CHECK_VALUE(block_size >= 1, "dispatch_plan: block_size=", block_size, " must be >= 1");
  TORCH_CHECK_VALUE(num_experts <= cuda::kDispatchMaxExperts, "dispatch_plan: num_experts=",
                    num_experts, " must be <= ", cuda::kDispatchMaxExperts, " on CUDA");
  const c10::cuda::CUDAGuard guard(ids.device());
  const at::Tensor ids_c = ids.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts;
  const int64_t N = T * k;  // numel of an existing tensor: no overflow
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(block_size - 1 <= (kMax - N) / E, "dispatch_plan: T*k + num_experts*(block_size-1)"
                    " overflows int64 (T*k=", N, ", num_experts=", E, ", block_size=", block_size,
                    ")");
  const int64_t R = N + E * (block_size - 1);

  const auto opts = ids.options().dtype(at::kLong);
  at::Tensor row_slot = at::empty({R}, opts);
  at::Tensor offsets = at::empty({E + 1}, opts);
  at::Tensor counts = at::empty({E}, opts);
  at::Tensor slot_row = at::empty({N}, opts);

  PlanParams p;
  p.ids = ids_c.data_ptr();
  p.ids_int64 = ids_c.scalar_type() == at::kLong;
  p.T = T;
  p.k = k;
  p.E = E;
  p.block_size = block_size;
  p.R = R;
  p.row_slot = row_slot.data_ptr<int64_t>();
  p.expert_offsets = offsets.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int64_t>();
  p.slot_row = slot_row.data_ptr<int64_t>();

  // Scratch from the caching allocator (stream-ordered, CUDA-graph safe); freed on return, reused
  // by later work on the same stream only after the kernels enqueued here.
  const size_t ws_bytes = cuda::dispatch_plan_workspace_bytes(p);
  at::Tensor ws = at::empty({int64_t(ws_bytes)}, ids.options().dtype(at::kByte));
  check_launch("dispatch_plan",
               cuda::launch_dispatch_plan(p, ws_bytes ? ws.data_ptr() : nullptr, ws_bytes,
                                          c10::cuda::getCurrentCUDAStream()));
  return {row_slot, offsets, counts, slot_row};
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_slot, int64_t k) {
  TORCH_CHECK_VALUE(x.dim() == 2, "permute: x must be 2-D [T, H], got shape ", shape_str(x));
  TORCH_CHECK_TYPE(is_row_type(x.scalar_type()),
                   "permute: x must be torch.float32, torch.float16 or torch.bfloat16, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(row_slot.dim() == 1, "permute: row_slot must be 1-D [R], got shape ",
                    shape_str(row_slot));
  TORCH_CHECK_TYPE(row_slot.scalar_type() == at::kLong,
                   "permute: row_slot must be torch.int64, got ", dtype_name(row_slot.scalar_type()));
  TORCH_CHECK_VALUE(k >= 1, "permute: k=", k, " must be >= 1");
  TORCH_CHECK_VALUE(x.is_cuda(), "permute: x must be a CUDA tensor, got ", x.device());
  check_cuda("permute", "row_slot", row_slot, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  // Rows may be strided (e.g. a column slice of a wider buffer); elements must be contiguous.
  const at::Tensor xc = (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
  const at::Tensor rs = row_slot.contiguous();
  const int64_t T = xc.size(0), H = xc.size(1), R = rs.numel();
  at::Tensor out = at::empty({R, H}, xc.options());
  PermuteParams p;
  p.x = xc.data_ptr();
  p.row_slot = rs.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.T = T;
  p.H = H;
  p.R = R;
  p.k = k;
  p.x_row_stride = T > 1 ? xc.stride(0) : H;
  p.elem_bytes = int64_t(xc.element_size());
  check_launch("permute", cuda::launch_permute(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& slot_row,
                          const at::Tensor& weights) {
  TORCH_CHECK_VALUE(y.dim() == 2, "unpermute: y must be 2-D [R, H], got shape ", shape_str(y));
  TORCH_CHECK_TYPE(is_row_type(y.scalar_type()),
                   "unpermute: y must be torch.float32, torch.float16 or torch.bfloat16, got ",
                   dtype_name(y.scalar_type()));
  TORCH_CHECK_VALUE(weights.dim() == 2, "unpermute: weights must be 2-D [T, k], got shape ",
                    shape_str(weights));
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()),
                   "unpermute: weights must be a floating-point tensor, got ",
                   dtype_name(weights.scalar_type()));
  TORCH_CHECK_VALUE(slot_row.dim() == 1, "unpermute: slot_row must be 1-D [T*k], got shape ",
                    shape_str(slot_row));
  TORCH_CHECK_TYPE(slot_row.scalar_type() == at::kLong,
                   "unpermute: slot_row must be torch.int64, got ",
                   dtype_name(slot_row.scalar_type()));
  const int64_t T = weights.size(0), k = weights.size(1);
  TORCH_CHECK_VALUE(slot_row.numel() == T * k, "unpermute: slot_row must have T*k=", T * k,
                    " entries for weights of shape ", shape_str(weights), ", got ",
                    slot_row.numel());
  TORCH_CHECK_VALUE(y.is_cuda(), "unpermute: y must be a CUDA tensor, got ", y.device());
  check_cuda("unpermute", "slot_row", slot_row, y.device());
  check_cuda("unpermute", "weights", weights, y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor sr = slot_row.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  const int64_t H = yc.size(1);
  at::Tensor out = at::empty({T, H}, yc.options());
  UnpermuteParams p;
  p.y = yc.data_ptr();
  p.type = yc.scalar_type() == at::kFloat  ? ElemType::F32
           : yc.scalar_type() == at::kHalf ? ElemType::F16
                                           : ElemType::BF16;
  p.slot_row = sr.data_ptr<int64_t>();
  p.weights = w.data_ptr<float>();
  p.out = out.data_ptr();
  p.T = T;
  p.k = k;
  p.H = H;
  p.R = yc.size(0);
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
