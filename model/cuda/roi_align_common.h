// Geometry shared by the CPU and CUDA kernels of the pooling modes (Mask R-CNN, Table 2):
//  * RoIAlign (mode 0; `aligned` false = torchvision's default, true = detectron2's ROIAlignV2);
//  * RoIWarp  (mode 1): RoIAlign on the box quantized to the feature grid (see roi_geometry);
//  * RoIPool  (mode 2, its own ops maskray::roi_pool / multi_level_roi_pool): quantized max
//    pooling with torchvision.ops.roi_pool's semantics (see roi_pool_geometry / pool_bin).
//
// Every kernel computes sample positions with exactly these functions, in the same
// floating-point order as torchvision's kernels, so all backends agree with each other
// and with torchvision.ops.roi_align. RoIAlign's bilinear weights are separable: a sample
// at (y, x) weighs pixel (r, q) by wy(r) * wx(q), and a sample outside the map
// (y < -1, y > H, x < -1 or x > W, or a NaN coordinate) has wy == 0 or wx == 0, so the
// kernels work with one dimension at a time ("taps").
//
// Hostile input is defined here, once, for every backend:
//  * a RoI with a non-finite coordinate or a batch index that is non-finite, non-integral or
//    outside [0, N) is "invalid": roi_batch() returns -1. The host functions of the CPU
//    kernels reject it (ValueError); the CUDA kernels (which cannot raise without a
//    device-to-host sync) write zeros and no gradient for it; model.ops raises
//    RoIAlignInputError before either runs.
//  * the adaptive sampling grid (sampling_ratio <= 0) is ceil(roi extent / output size)
//    per side, as in torchvision, capped at kMaxSamplingGrid; an explicit sampling_ratio
//    above kMaxSamplingGrid is rejected by the host functions. Work per output element is
//    therefore at most kMaxSamplingGrid^2 samples whatever the box.
//  * coordinates that overflow (inf, or NaN from inf - inf) give empty taps, never an
//    out-of-range index.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MASKRAY_HD __host__ __device__ __forceinline__
#else
#define MASKRAY_HD inline
#endif

