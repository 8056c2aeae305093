// Launchers of the CUDA dispatch kernels (design notes in dispatch.cuh).
#include "dispatch.cuh"
#include "dispatch_launch.h"

namespace moe_route::cuda {

static_assert(kDispatchMaxExperts == detail::kMaxExperts, "keep the public limit in sync");

size_t dispatch_plan_workspace_bytes(const PlanParams& p) { return detail::workspace_bytes_for(p); }

cudaError_t launch_dispatch_plan(const PlanParams& p, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  if (!detail::plan_args_ok(p)) return cudaErrorInvalidValue;
  const detail::PlanGeom g = detail::plan_geometry(p);
  if (!detail::plan_workspace_ok(g, p.E, workspace, workspace_bytes)) return cudaErrorInvalidValue;
  if (g.one_cta) {
    detail::plan_one_cta_kernel<<<1, detail::kScanThreads, g.scan_smem, stream>>>(p, g.tile,
                                                                                 g.n_tiles);
    return cudaGetLastError();
  }
  int64_t* ws = static_cast<int64_t*>(workspace);

  // 1. Tile histograms + row_slot fill.
  const int hist_grid = g.hist_blocks > g.fill_blocks ? g.hist_blocks : g.fill_blocks;
  if (hist_grid > 0) {
    detail::plan_hist_kernel<<<hist_grid, g.wpb * 32, g.hist_smem, stream>>>(p, g.tile, g.n_tiles,
                                                                             ws);
  }
  // 2. Counts, offsets and per-tile bases (always: writes counts / offsets even when T*k == 0).
  detail::plan_scan_kernel<<<1, detail::kScanThreads, g.scan_smem, stream>>>(p, g.n_tiles, ws);
  // 3. Stable scatter.
  if (g.n_tiles > 0) {
    detail::plan_scatter_kernel<<<g.hist_blocks, g.wpb * 32, g.scatter_smem, stream>>>(
        p, g.tile, g.n_tiles, ws);
  }
  return cudaGetLastError();
}

namespace {
template <int V>
void launch_permute_vec(const PermuteParams& p, const detail::RowLaunch& g, cudaStream_t stream) {
  constexpr int kThreads = detail::kRowThreads;
  if (g.per_slot)
    detail::permute_kernel<V, true><<<g.grid, kThreads, 0, stream>>>(p, g.tpr, g.n_vec);
  else
    detail::permute_kernel<V, false><<<g.grid, kThreads, 0, stream>>>(p, g.tpr, g.n_vec);
}
}  // namespace

cudaError_t launch_permute(const PermuteParams& p, cudaStream_t stream) {
  if (!detail::permute_args_ok(p)) return cudaErrorInvalidValue;
  if (p.R == 0 || p.H == 0) return cudaSuccess;
  const detail::RowLaunch g = detail::permute_launch(p);
  switch (g.vec) {
    case 16: launch_permute_vec<16>(p, g, stream); break;
    case 8: launch_permute_vec<8>(p, g, stream); break;
    case 4: launch_permute_vec<4>(p, g, stream); break;
    default: launch_permute_vec<2>(p, g, stream); break;
  }
  return cudaGetLastError();
}

namespace {

template <typename T>
void launch_unpermute_typed(const UnpermuteParams& p, cudaStream_t stream) {
  constexpr int kVec = int(16 / sizeof(T));
  const detail::RowLaunch g = detail::unpermute_launch<T>(p);
  constexpr int kThreads = detail::kRowThreads;
  if (g.vec == kVec)
    detail::unpermute_kernel<T, kVec><<<g.grid, kThreads, 0, stream>>>(p, g.tpr, g.n_vec);
  else
    detail::unpermute_kernel<T, 1><<<g.grid, kThreads, 0, stream>>>(p, g.tpr, g.n_vec);
}

}  // namespace

cudaError_t launch_unpermute(const UnpermuteParams& p, cudaStream_t stream) {
  if (!detail::unpermute_args_ok(p)) return cudaErrorInvalidValue;
  if (p.T == 0 || p.H == 0) return cudaSuccess;
  switch (p.type) {
    case ElemType::F32: launch_unpermute_typed<float>(p, stream); break;
    case ElemType::F16: launch_unpermute_typed<__half>(p, stream); break;
    case ElemType::BF16: launch_unpermute_typed<__nv_bfloat16>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace moe_route::cuda
