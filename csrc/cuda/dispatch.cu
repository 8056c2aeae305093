// Launchers of the CUDA dispatch kernels (design notes in dispatch.cuh), each a programmatic
// dependent launch on sm_90+ (pdl.cuh).
#include "dispatch.cuh"
#include "dispatch_launch.h"
#include "pdl.cuh"

namespace moe_route::cuda {

static_assert(kDispatchMaxExperts == detail::kMaxExperts, "keep the public limit in sync");

size_t dispatch_plan_workspace_bytes(const PlanParams& p) { return detail::workspace_bytes_for(p); }

cudaError_t launch_dispatch_plan(const PlanParams& p, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  if (!detail::plan_args_ok(p)) return cudaErrorInvalidValue;
  const detail::PlanGeom g = detail::plan_geometry(p);
  if (!detail::plan_workspace_ok(g, p.E, workspace, workspace_bytes)) return cudaErrorInvalidValue;
  if (g.one_cta) {
    return launch_kernel(detail::plan_one_cta_kernel, 1, detail::kScanThreads, g.scan_smem, stream,
                         p, g.tile, g.n_tiles);
  }
  int64_t* ws = static_cast<int64_t*>(workspace);

  // 1. Tile histograms + row_slot fill.
  const int hist_grid = g.hist_blocks > g.fill_blocks ? g.hist_blocks : g.fill_blocks;
  if (hist_grid > 0) {
    const cudaError_t err = launch_kernel(detail::plan_hist_kernel, hist_grid, g.wpb * 32,
                                          g.hist_smem, stream, p, g.tile, g.n_tiles, ws);
    if (err != cudaSuccess) return err;
  }
  // 2. Counts, offsets and per-tile bases (always: writes counts / offsets even when T*k == 0).
  const cudaError_t err = launch_kernel(detail::plan_scan_kernel, 1, detail::kScanThreads,
                                        g.scan_smem, stream, p, g.n_tiles, ws);
  if (err != cudaSuccess || g.n_tiles == 0) return err;
  // 3. Stable scatter.
  return launch_kernel(detail::plan_scatter_kernel, g.hist_blocks, g.wpb * 32, g.scatter_smem,
                       stream, p, g.tile, g.n_tiles, ws);
}

namespace {
template <int V>
cudaError_t launch_permute_vec(const PermuteParams& p, const detail::RowLaunch& g,
                               cudaStream_t stream) {
  const auto kernel =
      g.per_slot ? detail::permute_kernel<V, true> : detail::permute_kernel<V, false>;
  return launch_kernel(kernel, g.grid, detail::kRowThreads, 0, stream, p, g.tpr, g.n_vec);
}
}  // namespace

cudaError_t launch_permute(const PermuteParams& p, cudaStream_t stream) {
  if (!detail::permute_args_ok(p)) return cudaErrorInvalidValue;
  if (p.R == 0 || p.H == 0) return cudaSuccess;
  const detail::RowLaunch g = detail::permute_launch(p);
  switch (g.vec) {
    case 16: return launch_permute_vec<16>(p, g, stream);
    case 8: return launch_permute_vec<8>(p, g, stream);
    case 4: return launch_permute_vec<4>(p, g, stream);
    default: return launch_permute_vec<2>(p, g, stream);
  }
}

namespace {

template <typename T>
cudaError_t launch_unpermute_typed(const UnpermuteParams& p, cudaStream_t stream) {
  constexpr int kVec = int(16 / sizeof(T));
  const detail::RowLaunch g = detail::unpermute_launch<T>(p);
  const auto kernel =
      g.vec == kVec ? detail::unpermute_kernel<T, kVec> : detail::unpermute_kernel<T, 1>;
  return launch_kernel(kernel, g.grid, detail::kRowThreads, 0, stream, p, g.tpr, g.n_vec);
}

}  // namespace

cudaError_t launch_unpermute(const UnpermuteParams& p, cudaStream_t stream) {
  if (!detail::unpermute_args_ok(p)) return cudaErrorInvalidValue;
  if (p.T == 0 || p.H == 0) return cudaSuccess;
  switch (p.type) {
    case ElemType::F32: return launch_unpermute_typed<float>(p, stream);
    case ElemType::F16: return launch_unpermute_typed<__half>(p, stream);
    case ElemType::BF16: return launch_unpermute_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe_route::cuda
