// Expert dispatch on CUDA: torch-free device code (moe_route/reference.py, section "Dispatch", is
// the specification).
//
// dispatch_plan: a stable counting sort of the N = T*k (token, slot) pairs by expert, in three
// launches and without any host synchronisation (outputs are sized for the worst case by the
// caller, so the launch is CUDA-graph capturable):
//   1. plan_hist_kernel: the slots are cut into contiguous tiles of `tile` slots, one tile per
//      warp. Each warp builds the histogram of its tile's valid ids in its own shared-memory row
//      (32-bit shared atomics, so the result is exact and order independent) and writes it to the
//      workspace ws[tile, E] (int64). The same grid fills row_slot[0, R) with -1 (grid-stride).
//   2. plan_scan_kernel (one CTA of kScanThreads): per expert, the column sum over the tiles gives
//      counts[e]; the padded counts are scanned (exclusive, over experts) into expert_offsets; then
//      ws[tile, e] is replaced in place by the first row of expert e owned by that tile:
//      offsets[e] + sum of counts of e in earlier tiles. Column sums are split over up to
//      kScanThreads / E thread groups, each owning a contiguous range of tiles, so small E does not
//      serialise on one thread per expert.
//   3. plan_scatter_kernel: each warp re-walks its tile in slot order, 32 slots per step, with its
//      cursors cur[e] (= ws row) in shared memory. Lanes with equal expert are grouped with
//      __match_any_sync; a lane's rank is the number of lower lanes in its group, the group's
//      lowest lane reads and advances cur[e]. Within an expert, rows are therefore handed out in
//      increasing slot order: tiles in order (step 2), steps in order, lanes in order. The warp
//      writes row_slot[row] = s and slot_row[s] = row (or -1 for ids outside [0, E)).
//   The result is a pure function of the ids: every step is integer arithmetic in a fixed order.
// Small plans (T*k <= kOneCtaMaxSlots and R <= kOneCtaMaxRows: decode and short prefill) run the
// same three steps in one launch, plan_one_cta_kernel: one CTA of kScanThreads threads whose warps
// own the tiles, with the tile histograms and cursors in shared memory instead of the workspace
// and __syncthreads between the steps. Under CUDA-graph replay every launch costs ~2 us even when
// it moves no data, so one launch instead of three is most of the latency at these sizes.
//
// permute: token-major. Groups of `tpr` threads (a power of two in [32, 256]; several groups per
// 256-thread CTA when the rows are short) each take a token, load its row once, kCopyUnroll
// vectors at a time, and store it to each of the token's k rows (slot_row). A destination-major
// gather (one group per output row) would read every token row k times, from HBM once x outgrows
// L2 (T=4096, H=7168 bf16 is 59 MB): (2k) row transfers per token instead of (k+1). Below
// kPermuteSplitBelow tokens, where x is small and stays in L2, each of a token's k rows gets a
// group of its own instead, so that a decode step's stores spread over k SMs.
// The same groups then zero-fill the rows with row_slot < 0 (block padding, unused tail),
// grid-stride. The grid covers the copy's work items, or the R rows if that takes more CTAs, up
// to kPermuteFillCtas: a group per row would leave most CTAs loading one row_slot entry and
// exiting (at T=4096, k=8, H=7168 and no padding, 32768 CTAs for 4096 tokens). Given the plan's
// row count in use (used_rows, expert_offsets[E] on the device), the fill stops there and only
// used_bound rows count for the grid: at decode with block padding nearly all of R is tail (T=1,
// k=8, E=256, block 64: R = 16136, at most 512 rows in use).
// The copy width is the largest of 16, 8, 4, 2 bytes that divides the row length in bytes, the
// row stride in bytes and both base addresses, so bf16/fp16/fp32 rows of any H take the 16-byte
// path whenever the layout allows it.
// row_slot and slot_row must be the two halves of one plan (dispatch_plan's): every row with
// row_slot[r] = s >= 0 has slot_row[s] = r.
//
// unpermute: the same row-group mapping over the T output tokens. For each vector chunk of the
// row, the k slots are visited in j order and acc = __fadd_rn(acc, __fmul_rn(float(y), w)) in fp32
// (never contracted into an FMA: the reference rounds the product and the sum separately), skipping
// slots with slot_row < 0, then rounded to the output type with round-to-nearest-even. No atomics;
// each output element is written by exactly one thread, so results are bit-reproducible. A token's
// first kSlotsInRegs row indices and weights are loaded once, before its chunks, and each chunk
// issues the loads of those slots' vectors before it adds any of them. Loading the index, then the
// row, one slot at a time would leave one 16-byte load in flight per thread.
//
// Index arithmetic is int64 throughout (T*k*H and R*H may exceed 2^31). The index values inside
// row_slot / slot_row come from dispatch_plan; the kernels cannot raise on bad ones without a host
// sync (the CPU ops do raise), so permute and unpermute skip a slot_row entry outside [0, R) as
// a dropped slot: one unsigned comparison, and no access outside the tensors whatever the plan
// holds. row_slot is only compared with 0 (a row to fill with zeros), never followed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../dispatch_params.h"
#include "pdl.cuh"

