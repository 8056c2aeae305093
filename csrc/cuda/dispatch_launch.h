// Torch-free entry points of the CUDA dispatch kernels (csrc/cuda/dispatch.cu), called by the ATen
// glue (csrc/cuda/dispatch_glue.cpp) and by the standalone self-test (dispatch_selftest.cu).
//
// Every launcher enqueues on `stream` (on the current device) and returns the launch status
// (cudaGetLastError). None synchronises or allocates, so all may be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "../dispatch_params.h"

namespace moe_route::cuda {

// Largest num_experts the CUDA plan supports (shared-memory budget); larger E: cudaErrorInvalidValue.
inline constexpr long long kDispatchMaxExperts = 4096;

// Bytes of scratch launch_dispatch_plan needs for `p` (depends on T, k and E only; may be 0).
// Requires 1 <= E <= kDispatchMaxExperts.
size_t dispatch_plan_workspace_bytes(const PlanParams& p);

// dispatch_plan: fills row_slot [R] (-1 first, then the used rows), expert_offsets [E+1],
// counts [E] and slot_row [T*k]. `workspace` must hold dispatch_plan_workspace_bytes(p) bytes,
// 8-byte aligned (nullptr allowed when that is 0); its contents on entry do not matter.
// Requires 1 <= E <= kDispatchMaxExperts, block_size >= 1, T, k >= 0, R == T*k + E*(block_size-1).
// Deterministic: the outputs are a pure function of the ids.
cudaError_t launch_dispatch_plan(const PlanParams& p, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

// permute: out[r] = x[row_slot[r] / k] or a zero row where row_slot[r] < 0. elem_bytes 2 or 4.
// Copies token-major through slot_row (required when T > 0), zero-fills through row_slot: both
// must come from one plan, with values in [-1, R) resp. [-1, T*k) (not checked on the device).
cudaError_t launch_permute(const PermuteParams& p, cudaStream_t stream);

// unpermute: out[t] = sum_j weights[t, j] * y[slot_row[t*k + j]] over slot_row >= 0, fp32
// accumulation in j order, written in y's type. slot_row values in [-1, R) are the caller's
// contract. Deterministic (no atomics).
cudaError_t launch_unpermute(const UnpermuteParams& p, cudaStream_t stream);

}  // namespace moe_route::cuda
