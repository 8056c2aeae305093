// Dispatch on the CPU: plan (stable counting sort by expert), permute, unpermute.
//
// The plan splits the T*k slots into fixed chunks: per-chunk histograms, one prefix pass over
// (expert, chunk), then every chunk writes its rows in slot order, so rows are stable and the
// result is independent of the thread count. unpermute sums each token's k rows in slot order in
// fp32, exactly as the reference does, without atomics.
//
// Memory, not arithmetic, is the cost at large T. The permuted [R, H] output (256 MiB at T=8192,
// k=8, H=1024, fp32) is a fresh allocation on every call, which torch's allocator maps from the
// OS; faulting it in 4 KiB pages cost more than copying the rows into it (about 60 ms against
// 15 ms on the 2-core development machine). Outputs of at least two huge pages are therefore
// advised to use transparent huge pages before their first touch, as torch does for its own
// allocations under THP_MEM_ALLOC_ENABLE=1 (MOE_ROUTE_NO_THP=1 turns this off). Rows are then
// written by the thread that copies them, so both threads fault in their own half.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../dispatch_op.h"
#include "isa.h"
#include "vec.h"

namespace moe_route {
namespace {

constexpr int64_t kPlanChunk = 4096;  // slots per chunk of the plan

// ---------------------------------------------------------------------------------------------
// Fresh outputs: transparent huge pages
// ---------------------------------------------------------------------------------------------

int64_t huge_page_bytes() {
  static const int64_t bytes = [] {
    long v = 0;
    if (std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
      if (std::fscanf(f, "%ld", &v) != 1) v = 0;
      std::fclose(f);
    }
    return static_cast<int64_t>(v > 0 && (v & (v - 1)) == 0 ? v : 0);
  }();
  return bytes;
}

// Advisory only: the data is untouched and a refusal (THP disabled) changes nothing but speed.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t huge = huge_page_bytes();
  if (huge == 0 || bytes < 2 * huge) return;
  const char* off = std::getenv("MOE_ROUTE_NO_THP");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return;
  const uintptr_t mask = static_cast<uintptr_t>(huge) - 1;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + mask) & ~mask;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~mask;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data, (void)bytes;
#endif
}

// ---------------------------------------------------------------------------------------------
// dispatch_plan
// ---------------------------------------------------------------------------------------------

inline int64_t id_at(const PlanParams& p, int64_t s) {
  return p.ids_int64 ? static_cast<const int64_t*>(p.ids)[s]
                     : static_cast<const int32_t*>(p.ids)[s];
}

void plan_cpu(const PlanParams& p) {
  const int64_t n = p.T * p.k, E = p.E;
  std::fill(p.row_slot, p.row_slot + p.R, -1);
  std::fill(p.slot_row, p.slot_row + n, -1);
  const int64_t chunks = std::max<int64_t>(1, (n + kPlanChunk - 1) / kPlanChunk);
  std::vector<int64_t> hist(chunks * E, 0);  // then: each chunk's first row per expert
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * E;
      for (int64_t s = c * kPlanChunk, end = std::min(n, s + kPlanChunk); s < end; ++s) {
        const int64_t e = id_at(p, s);
        if (e >= 0 && e < E) ++h[e];
      }
    }
  });
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.expert_offsets[e] = row;
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = hist[c * E + e];
      hist[c * E + e] = row + total;
      total += count;
    }
    p.counts[e] = total;
    row += (total + p.block_size - 1) / p.block_size * p.block_size;
  }
  p.expert_offsets[E] = row;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = hist.data() + c * E;
      for (int64_t s = c * kPlanChunk, end = std::min(n, s + kPlanChunk); s < end; ++s) {
        const int64_t e = id_at(p, s);
        if (e < 0 || e >= E) continue;
        const int64_t r = next[e]++;
        p.row_slot[r] = s;
        p.slot_row[s] = r;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// permute
// ---------------------------------------------------------------------------------------------

void permute_cpu(const PermuteParams& p) {
  const int64_t row_bytes = p.H * p.elem_bytes;
  const char* x = static_cast<const char*>(p.x);
  char* out = static_cast<char*>(p.out);
  const int64_t rows = p.used_rows ? *p.used_rows : p.R;  // the tail past it stays untouched
  advise_huge_pages(out, rows * row_bytes);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = p.row_slot[r];
      char* dst = out + r * row_bytes;
      if (s < 0) std::memset(dst, 0, row_bytes);
      else std::memcpy(dst, x + (s / p.k) * p.x_row_stride * p.elem_bytes, row_bytes);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// unpermute
// ---------------------------------------------------------------------------------------------

// 8-lane vectors (vec.h): AVX2 or AVX-512VL in those variants, SSE pairs in the baseline. Lanes
// are independent IEEE operations (no FMA: -ffp-contract=off), so every variant computes the
// reference's fp32 values bit for bit.
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

template <typename T>
MOE_ROUTE_INLINE f32x8 load8(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    f32x8 v;
    std::memcpy(&v, src, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    u16x8 h;
    std::memcpy(&h, src, sizeof h);
    return reinterpret_cast<f32x8>(__builtin_convertvector(h, u32x8) << 16);
  } else {
    f32x8 v;
    for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(src[i]);
    return v;
  }
}

template <typename T>
MOE_ROUTE_INLINE void store8(T* dst, f32x8 v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, &v, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
    const u32x8 bits = reinterpret_cast<u32x8>(v);
    const u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const u32x8 nan = reinterpret_cast<u32x8>(vne(v, v));
    const u16x8 h = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), u16x8);
    std::memcpy(dst, &h, sizeof h);
  } else {
    for (int i = 0; i < 8; ++i) dst[i] = static_cast<T>(v[i]);
  }
}

