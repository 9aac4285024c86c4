// maskray::roi_align and maskray::multi_level_roi_align (modes RoIAlign and RoIWarp: the
// same kernels, RoIWarp rounding the corners in roi_geometry) — CUDA kernels (forward, atomic
// backward, deterministic backward); maskray::roi_pool, multi_level_roi_pool and
// roi_pool_backward (RoIPool, at the end of the file).
//
// One set of kernels serves both ops: they read a table of up to kMaxLevels feature maps
// and pick each RoI's level with roi_level() (torchvision's LevelMapper); the single-level
// op is the table of one level with the mapping disabled. So all FPN levels are pooled in
// ONE launch. Geometry and the handling of hostile input come from roi_align_common.h,
// shared with the CPU kernels: an invalid RoI (non-finite coordinate, batch index not an
// integer in [0, N)) gets zeros and no gradient (raising would need a device-to-host sync;
// model.ops raises RoIAlignInputError before launching), the adaptive sampling grid is
// capped at kMaxSamplingGrid per side, and NaN/inf sample coordinates read nothing.
// Half and bfloat16 inputs are computed in float32 (at::opmath_type): sample positions,
// sums, and the gradient accumulation (the atomic backward accumulates into float32
// buffers that are converted at the end).
//
// Two backward kernels:
//  * atomic (default): one thread per output-gradient element scatters its share to the
//    four pixels of every sample with atomicAdd (like torchvision);
//  * deterministic (torch.use_deterministic_algorithms(True)): one thread per input pixel
//    (and 16 channels) gathers the contributions of every RoI that can touch it, in RoI
//    order — no atomics, so results are bitwise reproducible. RoIs are described once by a
//    small prep kernel (level, geometry, footprint) and scanned in shared-memory chunks;
//    blocks (16x16 pixel tiles of every level, one launch) skip RoIs of other levels or
//    whose footprint misses their tile.
// Narrow includes (no ATen/ATen.h, no cuBLAS/cuSPARSE headers) keep compiles quick.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <tuple>
#include <vector>

#include "roi_align_checks.h"
#include "roi_align_common.h"

namespace maskray {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 16;           // deterministic backward: 16x16 pixels per block
constexpr int kChannelGroup = 16;   // deterministic backward: channels per thread
constexpr int kRoiChunk = 128;      // deterministic backward: RoIs staged in shared memory at once

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int grid_size(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), int64_t(sms) * 32)));
}

// The feature maps (or gradient buffers) of one call, passed to kernels by value.
// P: pointer type of the maps, each contiguous [N, C, height[l], width[l]].
template <typename P, typename acc_t>
struct Levels {
  P data[kMaxLevels];
  int height[kMaxLevels];
  int width[kMaxLevels];
  acc_t scale[kMaxLevels];
  int64_t tile_begin[kMaxLevels + 1];  // deterministic backward: first block of each level
  int num_levels;
  LevelMap map;
};

template <typename P, typename acc_t>
Levels<P, acc_t> make_levels(
    const std::vector<P>& data, const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
    const std::vector<double>& scales, const LevelMap& map) {
  Levels<P, acc_t> L{};
  L.num_levels = static_cast<int>(data.size());
  L.map = map;
  for (int l = 0; l < L.num_levels; ++l) {
    L.data[l] = data[l];
    L.height[l] = static_cast<int>(heights[l]);
    L.width[l] = static_cast<int>(widths[l]);
    L.scale[l] = static_cast<acc_t>(scales[l]);
  }
  return L;
}

// Level and geometry of one RoI; false when it samples nothing (invalid RoI, no such level,
// or an empty map).
template <typename scalar_t, typename acc_t, typename P>
__device__ __forceinline__ bool resolve_roi(
    const scalar_t* roi,
    const Levels<P, acc_t>& L,
    int64_t batch_size,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned,
    bool quantize,
    int& level,
    RoiGeometry<acc_t>& g) {
  level = roi_level<acc_t>(roi, L.map);
  if (level < 0 || level >= L.num_levels || L.height[level] == 0 || L.width[level] == 0) return false;
  g = roi_geometry<acc_t>(
      roi, batch_size, L.scale[level], pooled_height, pooled_width, sampling_ratio, aligned, quantize);
  return g.batch >= 0;
}

template <typename T>
__device__ __forceinline__ bool is_empty(const Tap<T>& t) {
  return t.w_lo == T(0) && t.w_hi == T(0);
}

