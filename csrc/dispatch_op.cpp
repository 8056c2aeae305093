#include "dispatch_op.h"
#include "messages.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>

namespace moe_route {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " must be on the device of the "
                    "first argument ", a.device(), ", got ", b.device());
}

// permute's unused tail: rows at and past expert_offsets[E] are left unwritten. R = N + E*pad
// for a plan of N = T*k ids (pad = block_size - 1), and at most min(E, N) experts are padded, so
// used_bound = N + pad*min(E, N) rows can be in use. The count itself is read on the device; on
// the CPU it is checked here.
void set_used_rows(const at::Tensor& offsets, int64_t N, PermuteParams& p) {
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "permute: expert_offsets must be "
                   "torch.int64, got ", dtype_name(offsets.scalar_type()));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.is_contiguous(),
                    "permute: expert_offsets must be contiguous 1-D [E+1] with E >= 1, got "
                    "shape ", shape_str(offsets));
  const int64_t E = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(p.R >= N && (p.R - N) % E == 0, "permute: row_slot has R=", p.R,
                    " rows, but a plan of T*k=", N, " ids over E=", E, " experts has ", N,
                    " + E*(block_size-1) rows");
  p.used_rows = offsets.data_ptr<int64_t>() + E;
  p.used_bound = N + (p.R - N) / E * std::min(E, N);
  if (offsets.device().is_cpu()) {
    const int64_t used = *p.used_rows;
    TORCH_CHECK_VALUE(used >= 0 && used <= p.used_bound, "permute: expert_offsets[E]=", used,
                      " rows in use must be in [0, ", p.used_bound, "] for this plan");
  }
}

// The smallest and largest of the first n values of a CPU int64 index tensor ({0, -1} when n is 0).
std::pair<int64_t, int64_t> index_range(const at::Tensor& index, int64_t n) {
  const int64_t* v = index.data_ptr<int64_t>();
  int64_t lo = 0, hi = -1;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  return {lo, hi};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_plan(
    const at::Tensor& ids, int64_t num_experts, int64_t block_size, at::Tensor& keep,
    PlanParams& p) {
  TORCH_CHECK_VALUE(ids.dim() == 2, "dispatch_plan: ids must be 2-D [T, k], got shape ", shape_str(ids));
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   "dispatch_plan: ids must be torch.int32 or torch.int64, got ",
                   dtype_name(ids.scalar_type()));
  TORCH_CHECK_VALUE(ids.size(1) >= 1, "dispatch_plan: ids must have k >= 1 columns, got shape ",
                    shape_str(ids));
  TORCH_CHECK_VALUE(num_experts >= 1, "dispatch_plan: num_experts=", num_experts,
                    " must be >= 1");
  TORCH_CHECK_VALUE(block_size >= 1, "dispatch_plan: block_size=", block_size, " must be >= 1");
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts;
  const int64_t N = ids.numel();  // T*k of an existing tensor: no overflow
  TORCH_CHECK_VALUE(block_size - 1 <= (std::numeric_limits<int64_t>::max() - N) / E,
                    "dispatch_plan: T*k + num_experts*(block_size-1) overflows int64 (T*k=", N,
                    ", num_experts=", E, ", block_size=", block_size, ")");
  keep = ids.contiguous();
  const int64_t R = N + E * (block_size - 1);
  const auto i64 = ids.options().dtype(at::kLong);
  at::Tensor row_slot = at::empty({R}, i64), offsets = at::empty({E + 1}, i64),
             counts = at::empty({E}, i64), slot_row = at::empty({N}, i64);
  p.ids = keep.data_ptr();
  p.ids_int64 = ids.scalar_type() == at::kLong;
  p.T = T, p.k = k, p.E = E, p.block_size = block_size, p.R = R;
  p.row_slot = row_slot.data_ptr<int64_t>();
  p.expert_offsets = offsets.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int64_t>();
  p.slot_row = slot_row.data_ptr<int64_t>();
  return {row_slot, offsets, counts, slot_row};
}