namespace maskray {

// Samples per bin side at most (adaptive grids are capped to it; explicit ratios above it
// are rejected). Equal to torchvision whenever a bin spans at most 64 feature-map pixels,
// i.e. RoIs up to 448 (7x7) / 896 (14x14) feature pixels per side.
constexpr int kMaxSamplingGrid = 64;
// Largest accepted output size per side and feature-map side (keeps every int index exact).
constexpr int64_t kMaxPooledSize = 4096;
constexpr int64_t kMaxMapSide = (int64_t(1) << 30);
// Most FPN levels one multi-level call may pool from.
constexpr int kMaxLevels = 8;

MASKRAY_HD float math_sqrt(float v) { return sqrtf(v); }
MASKRAY_HD double math_sqrt(double v) { return sqrt(v); }
MASKRAY_HD float math_log2(float v) { return log2f(v); }
MASKRAY_HD double math_log2(double v) { return log2(v); }
MASKRAY_HD float math_floor(float v) { return floorf(v); }
MASKRAY_HD double math_floor(double v) { return floor(v); }
MASKRAY_HD float math_ceil(float v) { return ceilf(v); }
MASKRAY_HD double math_ceil(double v) { return ceil(v); }
// round half away from zero, as C's round() (what torchvision's roi_pool uses)
MASKRAY_HD float math_round(float v) { return roundf(v); }
MASKRAY_HD double math_round(double v) { return round(v); }

// The pooling modes of the `mode` argument of maskray::roi_align / multi_level_roi_align.
constexpr int kModeAlign = 0;
constexpr int kModeWarp = 1;
constexpr int kModePool = 2;  // not a mode of roi_align: the ops maskray::roi_pool / multi_level_roi_pool

// True for finite values (false for NaN and +-inf), without relying on <cmath> overloads.
template <typename T>
MASKRAY_HD bool is_finite(T v) {
  return v - v == static_cast<T>(0);
}

// Batch index of RoI `roi` = (batch_index, x1, y1, x2, y2), or -1 when the RoI is invalid:
// a non-finite coordinate, or an index that is not an integer in [0, batch_size).
template <typename T, typename R>
MASKRAY_HD int64_t roi_batch(const R* roi, int64_t batch_size) {
  const T b = static_cast<T>(roi[0]);
  if (!(b >= static_cast<T>(0) && b < static_cast<T>(batch_size)) || math_floor(b) != b) return -1;
  for (int i = 1; i < 5; ++i) {
    if (!is_finite(static_cast<T>(roi[i]))) return -1;
  }
  return static_cast<int64_t>(b);
}

// FPN level assignment (eq. 1 of the FPN paper), as torchvision.ops.poolers.LevelMapper:
//   level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), k_min, k_max) - k_min
// computed in T (float for float32 boxes, like torchvision). `enabled == false` (single-level
// pooling) puts every RoI on level 0.
struct LevelMap {
  bool enabled;
  int k_min, k_max;
  double canonical_scale, canonical_level, eps;
};

// Level index in [0, k_max - k_min], or -1 when the area is negative or NaN (torchvision's
// mapper yields NaN there and the RoI's output stays zero).
template <typename T, typename R>
MASKRAY_HD int roi_level(const R* roi, const LevelMap& m) {
  if (!m.enabled) return 0;
  const T w = static_cast<T>(roi[3]) - static_cast<T>(roi[1]);
  const T h = static_cast<T>(roi[4]) - static_cast<T>(roi[2]);
  const T s = math_sqrt(w * h);
  T v = math_floor(static_cast<T>(m.canonical_level) + math_log2(s / static_cast<T>(m.canonical_scale)) +
                   static_cast<T>(m.eps));
  if (v != v) return -1;  // NaN
  if (v < static_cast<T>(m.k_min)) v = static_cast<T>(m.k_min);
  if (v > static_cast<T>(m.k_max)) v = static_cast<T>(m.k_max);
  return static_cast<int>(v) - m.k_min;
}

// One RoI mapped onto the feature map.
template <typename T>
struct RoiGeometry {
  int64_t batch;       // -1: invalid RoI (see roi_batch)
  T start_h, start_w;  // top-left corner in feature-map pixels
  T bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;  // samples per bin along y and x, in [0, kMaxSamplingGrid]
  T count;             // samples per bin (>= 1), the averaging divisor
};

// Adaptive samples per bin side: ceil(extent / pooled) in [0, kMaxSamplingGrid] (0 for an
// empty or negative extent, which samples nothing; NaN/inf extents are capped too).
template <typename T>
MASKRAY_HD int adaptive_grid(T extent, int pooled) {
  const T v = math_ceil(extent / static_cast<T>(pooled));
  if (!(v > static_cast<T>(0))) return 0;
  if (!(v < static_cast<T>(kMaxSamplingGrid))) return kMaxSamplingGrid;
  return static_cast<int>(v);
}

// `roi` points at (batch_index, x1, y1, x2, y2) in input-image coordinates.
//
// RoIAlign (quantize == false): the corners are x1 * spatial_scale - offset, ... with
// offset = 0.5 when `aligned`, else 0 (then an extent below 1 is raised to 1, torchvision's
// "legacy" rule).
// RoIWarp (quantize == true): each corner is first rounded to the feature grid,
// x1' = round(x1 * spatial_scale) (half away from zero, as RoIPool), and RoIAlign then runs
// unchanged on the quantized box: start = x1' - offset, extent = x2' - x1' (at least 1 when
// not `aligned`), bins of extent / pooled (not quantized), the adaptive grid
// ceil(extent / pooled) capped at kMaxSamplingGrid, bilinear samples averaged per bin.
template <typename T, typename R>
MASKRAY_HD RoiGeometry<T> roi_geometry(
    const R* roi,
    int64_t batch_size,
    T spatial_scale,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned,
    bool quantize = false) {
  RoiGeometry<T> g;
  g.batch = roi_batch<T>(roi, batch_size);
  const T offset = aligned ? static_cast<T>(0.5) : static_cast<T>(0.0);
  T end_w, end_h;
  if (quantize) {
    g.start_w = math_round(static_cast<T>(roi[1]) * spatial_scale) - offset;
    g.start_h = math_round(static_cast<T>(roi[2]) * spatial_scale) - offset;
    end_w = math_round(static_cast<T>(roi[3]) * spatial_scale) - offset;
    end_h = math_round(static_cast<T>(roi[4]) * spatial_scale) - offset;
  } else {
    g.start_w = static_cast<T>(roi[1]) * spatial_scale - offset;
    g.start_h = static_cast<T>(roi[2]) * spatial_scale - offset;
    end_w = static_cast<T>(roi[3]) * spatial_scale - offset;
    end_h = static_cast<T>(roi[4]) * spatial_scale - offset;
  }
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy behaviour: force malformed RoIs to be 1x1
    roi_w = roi_w > static_cast<T>(1.) ? roi_w : static_cast<T>(1.);
    roi_h = roi_h > static_cast<T>(1.) ? roi_h : static_cast<T>(1.);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_h, pooled_height);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_w, pooled_width);
  const T n = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = n > static_cast<T>(1) ? n : static_cast<T>(1);
  if (g.batch < 0) {  // invalid RoI: sample nothing
    g.grid_h = 0;
    g.grid_w = 0;
  }
  return g;
}