// ---------------------------------------------------------------------------------------
// forward: one thread per output element (n, c, ph, pw)
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) roi_align_forward_kernel(
    int64_t total,
    const Levels<const scalar_t*, acc_t> L,
    const scalar_t* __restrict__ rois,
    int64_t batch_size,
    int64_t channels,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned,
    bool quantize,
    scalar_t* __restrict__ output) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int pw = static_cast<int>(index % pooled_width);
    const int ph = static_cast<int>((index / pooled_width) % pooled_height);
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t n = index / pooled_width / pooled_height / channels;
    int level;
    RoiGeometry<acc_t> g;
    if (!resolve_roi(rois + n * 5, L, batch_size, pooled_height, pooled_width, sampling_ratio, aligned, quantize, level,
                     g)) {
      output[index] = scalar_t(0);
      continue;
    }
    const int height = L.height[level], width = L.width[level];
    const scalar_t* plane = L.data[level] + (g.batch * channels + c) * (int64_t(height) * width);
    acc_t sum = 0;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const Tap<acc_t> ty = linear_tap(sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), height);
      if (is_empty(ty)) continue;
      const scalar_t* row_lo = plane + int64_t(ty.lo) * width;
      const scalar_t* row_hi = plane + int64_t(ty.hi) * width;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const Tap<acc_t> tx = linear_tap(sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), width);
        if (is_empty(tx)) continue;
        const acc_t top = tx.w_lo * static_cast<acc_t>(row_lo[tx.lo]) + tx.w_hi * static_cast<acc_t>(row_lo[tx.hi]);
        const acc_t bottom = tx.w_lo * static_cast<acc_t>(row_hi[tx.lo]) + tx.w_hi * static_cast<acc_t>(row_hi[tx.hi]);
        sum += ty.w_lo * top + ty.w_hi * bottom;
      }
    }
    output[index] = static_cast<scalar_t>(sum / g.count);
  }
}

// ---------------------------------------------------------------------------------------
// backward, atomic: one thread per output-gradient element; accumulates into acc_t
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) roi_align_backward_atomic_kernel(
    int64_t total,
    const scalar_t* __restrict__ grad,
    int64_t sn,
    int64_t sc,
    int64_t sh,
    int64_t sw,
    const scalar_t* __restrict__ rois,
    const Levels<acc_t*, acc_t> L,
    int64_t batch_size,
    int64_t channels,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned,
    bool quantize) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int pw = static_cast<int>(index % pooled_width);
    const int ph = static_cast<int>((index / pooled_width) % pooled_height);
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t n = index / pooled_width / pooled_height / channels;
    int level;
    RoiGeometry<acc_t> g;
    if (!resolve_roi(rois + n * 5, L, batch_size, pooled_height, pooled_width, sampling_ratio, aligned, quantize, level,
                     g)) {
      continue;
    }
    const acc_t gv = static_cast<acc_t>(grad[n * sn + c * sc + ph * sh + pw * sw]) / g.count;
    if (gv == acc_t(0)) continue;
    const int height = L.height[level], width = L.width[level];
    acc_t* plane = L.data[level] + (g.batch * channels + c) * (int64_t(height) * width);
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const Tap<acc_t> ty = linear_tap(sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), height);
      if (is_empty(ty)) continue;
      acc_t* row_lo = plane + int64_t(ty.lo) * width;
      acc_t* row_hi = plane + int64_t(ty.hi) * width;
      const acc_t g_lo = gv * ty.w_lo, g_hi = gv * ty.w_hi;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const Tap<acc_t> tx = linear_tap(sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), width);
        if (is_empty(tx)) continue;
        if (g_lo != acc_t(0)) {
          if (tx.w_lo != acc_t(0)) atomicAdd(row_lo + tx.lo, g_lo * tx.w_lo);
          if (tx.w_hi != acc_t(0)) atomicAdd(row_lo + tx.hi, g_lo * tx.w_hi);
        }
        if (g_hi != acc_t(0)) {
          if (tx.w_lo != acc_t(0)) atomicAdd(row_hi + tx.lo, g_hi * tx.w_lo);
          if (tx.w_hi != acc_t(0)) atomicAdd(row_hi + tx.hi, g_hi * tx.w_hi);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// backward, deterministic
// ---------------------------------------------------------------------------------------

// Per-RoI description for the gather kernel.
template <typename acc_t>
struct RoiDesc {
  acc_t start_h, start_w, bin_h, bin_w, count;
  int level;  // -1: the RoI samples nothing
  int batch, grid_h, grid_w;
  int r0, r1, q0, q1;  // inclusive footprint (rows, columns) that may receive gradient; r1 < r0 if none
};

// Footprint along one axis of the samples start + ... (all bins): pixels [lo, hi].
template <typename acc_t>
__device__ void axis_footprint(acc_t start, acc_t bin, int pooled, int grid, int size, int& lo, int& hi) {
  lo = 0;
  hi = -1;
  if (grid <= 0 || size <= 0) return;
  const acc_t a = sample_coord(start, bin, 0, 0, grid);
  const acc_t b = sample_coord(start, bin, pooled - 1, grid - 1, grid);
  if (!is_finite(a) || !is_finite(b)) {  // overflowing box: every pixel; the exact weights decide
    hi = size - 1;
    return;
  }
  const acc_t vmin = a < b ? a : b, vmax = a < b ? b : a;
  if (vmax < acc_t(-1) || vmin > acc_t(size)) return;
  const acc_t fmin = vmin > acc_t(0) ? vmin : acc_t(0);  // in [0, size]: the casts below are exact
  const acc_t fmax = vmax > acc_t(0) ? (vmax < acc_t(size) ? vmax : acc_t(size)) : acc_t(0);
  lo = static_cast<int>(::floor(fmin)) - 1;  // one pixel of slack each side against rounding
  hi = static_cast<int>(::floor(fmax)) + 2;
  lo = lo < 0 ? 0 : lo;
  hi = hi > size - 1 ? size - 1 : hi;
}

template <typename scalar_t, typename acc_t, typename P>
__global__ void roi_describe_kernel(
    int64_t num_rois,
    const scalar_t* __restrict__ rois,
    const Levels<P, acc_t> L,
    int64_t batch_size,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned,
    bool quantize,
    RoiDesc<acc_t>* __restrict__ out) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= num_rois) return;
  RoiDesc<acc_t> d;
  int level;
  RoiGeometry<acc_t> g;
  if (!resolve_roi(rois + n * 5, L, batch_size, pooled_height, pooled_width, sampling_ratio, aligned, quantize, level,
                     g)) {
    d.level = -1;
    d.batch = -1;
    d.r0 = d.q0 = 0;
    d.r1 = d.q1 = -1;
    d.grid_h = d.grid_w = 0;
    d.start_h = d.start_w = d.bin_h = d.bin_w = acc_t(0);
    d.count = acc_t(1);
    out[n] = d;
    return;
  }
  d.start_h = g.start_h;
  d.start_w = g.start_w;
  d.bin_h = g.bin_h;
  d.bin_w = g.bin_w;
  d.count = g.count;
  d.level = level;
  d.batch = static_cast<int>(g.batch);
  d.grid_h = g.grid_h;
  d.grid_w = g.grid_w;
  axis_footprint(g.start_h, g.bin_h, pooled_height, g.grid_h, L.height[level], d.r0, d.r1);
  axis_footprint(g.start_w, g.bin_w, pooled_width, g.grid_w, L.width[level], d.q0, d.q1);
  out[n] = d;
}

