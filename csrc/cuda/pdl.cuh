// Programmatic dependent launch (PDL, sm_90 and later) for every moe_route kernel.
//
// launch_kernel enqueues a kernel with programmatic stream serialisation: the GPU may launch it
// (schedule its blocks, set up its parameters) while the kernel before it in the stream still
// runs, once that one has called allow_dependent_launch() in every block or finished. At decode
// sizes the launch is a good part of a call's time; the fastest routers do the same
// (../shared/research/kernel_anchors.md, section 9).
//
// In return, every kernel calls wait_for_prior_grids() before it touches global memory, reads
// and writes alike (prefetches too, which could leave a stale line in L1). It returns once the
// kernels before it have finished and their writes are visible, so the kernel reads their
// outputs and overwrites nothing they still read. Right after it, each kernel calls
// allow_dependent_launch(): that only lets the next PDL launch start early, and that kernel in
// turn waits in its own wait_for_prior_grids() for this one's end.
//
// A launch without the attribute (MOE_ROUTE_PDL=0, a build for an arch before sm_90, the host
// emulator, which runs kernels one after another) makes both calls return at once.
#pragma once
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#include <cstdlib>
#include <mutex>
#include <vector>
#endif

namespace moe_route::cuda {

// Waits until the kernels this one depends on have finished and their writes are visible.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream, if it is a PDL launch, start launching now.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

#if defined(__CUDACC__)  // the launchers (gate.cu, dispatch.cu); the host emulator has its own

namespace detail {

// PDL unless the environment sets MOE_ROUTE_PDL=0 (read once per process).
inline bool pdl_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("MOE_ROUTE_PDL");
    return v == nullptr || v[0] != '0';
  }();
  return wanted;
}

// Whether `kernel` waits for prior grids as the current device runs it: whether it was compiled
// for sm_90 or later (its PTX version). The default builds hold sm_80 and sm_90a machine code
// and compute_80 PTX, which the driver compiles for a later GPU (Blackwell): that build has no
// griddepcontrol and must not be a PDL launch. Cached per device and kernel: this sits on the
// per-call path of decode-sized ops.
inline bool kernel_waits(const void* kernel) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  struct Entry {
    const void* kernel;
    int device;
    bool waits;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;  // a few dozen kernels a device
  const std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.device == device) return e.waits;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no failed query's status for the launch check
    return false;
  }
  const bool waits = attr.ptxVersion >= 90;
  cache.push_back(Entry{kernel, device, waits});
  return waits;
}

}  // namespace detail

// kernel<<<grid, block, smem, stream>>>(args...), a PDL launch where the kernel waits for prior
// grids (detail::kernel_waits) and MOE_ROUTE_PDL is not 0; returns the launch status as
// cudaGetLastError() gives it after a <<<>>> launch.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, const Args&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs =
      detail::pdl_wanted() && detail::kernel_waits(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
  const cudaError_t last = cudaGetLastError();  // also an earlier kernel's error, as before
  return err != cudaSuccess ? err : last;
}

#endif  // __CUDACC__

}  // namespace moe_route::cuda