// Coordinate of sample `i` (0..grid-1) inside bin `p`, as torchvision computes it.
template <typename T>
MASKRAY_HD T sample_coord(T start, T bin, int p, int i, int grid) {
  return start + static_cast<T>(p) * bin + static_cast<T>(i + .5f) * bin / static_cast<T>(grid);
}

// Linear interpolation along one axis of length `size`: pixel `lo` gets weight `w_lo`,
// pixel `hi` gets `w_hi`. Samples outside [-1, size], and NaN samples, get zero weights
// (lo = hi = 0).
template <typename T>
struct Tap {
  int lo, hi;
  T w_lo, w_hi;
};

template <typename T>
MASKRAY_HD Tap<T> linear_tap(T v, int size) {
  Tap<T> t;
  if (!(v >= static_cast<T>(-1.0) && v <= static_cast<T>(size))) {  // also catches NaN
    t.lo = 0;
    t.hi = 0;
    t.w_lo = static_cast<T>(0);
    t.w_hi = static_cast<T>(0);
    return t;
  }
  if (v <= static_cast<T>(0)) v = static_cast<T>(0);
  int lo = static_cast<int>(v);
  int hi;
  if (lo >= size - 1) {
    hi = lo = size - 1;
    v = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = v - static_cast<T>(lo);
  t.lo = lo;
  t.hi = hi;
  t.w_lo = static_cast<T>(1.) - l;
  t.w_hi = l;
  return t;
}

// ---------------------------------------------------------------------------------------
// RoIPool: torchvision.ops.roi_pool's geometry
// ---------------------------------------------------------------------------------------
// corners rounded to the feature grid: start = round(x1 * scale), end = round(x2 * scale)
// (half away from zero); extent = max(end - start + 1, 1); bin = extent / pooled (in T);
// bin p spans [floor(p * bin) + start, ceil((p + 1) * bin) + start) clipped to [0, size);
// an empty bin outputs 0 with no argmax; otherwise the first maximum in row-major order wins
// (strict >, starting from -FLT_MAX, as torchvision). Rounded corners beyond
// +-kMaxPoolCoord are clamped there (torchvision's int cast overflows, undefined behaviour):
// every index stays exact in int64 and a box that large covers the whole map anyway.
constexpr int64_t kMaxPoolCoord = int64_t(1) << 40;

template <typename T>
struct PoolGeometry {
  int64_t batch;             // -1: invalid RoI (see roi_batch)
  int64_t start_h, start_w;  // rounded top-left corner, feature-map pixels
  T bin_h, bin_w;
};

template <typename T>
MASKRAY_HD int64_t pool_coord(T v) {
  const T r = math_round(v);
  if (!(r > static_cast<T>(-kMaxPoolCoord))) return -kMaxPoolCoord;  // also NaN (never reached: invalid)
  if (r > static_cast<T>(kMaxPoolCoord)) return kMaxPoolCoord;
  return static_cast<int64_t>(r);
}

template <typename T, typename R>
MASKRAY_HD PoolGeometry<T> roi_pool_geometry(
    const R* roi, int64_t batch_size, T spatial_scale, int pooled_height, int pooled_width) {
  PoolGeometry<T> g;
  g.batch = roi_batch<T>(roi, batch_size);
  g.start_w = pool_coord(static_cast<T>(roi[1]) * spatial_scale);
  g.start_h = pool_coord(static_cast<T>(roi[2]) * spatial_scale);
  const int64_t end_w = pool_coord(static_cast<T>(roi[3]) * spatial_scale);
  const int64_t end_h = pool_coord(static_cast<T>(roi[4]) * spatial_scale);
  const int64_t roi_w = end_w - g.start_w + 1 > 1 ? end_w - g.start_w + 1 : 1;
  const int64_t roi_h = end_h - g.start_h + 1 > 1 ? end_h - g.start_h + 1 : 1;
  g.bin_h = static_cast<T>(roi_h) / static_cast<T>(pooled_height);
  g.bin_w = static_cast<T>(roi_w) / static_cast<T>(pooled_width);
  return g;
}

// Pixels [lo, hi) of bin `p` along an axis of length `size` (lo >= hi: empty bin).
template <typename T>
MASKRAY_HD void pool_bin(int64_t start, T bin, int p, int size, int& lo, int& hi) {
  int64_t a = static_cast<int64_t>(math_floor(static_cast<T>(p) * bin)) + start;
  int64_t b = static_cast<int64_t>(math_ceil(static_cast<T>(p + 1) * bin)) + start;
  a = a < 0 ? 0 : (a > size ? size : a);
  b = b < 0 ? 0 : (b > size ? size : b);
  lo = static_cast<int>(a);
  hi = static_cast<int>(b);
}

}  // namespace maskray