// Samples (global index s = p * grid + i, 0 <= s < pooled * grid) that may touch pixel `pix`.
template <typename acc_t>
__device__ __forceinline__ void candidate_samples(
    acc_t start, acc_t bin, int grid, int pooled, int pix, int& s_lo, int& s_hi) {
  const int total = pooled * grid;  // <= kMaxPooledSize * kMaxSamplingGrid
  const acc_t step = bin / static_cast<acc_t>(grid);
  s_lo = 0;
  s_hi = total - 1;
  if (step > acc_t(1e-6) || step < acc_t(-1e-6)) {
    // sample s sits near start + (s + 0.5) * step; it touches pix when within 1 pixel of it
    const acc_t a = (static_cast<acc_t>(pix - 1) - start) / step - acc_t(0.5);
    const acc_t b = (static_cast<acc_t>(pix + 1) - start) / step - acc_t(0.5);
    const acc_t lo = (a < b ? a : b) - acc_t(1), hi = (a < b ? b : a) + acc_t(1);
    if (hi < acc_t(0) || lo > static_cast<acc_t>(total)) {
      s_lo = 0;
      s_hi = -1;
      return;
    }
    // NaN comparisons are false: a NaN bound keeps the full range
    s_lo = lo > acc_t(0) ? static_cast<int>(::floor(lo)) : 0;
    s_hi = hi < static_cast<acc_t>(total - 1) ? static_cast<int>(::ceil(hi)) : total - 1;
  }
}

