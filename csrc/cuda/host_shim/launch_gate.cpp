// Emulated twin of csrc/cuda/gate.cu's launcher (which nvcc alone compiles): the same checks and
// plans, the kernels run by the host emulator (cuda_runtime.h here).
#include "../gate.cuh"
#include "../gate_grouped.cuh"
#include "../gate_launch.h"
#include "../gate_wide.cuh"

namespace moe_route::cuda {
namespace detail {
constexpr size_t kEmuSmemBytes =
    size_t(kSmemPerBlock) > kWideMaxSmemBytes ? size_t(kSmemPerBlock) : kWideMaxSmemBytes;
alignas(16) uint32_t gate_smem[kEmuSmemBytes / sizeof(uint32_t)];
}  // namespace detail

cudaError_t launch_topk_gate(const GateParams& p, cudaStream_t) {
  if (p.T <= 0) return cudaSuccess;
  if (!gate_args_ok(p)) return cudaErrorInvalidValue;
  if (p.E > detail::kMaxExperts) {
    const detail::WideKernel kernel = detail::select_wide_kernel(p);
    const cudaError_t opt_in =
        detail::wide_opt_in(kernel, detail::wide_smem_bytes(p), emu::kOptInMaxDynamicSmem);
    if (opt_in != cudaSuccess) return opt_in;
    const detail::WidePlan plan =
        detail::plan_topk_gate_wide(p, emu::sm_count(), emu::resident_warps() / kWideWarps);
    emu::launch(plan.blocks, detail::kWideThreads, true, [&] { kernel(p, plan); },
                {detail::gate_smem, sizeof(detail::gate_smem), plan.smem_bytes,
                 reinterpret_cast<const void*>(kernel)});
    return cudaSuccess;
  }
  if (detail::runs_grouped_build(p)) {
    const detail::GroupedKernel kernel = detail::grouped_kernel_for_type(p.logit_type);
    const int threads = int(p.n_group) * 32;
    const detail::GroupedPlan plan =
        detail::plan_topk_gate_grouped(p, emu::sm_count(), emu::resident_warps() / (threads / 32));
    emu::launch(plan.blocks, threads, true, [&] { kernel(p, plan); },
                {detail::gate_smem, sizeof(detail::gate_smem), plan.smem_bytes,
                 reinterpret_cast<const void*>(kernel)});
    return cudaSuccess;
  }
  const detail::GateKernel kernel = detail::select_kernel(p);
  const auto occupancy = [](detail::GateKernel, int threads, size_t) {
    return emu::resident_warps() / (threads / 32);
  };
  const detail::GatePlan plan = detail::plan_for_device(p, emu::sm_count(), kernel, occupancy);
  emu::launch(plan.blocks, plan.warps_per_block * 32, true, [&] { kernel(p, plan); },
              {detail::gate_smem, sizeof(detail::gate_smem), plan.smem_bytes});
  return cudaSuccess;
}

}  // namespace moe_route::cuda
