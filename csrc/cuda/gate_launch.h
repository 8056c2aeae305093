// Torch-free entry point of the CUDA topk_gate kernels (csrc/cuda/gate.cu), called by the ATen glue
// (csrc/cuda/gate_glue.cpp) and by the standalone self-test.
#pragma once
#include <cuda_runtime_api.h>

#include "../gate_params.h"

namespace moe_route::cuda {

// Enqueues topk_gate for `p` on `stream` (on the current device) and returns the launch status
// (cudaGetLastError); it never synchronises or allocates, so it may be captured in a CUDA graph.
// T == 0 launches nothing. Requires 1 <= E <= 1024 and 1 <= k <= E (cudaErrorInvalidValue
// otherwise); every other argument check is prepare_gate's. groups[t] outside [-1, G) are skipped
// for the statistics (the device cannot raise without a host sync).
cudaError_t launch_topk_gate(const GateParams& p, cudaStream_t stream);

}  // namespace moe_route::cuda