// Weight of sample s on pixel `pix` along one axis.
template <typename acc_t>
__device__ __forceinline__ acc_t sample_weight(acc_t start, acc_t bin, int grid, int s, int size, int pix) {
  const Tap<acc_t> t = linear_tap(sample_coord(start, bin, s / grid, s % grid, grid), size);
  acc_t w = acc_t(0);
  if (t.lo == pix) w += t.w_lo;
  if (t.hi == pix) w += t.w_hi;
  return w;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTile* kTile) roi_align_backward_gather_kernel(
    const scalar_t* __restrict__ grad,
    int64_t sn,
    int64_t sc,
    int64_t sh,
    int64_t sw,
    const RoiDesc<acc_t>* __restrict__ desc,
    int64_t num_rois,
    int64_t channels,
    int pooled_height,
    int pooled_width,
    const Levels<scalar_t*, acc_t> L) {
  __shared__ RoiDesc<acc_t> rois_s[kRoiChunk];
  // which level, image and 16x16 tile this block owns (blocks of level l: [tile_begin[l], tile_begin[l+1]))
  int level = 0;
  while (level + 1 < L.num_levels && int64_t(blockIdx.x) >= L.tile_begin[level + 1]) ++level;
  const int height = L.height[level], width = L.width[level];
  const int tiles_x = (width + kTile - 1) / kTile;
  const int tiles_y = (height + kTile - 1) / kTile;
  int64_t t = int64_t(blockIdx.x) - L.tile_begin[level];
  const int tile_x = static_cast<int>(t % tiles_x);
  t /= tiles_x;
  const int tile_y = static_cast<int>(t % tiles_y);
  const int b = static_cast<int>(t / tiles_y);
  const int tile_r0 = tile_y * kTile, tile_r1 = min(tile_r0 + kTile, height) - 1;
  const int tile_q0 = tile_x * kTile, tile_q1 = min(tile_q0 + kTile, width) - 1;
  const int r = tile_r0 + static_cast<int>(threadIdx.x) / kTile;
  const int q = tile_q0 + static_cast<int>(threadIdx.x) % kTile;
  const bool inside = r < height && q < width;
  const int64_t c0 = int64_t(blockIdx.y) * kChannelGroup;
  const int nc = static_cast<int>(channels - c0 < kChannelGroup ? channels - c0 : kChannelGroup);

  acc_t acc[kChannelGroup];
#pragma unroll
  for (int k = 0; k < kChannelGroup; ++k) acc[k] = acc_t(0);

  for (int64_t chunk = 0; chunk < num_rois; chunk += kRoiChunk) {
    const int m = static_cast<int>(num_rois - chunk < kRoiChunk ? num_rois - chunk : kRoiChunk);
    __syncthreads();
    for (int i = threadIdx.x; i < m; i += blockDim.x) rois_s[i] = desc[chunk + i];
    __syncthreads();
    for (int j = 0; j < m; ++j) {
      const RoiDesc<acc_t>& d = rois_s[j];
      // block-uniform rejection: other level or image, or footprint misses this tile
      if (d.level != level || d.batch != b || d.r1 < tile_r0 || d.r0 > tile_r1 || d.q1 < tile_q0 ||
          d.q0 > tile_q1) {
        continue;
      }
      if (!inside || r < d.r0 || r > d.r1 || q < d.q0 || q > d.q1) continue;
      int sy_lo, sy_hi, sx_lo, sx_hi;
      candidate_samples(d.start_h, d.bin_h, d.grid_h, pooled_height, r, sy_lo, sy_hi);
      candidate_samples(d.start_w, d.bin_w, d.grid_w, pooled_width, q, sx_lo, sx_hi);
      const scalar_t* g_roi = grad + (chunk + j) * sn + c0 * sc;
      for (int sy = sy_lo; sy <= sy_hi; ++sy) {
        const acc_t wy = sample_weight(d.start_h, d.bin_h, d.grid_h, sy, height, r);
        if (wy == acc_t(0)) continue;
        const scalar_t* g_row = g_roi + (sy / d.grid_h) * sh;
        for (int sx = sx_lo; sx <= sx_hi; ++sx) {
          const acc_t wx = sample_weight(d.start_w, d.bin_w, d.grid_w, sx, width, q);
          if (wx == acc_t(0)) continue;
          const acc_t w = wy * wx / d.count;
          const scalar_t* g_bin = g_row + (sx / d.grid_w) * sw;
#pragma unroll
          for (int k = 0; k < kChannelGroup; ++k) {
            if (k < nc) acc[k] += w * static_cast<acc_t>(g_bin[k * sc]);
          }
        }
      }
    }
  }
  if (!inside) return;
  const int64_t plane = int64_t(height) * width;
  scalar_t* out = L.data[level] + (int64_t(b) * channels + c0) * plane + int64_t(r) * width + q;
#pragma unroll
  for (int k = 0; k < kChannelGroup; ++k) {
    if (k < nc) out[k * plane] = static_cast<scalar_t>(acc[k]);
  }
}

// ---------------------------------------------------------------------------------------
// RoIPool (maskray::roi_pool, multi_level_roi_pool, roi_pool_backward)
// ---------------------------------------------------------------------------------------
// argmax: flat index into the call's feature maps taken as one vector, levels one after the
// other (offset[l] = elements of the levels before l); -1 where nothing was pooled (also for
// an invalid RoI, whose output is zeros). The backward adds each output gradient to its
// argmax element: atomically, or (deterministic) after one stable sort of argmax, one thread
// per run of equal targets summing the run in output order.

// Level offsets of the flat argmax space: data[l] holds elements [offset[l], offset[l + 1]).
template <typename P>
struct FlatLevels {
  P data[kMaxLevels];
  int64_t offset[kMaxLevels + 1];
  int num_levels;
};

