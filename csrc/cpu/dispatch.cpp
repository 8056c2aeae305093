// Dispatch on the CPU: plan (stable counting sort by expert), permute, unpermute.
//
// The plan splits the T*k slots into fixed chunks: per-chunk histograms, one prefix pass over
// (expert, chunk), then every chunk writes its rows in slot order, so rows are stable and the
// result is independent of the thread count. unpermute sums each token's k rows in slot order in
// fp32, exactly as the reference does, without atomics.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../dispatch_op.h"

namespace moe_route {
namespace {

constexpr int64_t kPlanChunk = 4096;  // slots per chunk of the plan

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

void permute_cpu(const PermuteParams& p) {
  const int64_t row_bytes = p.H * p.elem_bytes;
  const char* x = static_cast<const char*>(p.x);
  char* out = static_cast<char*>(p.out);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, p.R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = p.row_slot[r];
      char* dst = out + r * row_bytes;
      if (s < 0) std::memset(dst, 0, row_bytes);
      else std::memcpy(dst, x + (s / p.k) * p.x_row_stride * p.elem_bytes, row_bytes);
    }
  });
}

template <typename T>
void unpermute_cpu(const UnpermuteParams& p) {
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.H, k = p.k;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, H * k));
  at::parallel_for(0, p.T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = p.slot_row[t * k + j];
        if (r < 0) continue;
        const float w = p.weights[t * k + j];
        const T* row = y + r * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<float>(row[h]) * w;
      }
      for (int64_t h = 0; h < H; ++h) out[t * H + h] = static_cast<T>(acc[h]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_op(
    const at::Tensor& ids, int64_t num_experts, int64_t block_size) {
  at::Tensor keep;
  PlanParams p;
  auto out = prepare_plan(ids, num_experts, block_size, keep, p);
  plan_cpu(p);
  return out;
}

at::Tensor permute_op(const at::Tensor& x, const at::Tensor& row_slot, int64_t k) {
  at::Tensor keep;
  PermuteParams p;
  at::Tensor out = prepare_permute(x, row_slot, k, keep, p);
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