namespace moe_route {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxExperts = 4096;            // shared-memory budget of the plan kernels
constexpr int kScanThreads = 1024;               // plan_scan_kernel CTA size
constexpr int kMaxPerThread = int(kMaxExperts / kScanThreads);  // experts per scan thread
constexpr int64_t kMinTile = 512;                // slots per warp tile (16 steps of 32)
constexpr int64_t kMaxWsEntries = int64_t(1) << 18;  // tiles * E bound: 2 MiB of workspace
constexpr int kPlanMaxWarps = 8;                 // warps per CTA of kernels 1 and 3
constexpr int64_t kPlanSmemBudget = 48 * 1024;   // default dynamic shared-memory limit
constexpr int kFillPerThread = 8;                // row_slot entries per fill thread (grid sizing)
constexpr int kMaxFillBlocks = 4096;
constexpr int kRowThreads = 256;                 // permute / unpermute CTA size
constexpr int kCopyUnroll = 4;
constexpr int kSlotsInRegs = 8;                  // unpermute: a token's slots held in registers
constexpr int64_t kMaxGrid = int64_t(1) << 20;   // grid-stride loops cover the rest
constexpr int kPermuteFillCtas = 4096;           // permute: CTAs the zero fill alone may ask for
constexpr int64_t kPermuteSplitBelow = 32;       // permute: fewer tokens: a work item per slot
constexpr int64_t kOneCtaMaxSlots = 2048;        // one-launch plan: T*k at most this ...
constexpr int64_t kOneCtaMaxRows = 32768;        // ... and R at most this (one CTA fills row_slot)
constexpr int64_t kOneCtaSmemBudget = 40 * 1024;  // its per-warp int64 tile rows

static_assert(kMaxExperts % kScanThreads == 0, "scan chunking");

// ---------------------------------------------------------------------------------------------
// Host-side geometry (shared by the launcher, the workspace query and the tests).

struct PlanGeom {
  bool one_cta = false;  // plan_one_cta_kernel (no workspace) instead of the three kernels
  int64_t N = 0;        // T * k
  int64_t tile = 0;     // slots per warp tile (multiple of 32)
  int64_t n_tiles = 0;  // ceil(N / tile); 0 when N == 0
  int32_t wpb = 1;      // warps per CTA of kernels 1 and 3
  int32_t hist_blocks = 0, fill_blocks = 0;
  size_t hist_smem = 0, scatter_smem = 0;
  size_t scan_smem = 0;  // kernel 2: max(kScanThreads, E) partial sums + 32 warp totals, int64;
                         // one_cta: n_tiles * E tile rows + 32 warp totals, int64
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// For 1 <= E <= kMaxExperts, T, k >= 0.
inline PlanGeom plan_geometry(const PlanParams& p) {
  PlanGeom g;
  g.N = p.T * p.k;
  const int64_t E = p.E;
  if (g.N <= kOneCtaMaxSlots && p.R <= kOneCtaMaxRows) {
    // As many tile warps as the shared rows allow (E = 4096: one), tiles of whole 32-slot steps.
    int64_t w = kOneCtaSmemBudget / (E * int64_t(sizeof(int64_t)));
    w = w < 1 ? 1 : (w > kScanThreads / 32 ? kScanThreads / 32 : w);
    g.one_cta = true;
    if (g.N > 0) {
      g.tile = ceil_div(ceil_div(g.N, w), 32) * 32;
      g.n_tiles = ceil_div(g.N, g.tile);
    }
    g.scan_smem = size_t((g.n_tiles * E + 32) * int64_t(sizeof(int64_t)));
    return g;
  }
  int64_t w = kPlanSmemBudget / (E * int64_t(sizeof(int64_t)));
  w = w < 1 ? 1 : (w > kPlanMaxWarps ? kPlanMaxWarps : w);
  g.wpb = int32_t(w);
  if (g.N > 0) {
    int64_t max_tiles = kMaxWsEntries / E;
    if (max_tiles < 1) max_tiles = 1;
    int64_t tile = ceil_div(g.N, max_tiles);
    if (tile < kMinTile) tile = kMinTile;
    g.tile = ceil_div(tile, 32) * 32;
    g.n_tiles = ceil_div(g.N, g.tile);
    g.hist_blocks = int32_t(ceil_div(g.n_tiles, w));
  }
  const int64_t fill = ceil_div(p.R, int64_t(w) * 32 * kFillPerThread);
  g.fill_blocks = int32_t(fill > kMaxFillBlocks ? kMaxFillBlocks : fill);
  g.hist_smem = size_t(w * E * int64_t(sizeof(uint32_t)));
  g.scatter_smem = size_t(w * E * int64_t(sizeof(int64_t)));
  g.scan_smem = size_t(((E > kScanThreads ? E : kScanThreads) + 32) * int64_t(sizeof(int64_t)));
  return g;
}

inline size_t plan_workspace_bytes(const PlanGeom& g, int64_t E) {
  return g.one_cta ? 0 : size_t(g.n_tiles * E * int64_t(sizeof(int64_t)));
}

// The launchers' argument checks (dispatch.cu, and its twin on the host emulator).
inline size_t workspace_bytes_for(const PlanParams& p) {
  if (p.E < 1 || p.E > kMaxExperts || p.T < 0 || p.k < 0) return 0;
  return plan_workspace_bytes(plan_geometry(p), p.E);
}

inline bool plan_args_ok(const PlanParams& p) {
  return p.E >= 1 && p.E <= kMaxExperts && p.block_size >= 1 && p.T >= 0 && p.k >= 0 && p.R >= 0;
}

inline bool plan_workspace_ok(const PlanGeom& g, int64_t E, const void* ws, size_t bytes) {
  const size_t need = plan_workspace_bytes(g, E);
  return bytes >= need && (need == 0 || ws != nullptr) &&
         (reinterpret_cast<uintptr_t>(ws) & 7u) == 0 &&
         g.tile <= int64_t(0xffffffff);  // uint32 tile histograms
}

inline bool permute_args_ok(const PermuteParams& p) {
  return p.R >= 0 && p.H >= 0 && p.T >= 0 && p.k >= 1 && (p.elem_bytes == 2 || p.elem_bytes == 4) &&
         (p.T == 0 || p.slot_row != nullptr) &&
         (p.used_rows == nullptr || (p.used_bound >= 0 && p.used_bound <= p.R));
}

inline bool unpermute_args_ok(const UnpermuteParams& p) {
  return p.T >= 0 && p.H >= 0 && p.k >= 0 && p.R >= 0;
}

// ---------------------------------------------------------------------------------------------
// dispatch_plan kernels.

__device__ __forceinline__ int64_t load_id(const void* ids, bool i64, int64_t s) {
  return i64 ? int64_t(__ldg(static_cast<const long long*>(ids) + s))
             : int64_t(__ldg(static_cast<const int*>(ids) + s));
}

// Expert of slot s as an int key, -1 when outside [0, E) (or past the tile).
__device__ __forceinline__ int expert_key(const PlanParams& p, int64_t s, int64_t s_end) {
  if (s >= s_end) return -1;
  const int64_t id = load_id(p.ids, p.ids_int64, s);
  return (id >= 0 && id < p.E) ? int(id) : -1;
}

// End of the tile of `tile` slots starting at slot s0 (< T*k): the last tile stops at T*k.
__device__ __forceinline__ int64_t tile_end(const PlanParams& p, const int64_t s0,
                                            const int64_t tile) {
  const int64_t N = p.T * p.k;
  return N - s0 < tile ? N : s0 + tile;
}

// One warp: the histogram of the valid ids of slots [s0, s1) into h[0, E), zeroed first. C: the
// shared counter type (uint32_t in the tile kernels; int64_t in the one-CTA kernel, whose row
// becomes its cursors in place). Either way the counts are 32-bit shared atomics on the low word
// (a tile has fewer than 2^32 slots): a 32-bit add is one instruction that serves every lane of
// the warp at once, a 64-bit one a compare-and-swap loop (sm_90: ATOMS.CAST.SPIN.64) that goes
// round once more for each lane of the warp adding to the same expert.
template <typename C>
__device__ __forceinline__ void warp_tile_hist(const PlanParams& p, const int64_t s0,
                                               const int64_t s1, C* h, const int lane) {
  static_assert(sizeof(C) == 4 || sizeof(C) == 8, "a 32- or 64-bit counter");
  const int E = int(p.E);
  for (int e = lane; e < E; e += 32) h[e] = C(0);
  __syncwarp();
  for (int64_t s = s0 + lane; s < s1; s += 32) {
    const int key = expert_key(p, s, s1);
    if (key >= 0) atomicAdd(reinterpret_cast<unsigned int*>(h + key), 1u);  // little-endian
  }
  __syncwarp();
}

// One warp: step 3 above over slots [s0, s1), with cur[e] = the next row of expert e.
__device__ __forceinline__ void warp_tile_scatter(const PlanParams& p, const int64_t s0,
                                                  const int64_t s1, int64_t* cur, const int lane) {
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
  int key_next = expert_key(p, s0 + lane, s1);
  for (int64_t base_s = s0; base_s < s1; base_s += 32) {
    const int64_t s = base_s + lane;
    const int key = key_next;
    key_next = expert_key(p, s + 32, s1);  // prefetch the next step
    const unsigned peers = __match_any_sync(kFullMask, key);
    const int leader = __ffs(peers) - 1;
    int64_t first = 0;
    if (key >= 0 && lane == leader) {
      first = cur[key];
      cur[key] = first + __popc(peers);
    }
    first = __shfl_sync(kFullMask, first, leader);
    if (key >= 0) {
      const int64_t r = first + __popc(peers & lower);
      p.row_slot[r] = s;
      p.slot_row[s] = r;
    } else if (s < s1) {
      p.slot_row[s] = -1;
    }
    __syncwarp();  // cursor updates are visible to the next step's leaders
  }
}

__device__ __forceinline__ int64_t round_up(int64_t c, int64_t b) {
  return c == 0 ? 0 : ((c - 1) / b + 1) * b;
}

// All kScanThreads threads of the CTA: part [G, E] holds the rows of each (group, expert), groups
// in slot order. Writes counts and expert_offsets, and replaces part[g, e] by the first row of
// expert e that group g owns. warp_tot: 32 int64 of shared scratch. Ends with a __syncthreads.
__device__ __forceinline__ void scan_experts(const PlanParams& p, int64_t* part, const int G,
                                             int64_t* warp_tot) {
  const int tid = int(threadIdx.x);
  const int E = int(p.E);
  // Thread t owns experts [t*per, t*per + per): counts, padded counts, group prefixes.
  const int per = (E + kScanThreads - 1) / kScanThreads;  // <= kMaxPerThread
  const int e0 = tid * per;
  int64_t padded[kMaxPerThread];
  int64_t local = 0;
#pragma unroll
  for (int i = 0; i < kMaxPerThread; ++i) {
    padded[i] = 0;
    const int e = e0 + i;
    if (i < per && e < E) {
      int64_t run = 0;
      for (int g = 0; g < G; ++g) {  // exclusive prefix over the groups, in place
        const int64_t v = part[int64_t(g) * E + e];
        part[int64_t(g) * E + e] = run;
        run += v;
      }
      p.counts[e] = run;
      padded[i] = round_up(run, p.block_size);
      local += padded[i];
    }
  }
  // Block-wide exclusive scan of `local` in thread order.
  const int lane = tid & 31, warp = tid >> 5;
  int64_t incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int64_t v = warp_tot[lane];  // kScanThreads / 32 == 32 warps
    int64_t wi = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += y;
    }
    warp_tot[lane] = wi - v;  // exclusive
    if (lane == 31) p.expert_offsets[E] = wi;
  }
  __syncthreads();
  int64_t off = warp_tot[warp] + incl - local;
#pragma unroll
  for (int i = 0; i < kMaxPerThread; ++i) {
    const int e = e0 + i;
    if (i < per && e < E) {
      p.expert_offsets[e] = off;
      for (int g = 0; g < G; ++g) part[int64_t(g) * E + e] += off;
      off += padded[i];
    }
  }
  __syncthreads();
}

