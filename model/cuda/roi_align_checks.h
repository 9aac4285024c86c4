// Host-side argument checks shared by the CPU (roi_align.cpp) and CUDA (roi_align_kernel.cu)
// host functions: one definition of what the ops accept. Value errors raise ValueError.
#pragma once

#include <ATen/core/Tensor.h>
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

// The `mode` argument of maskray::roi_align / multi_level_roi_align (and their backwards):
// kModeAlign or kModeWarp; returns true for RoIWarp (quantized corners).
inline bool quantize_arg(const char* op, int64_t mode) {
  TORCH_CHECK_VALUE(
      mode == kModeAlign || mode == kModeWarp, "maskray::", op, ": mode must be ", kModeAlign, " (RoIAlign) or ",
      kModeWarp, " (RoIWarp), got ", mode, mode == kModePool ? " (RoIPool is maskray::roi_pool)" : "");
  return mode == kModeWarp;
}

constexpr LevelMap kSingleLevel{false, 0, 0, 1.0, 0.0, 0.0};

// Shapes of a RoIPool backward (maskray::roi_pool_backward); returns the offsets of the levels
// in the flat index space of argmax, and the total size last.
inline std::vector<int64_t> check_pool_backward(
    const char* op,
    const at::Tensor& grad,
    const at::Tensor& argmax,
    int64_t batch_size,
    int64_t channels,
    at::IntArrayRef heights,
    at::IntArrayRef widths) {
  TORCH_CHECK(
      !heights.empty() && heights.size() <= size_t(kMaxLevels) && heights.size() == widths.size(), "maskray::", op,
      ": need one height and width per level (1 to ", kMaxLevels, " levels)");
  TORCH_CHECK(batch_size >= 0 && channels >= 0, "maskray::", op, ": negative batch size or channels");
  TORCH_CHECK(grad.dim() == 4 && grad.size(1) == channels, "maskray::", op, ": grad has shape ", grad.sizes(),
              ", expected [K, ", channels, ", PH, PW]");
  TORCH_CHECK(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kLong, "maskray::", op,
              ": argmax must be int64 of grad's shape ", grad.sizes(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes());
  TORCH_CHECK(argmax.device() == grad.device(), "maskray::", op, ": tensors on different devices (",
              grad.device(), " vs ", argmax.device(), ")");
  std::vector<int64_t> offset;
  int64_t total = 0;
  for (size_t l = 0; l < heights.size(); ++l) {
    check_map_size(op, heights[l], widths[l]);
    offset.push_back(total);
    total += batch_size * channels * heights[l] * widths[l];
  }
  offset.push_back(total);
  return offset;
}

}  // namespace maskray
