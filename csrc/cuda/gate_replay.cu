// The router-replay builds of the topk_gate kernel (gate.cuh: kReplay), in a translation unit of
// their own so that nvcc compiles them beside gate.cu's plain and full builds.
#include "gate.cuh"

namespace moe_route::cuda::detail {

GateKernel replay_kernel_for_tier(int vpt, LogitType lt) {
  return kernel_for_tier<true, true>(vpt, lt);
}

}  // namespace moe_route::cuda::detail
