// The host emulator behind cuda_runtime.h (see there).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(addr, size) ASAN_POISON_MEMORY_REGION(addr, size)
#define EMU_UNPOISON(addr, size) ASAN_UNPOISON_MEMORY_REGION(addr, size)
#else
#define EMU_POISON(addr, size) ((void)(addr), (void)(size))
#define EMU_UNPOISON(addr, size) ((void)(addr), (void)(size))
#endif

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return "out of memory";
  }
}

// 256-byte aligned as on a GPU, and exactly n bytes: an AddressSanitizer build (CMake option
// MOE_ROUTE_EMU_SANITIZERS) reports an access one byte past the end.
cudaError_t cudaMalloc(void** p, size_t n) {
  if (posix_memalign(p, 256, n ? n : 1) != 0) *p = nullptr;
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t n) {
  if (n) std::memset(p, value, n);
  return cudaSuccess;
}

namespace {
std::mutex func_attr_mu;
std::vector<std::pair<const void*, size_t>> func_smem_limits;  // kernels that opted in
}  // namespace

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute, int value) {
  if (func == nullptr || value < 0 || size_t(value) > emu::kOptInMaxDynamicSmem)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(func_attr_mu);
  for (auto& entry : func_smem_limits) {
    if (entry.first == func) {
      entry.second = size_t(value);
      return cudaSuccess;
    }
  }
  func_smem_limits.emplace_back(func, size_t(value));
  return cudaSuccess;
}

namespace emu {

size_t max_dynamic_smem(const void* func) {
  std::lock_guard<std::mutex> lock(func_attr_mu);
  for (const auto& entry : func_smem_limits)
    if (entry.first == func) return entry.second;
  return kDefaultMaxDynamicSmem;
}

namespace {

// A barrier of `count` threads that can be used again at once. Waits block (no spinning), so a
// block of 1024 threads runs on two cores; a wait of a minute is a deadlock (threads of one warp
// or block reaching different collectives), reported instead of hanging. It returns whether any
// thread arrived with `vote` set (__syncthreads_or): the last to arrive records it before any
// thread leaves, and no thread can arrive at the next use before every one has read it.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  bool arrive_and_wait(const char* what, bool vote = false) {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    any_ = any_ || vote;
    if (++arrived_ == count_) {
      arrived_ = 0;
      result_ = any_;
      any_ = false;
      ++gen_;
      cv_.notify_all();
      return result_;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "emu: %s deadlock (block %u, thread %u)\n", what, blockIdx.x,
                   threadIdx.x);
      std::abort();
    }
    return result_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long gen_ = 0;
  bool any_ = false, result_ = false;
};

// ThreadSanitizer builds (*_tsan_selftest, CMake option MOE_ROUTE_EMU_SANITIZERS) hold the
// emulator to CUDA's memory model: __syncthreads and __syncwarp order memory among the threads they
// join; shuffles, votes and atomics do not. A warp collective still waits at a barrier, so it hides
// that barrier's synchronisation (and its bookkeeping) from the sanitizer. A lane that reads shared
// memory another lane wrote, with only a shuffle in between, is then reported: it is a race on a
// GPU.
#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char*, int);
extern "C" void AnnotateIgnoreSyncEnd(const char*, int);
extern "C" void AnnotateIgnoreReadsBegin(const char*, int);
extern "C" void AnnotateIgnoreReadsEnd(const char*, int);
extern "C" void AnnotateIgnoreWritesBegin(const char*, int);
extern "C" void AnnotateIgnoreWritesEnd(const char*, int);
void wait_unordered(Barrier& barrier, const char* what) {
  AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  barrier.arrive_and_wait(what);
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
}
#else
void wait_unordered(Barrier& barrier, const char* what) { barrier.arrive_and_wait(what); }
#endif

struct Warp {
  Barrier barrier{32};
  std::atomic<uint64_t> slot[32] = {};  // relaxed: see wait_unordered
};

struct Block {
  explicit Block(int threads) : barrier(threads), warps(size_t(threads / 32)) {}
  Barrier barrier;
  std::vector<Warp> warps;
};

thread_local Block* t_block = nullptr;
thread_local int t_lane = 0;

// The calling thread's block; `what` (a collective or barrier) needs a cooperative launch.
Block& block(const char* what) {
  if (t_block == nullptr) {
    std::fprintf(stderr, "emu: %s in a kernel launched as non-cooperative\n", what);
    std::abort();
  }
  return *t_block;
}

Warp& warp() { return block("a warp collective").warps[threadIdx.x / 32]; }