template <typename P>
__device__ __forceinline__ int flat_level(const FlatLevels<P>& F, int64_t idx) {
  int l = 0;
  while (l + 1 < F.num_levels && idx >= F.offset[l + 1]) ++l;
  return l;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) roi_pool_forward_kernel(
    int64_t total,
    const Levels<const scalar_t*, acc_t> L,
    const FlatLevels<const scalar_t*> F,
    const scalar_t* __restrict__ rois,
    int64_t batch_size,
    int64_t channels,
    int pooled_height,
    int pooled_width,
    scalar_t* __restrict__ output,
    int64_t* __restrict__ argmax) {
  // torchvision starts every non-empty bin from -FLT_MAX (also for double)
  const acc_t lowest = static_cast<acc_t>(-FLT_MAX);
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int pw = static_cast<int>(index % pooled_width);
    const int ph = static_cast<int>((index / pooled_width) % pooled_height);
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t n = index / pooled_width / pooled_height / channels;
    const scalar_t* roi = rois + n * 5;
    const int level = roi_level<acc_t>(roi, L.map);
    const PoolGeometry<acc_t> g =
        level < 0 || level >= L.num_levels
            ? PoolGeometry<acc_t>{-1, 0, 0, acc_t(0), acc_t(0)}
            : roi_pool_geometry<acc_t>(roi, batch_size, L.scale[level], pooled_height, pooled_width);
    if (g.batch < 0 || L.height[level] == 0 || L.width[level] == 0) {
      output[index] = scalar_t(0);
      argmax[index] = -1;
      continue;
    }
    const int height = L.height[level], width = L.width[level];
    int h0, h1, w0, w1;
    pool_bin(g.start_h, g.bin_h, ph, height, h0, h1);
    pool_bin(g.start_w, g.bin_w, pw, width, w0, w1);
    const int64_t plane_index = (g.batch * channels + c) * (int64_t(height) * width);
    const scalar_t* plane = L.data[level] + plane_index;
    const bool empty = h1 <= h0 || w1 <= w0;
    acc_t best = empty ? acc_t(0) : lowest;
    int64_t arg = -1;
    for (int h = h0; h < h1; ++h) {
      const scalar_t* row = plane + int64_t(h) * width;
      for (int w = w0; w < w1; ++w) {
        const acc_t v = static_cast<acc_t>(row[w]);
        if (v > best) {
          best = v;
          arg = int64_t(h) * width + w;
        }
      }
    }
    output[index] = static_cast<scalar_t>(best);
    argmax[index] = arg < 0 ? int64_t(-1) : F.offset[level] + plane_index + arg;
  }
}

