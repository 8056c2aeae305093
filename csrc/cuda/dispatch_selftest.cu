// Standalone self-test of the CUDA dispatch kernels (torch-free): builds ids with sentinels (-1,
// >= E), runs launch_dispatch_plan / launch_permute / launch_unpermute and compares with a plain
// host re-implementation of moe_route/reference.py ("Dispatch") written independently of the
// kernels.
//
//   nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80
//        -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
//        csrc/cuda/dispatch_selftest.cu csrc/cuda/dispatch.cu -o /tmp/dispatch_selftest
//   /tmp/dispatch_selftest
//
// Exit status 0 when every case passes. Plan and permute must match exactly; unpermute must match
// the host's fp32 "round the product, round the sum, j order" loop bit for bit (the kernel uses
// __fmul_rn/__fadd_rn), which implies the rtol 1e-6 the brief asks for.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dispatch_launch.h"
#include "selftest_util.h"

using moe_route::ElemType;
using moe_route::PermuteParams;
using moe_route::PlanParams;
using moe_route::UnpermuteParams;

namespace {

using namespace selftest;  // NOLINT: the test helpers of selftest_util.h

// ---- Host reference of dispatch_plan ----
struct Plan {
  std::vector<int64_t> row_slot, offsets, counts, slot_row;
};

Plan host_plan(const std::vector<int64_t>& ids, int64_t T, int64_t k, int64_t E, int64_t bs) {
  Plan p;
  const int64_t N = T * k, R = N + E * (bs - 1);
  p.counts.assign(E, 0);
  for (int64_t s = 0; s < N; ++s)
    if (ids[s] >= 0 && ids[s] < E) ++p.counts[ids[s]];
  p.offsets.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    p.offsets[e + 1] = p.offsets[e] + (p.counts[e] + bs - 1) / bs * bs;
  p.row_slot.assign(R, -1);
  p.slot_row.assign(N, -1);
  std::vector<int64_t> cursor(p.offsets.begin(), p.offsets.end() - 1);
  for (int64_t s = 0; s < N; ++s) {  // slot order: stable
    if (ids[s] < 0 || ids[s] >= E) continue;
    const int64_t r = cursor[ids[s]]++;
    p.row_slot[r] = s;
    p.slot_row[s] = r;
  }
  return p;
}

int g_failures = 0;

template <typename T>
bool same(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  if (a.size() != b.size()) {
    std::printf("  FAIL %s: size %zu vs %zu\n", what.c_str(), a.size(), b.size());
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) {
      std::printf("  FAIL %s: first mismatch at %zu: %lld vs %lld\n", what.c_str(), i,
                  (long long)a[i], (long long)b[i]);
      return false;
    }
  }
  return true;
}

struct Case {
  const char* name;
  int64_t T, k, E, bs, H;
  bool ids_int64;
  int64_t x_pad;  // x row stride = H + x_pad (elements); odd: x and row_slot 8 bytes off 16
  uint32_t seed;
  bool one_cta;  // the one-launch plan (no workspace) is expected; checked when T*k > 0
};

