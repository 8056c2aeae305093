// Torch-free entry point of the CUDA topk_gate kernels (csrc/cuda/gate.cu), called by the ATen glue
// (csrc/cuda/gate_glue.cpp) and by the standalone self-test.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "../gate_params.h"

namespace moe_route::cuda {

// The shapes the kernels take: up to kWarpMaxExperts experts a warp routes each token
// (gate.cuh); more, up to kWideMaxExperts, a CTA routes each token (gate_wide.cuh), with
// k <= kWideMaxK and no group limit.
inline constexpr long long kWarpMaxExperts = 1024, kWideMaxExperts = 16384, kWideMaxK = 256;

// Warps in a CTA of the CTA-per-token kernel (gate_wide.cuh).
inline constexpr int kWideWarps = 16;

// Keys each warp of the CTA-per-token kernel lists of its experts' best before they are ranked,
// and how many more it lists each time its last one ranks above the k-th: twice its even share
// of k, plus 4, at most k (k = 64: 12; k = 8: 6; k = 256: 36). A warp's share of a row's top k
// is about k / 16 where the row's leaders are spread over the warps.
// Listing k keys a warp, as the kernel did at first, took 16 times the keys the top k can use
// (bench/RESULTS.md, "Fewer rounds in the CTA-per-token gate").
MOE_ROUTE_HOST_DEVICE inline constexpr int wide_list_step(int k) {
  const int step = 2 * ((k + kWideWarps - 1) / kWideWarps) + 4;
  return step < k ? step : k;
}

// Whether the kernels take a call with p.T > 0 (1 <= k <= E within the limits above).
inline bool gate_args_ok(const GateParams& p) {
  if (p.E < 1 || p.k < 1 || p.k > p.E) return false;
  return p.E <= kWarpMaxExperts ||
         (p.E <= kWideMaxExperts && p.k <= kWideMaxK && !limits_groups(p));
}

// Dynamic shared memory a CTA of the CTA-per-token kernel takes for `p` (E > kWarpMaxExperts):
// 136 + 136*k bytes, plus 4*E for an accumulator when the call sums prob_sum. Past the default
// 48 KiB (E = 16384, k = 64 with prob_sum: 74,376 bytes; at most 100,488) the launcher opts in,
// up to the device's limit (cudaDevAttrMaxSharedMemoryPerBlockOptin).
size_t wide_gate_smem_bytes(const GateParams& p);

// Enqueues topk_gate for `p` on `stream` (on the current device) and returns the launch status
// (cudaGetLastError); it never synchronises or allocates, so it may be captured in a CUDA graph.
// T == 0 launches nothing. A call gate_args_ok refuses, or one that needs more shared memory than
// the device allows (wide_gate_smem_bytes), returns cudaErrorInvalidValue; every other
// argument check is prepare_gate's. groups[t] outside [-1, G) are skipped for the statistics
// (the device cannot raise without a host sync).
cudaError_t launch_topk_gate(const GateParams& p, cudaStream_t stream);

}  // namespace moe_route::cuda