// Offset of output element `index` (contiguous [K, C, PH, PW] numbering) in a strided grad.
__device__ __forceinline__ int64_t grad_offset(
    int64_t index, int64_t channels, int PH, int PW, int64_t sn, int64_t sc, int64_t sh, int64_t sw) {
  const int64_t pw = index % PW;
  const int64_t ph = (index / PW) % PH;
  const int64_t c = (index / PW / PH) % channels;
  const int64_t n = index / PW / PH / channels;
  return n * sn + c * sc + ph * sh + pw * sw;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) roi_pool_backward_atomic_kernel(
    int64_t total,
    const scalar_t* __restrict__ grad,
    int64_t sn,
    int64_t sc,
    int64_t sh,
    int64_t sw,
    int64_t channels,
    int PH,
    int PW,
    const int64_t* __restrict__ argmax,
    const FlatLevels<acc_t*> F) {
  const int64_t size = F.offset[F.num_levels];
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t idx = argmax[index];
    if (idx < 0 || idx >= size) continue;  // nothing pooled (or a bad index from a direct call)
    const int l = flat_level(F, idx);
    atomicAdd(F.data[l] + (idx - F.offset[l]),
              static_cast<acc_t>(grad[grad_offset(index, channels, PH, PW, sn, sc, sh, sw)]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) roi_pool_backward_sorted_kernel(
    int64_t total,
    const int64_t* __restrict__ keys,  // argmax, sorted (stable)
    const int64_t* __restrict__ perm,  // output element of each key
    const scalar_t* __restrict__ grad,
    int64_t sn,
    int64_t sc,
    int64_t sh,
    int64_t sw,
    int64_t channels,
    int PH,
    int PW,
    const FlatLevels<scalar_t*> F) {
  const int64_t size = F.offset[F.num_levels];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t idx = keys[i];
    if (idx < 0 || idx >= size || (i > 0 && keys[i - 1] == idx)) continue;  // not the start of a run
    acc_t sum = 0;
    for (int64_t j = i; j < total && keys[j] == idx; ++j) {
      sum += static_cast<acc_t>(grad[grad_offset(perm[j], channels, PH, PW, sn, sc, sh, sw)]);
    }
    const int l = flat_level(F, idx);
    F.data[l][idx - F.offset[l]] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// host functions
// ---------------------------------------------------------------------------------------

void check_rois(const char* op, const at::Tensor& rois, const at::Tensor& like) {
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5, "maskray::", op, ": rois must be [K, 5] (batch index, x1, y1, x2, y2), got ",
      rois.sizes());
  TORCH_CHECK(like.is_cuda() && rois.is_cuda(), "maskray::", op, ": CUDA kernel got tensors on ", like.device(),
              " and ", rois.device());
  TORCH_CHECK(like.device() == rois.device(), "maskray::", op, ": tensors on different devices (", like.device(),
              " vs ", rois.device(), ")");
  TORCH_CHECK(like.scalar_type() == rois.scalar_type(), "maskray::", op, ": dtypes differ (", like.scalar_type(),
              " vs ", rois.scalar_type(), ")");
}

at::Tensor forward_levels_cuda(
    const char* op,
    at::TensorList features,
    const at::Tensor& rois,
    const std::vector<double>& scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    int64_t mode,
    const LevelMap& map) {
  const bool quantize = quantize_arg(op, mode);
  TORCH_CHECK(!features.empty() && features.size() <= size_t(kMaxLevels), "maskray::", op, ": 1 to ", kMaxLevels,
              " feature maps, got ", features.size());
  TORCH_CHECK(scales.size() == features.size(), "maskray::", op, ": ", features.size(), " feature maps but ",
              scales.size(), " scales");
  check_params(op, scales, pooled_height, pooled_width, sampling_ratio);
  const at::Tensor& first = features[0];
  std::vector<at::Tensor> inputs;
  std::vector<int64_t> heights, widths;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "maskray::", op, ": feature map ", l, " must be [N, C, H, W], got ", f.sizes());
    TORCH_CHECK(
        f.size(0) == first.size(0) && f.size(1) == first.size(1) && f.scalar_type() == first.scalar_type() &&
            f.device() == first.device(),
        "maskray::", op, ": feature map ", l, " differs from map 0 in batch, channels, dtype or device");
    check_map_size(op, f.size(2), f.size(3));
    inputs.push_back(f.contiguous());
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  check_rois(op, rois, first);
  const c10::cuda::CUDAGuard device_guard(first.device());
  at::Tensor output = at::empty({rois.size(0), first.size(1), pooled_height, pooled_width}, first.options());
  if (output.numel() == 0) return output;
  const at::Tensor r = rois.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "maskray_roi_align_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const at::Tensor& t : inputs) ptrs.push_back(t.const_data_ptr<scalar_t>());
    const auto L = make_levels<const scalar_t*, acc_t>(ptrs, heights, widths, scales, map);
    roi_align_forward_kernel<scalar_t, acc_t><<<grid_size(total), kThreads, 0, stream>>>(
        total, L, r.const_data_ptr<scalar_t>(), first.size(0), first.size(1), static_cast<int>(pooled_height),
        static_cast<int>(pooled_width), sampling_arg(sampling_ratio), aligned, quantize,
        output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> backward_levels_cuda(
    const char* op,
    const at::Tensor& grad,
    const at::Tensor& rois,
    const std::vector<double>& scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    at::IntArrayRef heights_in,
    at::IntArrayRef widths_in,
    int64_t sampling_ratio,
    bool aligned,
    bool deterministic,
    int64_t mode,
    const LevelMap& map) {
  const bool quantize = quantize_arg(op, mode);
  const size_t num_levels = scales.size();
  TORCH_CHECK(
      num_levels >= 1 && num_levels <= size_t(kMaxLevels) && heights_in.size() == num_levels &&
          widths_in.size() == num_levels,
      "maskray::", op, ": need one height, width and scale per level (1 to ", kMaxLevels, " levels)");
  check_params(op, scales, pooled_height, pooled_width, sampling_ratio);
  check_rois(op, rois, grad);
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
          grad.size(2) == pooled_height && grad.size(3) == pooled_width,
      "maskray::", op, ": grad has shape ", grad.sizes(), ", expected [", rois.size(0), ", ", channels, ", ",
      pooled_height, ", ", pooled_width, "]");
  TORCH_CHECK(batch_size >= 0 && channels >= 0, "maskray::", op, ": negative batch size or channels");
  std::vector<int64_t> heights(heights_in.begin(), heights_in.end()), widths(widths_in.begin(), widths_in.end());
  for (size_t l = 0; l < num_levels; ++l) check_map_size(op, heights[l], widths[l]);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const at::ScalarType acc_type = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> result;
  if (grad.numel() == 0) {
    for (size_t l = 0; l < num_levels; ++l) {
      result.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options()));
    }
    return result;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor r = rois.contiguous();
  const int64_t K = rois.size(0);
  const int PH = static_cast<int>(pooled_height), PW = static_cast<int>(pooled_width);
  const int SR = sampling_arg(sampling_ratio);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maskray_roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (deterministic) {
      std::vector<scalar_t*> ptrs;
      for (size_t l = 0; l < num_levels; ++l) {
        result.push_back(at::empty({batch_size, channels, heights[l], widths[l]}, grad.options()));
        ptrs.push_back(result.back().mutable_data_ptr<scalar_t>());
      }
      auto L = make_levels<scalar_t*, acc_t>(ptrs, heights, widths, scales, map);
      L.tile_begin[0] = 0;
      for (size_t l = 0; l < num_levels; ++l) {
        L.tile_begin[l + 1] = L.tile_begin[l] + batch_size * ceil_div(heights[l], kTile) * ceil_div(widths[l], kTile);
      }
      const int64_t tiles = L.tile_begin[num_levels];
      if (tiles == 0 || channels == 0) return;
      TORCH_CHECK(tiles <= int64_t(0x7fffffff), "maskray::", op, ": feature maps too large (", tiles, " tiles)");
      const int64_t channel_groups = ceil_div(channels, kChannelGroup);
      TORCH_CHECK(channel_groups <= 65535, "maskray::", op, ": too many channels (", channels, ")");
      at::Tensor desc = at::empty(
          {static_cast<int64_t>(K * sizeof(RoiDesc<acc_t>))}, grad.options().dtype(at::kByte));
      auto* desc_ptr = reinterpret_cast<RoiDesc<acc_t>*>(desc.mutable_data_ptr());
      roi_describe_kernel<scalar_t, acc_t><<<ceil_div(K, kThreads), kThreads, 0, stream>>>(
          K, r.const_data_ptr<scalar_t>(), L, batch_size, PH, PW, SR, aligned, quantize, desc_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 blocks(static_cast<unsigned>(tiles), static_cast<unsigned>(channel_groups));
      roi_align_backward_gather_kernel<scalar_t, acc_t><<<blocks, kTile * kTile, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3), desc_ptr,
          K, channels, PH, PW, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      std::vector<at::Tensor> acc;
      std::vector<acc_t*> ptrs;
      for (size_t l = 0; l < num_levels; ++l) {
        acc.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options().dtype(acc_type)));
        ptrs.push_back(acc.back().mutable_data_ptr<acc_t>());
      }
      const auto L = make_levels<acc_t*, acc_t>(ptrs, heights, widths, scales, map);
      const int64_t total = grad.numel();
      roi_align_backward_atomic_kernel<scalar_t, acc_t><<<grid_size(total), kThreads, 0, stream>>>(
          total, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          r.const_data_ptr<scalar_t>(), L, batch_size, channels, PH, PW, SR, aligned, quantize);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (at::Tensor& t : acc) result.push_back(t.scalar_type() == grad.scalar_type() ? t : t.to(grad.scalar_type()));
    }
  });
  return result;
}

