// The full builds of the CTA-per-token topk_gate kernel at VPT 32 (8193-16384 experts), in a
// translation unit of their own: they compile about as long as gate_wide.cu's together.
#include "gate_launch.h"
#include "gate_wide.cuh"

namespace moe_route::cuda::detail {

WideKernel wide_full_kernel_vpt32(LogitType lt) { return wide_kernel_for_type<32, true>(lt); }

}  // namespace moe_route::cuda::detail