// Plan + permute + unpermute for one shape; elem: 4 = fp32, 2 = bf16 (and fp16 for unpermute).
void run_case(const Case& c) {
  std::printf("case %s: T=%lld k=%lld E=%lld block=%lld H=%lld ids=%s\n", c.name, (long long)c.T,
              (long long)c.k, (long long)c.E, (long long)c.bs, (long long)c.H,
              c.ids_int64 ? "int64" : "int32");
  bool ok = true;
  std::mt19937 rng(c.seed);
  const int64_t N = c.T * c.k, R = N + c.E * (c.bs - 1);
  std::vector<int64_t> ids(N);
  for (int64_t s = 0; s < N; ++s) {
    const uint32_t u = rng() % 100;
    ids[s] = u < 5 ? -1 : u < 9 ? c.E + int64_t(rng() % 3) : int64_t(rng() % uint32_t(c.E));
  }
  // Skewed block: make one expert hot so that several tiles share it.
  for (int64_t s = 0; s < N / 3; ++s) if (rng() % 2) ids[s] = 0;

  // ---- plan ----
  const Plan ref = host_plan(ids, c.T, c.k, c.E, c.bs);
  void* d_ids;
  if (c.ids_int64) {
    d_ids = to_device(ids);
  } else {
    std::vector<int32_t> i32(ids.begin(), ids.end());
    d_ids = to_device(i32);
  }
  // Garbage first: every output element must be written.
  int64_t* d_rs_base = device_filled<int64_t>(R + 1, 0x5a);
  int64_t* d_rs = d_rs_base + c.x_pad % 2;
  int64_t* d_off = device_filled<int64_t>(c.E + 1, 0x5a);
  int64_t* d_cnt = device_filled<int64_t>(c.E, 0x5a);
  int64_t* d_sr = device_filled<int64_t>(N, 0x5a);
  PlanParams pp;
  pp.ids = d_ids;
  pp.ids_int64 = c.ids_int64;
  pp.T = c.T;
  pp.k = c.k;
  pp.E = c.E;
  pp.block_size = c.bs;
  pp.R = R;
  pp.row_slot = d_rs;
  pp.expert_offsets = d_off;
  pp.counts = d_cnt;
  pp.slot_row = d_sr;
  const size_t ws_bytes = moe_route::cuda::dispatch_plan_workspace_bytes(pp);
  void* d_ws = nullptr;
  if (N > 0 && (ws_bytes == 0) != c.one_cta) {
    std::printf("  FAIL plan path: workspace %zu B, expected the %s plan\n", ws_bytes,
                c.one_cta ? "one-launch" : "three-launch");
    ok = false;
  }
  if (ws_bytes) d_ws = device_filled<uint8_t>(ws_bytes, 0x77);
  for (int rep = 0; rep < 2; ++rep) {  // twice: determinism and workspace reuse
    CHECK_CUDA(moe_route::cuda::launch_dispatch_plan(pp, d_ws, ws_bytes, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::string tag = rep ? " (rerun)" : "";
    ok &= same(to_host(d_rs, R), ref.row_slot, "row_slot" + tag);
    ok &= same(to_host(d_off, c.E + 1), ref.offsets, "expert_offsets" + tag);
    ok &= same(to_host(d_cnt, c.E), ref.counts, "counts" + tag);
    ok &= same(to_host(d_sr, N), ref.slot_row, "slot_row" + tag);
  }

  // ---- permute (fp32 and bf16 bit patterns; strided x). Then bf16 with used_rows: the tail
  // past expert_offsets[E] must keep the garbage fill. ----
  const int64_t H = c.H, stride = c.H + c.x_pad;
  const int64_t used = ref.offsets[c.E];
  for (int variant = 0; variant < 3; ++variant) {
    const int eb = variant ? 2 : 4;
    const bool keep_tail = variant == 2;
    std::vector<uint8_t> x(size_t(c.T * stride * eb));
    for (auto& b : x) b = uint8_t(rng());
    // Unaligned base too when x_pad is odd: offset the device pointer by one element.
    const int64_t shift = c.x_pad % 2;
    std::vector<uint8_t> xs(x.size() + size_t(shift * eb));
    if (!x.empty()) std::memcpy(xs.data() + shift * eb, x.data(), x.size());
    uint8_t* d_x = to_device(xs);
    uint8_t* d_out = device_filled<uint8_t>(size_t(R * H * eb), 0x33);
    PermuteParams p;
    p.x = d_x + shift * eb;
    p.row_slot = d_rs;
    p.slot_row = d_sr;
    p.out = d_out;
    p.T = c.T;
    p.H = H;
    p.R = R;
    p.k = c.k;
    p.x_row_stride = stride;
    p.elem_bytes = eb;
    if (keep_tail) {
      p.used_rows = d_off + c.E;
      p.used_bound = N + (c.bs - 1) * std::min(c.E, N);
    }
    CHECK_CUDA(moe_route::cuda::launch_permute(p, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> want(size_t(R * H * eb), 0);
    if (keep_tail) std::fill(want.begin() + used * H * eb, want.end(), uint8_t(0x33));
    for (int64_t r = 0; r < R; ++r)
      if (ref.row_slot[r] >= 0)
        std::memcpy(&want[r * H * eb], &x[(ref.row_slot[r] / c.k) * stride * eb], H * eb);
    ok &= same(to_host(d_out, size_t(R * H * eb)), want,
               std::string("permute elem_bytes=") + std::to_string(eb) +
                   (keep_tail ? " (tail kept)" : ""));
    CHECK_CUDA(cudaFree(d_x));
    CHECK_CUDA(cudaFree(d_out));
  }

  // ---- unpermute: y [R, H] random, weights [T, k] random, for F32 / BF16 / F16 ----
  std::vector<float> w(N);
  for (auto& v : w) v = float(int32_t(rng() % 2001) - 1000) / 997.f;
  float* d_w = to_device(w);
  for (ElemType et : {ElemType::F32, ElemType::BF16, ElemType::F16}) {
    const int eb = et == ElemType::F32 ? 4 : 2;
    std::vector<float> yf(R * H);
    std::vector<uint8_t> yb(size_t(R * H * eb));
    for (int64_t i = 0; i < R * H; ++i) {
      const float v = float(int32_t(rng() % 20001) - 10000) / 1237.f;
      if (et == ElemType::F32) {
        yf[i] = v;
        std::memcpy(&yb[i * 4], &v, 4);
      } else {
        const uint16_t b = et == ElemType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
        yf[i] = et == ElemType::BF16 ? bf16_to_f32(b) : f16_to_f32(b);
        std::memcpy(&yb[i * 2], &b, 2);
      }
    }
    // Padding rows of y hold NaN bit patterns? No: valid slots never point at them, so fill them
    // with a large value that would show up if a dropped slot were read.
    for (int64_t r = 0; r < R; ++r) {
      if (ref.row_slot[r] >= 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        const float big = 1.0e4f;
        if (et == ElemType::F32) std::memcpy(&yb[(r * H + h) * 4], &big, 4);
        else {
          const uint16_t b = et == ElemType::BF16 ? f32_to_bf16(big) : f32_to_f16(big);
          std::memcpy(&yb[(r * H + h) * 2], &b, 2);
        }
      }
    }
    uint8_t* d_y = to_device(yb);
    uint8_t* d_o = device_filled<uint8_t>(size_t(c.T * H * eb), 0x33);
    UnpermuteParams p;
    p.y = d_y;
    p.type = et;
    p.slot_row = d_sr;
    p.weights = d_w;
    p.out = d_o;
    p.T = c.T;
    p.k = c.k;
    p.H = H;
    p.R = R;
    CHECK_CUDA(moe_route::cuda::launch_unpermute(p, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> want(size_t(c.T * H * eb));
    for (int64_t t = 0; t < c.T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        volatile float acc = 0.f;  // volatile: no host contraction / reassociation
        for (int64_t j = 0; j < c.k; ++j) {
          const int64_t r = ref.slot_row[t * c.k + j];
          if (r < 0) continue;
          volatile float prod = yf[r * H + h] * w[t * c.k + j];
          acc = acc + prod;
        }
        const float a = acc;
        if (et == ElemType::F32) std::memcpy(&want[(t * H + h) * 4], &a, 4);
        else {
          const uint16_t b = et == ElemType::BF16 ? f32_to_bf16(a) : f32_to_f16(a);
          std::memcpy(&want[(t * H + h) * 2], &b, 2);
        }
      }
    }
    const char* tn = et == ElemType::F32 ? "f32" : et == ElemType::BF16 ? "bf16" : "f16";
    ok &= same(to_host(d_o, size_t(c.T * H * eb)), want, std::string("unpermute ") + tn);
    CHECK_CUDA(cudaFree(d_y));
    CHECK_CUDA(cudaFree(d_o));
  }
  CHECK_CUDA(cudaFree(d_w));
  CHECK_CUDA(cudaFree(d_ids));
  CHECK_CUDA(cudaFree(d_rs_base));
  CHECK_CUDA(cudaFree(d_off));
  CHECK_CUDA(cudaFree(d_cnt));
  CHECK_CUDA(cudaFree(d_sr));
  if (d_ws) CHECK_CUDA(cudaFree(d_ws));
  std::printf("  %s\n", ok ? "ok" : "FAILED");
  if (!ok) ++g_failures;
}

// A plan whose slot_row holds indices outside [0, R) (a corrupted or mismatched plan): permute
// and unpermute must skip them as dropped slots and touch nothing outside their tensors. out and
// y are allocated with kGuard rows past R, filled with a pattern that must survive: an index of
// R + i would land there if followed. The other indices (INT64_MAX, INT64_MIN, -2) would fault,
// or trip the sanitizers.
void run_bad_index_case() {
  std::printf("case bad_indices: slot_row entries outside [0, R)\n");
  bool ok = true;
  const int64_t T = 40, k = 4, E = 8, bs = 4, H = 24, N = T * k, R = N + E * (bs - 1);
  const int64_t kGuard = 16;
  std::mt19937 rng(99);
  std::vector<int64_t> ids(N);
  for (auto& id : ids) id = int64_t(rng() % E);
  Plan plan = host_plan(ids, T, k, E, bs);
  const int64_t bad[] = {R, R + 1, R + kGuard - 1, INT64_MAX, INT64_MIN, -2};
  std::vector<bool> corrupt(N, false);
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); ++i) {
    const int64_t s = int64_t(i) * 7 + 3;
    plan.slot_row[s] = bad[i];
    corrupt[s] = true;
  }
  int64_t* d_rs = to_device(plan.row_slot);
  int64_t* d_sr = to_device(plan.slot_row);

  // permute (fp32): rows fed by intact slots hold their token's row, padding rows zeros; the rows
  // the corrupted slots fed are left unspecified; the guard keeps its pattern.
  std::vector<float> x(T * H);
  for (auto& v : x) v = float(int32_t(rng() % 2001) - 1000);
  float* d_x = to_device(x);
  float* d_out = device_filled<float>(size_t((R + kGuard) * H), 0x33);
  PermuteParams pp;
  pp.x = d_x;
  pp.row_slot = d_rs;
  pp.slot_row = d_sr;
  pp.out = d_out;
  pp.T = T, pp.H = H, pp.R = R, pp.k = k, pp.x_row_stride = H, pp.elem_bytes = 4;
  CHECK_CUDA(moe_route::cuda::launch_permute(pp, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> out = to_host(d_out, size_t((R + kGuard) * H));
  float pattern;
  std::memset(&pattern, 0x33, sizeof pattern);
  for (int64_t r = 0; r < R + kGuard && ok; ++r) {
    const int64_t s = r < R ? plan.row_slot[r] : -1;
    if (s >= 0 && corrupt[s]) continue;
    for (int64_t h = 0; h < H; ++h) {
      const float want = r >= R ? pattern : s < 0 ? 0.f : x[(s / k) * H + h];
      if (std::memcmp(&out[r * H + h], &want, 4) != 0) {
        std::printf("  FAIL permute: row %lld (%s) element %lld\n", (long long)r,
                    r >= R ? "guard past R" : "intact", (long long)h);
        ok = false;
        break;
      }
    }
  }

  // unpermute (fp32): the host loop without the corrupted slots; y's guard rows hold a large
  // value that would show in the sum if an index of R + i were followed.
  std::vector<float> y((R + kGuard) * H), w(N);
  for (auto& v : y) v = float(int32_t(rng() % 2001) - 1000) / 977.f;
  for (int64_t i = R * H; i < (R + kGuard) * H; ++i) y[i] = 1.0e6f;
  for (auto& v : w) v = float(int32_t(rng() % 2001) - 1000) / 997.f;
  float* d_y = to_device(y);
  float* d_w = to_device(w);
  float* d_o = device_filled<float>(size_t(T * H), 0x33);
  UnpermuteParams up;
  up.y = d_y;
  up.type = ElemType::F32;
  up.slot_row = d_sr;
  up.weights = d_w;
  up.out = d_o;
  up.T = T, up.k = k, up.H = H, up.R = R;  // y's rows: the guard is not part of y
  CHECK_CUDA(moe_route::cuda::launch_unpermute(up, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> want(T * H);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      volatile float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = plan.slot_row[t * k + j];
        if (r < 0 || r >= R) continue;
        volatile float prod = y[r * H + h] * w[t * k + j];
        acc = acc + prod;
      }
      want[t * H + h] = acc;
    }
  }
  const std::vector<float> got = to_host(d_o, size_t(T * H));
  if (std::memcmp(got.data(), want.data(), want.size() * 4) != 0) {
    std::printf("  FAIL unpermute: differs from the sum over the intact slots\n");
    ok = false;
  }
  for (void* d : {(void*)d_rs, (void*)d_sr, (void*)d_x, (void*)d_out, (void*)d_y, (void*)d_w,
                  (void*)d_o})
    CHECK_CUDA(cudaFree(d));
  std::printf("  %s\n", ok ? "ok" : "FAILED");
  if (!ok) ++g_failures;
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("no CUDA device\n");
    return 2;
  }
  const Case cases[] = {
      {"tiny", 1, 1, 1, 1, 8, false, 0, 1, true},
      {"T300_k8_E64", 300, 8, 64, 1, 256, true, 0, 2, false},
      {"T257_k4_E60_b16", 257, 4, 60, 16, 100, false, 3, 3, true},  // odd stride: narrow copies
      {"T0", 0, 4, 16, 8, 64, true, 0, 4, true},
      {"H_odd", 33, 3, 7, 4, 7, false, 1, 5, true},
      {"many_tiles_E8", 4000, 8, 8, 1, 16, true, 0, 6, false},        // G > 1 column groups
      {"E4096", 700, 8, 4096, 2, 32, false, 0, 7, false},             // one warp per CTA, per = 4
      {"E1500", 2000, 6, 1500, 1, 8, true, 0, 8, false},              // E > scan threads
      {"k12", 150, 12, 40, 1, 24, true, 0, 9, true},                  // unpermute: slots past 8
      {"decode_E256", 64, 8, 256, 1, 64, false, 0, 10, true},         // one CTA: 16 tiles of 32
      {"one_cta_full", 256, 8, 128, 1, 16, true, 0, 11, true},        // T*k = kOneCtaMaxSlots
      {"one_cta_E4096", 64, 8, 4096, 1, 16, false, 0, 12, true},      // one tile warp, per = 4
      {"one_cta_E1500", 300, 6, 1500, 3, 8, true, 0, 13, true},       // 3 tile warps, E > 1024
      {"small_N_big_R", 8, 8, 256, 129, 16, false, 0, 14, false},     // R > kOneCtaMaxRows;
                                                                      // permute's fill strides
      {"decode_b64", 64, 8, 256, 64, 16, true, 1, 16, true},          // R = 16640 in one CTA
      {"just_past_one_cta", 257, 8, 128, 1, 16, true, 1, 15, false},  // T*k = 2056
      {"split_T5_k8", 5, 8, 64, 4, 300, false, 1, 17, true},          // permute: item per slot
      {"split_T31_k6", 31, 6, 16, 1, 40, true, 0, 18, true},          // ... at its last T
  };
  for (const Case& c : cases) run_case(c);
  run_bad_index_case();
  std::printf("%s (%d failing case%s)\n", g_failures ? "FAILED" : "PASSED", g_failures,
              g_failures == 1 ? "" : "s");
  return g_failures ? 1 : 0;
}