// row_slot[0, R) = -1 by threads tid = 0, 1, ..., n - 1: 16-byte stores of all-ones bits (two
// int64 -1) on the 16-byte aligned part, single stores at the ends (row_slot is 8-byte aligned).
__device__ __forceinline__ void fill_minus_one(int64_t* row_slot, const int64_t R,
                                               const int64_t tid, const int64_t n) {
  const int64_t head = (reinterpret_cast<uintptr_t>(row_slot) & 15u) ? 1 : 0;
  const int64_t pairs = R > head ? (R - head) / 2 : 0;
  uint4* v = reinterpret_cast<uint4*>(row_slot + head);
  uint4 ones;
  ones.x = ones.y = ones.z = ones.w = ~0u;
  for (int64_t i = tid; i < pairs; i += n) v[i] = ones;
  if (tid == 0) {
    if (head && R > 0) row_slot[0] = -1;
    if (R > head + 2 * pairs) row_slot[R - 1] = -1;
  }
}

__global__ void plan_hist_kernel(const PlanParams p, const int64_t tile, const int64_t n_tiles,
                                 int64_t* __restrict__ ws) {
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();
  extern __shared__ __align__(16) uint32_t hist_smem[];
  // Padding and tail rows: everything starts at -1, the scatter overwrites the used rows.
  fill_minus_one(p.row_slot, p.R, int64_t(blockIdx.x) * blockDim.x + threadIdx.x,
                 int64_t(gridDim.x) * blockDim.x);

  const int lane = int(threadIdx.x & 31u);
  const int warp = int(threadIdx.x >> 5);
  const int64_t tile_id = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (tile_id >= n_tiles) return;  // no block-level barriers below
  const int E = int(p.E);
  uint32_t* h = hist_smem + int64_t(warp) * E;
  const int64_t s0 = tile_id * tile;
  warp_tile_hist(p, s0, tile_end(p, s0, tile), h, lane);
  int64_t* row = ws + tile_id * E;
  for (int e = lane; e < E; e += 32) row[e] = int64_t(h[e]);
}