at::Tensor roi_align_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    int64_t mode) {
  TORCH_CHECK(input.dim() == 4, "maskray::roi_align: input must be [N, C, H, W], got ", input.sizes());
  return forward_levels_cuda(
      "roi_align", {input}, rois, {spatial_scale}, pooled_height, pooled_width, sampling_ratio, aligned, mode,
      kSingleLevel);
}

at::Tensor roi_align_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t sampling_ratio,
    bool aligned,
    bool deterministic,
    int64_t mode) {
  return backward_levels_cuda(
      "roi_align_backward", grad, rois, {spatial_scale}, pooled_height, pooled_width, batch_size, channels, {height},
      {width}, sampling_ratio, aligned, deterministic, mode, kSingleLevel)[0];
}

at::Tensor multi_level_roi_align_cuda(
    at::TensorList features,
    const at::Tensor& rois,
    at::ArrayRef<double> scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    int64_t k_min,
    int64_t k_max,
    double canonical_scale,
    double canonical_level,
    double eps,
    int64_t mode) {
  const char* op = "multi_level_roi_align";
  const LevelMap map = make_level_map(op, features.size(), k_min, k_max, canonical_scale, canonical_level, eps);
  return forward_levels_cuda(
      op, features, rois, scales.vec(), pooled_height, pooled_width, sampling_ratio, aligned, mode, map);
}

std::vector<at::Tensor> multi_level_roi_align_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& rois,
    at::ArrayRef<double> scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    at::IntArrayRef heights,
    at::IntArrayRef widths,
    int64_t sampling_ratio,
    bool aligned,
    int64_t k_min,
    int64_t k_max,
    double canonical_scale,
    double canonical_level,
    double eps,
    bool deterministic,
    int64_t mode) {
  const char* op = "multi_level_roi_align_backward";
  const LevelMap map = make_level_map(op, scales.size(), k_min, k_max, canonical_scale, canonical_level, eps);
  return backward_levels_cuda(
      op, grad, rois, scales.vec(), pooled_height, pooled_width, batch_size, channels, heights, widths,
      sampling_ratio, aligned, deterministic, mode, map);
}

