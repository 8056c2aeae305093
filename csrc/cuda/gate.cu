// Launcher of the CUDA topk_gate kernels: picks the kernel from E and the features used (a warp
// per token up to 1024 experts, a CTA per token beyond, and a CTA per token of a warp per group
// for decode-sized calls of group-limited routers: gate_grouped.cuh), the grid from T, the SM
// count and the kernel's occupancy, then enqueues it on the caller's stream (a programmatic
// dependent launch on sm_90+: pdl.cuh).
#include <array>
#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

#include "gate.cuh"
#include "gate_grouped.cuh"
#include "gate_launch.h"
#include "gate_wide.cuh"
#include "pdl.cuh"

namespace moe_route::cuda {
namespace {

constexpr int kMaxCachedDevices = 64;

// A positive attribute of the device, or `fallback` if the query fails. cudaDeviceGetAttribute is
// cheap, but this sits on the per-call path of a decode-sized op.
template <cudaDeviceAttr kAttr>
int device_attribute(int device, int fallback) {
  static std::atomic<int> cache[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int n = cache[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, kAttr, device) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();  // do not leave the failed query's status for the launch check
    return fallback;
  }
  if (cacheable) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

int sm_count_of(int device) {  // 1 if unknown: still correct, just a smaller grid
  return device_attribute<cudaDevAttrMultiProcessorCount>(device, 1);
}

// Blocks of `threads` threads and `smem` bytes that fit on one SM (0 if unknown). Cached: the
// answer depends only on the arguments and the device, and the launch of a decode-sized op should
// not pay for the query every time.
int blocks_per_sm(int device, const void* kernel, int threads, size_t smem) {
  struct Entry {
    int device = -1;
    const void* kernel = nullptr;
    int threads = 0;
    size_t smem = 0;
    int blocks = 0;
  };
  static std::mutex mu;
  static std::array<Entry, 32> cache;
  static size_t next = 0;
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.device == device && e.threads == threads && e.smem == smem)
      return e.blocks;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // plan for the default; correct either way
  }
  cache[next] = Entry{device, kernel, threads, smem, n};
  next = (next + 1) % cache.size();
  return n;
}

// detail::wide_opt_in, once per build and device: cudaFuncSetAttribute has been seen to wait for
// pending host-device copies, so it stays off the per-call path. Every call of a build opts in to
// the same size, so the first one's stands for all.
cudaError_t wide_opt_in_once(int device, detail::WideKernel kernel, size_t smem, size_t limit) {
  if (smem <= size_t(detail::kSmemPerBlock) || smem > limit)
    return detail::wide_opt_in(kernel, smem, limit);  // nothing to do, or the refusal
  static std::mutex mu;
  static std::vector<std::pair<int, detail::WideKernel>> done;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& d : done)
    if (d.first == device && d.second == kernel) return cudaSuccess;
  const cudaError_t err = detail::wide_opt_in(kernel, smem, limit);
  if (err == cudaSuccess) done.emplace_back(device, kernel);
  return err;
}

}  // namespace

cudaError_t launch_topk_gate(const GateParams& p, cudaStream_t stream) {
  if (p.T <= 0) return cudaSuccess;
  if (!gate_args_ok(p)) return cudaErrorInvalidValue;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (p.E > detail::kMaxExperts) {
    const detail::WideKernel kernel = detail::select_wide_kernel(p);
    const size_t smem = detail::wide_smem_bytes(p);
    const int smem_limit = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(
        device, int(detail::kSmemPerBlock));
    const cudaError_t opt_in = wide_opt_in_once(device, kernel, smem, size_t(smem_limit));
    if (opt_in != cudaSuccess) return opt_in;
    const int per_sm =
        blocks_per_sm(device, reinterpret_cast<const void*>(kernel), detail::kWideThreads, smem);
    const detail::WidePlan plan = detail::plan_topk_gate_wide(p, sm_count_of(device), per_sm);
    return launch_kernel(kernel, plan.blocks, detail::kWideThreads, plan.smem_bytes, stream, p,
                         plan);
  }
  if (detail::runs_grouped_build(p)) {
    const detail::GroupedKernel kernel = detail::grouped_kernel_for_type(p.logit_type);
    const int threads = int(p.n_group) * 32;
    const int per_sm = blocks_per_sm(device, reinterpret_cast<const void*>(kernel), threads,
                                     detail::grouped_layout(p).smem_bytes);
    const detail::GroupedPlan plan = detail::plan_topk_gate_grouped(p, sm_count_of(device), per_sm);
    return launch_kernel(kernel, plan.blocks, threads, plan.smem_bytes, stream, p, plan);
  }
  const detail::GateKernel kernel = detail::select_kernel(p);
  const auto occupancy = [device](detail::GateKernel f, int threads, size_t smem) {
    return blocks_per_sm(device, reinterpret_cast<const void*>(f), threads, smem);
  };
  const detail::GatePlan plan = detail::plan_for_device(p, sm_count_of(device), kernel, occupancy);
  return launch_kernel(kernel, plan.blocks, plan.warps_per_block * 32, plan.smem_bytes, stream, p,
                       plan);
}

}  // namespace moe_route::cuda
