// The builds of the CTA-per-token topk_gate kernel (gate_wide.cuh, E > 1024) but the full ones at
// VPT 32 (gate_wide32.cu), in a translation unit of their own so that nvcc compiles them beside
// the warp kernel's units.
#include "gate_launch.h"
#include "gate_wide.cuh"

namespace moe_route::cuda::detail {
namespace {

template <bool kFull>
WideKernel wide_kernel_for_tier(int vpt, LogitType lt) {
  switch (vpt) {
    case 4: return wide_kernel_for_type<4, kFull>(lt);
    case 8: return wide_kernel_for_type<8, kFull>(lt);
    case 16: return wide_kernel_for_type<16, kFull>(lt);
    default: return kFull ? wide_full_kernel_vpt32(lt) : wide_kernel_for_type<32, false>(lt);
  }
}

}  // namespace

WideKernel select_wide_kernel(const GateParams& p) {
  const int vpt = wide_vpt_for(p.E);
  return needs_full_kernel(p) ? wide_kernel_for_tier<true>(vpt, p.logit_type)
                              : wide_kernel_for_tier<false>(vpt, p.logit_type);
}

}  // namespace moe_route::cuda::detail

namespace moe_route::cuda {
size_t wide_gate_smem_bytes(const GateParams& p) { return detail::wide_smem_bytes(p); }
}  // namespace moe_route::cuda