std::tuple<at::Tensor, at::Tensor> pool_forward_levels_cuda(
    const char* op,
    at::TensorList features,
    const at::Tensor& rois,
    const std::vector<double>& scales,
    int64_t pooled_height,
    int64_t pooled_width,
    const LevelMap& map) {
  TORCH_CHECK(!features.empty() && features.size() <= size_t(kMaxLevels), "maskray::", op, ": 1 to ", kMaxLevels,
              " feature maps, got ", features.size());
  TORCH_CHECK(scales.size() == features.size(), "maskray::", op, ": ", features.size(), " feature maps but ",
              scales.size(), " scales");
  check_params(op, scales, pooled_height, pooled_width, 0);
  const at::Tensor& first = features[0];
  std::vector<at::Tensor> inputs;
  std::vector<int64_t> heights, widths;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "maskray::", op, ": feature map ", l, " must be [N, C, H, W], got ", f.sizes());
    TORCH_CHECK(
        f.size(0) == first.size(0) && f.size(1) == first.size(1) && f.scalar_type() == first.scalar_type() &&
            f.device() == first.device(),
        "maskray::", op, ": feature map ", l, " differs from map 0 in batch, channels, dtype or device");
    check_map_size(op, f.size(2), f.size(3));
    inputs.push_back(f.contiguous());
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  check_rois(op, rois, first);
  const c10::cuda::CUDAGuard device_guard(first.device());
  at::Tensor output = at::empty({rois.size(0), first.size(1), pooled_height, pooled_width}, first.options());
  at::Tensor argmax = at::empty(output.sizes(), first.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, argmax};
  const at::Tensor r = rois.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "maskray_roi_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const at::Tensor& t : inputs) ptrs.push_back(t.const_data_ptr<scalar_t>());
    const auto L = make_levels<const scalar_t*, acc_t>(ptrs, heights, widths, scales, map);
    FlatLevels<const scalar_t*> F{};
    F.num_levels = static_cast<int>(inputs.size());
    for (size_t l = 0; l < inputs.size(); ++l) {
      F.data[l] = ptrs[l];
      F.offset[l + 1] = F.offset[l] + inputs[l].numel();
    }
    roi_pool_forward_kernel<scalar_t, acc_t><<<grid_size(total), kThreads, 0, stream>>>(
        total, L, F, r.const_data_ptr<scalar_t>(), first.size(0), first.size(1), static_cast<int>(pooled_height),
        static_cast<int>(pooled_width), output.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, argmax};
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  TORCH_CHECK(input.dim() == 4, "maskray::roi_pool: input must be [N, C, H, W], got ", input.sizes());
  return pool_forward_levels_cuda("roi_pool", {input}, rois, {spatial_scale}, pooled_height, pooled_width,
                                  kSingleLevel);
}

std::tuple<at::Tensor, at::Tensor> multi_level_roi_pool_cuda(
    at::TensorList features,
    const at::Tensor& rois,
    at::ArrayRef<double> scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t k_min,
    int64_t k_max,
    double canonical_scale,
    double canonical_level,
    double eps) {
  const char* op = "multi_level_roi_pool";
  const LevelMap map = make_level_map(op, features.size(), k_min, k_max, canonical_scale, canonical_level, eps);
  return pool_forward_levels_cuda(op, features, rois, scales.vec(), pooled_height, pooled_width, map);
}

std::vector<at::Tensor> roi_pool_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& argmax,
    int64_t batch_size,
    int64_t channels,
    at::IntArrayRef heights,
    at::IntArrayRef widths,
    bool deterministic) {
  const char* op = "roi_pool_backward";
  const std::vector<int64_t> offset = check_pool_backward(op, grad, argmax, batch_size, channels, heights, widths);
  TORCH_CHECK(grad.is_cuda(), "maskray::", op, ": CUDA kernel got a ", grad.device(), " tensor");
  const size_t num_levels = heights.size();
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const at::ScalarType acc_type = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> result;
  if (grad.numel() == 0) {
    for (size_t l = 0; l < num_levels; ++l) {
      result.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options()));
    }
    return result;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor a = argmax.contiguous();
  const int64_t total = grad.numel();
  const int PH = static_cast<int>(grad.size(2)), PW = static_cast<int>(grad.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maskray_roi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (deterministic) {
      FlatLevels<scalar_t*> F{};
      F.num_levels = static_cast<int>(num_levels);
      for (size_t l = 0; l < num_levels; ++l) {
        result.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options()));
        F.data[l] = result.back().mutable_data_ptr<scalar_t>();
        F.offset[l + 1] = offset[l + 1];
      }
      const auto sorted = at::sort(a.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor& keys = std::get<0>(sorted);
      const at::Tensor& perm = std::get<1>(sorted);
      roi_pool_backward_sorted_kernel<scalar_t, acc_t><<<grid_size(total), kThreads, 0, stream>>>(
          total, keys.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), grad.const_data_ptr<scalar_t>(),
          grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3), channels, PH, PW, F);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      std::vector<at::Tensor> acc;
      FlatLevels<acc_t*> F{};
      F.num_levels = static_cast<int>(num_levels);
      for (size_t l = 0; l < num_levels; ++l) {
        acc.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options().dtype(acc_type)));
        F.data[l] = acc.back().mutable_data_ptr<acc_t>();
        F.offset[l + 1] = offset[l + 1];
      }
      roi_pool_backward_atomic_kernel<scalar_t, acc_t><<<grid_size(total), kThreads, 0, stream>>>(
          total, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          channels, PH, PW, a.const_data_ptr<int64_t>(), F);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (at::Tensor& t : acc) result.push_back(t.scalar_type() == grad.scalar_type() ? t : t.to(grad.scalar_type()));
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskray, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
  m.impl("multi_level_roi_align", &multi_level_roi_align_cuda);
  m.impl("multi_level_roi_align_backward", &multi_level_roi_align_backward_cuda);
  m.impl("roi_pool", &roi_pool_forward_cuda);
  m.impl("multi_level_roi_pool", &multi_level_roi_pool_cuda);
  m.impl("roi_pool_backward", &roi_pool_backward_cuda);
}

}  // namespace maskray