// One warp collective: every lane posts `value`, then computes its result from all 32 posted
// values (`combine(posted)`, posted(l): lane l's value) before any lane may post again.
template <class Combine>
auto exchange(uint64_t value, const char* what, Combine&& combine) {
  Warp& w = warp();
  w.slot[t_lane].store(value, std::memory_order_relaxed);
  wait_unordered(w.barrier, what);
  const auto result =
      combine([&](int l) { return w.slot[l].load(std::memory_order_relaxed); });
  wait_unordered(w.barrier, what);
  return result;
}

}  // namespace

int lane() { return t_lane; }

uint64_t shuffle(uint64_t value, int src_lane) {
  return exchange(value, "warp shuffle", [&](auto posted) { return posted(src_lane & 31); });
}

uint32_t ballot(bool predicate) {
  return exchange(predicate ? 1u : 0u, "warp vote", [](auto posted) {
    uint32_t bits = 0;
    for (int l = 0; l < 32; ++l) bits |= uint32_t(posted(l) != 0) << l;
    return bits;
  });
}

uint32_t match_any(uint64_t value) {
  return exchange(value, "warp match", [&](auto posted) {
    uint32_t bits = 0;
    for (int l = 0; l < 32; ++l) bits |= uint32_t(posted(l) == value) << l;
    return bits;
  });
}

uint32_t reduce_max(uint32_t value) {
  return exchange(value, "warp reduce", [](auto posted) {
    uint32_t m = 0;
    for (int l = 0; l < 32; ++l) m = std::max(m, uint32_t(posted(l)));
    return m;
  });
}

void syncwarp() { warp().barrier.arrive_and_wait("__syncwarp"); }

void syncthreads() { block("__syncthreads").barrier.arrive_and_wait("__syncthreads"); }

bool syncthreads_or(bool predicate) {
  return block("__syncthreads_or").barrier.arrive_and_wait("__syncthreads_or", predicate);
}

int sm_count() {
  const char* s = std::getenv("MOE_ROUTE_EMU_SMS");
  const int n = s ? std::atoi(s) : 2;
  return n > 0 ? n : 2;
}

int resident_warps() { return 12; }

void run_grid(int grid, int block, bool cooperative, void (*thunk)(void*), void* kernel,
              const DynamicSmem& smem) {
  if (block < 1 || block > 1024 || (cooperative && block % 32 != 0)) {
    std::fprintf(stderr, "emu: block of %d threads\n", block);
    std::abort();
  }
  if (grid < 1) {  // a GPU refuses a launch of 0 blocks (cudaErrorInvalidConfiguration)
    std::fprintf(stderr, "emu: grid of %d blocks\n", grid);
    std::abort();
  }
  const size_t limit = max_dynamic_smem(smem.func);
  if (smem.bytes > limit || smem.bytes > smem.capacity ||
      (smem.bytes > 0 && smem.base == nullptr)) {
    std::fprintf(stderr, "emu: a launch asks for %zu bytes of dynamic shared memory (the "
                 "kernel's limit: %zu, %zu without cudaFuncSetAttribute; %zu emulated)\n",
                 smem.bytes, limit, kDefaultMaxDynamicSmem, smem.capacity);
    std::abort();
  }
  char* const smem_base = static_cast<char*>(smem.base);
  // Past the launch's bytes: an access faults on a GPU, AddressSanitizer reports it here.
  if (smem_base != nullptr) EMU_POISON(smem_base + smem.bytes, smem.capacity - smem.bytes);
  for (int b = 0; b < grid; ++b) {
    // Every block starts with garbage, not with what the previous block left there. Two
    // patterns, block by block: 0xa5 bytes are a negative integer but a float of 3e-16, which
    // a float accumulator read without its zeroing would absorb; 0x7f bytes are a float of
    // 3.4e38 and a large positive integer.
    if (smem_base != nullptr && smem.bytes > 0)
      std::memset(smem_base, b % 2 ? 0x7f : 0xa5, smem.bytes);
    auto set_thread = [&](int t) {
      threadIdx = uint3{unsigned(t), 0, 0};
      blockIdx = uint3{unsigned(b), 0, 0};
      blockDim = dim3(unsigned(block));
      gridDim = dim3(unsigned(grid));
      t_lane = t % 32;
    };
    if (!cooperative) {
      for (int t = 0; t < block; ++t) {
        set_thread(t);
        thunk(kernel);
      }
      continue;
    }
    Block state(block);
    std::vector<std::thread> threads;
    threads.reserve(size_t(block));
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        set_thread(t);
        t_block = &state;
        thunk(kernel);
        t_block = nullptr;
      });
    }
    for (std::thread& th : threads) th.join();
  }
  if (smem_base != nullptr) EMU_UNPOISON(smem_base + smem.bytes, smem.capacity - smem.bytes);
}

}  // namespace emu
