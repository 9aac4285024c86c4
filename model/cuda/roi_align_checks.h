// Host-side argument checks shared by the CPU (roi_align.cpp) and CUDA (roi_align_kernel.cu)
// host functions: one definition of what the ops accept. Value errors raise ValueError.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "roi_align_common.h"

namespace maskray {

// spatial scales finite and positive, output size in [1, kMaxPooledSize], explicit
// sampling_ratio at most kMaxSamplingGrid.
inline void check_params(
    const char* op, const std::vector<double>& scales, int64_t ph, int64_t pw, int64_t sampling_ratio) {
  for (double s : scales) {
    TORCH_CHECK_VALUE(
        std::isfinite(s) && s > 0, "maskray::", op, ": spatial_scale must be finite and positive, got ", s);
  }
  TORCH_CHECK_VALUE(
      ph > 0 && pw > 0 && ph <= kMaxPooledSize && pw <= kMaxPooledSize, "maskray::", op,
      ": output size must be in [1, ", kMaxPooledSize, "], got ", ph, "x", pw);
  TORCH_CHECK_VALUE(
      sampling_ratio <= kMaxSamplingGrid, "maskray::", op, ": sampling_ratio must be at most ", kMaxSamplingGrid,
      " (<= 0 for adaptive), got ", sampling_ratio);
}

inline void check_map_size(const char* op, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(
      height >= 0 && width >= 0 && height <= kMaxMapSide && width <= kMaxMapSide, "maskray::", op,
      ": bad feature map size ", height, "x", width);
}

// The sampling ratio as the kernels take it: > 0 explicit, 0 adaptive.
inline int sampling_arg(int64_t sampling_ratio) {
  return sampling_ratio > 0 ? static_cast<int>(sampling_ratio) : 0;
}

inline LevelMap make_level_map(
    const char* op, int64_t num_levels, int64_t k_min, int64_t k_max, double canonical_scale,
    double canonical_level, double eps) {
  TORCH_CHECK_VALUE(
      num_levels >= 1 && num_levels <= kMaxLevels, "maskray::", op, ": 1 to ", kMaxLevels, " levels, got ",
      num_levels);
  TORCH_CHECK_VALUE(
      k_min <= k_max && std::llabs(k_min) < 1024 && std::llabs(k_max) < 1024, "maskray::", op,
      ": bad level range [", k_min, ", ", k_max, "]");
  TORCH_CHECK_VALUE(
      std::isfinite(canonical_scale) && canonical_scale > 0 && std::isfinite(canonical_level) && std::isfinite(eps),
      "maskray::", op, ": canonical_scale, canonical_level and eps must be finite (scale positive)");
  return LevelMap{true, static_cast<int>(k_min), static_cast<int>(k_max), canonical_scale, canonical_level, eps};
}

constexpr LevelMap kSingleLevel{false, 0, 0, 1.0, 0.0, 0.0};

}  // namespace maskray
