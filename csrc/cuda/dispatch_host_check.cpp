// Runs the CUDA permute and unpermute kernels of dispatch.cuh on the host, thread by thread (the
// CUDA names come from host_shim/), with the launchers' own geometry, against a plain host
// implementation of the reference semantics (moe_route/reference.py). Neither kernel has threads
// that cooperate, so running the CUDA threads one after another computes what the GPU computes.
// This is what CI, which has no GPU, can check of those kernels beyond compiling them; the GPU
// self-test (dispatch_selftest.cu) covers the plan kernels and the real launches.
//
// Permute must match bit for bit; unpermute too, as both sides multiply and add in fp32 in slot
// order (built with -ffp-contract=off, as __fmul_rn / __fadd_rn are never contracted on the GPU).
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/dispatch.cuh"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// The plan kernels' dynamic shared memory: declared in dispatch.cuh, never used here.
namespace moe_route::cuda::detail {
alignas(16) uint32_t hist_smem[1];
alignas(16) int64_t part[1];
alignas(16) int64_t cur_smem[1];
}  // namespace moe_route::cuda::detail

namespace {

using moe_route::ElemType;
using moe_route::PermuteParams;
using moe_route::UnpermuteParams;
namespace detail = moe_route::cuda::detail;

template <class Kernel>
void launch(int grid, Kernel&& kernel) {
  gridDim.x = unsigned(grid);
  blockDim.x = unsigned(detail::kRowThreads);
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < detail::kRowThreads; ++t) {
      blockIdx.x = unsigned(b);
      threadIdx.x = unsigned(t);
      kernel();
    }
}

// A plan with the reference semantics: stable counting sort by expert, each expert's rows padded
// to a multiple of bs, ids outside [0, E) dropped.
struct Plan {
  std::vector<int64_t> row_slot, slot_row;
};

Plan make_plan(const std::vector<int64_t>& ids, int64_t T, int64_t k, int64_t E, int64_t bs) {
  std::vector<int64_t> counts(E, 0), cur(E, 0);
  for (int64_t e : ids)
    if (e >= 0 && e < E) ++counts[e];
  for (int64_t e = 1; e < E; ++e) cur[e] = cur[e - 1] + (counts[e - 1] + bs - 1) / bs * bs;
  Plan p{std::vector<int64_t>(T * k + E * (bs - 1), -1), std::vector<int64_t>(T * k, -1)};
  for (int64_t s = 0; s < T * k; ++s) {
    const int64_t e = ids[s];
    if (e < 0 || e >= E) continue;
    p.row_slot[cur[e]] = s;
    p.slot_row[s] = cur[e]++;
  }
  return p;
}

// A buffer whose data starts `shift` bytes past a 16-byte boundary, filled with `fill`.
struct Buffer {
  std::vector<uint8_t> bytes;
  uint8_t* data;
  Buffer(size_t n, int64_t shift, uint8_t fill) : bytes(n + 32, fill) {
    data = bytes.data() + (16 - reinterpret_cast<uintptr_t>(bytes.data()) % 16) % 16 + shift;
  }
};

float load(const uint8_t* p, ElemType type) {
  if (type == ElemType::F32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  if (type == ElemType::BF16) return __bfloat162float(__nv_bfloat16{h});
  __half half;
  std::memcpy(&half.v, &h, 2);
  return __half2float(half);
}

void store(uint8_t* p, float v, ElemType type) {
  if (type == ElemType::F32) {
    std::memcpy(p, &v, 4);
  } else if (type == ElemType::BF16) {
    const uint16_t h = __float2bfloat16_rn(v).bits;
    std::memcpy(p, &h, 2);
  } else {
    const _Float16 h = __float2half_rn(v).v;
    std::memcpy(p, &h, 2);
  }
}

struct Case {
  int64_t T, k, E, bs, H, x_pad, shift;  // shift: bytes off 16-byte alignment of x and y
};

bool check_permute(const Case& c, const Plan& plan, int eb, std::mt19937& rng) {
  const int64_t R = int64_t(plan.row_slot.size()), stride = c.H + c.x_pad;
  Buffer x(size_t(c.T * stride * eb), c.shift * eb, 0);
  for (size_t i = 0; i < size_t(c.T * stride * eb); ++i) x.data[i] = uint8_t(rng());
  Buffer out(size_t(R * c.H * eb), 0, 0x33);
  PermuteParams p;
  p.x = x.data;
  p.row_slot = plan.row_slot.data();
  p.slot_row = plan.slot_row.data();
  p.out = out.data;
  p.T = c.T, p.H = c.H, p.R = R, p.k = c.k, p.x_row_stride = stride, p.elem_bytes = eb;
  if (R > 0 && c.H > 0) {
    const detail::RowLaunch g = detail::permute_launch(p);
    launch(g.grid, [&] {
      switch (g.vec) {
        case 16: detail::permute_kernel<16>(p, g.tpr, g.n_vec); break;
        case 8: detail::permute_kernel<8>(p, g.tpr, g.n_vec); break;
        case 4: detail::permute_kernel<4>(p, g.tpr, g.n_vec); break;
        default: detail::permute_kernel<2>(p, g.tpr, g.n_vec); break;
      }
    });
  }
  int64_t bad = 0;
  const int64_t row_bytes = c.H * eb;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t s = plan.row_slot[r];
    for (int64_t b = 0; b < row_bytes; ++b)
      bad += out.data[r * row_bytes + b] != (s >= 0 ? x.data[(s / c.k) * stride * eb + b] : 0);
  }
  for (int64_t b = R * row_bytes; b < R * row_bytes + 16; ++b) bad += out.data[b] != 0x33;
  if (bad) std::printf("  permute elem_bytes=%d: %lld bytes differ\n", eb, (long long)bad);
  return bad == 0;
}

