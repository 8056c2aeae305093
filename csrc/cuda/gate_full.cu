// The full builds of the topk_gate kernel (gate.cuh: steering, the group limit, statistics,
// rounded scores) at VPT 1-16, in a translation unit of their own so that nvcc compiles them
// beside the other builds' units.
#include "gate.cuh"

namespace moe_route::cuda::detail {

GateKernel full_kernel_for_tier(int vpt, LogitType lt) {
  return kernel_for_tier<true, false, 1, 2, 4, 8, 16>(vpt, lt);
}

}  // namespace moe_route::cuda::detail