// One token: out[h] = sum over its valid slots j (in order) of rows[j][h] * w[j], fp32.
template <typename T>
MOE_ROUTE_INLINE void combine_token(const T* const* rows, const float* w, int64_t n, int64_t H,
                                    T* out) {
  constexpr int64_t kBlock = 32;  // four 8-lane accumulators
  int64_t h = 0;
  for (; h + kBlock <= H; h += kBlock) {
    f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t j = 0; j < n; ++j) {
      const T* row = rows[j] + h;
      const f32x8 wj = f32x8{} + w[j];
      a0 += load8(row) * wj;
      a1 += load8(row + 8) * wj;
      a2 += load8(row + 16) * wj;
      a3 += load8(row + 24) * wj;
    }
    store8(out + h, a0);
    store8(out + h + 8, a1);
    store8(out + h + 16, a2);
    store8(out + h + 24, a3);
  }
  for (; h + 8 <= H; h += 8) {
    f32x8 a = {};
    for (int64_t j = 0; j < n; ++j) a += load8(rows[j] + h) * (f32x8{} + w[j]);
    store8(out + h, a);
  }
  for (; h < H; ++h) {
    float a = 0.f;
    for (int64_t j = 0; j < n; ++j) a += static_cast<float>(rows[j][h]) * w[j];
    out[h] = static_cast<T>(a);
  }
}

template <typename T>
MOE_ROUTE_INLINE void combine_tokens_body(const UnpermuteParams& p, int64_t t0, int64_t t1) {
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.H, k = p.k;
  std::vector<const T*> rows(k);
  std::vector<float> w(k);
  for (int64_t t = t0; t < t1; ++t) {
    int64_t n = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = p.slot_row[t * k + j];
      if (r < 0) continue;
      rows[n] = y + r * H;
      w[n++] = p.weights[t * k + j];
    }
    combine_token(rows.data(), w.data(), n, H, out + t * H);
  }
}

#if MOE_ROUTE_X86_VARIANTS
template <typename T>
MOE_ROUTE_TARGET_AVX512 void combine_tokens_avx512(const UnpermuteParams& p, int64_t t0,
                                                   int64_t t1) {
  combine_tokens_body<T>(p, t0, t1);
}
template <typename T>
MOE_ROUTE_TARGET_AVX2 void combine_tokens_avx2(const UnpermuteParams& p, int64_t t0, int64_t t1) {
  combine_tokens_body<T>(p, t0, t1);
}
#endif

template <typename T>
void combine_tokens(const UnpermuteParams& p, int64_t t0, int64_t t1) {
#if MOE_ROUTE_X86_VARIANTS
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return combine_tokens_avx512<T>(p, t0, t1);
    case CpuIsa::Avx2: return combine_tokens_avx2<T>(p, t0, t1);
    case CpuIsa::Base: break;
  }
#endif
  combine_tokens_body<T>(p, t0, t1);
}

template <typename T>
void unpermute_cpu(const UnpermuteParams& p) {
  advise_huge_pages(p.out, p.T * p.H * static_cast<int64_t>(sizeof(T)));
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.H * p.k));
  at::parallel_for(0, p.T, grain, [&](int64_t t0, int64_t t1) { combine_tokens<T>(p, t0, t1); });
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_op(
    const at::Tensor& ids, int64_t num_experts, int64_t block_size) {
  at::Tensor keep;
  PlanParams p;
  auto out = prepare_plan(ids, num_experts, block_size, keep, p);
  plan_cpu(p);
  return out;
}

at::Tensor permute_op(const at::Tensor& x, const at::Tensor& row_slot,
                      const at::Tensor& slot_row, int64_t k,
                      const std::optional<at::Tensor>& expert_offsets) {
  at::Tensor keep;
  PermuteParams p;
  at::Tensor out = prepare_permute(x, row_slot, slot_row, k, expert_offsets, keep, p);
  permute_cpu(p);
  return out;
}

at::Tensor unpermute_op(const at::Tensor& y, const at::Tensor& slot_row,
                        const at::Tensor& weights) {
  at::Tensor keep_y, keep_w;
  UnpermuteParams p;
  at::Tensor out = prepare_unpermute(y, slot_row, weights, keep_y, keep_w, p);
  switch (p.type) {
    case ElemType::F32: unpermute_cpu<float>(p); break;
    case ElemType::F16: unpermute_cpu<c10::Half>(p); break;
    case ElemType::BF16: unpermute_cpu<c10::BFloat16>(p); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_route, CPU, m) {
  m.impl("dispatch_plan", &dispatch_plan_op);
  m.impl("permute", &permute_op);
  m.impl("unpermute", &unpermute_op);
}

}  // namespace moe_route