// One CTA of kScanThreads threads; dynamic shared memory: PlanGeom::scan_smem.
__global__ void __launch_bounds__(kScanThreads)
    plan_scan_kernel(const PlanParams p, const int64_t n_tiles, int64_t* __restrict__ ws) {
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();
  extern __shared__ __align__(16) int64_t part[];  // [G, E]: per-(group, expert) partial sums
  const int tid = int(threadIdx.x);
  const int E = int(p.E);
  const int G = E < kScanThreads ? kScanThreads / E : 1;  // thread groups per expert column
  const int64_t GE = int64_t(G) * E;
  int64_t* warp_tot = part + (E > kScanThreads ? E : kScanThreads);  // [kScanThreads / 32]

  // Partial column sums; group g owns tiles [g*n/G, (g+1)*n/G) (coalesced over e).
  for (int64_t idx = tid; idx < GE; idx += kScanThreads) {
    const int g = int(idx / E);
    const int e = int(idx - int64_t(g) * E);
    const int64_t b0 = n_tiles * g / G, b1 = n_tiles * (g + 1) / G;
    int64_t sum = 0;
#pragma unroll 8
    for (int64_t b = b0; b < b1; ++b) sum += ws[b * E + e];
    part[idx] = sum;
  }
  __syncthreads();
  scan_experts(p, part, G, warp_tot);
  // ws[b, e] <- first row of expert e owned by tile b.
  for (int64_t idx = tid; idx < GE; idx += kScanThreads) {
    const int g = int(idx / E);
    const int e = int(idx - int64_t(g) * E);
    const int64_t b0 = n_tiles * g / G, b1 = n_tiles * (g + 1) / G;
    int64_t run = part[idx];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v = ws[b * E + e];
      ws[b * E + e] = run;
      run += v;
    }
  }
}

