// The builds of the CTA-per-token topk_gate kernel (gate_wide.cuh, E > 1024), in a translation
// unit of their own so that nvcc compiles them beside gate.cu.
#include "gate_wide.cuh"

namespace moe_route::cuda::detail {
namespace {

template <int VPT>
WideKernel wide_kernel_for_type(LogitType lt) {
  switch (lt) {
    case LogitType::F16: return &topk_gate_wide_kernel<VPT, LogitType::F16>;
    case LogitType::BF16: return &topk_gate_wide_kernel<VPT, LogitType::BF16>;
    default: return &topk_gate_wide_kernel<VPT, LogitType::F32>;
  }
}

}  // namespace

WideKernel wide_kernel_for(int vpt, LogitType lt) {
  switch (vpt) {
    case 4: return wide_kernel_for_type<4>(lt);
    case 8: return wide_kernel_for_type<8>(lt);
    case 16: return wide_kernel_for_type<16>(lt);
    default: return wide_kernel_for_type<32>(lt);
  }
}

}  // namespace moe_route::cuda::detail
