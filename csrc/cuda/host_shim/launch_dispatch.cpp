// Emulated twin of csrc/cuda/dispatch.cu's launchers (which nvcc alone compiles): the same checks
// and geometry, the kernels run by the host emulator (cuda_runtime.h here).
#include "../dispatch.cuh"
#include "../dispatch_launch.h"

namespace moe_route::cuda {
namespace detail {
constexpr size_t kSmemBytes = emu::kDefaultMaxDynamicSmem;
alignas(16) uint32_t hist_smem[kSmemBytes / sizeof(uint32_t)];
alignas(16) int64_t part[kSmemBytes / sizeof(int64_t)];
alignas(16) int64_t cur_smem[kSmemBytes / sizeof(int64_t)];
}  // namespace detail

size_t dispatch_plan_workspace_bytes(const PlanParams& p) { return detail::workspace_bytes_for(p); }

cudaError_t launch_dispatch_plan(const PlanParams& p, void* workspace, size_t workspace_bytes,
                                 cudaStream_t) {
  if (!detail::plan_args_ok(p)) return cudaErrorInvalidValue;
  const detail::PlanGeom g = detail::plan_geometry(p);
  if (!detail::plan_workspace_ok(g, p.E, workspace, workspace_bytes)) return cudaErrorInvalidValue;
  int64_t* ws = static_cast<int64_t*>(workspace);
  const emu::DynamicSmem hist{detail::hist_smem, sizeof(detail::hist_smem), g.hist_smem};
  const emu::DynamicSmem scan{detail::part, sizeof(detail::part), g.scan_smem};
  const emu::DynamicSmem scatter{detail::cur_smem, sizeof(detail::cur_smem), g.scatter_smem};
  if (g.one_cta) {
    emu::launch(1, detail::kScanThreads, true,
                [&] { detail::plan_one_cta_kernel(p, g.tile, g.n_tiles); }, scan);
    return cudaSuccess;
  }
  const int hist_grid = g.hist_blocks > g.fill_blocks ? g.hist_blocks : g.fill_blocks;
  if (hist_grid > 0)
    emu::launch(hist_grid, g.wpb * 32, true,
                [&] { detail::plan_hist_kernel(p, g.tile, g.n_tiles, ws); }, hist);
  emu::launch(1, detail::kScanThreads, true, [&] { detail::plan_scan_kernel(p, g.n_tiles, ws); },
              scan);
  if (g.n_tiles > 0)
    emu::launch(g.hist_blocks, g.wpb * 32, true,
                [&] { detail::plan_scatter_kernel(p, g.tile, g.n_tiles, ws); }, scatter);
  return cudaSuccess;
}

namespace {
template <int V>
void permute_vec(const PermuteParams& p, const detail::RowLaunch& g) {
  if (g.per_slot)
    detail::permute_kernel<V, true>(p, g.tpr, g.n_vec);
  else
    detail::permute_kernel<V, false>(p, g.tpr, g.n_vec);
}
}  // namespace

cudaError_t launch_permute(const PermuteParams& p, cudaStream_t) {
  if (!detail::permute_args_ok(p)) return cudaErrorInvalidValue;
  if (p.R == 0 || p.H == 0) return cudaSuccess;
  const detail::RowLaunch g = detail::permute_launch(p);
  emu::launch(g.grid, detail::kRowThreads, false, [&] {
    switch (g.vec) {
      case 16: permute_vec<16>(p, g); break;
      case 8: permute_vec<8>(p, g); break;
      case 4: permute_vec<4>(p, g); break;
      default: permute_vec<2>(p, g); break;
    }
  });
  return cudaSuccess;
}

namespace {
template <typename T>
void unpermute_typed(const UnpermuteParams& p) {
  constexpr int kVec = int(16 / sizeof(T));
  const detail::RowLaunch g = detail::unpermute_launch<T>(p);
  emu::launch(g.grid, detail::kRowThreads, false, [&] {
    if (g.vec == kVec)
      detail::unpermute_kernel<T, kVec>(p, g.tpr, g.n_vec);
    else
      detail::unpermute_kernel<T, 1>(p, g.tpr, g.n_vec);
  });
}
}  // namespace

cudaError_t launch_unpermute(const UnpermuteParams& p, cudaStream_t) {
  if (!detail::unpermute_args_ok(p)) return cudaErrorInvalidValue;
  if (p.T == 0 || p.H == 0) return cudaSuccess;
  switch (p.type) {
    case ElemType::F32: unpermute_typed<float>(p); break;
    case ElemType::F16: unpermute_typed<__half>(p); break;
    case ElemType::BF16: unpermute_typed<__nv_bfloat16>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace moe_route::cuda