__global__ void plan_scatter_kernel(const PlanParams p, const int64_t tile, const int64_t n_tiles,
                                    const int64_t* __restrict__ ws) {
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();
  extern __shared__ __align__(16) int64_t cur_smem[];
  const int lane = int(threadIdx.x & 31u);
  const int warp = int(threadIdx.x >> 5);
  const int64_t tile_id = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (tile_id >= n_tiles) return;  // no block-level barriers below
  const int E = int(p.E);
  int64_t* cur = cur_smem + int64_t(warp) * E;
  const int64_t* row = ws + tile_id * E;
  for (int e = lane; e < E; e += 32) cur[e] = row[e];
  __syncwarp();
  const int64_t s0 = tile_id * tile;
  warp_tile_scatter(p, s0, tile_end(p, s0, tile), cur, lane);
}

// The whole plan in one CTA of kScanThreads threads (PlanGeom::one_cta): warp w owns tile w, its
// histogram row part[w] becomes its cursor row in place; dynamic shared memory: scan_smem.
__global__ void __launch_bounds__(kScanThreads)
    plan_one_cta_kernel(const PlanParams p, const int64_t tile, const int64_t n_tiles) {
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();
  extern __shared__ __align__(16) int64_t part[];  // [n_tiles, E], then 32 warp totals
  const int tid = int(threadIdx.x);
  fill_minus_one(p.row_slot, p.R, tid, kScanThreads);
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t s0 = warp * tile;
  int64_t* row = part + int64_t(warp) * p.E;
  if (warp < n_tiles)
    warp_tile_hist(p, s0, tile_end(p, s0, tile), row, lane);
  __syncthreads();
  // Its closing barrier also orders the -1 fill before the scatter's stores.
  scan_experts(p, part, int(n_tiles), part + n_tiles * p.E);
  if (warp < n_tiles) warp_tile_scatter(p, s0, tile_end(p, s0, tile), row, lane);
}