at::Tensor prepare_permute(const at::Tensor& x, const at::Tensor& row_slot,
                           const at::Tensor& slot_row, int64_t k,
                           const std::optional<at::Tensor>& expert_offsets, at::Tensor& keep,
                           PermuteParams& p) {
  TORCH_CHECK_VALUE(x.dim() == 2, "permute: x must be 2-D [T, H], got shape ", shape_str(x));
  TORCH_CHECK_TYPE(is_float(x.scalar_type()),
                   "permute: x must be float32, float16 or bfloat16, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(row_slot.dim() == 1, "permute: row_slot must be 1-D [R], got shape ", shape_str(row_slot));
  TORCH_CHECK_TYPE(row_slot.scalar_type() == at::kLong, "permute: row_slot must be torch.int64, "
                   "got ", dtype_name(row_slot.scalar_type()));
  TORCH_CHECK_VALUE(k >= 1, "permute: k=", k, " must be >= 1");
  int64_t N = 0;  // T*k, which a raw call's k can overflow
  TORCH_CHECK_VALUE(!c10::mul_overflows(x.size(0), k, &N), "permute: T*k overflows int64 (T=",
                    x.size(0), ", k=", k, ")");
  TORCH_CHECK_VALUE(row_slot.is_contiguous(), "permute: row_slot must be contiguous");
  TORCH_CHECK_TYPE(slot_row.scalar_type() == at::kLong, "permute: slot_row must be torch.int64, "
                   "got ", dtype_name(slot_row.scalar_type()));
  TORCH_CHECK_VALUE(slot_row.dim() == 1 && slot_row.size(0) == N && slot_row.is_contiguous(),
                    "permute: slot_row must be contiguous 1-D of length T*k=", N,
                    ", got shape ", shape_str(slot_row));
  same_device(x, row_slot, "permute", "row_slot");
  same_device(x, slot_row, "permute", "slot_row");
  keep = x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor& rs = row_slot;
  at::Tensor out = at::empty({rs.size(0), x.size(1)}, x.options());
  p.x = keep.data_ptr();
  p.row_slot = rs.data_ptr<int64_t>();
  p.slot_row = slot_row.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.T = x.size(0), p.H = x.size(1), p.R = rs.size(0), p.k = k;
  p.x_row_stride = x.size(0) > 1 ? keep.stride(0) : x.size(1);
  p.elem_bytes = x.element_size();
  if (expert_offsets.has_value()) {
    same_device(x, *expert_offsets, "permute", "expert_offsets");
    set_used_rows(*expert_offsets, N, p);
  }
  if (rs.is_cpu()) {
    // The CPU kernel copies x's row of the slot each row names: a row_slot of another plan (more
    // tokens) would be read out of x's bounds. The rows it fills are checked, the unused tail
    // skipped. On the GPU this would cost a host sync: the kernel skips slot_row entries outside
    // [0, R) instead (the only indices it writes through).
    const auto [lo, hi] = index_range(rs, p.used_rows ? *p.used_rows : p.R);
    TORCH_CHECK_VALUE(lo >= -1 && hi < N, "permute: row_slot holds slots in [", lo, ", ", hi,
                      "], but x has T=", x.size(0), " rows and k=", k, ", so T*k=", N,
                      " slots: row_slot must be the plan of x's tokens");
  }
  return out;
}

at::Tensor prepare_unpermute(const at::Tensor& y, const at::Tensor& slot_row,
                             const at::Tensor& weights, at::Tensor& keep_y,
                             at::Tensor& keep_weights, UnpermuteParams& p) {
  TORCH_CHECK_VALUE(y.dim() == 2, "unpermute: y must be 2-D [R, H], got shape ", shape_str(y));
  TORCH_CHECK_TYPE(is_float(y.scalar_type()),
                   "unpermute: y must be float32, float16 or bfloat16, got ",
                   dtype_name(y.scalar_type()));
  TORCH_CHECK_VALUE(weights.dim() == 2, "unpermute: weights must be 2-D [T, k], got shape ", shape_str(weights));
  TORCH_CHECK_TYPE(is_float(weights.scalar_type()) || weights.scalar_type() == at::kDouble,
                   "unpermute: weights must be a float tensor, got ",
                   dtype_name(weights.scalar_type()));
  TORCH_CHECK_VALUE(slot_row.dim() == 1 && slot_row.size(0) == weights.numel(),
                    "unpermute: slot_row must be 1-D of length T*k=", weights.numel(),
                    ", got shape ", shape_str(slot_row));
  TORCH_CHECK_TYPE(slot_row.scalar_type() == at::kLong,
                   "unpermute: slot_row must be torch.int64, got ",
                   dtype_name(slot_row.scalar_type()));
  TORCH_CHECK_VALUE(slot_row.is_contiguous(), "unpermute: slot_row must be contiguous");
  same_device(y, slot_row, "unpermute", "slot_row");
  same_device(y, weights, "unpermute", "weights");
  if (slot_row.is_cpu()) {
    // Rows are read at the plan's indices: a y with fewer rows than the plan (say x instead of
    // the expert outputs) would be read out of bounds. On the GPU this would cost a host sync:
    // the kernel skips indices outside [0, R) instead.
    const auto [lo, hi] = index_range(slot_row, slot_row.size(0));
    TORCH_CHECK_VALUE(lo >= -1 && hi < y.size(0), "unpermute: slot_row holds rows in [", lo,
                      ", ", hi, "], but y has ", y.size(0), " rows: y must be [R, H], one row per "
                      "row of the plan (permute's output rows)");
  }
  keep_y = y.contiguous();
  keep_weights = weights.to(at::kFloat).contiguous();
  const at::Tensor& sr = slot_row;
  const int64_t T = weights.size(0), H = y.size(1);
  at::Tensor out = at::empty({T, H}, y.options());
  p.y = keep_y.data_ptr();
  p.type = y.scalar_type() == at::kFloat  ? ElemType::F32
           : y.scalar_type() == at::kHalf ? ElemType::F16
                                          : ElemType::BF16;
  p.slot_row = sr.data_ptr<int64_t>();
  p.weights = keep_weights.data_ptr<float>();
  p.out = out.data_ptr();
  p.T = T, p.k = weights.size(1), p.H = H, p.R = y.size(0);
  return out;
}

}  // namespace moe_route
