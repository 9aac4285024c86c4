// Geometry shared by the CPU and CUDA RoIAlign kernels.
//
// Every kernel computes sample positions with exactly these functions, in the same
// floating-point order as torchvision's kernels, so all backends agree with each other
// and with torchvision.ops.roi_align. RoIAlign's bilinear weights are separable: a sample
// at (y, x) weighs pixel (r, q) by wy(r) * wx(q), and a sample outside the map
// (y < -1, y > H, x < -1 or x > W) has wy == 0 or wx == 0, so the kernels work with one
// dimension at a time ("taps").
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MASKRAY_HD __host__ __device__ __forceinline__
#else
#define MASKRAY_HD inline
#endif

namespace maskray {

// One RoI mapped onto the feature map.
template <typename T>
struct RoiGeometry {
  int64_t batch;
  T start_h, start_w;  // top-left corner in feature-map pixels
  T bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;  // samples per bin along y and x
  T count;             // samples per bin (>= 1), the averaging divisor
};

// `roi` points at (batch_index, x1, y1, x2, y2) in input-image coordinates.
template <typename T, typename R>
MASKRAY_HD RoiGeometry<T> roi_geometry(
    const R* roi,
    T spatial_scale,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned) {
  RoiGeometry<T> g;
  g.batch = static_cast<int64_t>(static_cast<T>(roi[0]));
  const T offset = aligned ? static_cast<T>(0.5) : static_cast<T>(0.0);
  g.start_w = static_cast<T>(roi[1]) * spatial_scale - offset;
  g.start_h = static_cast<T>(roi[2]) * spatial_scale - offset;
  const T end_w = static_cast<T>(roi[3]) * spatial_scale - offset;
  const T end_h = static_cast<T>(roi[4]) * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy behaviour: force malformed RoIs to be 1x1
    roi_w = roi_w > static_cast<T>(1.) ? roi_w : static_cast<T>(1.);
    roi_h = roi_h > static_cast<T>(1.) ? roi_h : static_cast<T>(1.);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio
                                : static_cast<int>(::ceil(roi_h / static_cast<T>(pooled_height)));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio
                                : static_cast<int>(::ceil(roi_w / static_cast<T>(pooled_width)));
  if (g.grid_h < 0) g.grid_h = 0;  // negative-size RoIs with aligned=True
  if (g.grid_w < 0) g.grid_w = 0;
  const int n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample `i` (0..grid-1) inside bin `p`, as torchvision computes it.
template <typename T>
MASKRAY_HD T sample_coord(T start, T bin, int p, int i, int grid) {
  return start + static_cast<T>(p) * bin + static_cast<T>(i + .5f) * bin / static_cast<T>(grid);
}

// Linear interpolation along one axis of length `size`: pixel `lo` gets weight `w_lo`,
// pixel `hi` gets `w_hi`. Samples outside [-1, size] get zero weights (lo = hi = 0).
template <typename T>
struct Tap {
  int lo, hi;
  T w_lo, w_hi;
};

template <typename T>
MASKRAY_HD Tap<T> linear_tap(T v, int size) {
  Tap<T> t;
  if (v < static_cast<T>(-1.0) || v > static_cast<T>(size)) {
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

}  // namespace maskray