// ---------------------------------------------------------------------------------------------
// Row-group mapping shared by permute and unpermute: `tpr` threads per row, kRowThreads / tpr
// rows per CTA, grid-stride over rows.

inline int threads_per_row(int64_t n_vec) {
  int t = 32;
  while (t < kRowThreads && t < n_vec) t <<= 1;
  return t;
}

inline int grid_for_rows(int64_t rows, int tpr) {
  const int64_t rpc = kRowThreads / tpr;
  int64_t g = ceil_div(rows, rpc);
  if (g > kMaxGrid) g = kMaxGrid;
  return int(g < 1 ? 1 : g);
}

// Copy unit of `V` bytes.
template <int V> struct CopyUnit;
template <> struct CopyUnit<16> { using type = uint4; };
template <> struct CopyUnit<8> { using type = uint2; };
template <> struct CopyUnit<4> { using type = uint32_t; };
template <> struct CopyUnit<2> { using type = uint16_t; };

// PerSlot: a work item per (token, slot), the token's row to that slot's row, instead of a work
// item per token (its row to all k rows). One group storing a row k times is bound by what one
// SM can store (T=1, k=8, H=7168 bf16: 115 KB); k groups spread that over k SMs and read the row
// k times, from L2 after the first. Launched below kPermuteSplitBelow tokens.
template <int V, bool PerSlot>
__global__ void __launch_bounds__(kRowThreads)
    permute_kernel(const PermuteParams p, const int tpr, const int64_t n_vec) {
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();
  using U = typename CopyUnit<V>::type;
  const U* __restrict__ x = static_cast<const U*>(p.x);
  U* __restrict__ out = static_cast<U*>(p.out);
  const long long* __restrict__ slot_row = reinterpret_cast<const long long*>(p.slot_row);
  const long long* __restrict__ row_slot = reinterpret_cast<const long long*>(p.row_slot);
  const int rpc = kRowThreads / tpr;
  const int group = int(threadIdx.x) / tpr;
  const int t = int(threadIdx.x) - group * tpr;
  const int64_t stride_vec = p.x_row_stride * p.elem_bytes / V;
  const int64_t first = int64_t(blockIdx.x) * rpc + group, step = int64_t(gridDim.x) * rpc;
  // 1. Token-major copy: each work item reads its token's row once and stores it to its rows.
  const int64_t items = PerSlot ? p.T * p.k : p.T, n_rows = PerSlot ? 1 : p.k;
  for (int64_t w = first; w < items; w += step) {
    const int64_t tok = PerSlot ? w / p.k : w;
    const U* in = x + tok * stride_vec;
    const long long* rows = slot_row + (PerSlot ? w : tok * p.k);
    for (int64_t i0 = t; i0 < n_vec; i0 += kCopyUnroll * int64_t(tpr)) {
      U v[kCopyUnroll] = {};
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t i = i0 + u * int64_t(tpr);
        if (i < n_vec) v[u] = in[i];
      }
      for (int64_t j = 0; j < n_rows; ++j) {
        const int64_t r = __ldg(rows + j);
        if (uint64_t(r) >= uint64_t(p.R)) continue;  // dropped (-1), or not a row of out
        U* dst = out + r * n_vec;
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int64_t i = i0 + u * int64_t(tpr);
          if (i < n_vec) dst[i] = v[u];
        }
      }
    }
  }
  // 2. Rows no slot feeds (block padding, unused tail): zeros. With used_rows, the tail is left.
  int64_t end = p.R;
  if (p.used_rows) {
    const int64_t used = __ldg(reinterpret_cast<const long long*>(p.used_rows));
    end = used < 0 ? 0 : used < p.R ? used : p.R;
  }
  for (int64_t r = first; r < end; r += step) {
    if (__ldg(row_slot + r) >= 0) continue;
    U* dst = out + r * n_vec;
    const U z{};
    for (int64_t i = t; i < n_vec; i += tpr) dst[i] = z;
  }
}

