// The full builds of the topk_gate kernel at VPT 32 (513-1024 experts), in a translation unit of
// their own: they compile about as long as gate_full.cu's together.
#include "gate.cuh"

namespace moe_route::cuda::detail {

GateKernel full_kernel_vpt32(LogitType lt) { return kernel_for_type<32, true, false>(lt); }

}  // namespace moe_route::cuda::detail