template <typename T>
void run_unpermute(const UnpermuteParams& p) {
  constexpr int kVec = int(16 / sizeof(T));
  const detail::RowLaunch g = detail::unpermute_launch<T>(p);
  launch(g.grid, [&] {
    if (g.vec == kVec)
      detail::unpermute_kernel<T, kVec>(p, g.tpr, g.n_vec);
    else
      detail::unpermute_kernel<T, 1>(p, g.tpr, g.n_vec);
  });
}

bool check_unpermute(const Case& c, const Plan& plan, ElemType type, std::mt19937& rng) {
  const int eb = type == ElemType::F32 ? 4 : 2;
  const int64_t R = int64_t(plan.row_slot.size());
  std::normal_distribution<float> normal;
  Buffer y(size_t(R * c.H * eb), c.shift * eb, 0);
  for (int64_t i = 0; i < R * c.H; ++i) store(y.data + i * eb, normal(rng), type);
  std::vector<float> w(size_t(c.T * c.k));
  for (float& v : w) v = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
  Buffer out(size_t(c.T * c.H * eb), c.shift * eb, 0x33);
  UnpermuteParams p;
  p.y = y.data;
  p.type = type;
  p.slot_row = plan.slot_row.data();
  p.weights = w.data();
  p.out = out.data;
  p.T = c.T, p.k = c.k, p.H = c.H, p.R = R;
  if (c.T > 0 && c.H > 0) {
    switch (type) {
      case ElemType::F32: run_unpermute<float>(p); break;
      case ElemType::F16: run_unpermute<__half>(p); break;
      case ElemType::BF16: run_unpermute<__nv_bfloat16>(p); break;
    }
  }
  int64_t bad = 0;
  uint8_t want[4];
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t h = 0; h < c.H; ++h) {
      float acc = 0.f;
      for (int64_t j = 0; j < c.k; ++j) {
        const int64_t r = plan.slot_row[t * c.k + j];
        if (r >= 0) acc = acc + load(y.data + (r * c.H + h) * eb, type) * w[t * c.k + j];
      }
      store(want, acc, type);
      bad += std::memcmp(want, out.data + (t * c.H + h) * eb, size_t(eb)) != 0;
    }
  for (int64_t b = c.T * c.H * eb; b < c.T * c.H * eb + 16; ++b) bad += out.data[b] != 0x33;
  if (bad) std::printf("  unpermute type=%d: %lld elements differ\n", int(type), (long long)bad);
  return bad == 0;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {1, 8, 256, 1, 7168, 0, 0},   {0, 2, 8, 4, 64, 0, 0},     {37, 3, 5, 1, 1, 0, 0},
      {64, 8, 64, 16, 72, 8, 0},    {33, 2, 8, 128, 31, 1, 1},  {200, 4, 16, 1, 1000, 24, 0},
      {5, 1, 3, 7, 4096, 0, 0},     {300, 8, 32, 1, 2048, 0, 0}, {3, 2, 1000, 4, 8, 0, 0},
      {129, 6, 7, 3, 40, 2, 2},
  };
  std::mt19937 rng(7);
  bool all = true;
  for (const Case& c : cases) {
    std::vector<int64_t> ids(size_t(c.T * c.k));
    for (int64_t& e : ids) {  // 5% dropped (-1), 3% expert-parallel sentinels (>= E)
      const uint32_t u = rng() % 100;
      e = u < 5 ? -1 : u < 8 ? c.E + int64_t(rng() % 3) : int64_t(rng() % uint32_t(c.E));
    }
    const Plan plan = make_plan(ids, c.T, c.k, c.E, c.bs);
    bool ok = true;
    for (int eb : {4, 2}) ok &= check_permute(c, plan, eb, rng);
    for (ElemType t : {ElemType::F32, ElemType::F16, ElemType::BF16})
      ok &= check_unpermute(c, plan, t, rng);
    std::printf("%s T=%lld k=%lld E=%lld block=%lld H=%lld x_pad=%lld shift=%lld\n",
                ok ? "ok  " : "FAIL", (long long)c.T, (long long)c.k, (long long)c.E,
                (long long)c.bs, (long long)c.H, (long long)c.x_pad, (long long)c.shift);
    all &= ok;
  }
  std::printf("%s\n", all ? "PASSED" : "FAILED");
  return all ? 0 : 1;
}