// Largest copy width in {16, 8, 4, 2} dividing all of: row bytes, row-stride bytes, both bases.
inline int permute_vec_bytes(const PermuteParams& p) {
  const uint64_t bits = uint64_t(p.H * p.elem_bytes) | uint64_t(p.x_row_stride * p.elem_bytes) |
                        uint64_t(reinterpret_cast<uintptr_t>(p.x)) |
                        uint64_t(reinterpret_cast<uintptr_t>(p.out));
  for (int v = 16; v > 2; v >>= 1)
    if ((bits & uint64_t(v - 1)) == 0) return v;
  return 2;
}

// Launch geometry of permute / unpermute: `vec` (permute: copy bytes; unpermute: elements per
// access), vectors per row, threads per row and grid size.
struct RowLaunch {
  int vec;
  int64_t n_vec;
  int tpr;
  int grid;
  bool per_slot = false;  // permute: the PerSlot kernel
};

inline RowLaunch permute_launch(const PermuteParams& p) {
  const int v = permute_vec_bytes(p);
  const int64_t n_vec = p.H * p.elem_bytes / v;
  const int tpr = threads_per_row(n_vec);
  const bool per_slot = p.T < kPermuteSplitBelow;
  const int copy = grid_for_rows(per_slot ? p.T * p.k : p.T, tpr);
  const int fill = grid_for_rows(p.used_rows ? p.used_bound : p.R, tpr);
  const int grid = fill < kPermuteFillCtas ? fill : kPermuteFillCtas;
  return {v, n_vec, tpr, copy > grid ? copy : grid, per_slot};
}

