// Host shim of the CUDA names that csrc/cuda/dispatch.cuh uses, for dispatch_host_check.cpp:
// the kernels compile as plain C++ and run thread by thread on the host. Only kernels without
// cooperation between threads (no barrier, shuffle, vote or atomic: permute, unpermute) can run
// this way; the cooperative intrinsics abort if reached.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// The emulated thread: set by the launcher before each call of a kernel function.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef struct CUstream_st* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <class T>
inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }

[[noreturn]] inline void moe_route_host_shim_cooperative() { std::abort(); }
inline void __syncthreads() { moe_route_host_shim_cooperative(); }
inline void __syncwarp(unsigned = 0) { moe_route_host_shim_cooperative(); }
inline unsigned __match_any_sync(unsigned, long long) { moe_route_host_shim_cooperative(); }
template <class T>
inline T __shfl_sync(unsigned, T, int, int = 32) { moe_route_host_shim_cooperative(); }
template <class T>
inline T __shfl_up_sync(unsigned, T, unsigned, int = 32) { moe_route_host_shim_cooperative(); }
template <class T, class U>
inline T atomicAdd(T*, U) { moe_route_host_shim_cooperative(); }
