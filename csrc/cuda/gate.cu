// Launcher of the CUDA topk_gate kernels: picks the VPT tier from E and the grid from T and the SM
// count, then enqueues one kernel on the caller's stream.
#include <atomic>

#include "gate.cuh"
#include "gate_launch.h"

namespace moe_route::cuda {
namespace {

constexpr int kMaxCachedDevices = 64;

// cudaDeviceGetAttribute is cheap, but this sits on the per-call path of a decode-sized op.
int sm_count_of(int device) {
  static std::atomic<int> cache[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int n = cache[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();  // do not leave the failed query's status for the launch check
    return 1;  // still correct, just a smaller grid
  }
  if (cacheable) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace

cudaError_t launch_topk_gate(const GateParams& p, cudaStream_t stream) {
  if (p.T <= 0) return cudaSuccess;
  if (p.E < 1 || p.E > detail::kMaxExperts || p.k < 1 || p.k > p.E) return cudaErrorInvalidValue;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const detail::GatePlan plan = detail::plan_topk_gate(p, sm_count_of(device));
  const detail::GateKernel kernel = detail::select_kernel(plan.vpt, p.logit_type);
  kernel<<<plan.blocks, plan.warps_per_block * 32, plan.smem_bytes, stream>>>(p, plan);
  return cudaGetLastError();
}

}  // namespace moe_route::cuda