// Element conversions.
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one aligned unit.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// unpermute reads and writes 16 bytes per access when H and both bases allow it.
template <typename T>
inline RowLaunch unpermute_launch(const UnpermuteParams& p) {
  constexpr int kVec = int(16 / sizeof(T));
  const bool vec = p.H % kVec == 0 && (reinterpret_cast<uintptr_t>(p.y) & 15u) == 0 &&
                   (reinterpret_cast<uintptr_t>(p.out) & 15u) == 0;
  const int64_t n_vec = vec ? p.H / kVec : p.H;
  const int tpr = threads_per_row(n_vec);
  return {vec ? kVec : 1, n_vec, tpr, grid_for_rows(p.T, tpr)};
}

// acc += float(v) * w, rounding the product and the sum separately (the reference's order).
template <typename T, int VEC>
__device__ __forceinline__ void add_weighted(float (&acc)[VEC], const Pack<T, VEC>& v, float w) {
#pragma unroll
  for (int c = 0; c < VEC; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(to_f32<T>(v.v[c]), w));
}

// VEC: elements per access (16 / sizeof(T) on the vector path, 1 otherwise).
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_kernel(const UnpermuteParams p, const int tpr, const int64_t n_vec) {
  wait_for_prior_grids();  // before any global memory access (pdl.cuh)
  allow_dependent_launch();
  using P = Pack<T, VEC>;
  const P* __restrict__ y = static_cast<const P*>(p.y);
  P* __restrict__ out = static_cast<P*>(p.out);
  const long long* __restrict__ slot_row = reinterpret_cast<const long long*>(p.slot_row);
  const float* __restrict__ weights = p.weights;
  const int rpc = kRowThreads / tpr;
  const int group = int(threadIdx.x) / tpr;
  const int t = int(threadIdx.x) - group * tpr;
  const int64_t k = p.k;
  for (int64_t tok = int64_t(blockIdx.x) * rpc + group; tok < p.T;
       tok += int64_t(gridDim.x) * rpc) {
    const int64_t s0 = tok * k;
    int64_t rows[kSlotsInRegs];
    float w[kSlotsInRegs];
#pragma unroll
    for (int j = 0; j < kSlotsInRegs; ++j) {
      rows[j] = j < k ? int64_t(__ldg(slot_row + s0 + j)) : -1;
      if (uint64_t(rows[j]) >= uint64_t(p.R)) rows[j] = -1;  // dropped, or not a row of y
      w[j] = rows[j] >= 0 ? __ldg(weights + s0 + j) : 0.f;
    }
    for (int64_t i = t; i < n_vec; i += tpr) {
      P v[kSlotsInRegs];
#pragma unroll
      for (int j = 0; j < kSlotsInRegs; ++j)
        if (rows[j] >= 0) v[j] = y[rows[j] * n_vec + i];
      float acc[VEC];
#pragma unroll
      for (int c = 0; c < VEC; ++c) acc[c] = 0.f;
#pragma unroll
      for (int j = 0; j < kSlotsInRegs; ++j)
        if (rows[j] >= 0) add_weighted(acc, v[j], w[j]);
      for (int64_t j = kSlotsInRegs; j < k; ++j) {  // k > kSlotsInRegs: the rest, one by one
        const int64_t r = __ldg(slot_row + s0 + j);
        if (uint64_t(r) < uint64_t(p.R))
          add_weighted(acc, y[r * n_vec + i], __ldg(weights + s0 + j));
      }
      P o;
#pragma unroll
      for (int c = 0; c < VEC; ++c) o.v[c] = from_f32<T>(acc[c]);
      out[tok * n_vec + i] = o;
    }
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace moe_route
