// Emulated twin of csrc/cuda/gate.cu's launcher (which nvcc alone compiles): the same checks and
// plan, the kernel run by the host emulator (cuda_runtime.h here).
#include "../gate.cuh"
#include "../gate_launch.h"

namespace moe_route::cuda {
namespace detail {
alignas(16) uint32_t gate_smem[kSmemPerBlock / sizeof(uint32_t)];
}  // namespace detail

cudaError_t launch_topk_gate(const GateParams& p, cudaStream_t) {
  if (p.T <= 0) return cudaSuccess;
  if (!detail::gate_args_ok(p)) return cudaErrorInvalidValue;
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
