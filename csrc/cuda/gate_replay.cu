// The router-replay builds of the topk_gate kernel (gate.cuh: kReplay) at VPT 1-16, in a
// translation unit of their own so that nvcc compiles them beside the other builds' units;
// VPT 32 is gate_replay32.cu's.
#include "gate.cuh"

namespace moe_route::cuda::detail {

GateKernel replay_kernel_for_tier(int vpt, LogitType lt) {
  return vpt == 32 ? replay_kernel_vpt32(lt) : kernel_for_tier<true, true, 1, 2, 4, 8, 16>(vpt, lt);
}

}  // namespace moe_route::cuda::detail
