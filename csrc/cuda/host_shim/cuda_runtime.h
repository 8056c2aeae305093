// Host emulation of the CUDA names that csrc/cuda uses, so that the kernels and the self-tests
// compile as plain C++ and run on a machine without a GPU (CMake: the *_host_selftest targets and
// their sanitizer builds, which CI runs). emu.cpp implements it:
//   * a cooperative launch runs every thread of a block as an OS thread, blocks one after another;
//     warp collectives (shuffles, votes, __syncwarp) and __syncthreads are barriers among them;
//   * a plain launch (kernels whose threads never cooperate: permute, unpermute) runs the threads
//     one after another in the caller;
//   * device memory is host memory, allocated to the byte; atomics are relaxed host atomics, as on
//     a GPU;
//   * dynamic shared memory is held to a GPU's launch rules (DynamicSmem below): garbage at the
//     start of every block, at most 48 KiB unless the kernel opted in to more
//     (cudaFuncSetAttribute), nothing past the launch's size.
// What this proves is that the kernels compute the right values under CUDA's execution model for
// the thread interleavings the barriers allow; not their speed. The sanitizer builds (CMake option
// MOE_ROUTE_EMU_SANITIZERS) check more: *_asan_selftest reports out-of-bounds and misaligned
// accesses (AddressSanitizer, UBSan; in shared memory too: past the size the launch asked for),
// *_tsan_selftest data races among the threads of a block under CUDA's ordering rules
// (ThreadSanitizer; see emu.cpp). Races between blocks (they run one after another) and among the
// threads of a plain launch stay with compute-sanitizer on a GPU.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// ---- runtime API (device memory is host memory) ----
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
typedef struct CUstream_st* cudaStream_t;
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMalloc(void** p, size_t n);
template <class T>
cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind);
cudaError_t cudaMemset(void* p, int value, size_t n);
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// Records the kernel's dynamic shared memory limit for the launches that name it (DynamicSmem);
// refuses more than emu::kOptInMaxDynamicSmem, an H100's limit.
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);

// ---- the emulator (emu.cpp) ----
namespace emu {
// A launch's dynamic shared memory: the first `bytes` of the emulated `extern __shared__` array
// `base` (of `capacity` bytes) that the kernel declares; `func` the kernel launched. A GPU gives
// every block its own uninitialised copy, refuses a launch asking for more than the default
// 48 KiB unless the kernel opted in to more (cudaFuncSetAttribute), and faults on an access past
// `bytes`; so the emulator fills the `bytes` with garbage before every block, aborts on more than
// func's limit, and under AddressSanitizer poisons the rest of the array for the launch.
struct DynamicSmem {
  void* base = nullptr;
  size_t capacity = 0;
  size_t bytes = 0;
  const void* func = nullptr;  // null: a kernel that never opted in
};
constexpr size_t kDefaultMaxDynamicSmem = 48 * 1024;
constexpr size_t kOptInMaxDynamicSmem = 227 * 1024;
size_t max_dynamic_smem(const void* func);  // kDefaultMaxDynamicSmem unless func opted in
// Runs kernel() for every thread of a grid x block launch; `cooperative`: see above.
template <class Kernel>
void launch(int grid, int block, bool cooperative, Kernel&& kernel, DynamicSmem smem = {});
void run_grid(int grid, int block, bool cooperative, void (*thunk)(void*), void* kernel,
              const DynamicSmem& smem);
uint64_t shuffle(uint64_t value, int src_lane);      // the value of lane src_lane
uint32_t ballot(bool predicate);                     // bit l: lane l's predicate
uint32_t match_any(uint64_t value);                   // lanes whose value equals this lane's
uint32_t reduce_max(uint32_t value);                  // the largest value of the warp
void syncwarp();
void syncthreads();
bool syncthreads_or(bool predicate);  // __syncthreads, and whether any thread's predicate held
int lane();
// Number of SMs the gate launcher plans for (environment MOE_ROUTE_EMU_SMS, default 2).
int sm_count();
// Resident warps per SM the emulated occupancy reports: 12, not the launcher's first guess of 32,
// so that the emulated runs take the re-planned grid.
int resident_warps();

template <class Kernel>
void launch(int grid, int block, bool cooperative, Kernel&& kernel, DynamicSmem smem) {
  run_grid(grid, block, cooperative, [](void* k) { (*static_cast<Kernel*>(k))(); },
           static_cast<void*>(&kernel), smem);
}
}  // namespace emu

// ---- device functions ----
template <class T>
inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline void __syncthreads() { emu::syncthreads(); }
inline int __syncthreads_or(int predicate) { return emu::syncthreads_or(predicate != 0); }
inline int __any_sync(unsigned, int predicate) { return emu::ballot(predicate != 0) != 0u; }
inline unsigned __ballot_sync(unsigned, int predicate) { return emu::ballot(predicate != 0); }
inline unsigned __reduce_max_sync(unsigned, unsigned value) { return emu::reduce_max(value); }
template <class T>
inline unsigned __match_any_sync(unsigned, T value) {
  return emu::match_any(uint64_t(int64_t(value)));
}

namespace emu_detail {
template <class T>
inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
}  // namespace emu_detail

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int base = emu::lane() & ~(width - 1);
  return emu_detail::from_bits<T>(emu::shuffle(emu_detail::bits_of(v), base + (src & (width - 1))));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int l = emu::lane(), src = l ^ mask;
  // Out of the lane's width segment: the lane's own value, as on the GPU.
  const int use = (src & ~(width - 1)) == (l & ~(width - 1)) ? src : l;
  return emu_detail::from_bits<T>(emu::shuffle(emu_detail::bits_of(v), use));
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int l = emu::lane();
  const int use = (l & (width - 1)) >= int(delta) ? l - int(delta) : l;
  return emu_detail::from_bits<T>(emu::shuffle(emu_detail::bits_of(v), use));
}

// Relaxed, as CUDA's atomics are: an atomic orders no other memory access.
template <class T, class U>
inline T atomicAdd(T* address, U value) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T sum = T(old + T(value));
  while (!__atomic_compare_exchange(address, &old, &sum, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    sum = T(old + T(value));
  return old;
}
template <class T>
inline T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange(address, &compare, &value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
