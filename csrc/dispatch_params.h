// Torch-free descriptions of the dispatch ops (moe_route/reference.py, "Dispatch"), shared by the
// C++ CPU kernels and the CUDA kernels. All indices are int64.
#pragma once
#include <cstdint>

namespace moe_route {

// dispatch_plan: ids [T, k] (int32 or int64) -> row_slot [R], expert_offsets [E+1], counts [E],
// slot_row [T*k], with R = T*k + E*(block_size-1). Ids outside [0, E) get no row.
struct PlanParams {
  const void* ids = nullptr;
  bool ids_int64 = false;
  int64_t T = 0, k = 0, E = 0, block_size = 1, R = 0;
  int64_t* row_slot = nullptr;        // [R], -1 for padding and unused rows
  int64_t* expert_offsets = nullptr;  // [E+1]
  int64_t* counts = nullptr;          // [E]
  int64_t* slot_row = nullptr;        // [T*k], -1 for dropped ids
};

enum class ElemType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// permute: out[r] = x[row_slot[r] / k] (or zeros), rows of H elements of `elem_bytes` each. The
// CPU kernel copies row by row through row_slot; the CUDA kernel token by token through slot_row,
// the inverse map of the same plan (each token row read once). With `used_rows` (the plan's
// expert_offsets[E], read on the device), rows at and past *used_rows, the unused tail, are not
// written; `used_bound` >= *used_rows is known on the host and sizes the CUDA grid.
struct PermuteParams {
  const void* x = nullptr;  // [T, H], rows contiguous with stride x_row_stride (elements)
  const int64_t* row_slot = nullptr;  // [R]
  const int64_t* slot_row = nullptr;  // [T*k]
  void* out = nullptr;  // [R, H] contiguous
  int64_t T = 0, H = 0, R = 0, k = 1, x_row_stride = 0, elem_bytes = 4;
  const int64_t* used_rows = nullptr;  // null: all R rows are written
  int64_t used_bound = 0;              // 0 <= used_bound <= R when used_rows is set
};

// unpermute: out[t] = sum_j weights[t, j] * y[slot_row[t*k + j]] over slot_row >= 0, fp32
// accumulation in j order, written in y's type.
struct UnpermuteParams {
  const void* y = nullptr;  // [R, H] contiguous
  ElemType type = ElemType::F32;
  const int64_t* slot_row = nullptr;  // [T*k]
  const float* weights = nullptr;     // [T, k] fp32 contiguous
  void* out = nullptr;                // [T, H] contiguous, same type as y
  int64_t T = 0, k = 1, H = 0, R = 0;
};

}  // namespace moe_route
