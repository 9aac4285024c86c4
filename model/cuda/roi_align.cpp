// maskray::roi_align, multi_level_roi_align (modes RoIAlign and RoIWarp), roi_pool,
// multi_level_roi_pool and roi_pool_backward — schemas and CPU kernels.
//
// Semantics are torchvision.ops.roi_align's (RoIWarp: on the quantized box) and
// torchvision.ops.roi_pool's (see roi_align_common.h for the geometry and
// for what hostile input does). multi_level_roi_align pools every RoI from the FPN level
// that torchvision's LevelMapper assigns it, in one call: the single-level op is the same
// code with one level and no mapping.
//
// The CPU kernels use the separability of the bilinear weights: per RoI we precompute,
// for every output row ph, the list of feature-map rows it reads with their summed weights
// (and likewise columns per output column pw). The forward pass then first blends the
// needed rows into one contiguous vector per ph (vectorisable), and reads the output bins
// from that vector; the backward pass runs the same two steps in reverse. Both passes are
// parallel over channels with at::parallel_for, every thread owning whole (batch, channel)
// planes of every level, so the backward has no races and is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "roi_align_checks.h"
#include "roi_align_common.h"

namespace maskray {
namespace {

// One feature map of a call: its size and scale (feature-map pixels per image pixel).
struct Level {
  int height, width;
  double scale;
};

// Merged, per-output-row/column sample weights of every RoI.
template <typename T>
struct RoiPlan {
  std::vector<int64_t> batch;  // [K]
  std::vector<int> level;      // [K] index into the levels; -1: the RoI reads nothing
  std::vector<T> count;        // [K] averaging divisor
  std::vector<int> col0;       // [K] first feature-map column read
  std::vector<int> ncols;      // [K] number of columns read (0: the RoI reads nothing)
  std::vector<int64_t> y_off;  // [K * (PH + 1)] ranges into y_row / y_w
  std::vector<int> y_row;      // absolute feature-map row
  std::vector<T> y_w;
  std::vector<int64_t> x_off;  // [K * (PW + 1)] ranges into x_col / x_w
  std::vector<int> x_col;      // column relative to col0
  std::vector<T> x_w;
  int max_cols = 0;
};

// Appends the merged taps of `grid` samples of bin `p` along one axis to (idx, w).
// `dense` is scratch of at least size + 2 zeros; it is left zeroed. size >= 1.
template <typename T>
void append_bin_taps(
    T start,
    T bin,
    int p,
    int grid,
    int size,
    std::vector<T>& dense,
    std::vector<int>& idx,
    std::vector<T>& w) {
  int lo_min = size, hi_max = -1;
  for (int i = 0; i < grid; ++i) {
    const Tap<T> t = linear_tap(sample_coord(start, bin, p, i, grid), size);
    if (t.w_lo == T(0) && t.w_hi == T(0)) continue;  // outside the map
    dense[t.lo] += t.w_lo;
    dense[t.hi] += t.w_hi;
    lo_min = std::min(lo_min, t.lo);
    hi_max = std::max(hi_max, t.hi);
  }
  for (int r = lo_min; r <= hi_max; ++r) {
    if (dense[r] != T(0)) {
      idx.push_back(r);
      w.push_back(dense[r]);
    }
    dense[r] = T(0);
  }
}

// Throws ValueError naming RoI `n` when roi_batch() rejected it.
template <typename T, typename scalar_t>
void reject_roi(const char* op, int64_t n, const scalar_t* roi, int64_t batch_size) {
  bool finite = true;
  for (int i = 1; i < 5; ++i) finite = finite && is_finite(static_cast<T>(roi[i]));
  const double v[5] = {static_cast<double>(static_cast<T>(roi[0])), static_cast<double>(static_cast<T>(roi[1])),
                       static_cast<double>(static_cast<T>(roi[2])), static_cast<double>(static_cast<T>(roi[3])),
                       static_cast<double>(static_cast<T>(roi[4]))};
  if (!finite) {
    TORCH_CHECK_VALUE(false, "maskray::", op, ": rois[", n, "] = (", v[0], ", ", v[1], ", ", v[2], ", ", v[3], ", ",
                      v[4], ") has a non-finite coordinate");
  }
  TORCH_CHECK_VALUE(false, "maskray::", op, ": rois[", n, ", 0] = ", v[0],
                    " is not a batch index of the input (an integer in [0, ", batch_size, "))");
}

template <typename T, typename scalar_t>
RoiPlan<T> make_plan(
    const char* op,
    const at::Tensor& rois,  // contiguous [K, 5]
    int64_t batch_size,
    const std::vector<Level>& levels,
    const LevelMap& map,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned,
    bool quantize) {
  const int64_t K = rois.size(0);
  const scalar_t* r = rois.const_data_ptr<scalar_t>();
  RoiPlan<T> plan;
  plan.batch.resize(K);
  plan.level.resize(K);
  plan.count.resize(K);
  plan.col0.resize(K);
  plan.ncols.resize(K);
  plan.y_off.resize(K * (pooled_height + 1));
  plan.x_off.resize(K * (pooled_width + 1));
  int max_side = 0;
  for (const Level& lv : levels) max_side = std::max({max_side, lv.height, lv.width});
  std::vector<T> dense(static_cast<size_t>(max_side) + 2, T(0));
  for (int64_t n = 0; n < K; ++n) {
    const scalar_t* roi = r + n * 5;
    const int64_t b = roi_batch<T>(roi, batch_size);
    if (b < 0) reject_roi<T>(op, n, roi, batch_size);
    int l = roi_level<T>(roi, map);
    if (l >= static_cast<int>(levels.size()) || (l >= 0 && (levels[l].height == 0 || levels[l].width == 0))) {
      l = -1;  // no such level (or an empty map): nothing to sample, as in torchvision
    }
    plan.batch[n] = b;
    plan.level[n] = l;
    int64_t* yo = plan.y_off.data() + n * (pooled_height + 1);
    int64_t* xo = plan.x_off.data() + n * (pooled_width + 1);
    if (l < 0) {
      std::fill(yo, yo + pooled_height + 1, static_cast<int64_t>(plan.y_row.size()));
      std::fill(xo, xo + pooled_width + 1, static_cast<int64_t>(plan.x_col.size()));
      plan.count[n] = T(1);
      plan.col0[n] = 0;
      plan.ncols[n] = 0;
      continue;
    }
    const int height = levels[l].height, width = levels[l].width;
    const RoiGeometry<T> g = roi_geometry<T>(
        roi, batch_size, static_cast<T>(levels[l].scale), pooled_height, pooled_width, sampling_ratio, aligned,
        quantize);
    plan.count[n] = g.count;
    for (int ph = 0; ph < pooled_height; ++ph) {
      yo[ph] = static_cast<int64_t>(plan.y_row.size());
      append_bin_taps<T>(g.start_h, g.bin_h, ph, g.grid_h, height, dense, plan.y_row, plan.y_w);
    }
    yo[pooled_height] = static_cast<int64_t>(plan.y_row.size());
    const int64_t x_begin = static_cast<int64_t>(plan.x_col.size());
    for (int pw = 0; pw < pooled_width; ++pw) {
      xo[pw] = static_cast<int64_t>(plan.x_col.size());
      append_bin_taps<T>(g.start_w, g.bin_w, pw, g.grid_w, width, dense, plan.x_col, plan.x_w);
    }
    xo[pooled_width] = static_cast<int64_t>(plan.x_col.size());
    const int64_t x_end = static_cast<int64_t>(plan.x_col.size());
    const bool reads = x_end > x_begin && yo[pooled_height] > yo[0];
    int c0 = width, c1 = -1;
    for (int64_t i = x_begin; i < x_end; ++i) {
      c0 = std::min(c0, plan.x_col[i]);
      c1 = std::max(c1, plan.x_col[i]);
    }
    if (!reads) {
      c0 = 0;
      c1 = -1;
    }
    for (int64_t i = x_begin; i < x_end; ++i) plan.x_col[i] -= c0;
    plan.col0[n] = c0;
    plan.ncols[n] = c1 - c0 + 1;
    plan.max_cols = std::max(plan.max_cols, plan.ncols[n]);
  }
  return plan;
}

// Channels per parallel task: small problems run on the calling thread (waking the pool
// costs more than they do); large ones split across all threads.
int64_t channel_grain(int64_t num_rois, int pooled_height, int pooled_width) {
  const int64_t per_channel = std::max<int64_t>(1, num_rois * pooled_height * pooled_width);
  return std::max<int64_t>(1, (int64_t(1) << 15) / per_channel);
}

template <typename scalar_t>
void forward_impl(
    const char* op,
    const std::vector<at::Tensor>& inputs,  // contiguous [N, C, H_l, W_l] per level
    const std::vector<Level>& levels,
    const LevelMap& map,
    const at::Tensor& rois,  // contiguous [K, 5]
    int PH,
    int PW,
    int sampling_ratio,
    bool aligned,
    bool quantize,
    at::Tensor& output) {  // contiguous [K, C, PH, PW]
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), N = inputs[0].size(0), C = inputs[0].size(1);
  const RoiPlan<acc_t> plan =
      make_plan<acc_t, scalar_t>(op, rois, N, levels, map, PH, PW, sampling_ratio, aligned, quantize);
  std::vector<const scalar_t*> in;
  for (const at::Tensor& t : inputs) in.push_back(t.const_data_ptr<scalar_t>());
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t bins = int64_t(PH) * PW;

  at::parallel_for(0, C, channel_grain(K, PH, PW), [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> rowbuf(std::max(plan.max_cols, 1));
    acc_t* V = rowbuf.data();
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t n = 0; n < K; ++n) {
        scalar_t* dst = out + (n * C + c) * bins;
        const int Q = plan.ncols[n];
        if (Q == 0) {
          std::fill(dst, dst + bins, scalar_t(0));
          continue;
        }
        const Level& lv = levels[plan.level[n]];
        const int64_t W = lv.width;
        const scalar_t* src = in[plan.level[n]] + (plan.batch[n] * C + c) * (int64_t(lv.height) * W) + plan.col0[n];
        const acc_t count = plan.count[n];
        const int64_t* yo = plan.y_off.data() + n * (PH + 1);
        const int64_t* xo = plan.x_off.data() + n * (PW + 1);
        for (int ph = 0; ph < PH; ++ph) {
          const int64_t y0 = yo[ph], y1 = yo[ph + 1];
          if (y0 == y1) {
            for (int pw = 0; pw < PW; ++pw) dst[int64_t(ph) * PW + pw] = scalar_t(0);
            continue;
          }
          // V = sum over the rows of this output row of weight * feature-map row.
          {
            const scalar_t* row = src + static_cast<int64_t>(plan.y_row[y0]) * W;
            const acc_t w = plan.y_w[y0];
            for (int q = 0; q < Q; ++q) V[q] = w * static_cast<acc_t>(row[q]);
          }
          for (int64_t k = y0 + 1; k < y1; ++k) {
            const scalar_t* row = src + static_cast<int64_t>(plan.y_row[k]) * W;
            const acc_t w = plan.y_w[k];
            for (int q = 0; q < Q; ++q) V[q] += w * static_cast<acc_t>(row[q]);
          }
          for (int pw = 0; pw < PW; ++pw) {
            acc_t s = 0;
            for (int64_t k = xo[pw]; k < xo[pw + 1]; ++k) s += plan.x_w[k] * V[plan.x_col[k]];
            dst[int64_t(ph) * PW + pw] = static_cast<scalar_t>(s / count);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(
    const char* op,
    const at::Tensor& grad,  // [K, C, PH, PW], any strides
    const at::Tensor& rois,  // contiguous [K, 5]
    const std::vector<Level>& levels,
    const LevelMap& map,
    int PH,
    int PW,
    int64_t N,
    int64_t C,
    int sampling_ratio,
    bool aligned,
    bool quantize,
    const std::vector<acc_t*>& grad_inputs) {  // contiguous [N, C, H_l, W_l] per level, zeroed here
  const int64_t K = rois.size(0);
  const RoiPlan<acc_t> plan =
      make_plan<acc_t, scalar_t>(op, rois, N, levels, map, PH, PW, sampling_ratio, aligned, quantize);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t sn = grad.stride(0), sc = grad.stride(1), sh = grad.stride(2), sw = grad.stride(3);

  at::parallel_for(0, C, channel_grain(K, PH, PW), [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> rowbuf(std::max(plan.max_cols, 1));
    acc_t* G = rowbuf.data();
    for (int64_t c = c_begin; c < c_end; ++c) {
      // this thread owns channel c of every level and image: zero those planes here, in
      // parallel and right before they are accumulated into (cache-warm)
      for (size_t l = 0; l < levels.size(); ++l) {
        const int64_t plane = int64_t(levels[l].height) * levels[l].width;
        for (int64_t b = 0; b < N; ++b) std::fill_n(grad_inputs[l] + (b * C + c) * plane, plane, acc_t(0));
      }
      for (int64_t n = 0; n < K; ++n) {
        const int Q = plan.ncols[n];
        if (Q == 0) continue;
        const Level& lv = levels[plan.level[n]];
        const int64_t W = lv.width;
        acc_t* dst = grad_inputs[plan.level[n]] + (plan.batch[n] * C + c) * (int64_t(lv.height) * W) + plan.col0[n];
        const scalar_t* src = g + n * sn + c * sc;
        const acc_t count = plan.count[n];
        const int64_t* yo = plan.y_off.data() + n * (PH + 1);
        const int64_t* xo = plan.x_off.data() + n * (PW + 1);
        for (int ph = 0; ph < PH; ++ph) {
          const int64_t y0 = yo[ph], y1 = yo[ph + 1];
          if (y0 == y1) continue;
          for (int q = 0; q < Q; ++q) G[q] = acc_t(0);
          for (int pw = 0; pw < PW; ++pw) {
            const acc_t gv = static_cast<acc_t>(src[ph * sh + pw * sw]) / count;
            for (int64_t k = xo[pw]; k < xo[pw + 1]; ++k) G[plan.x_col[k]] += plan.x_w[k] * gv;
          }
          for (int64_t k = y0; k < y1; ++k) {
            acc_t* row = dst + static_cast<int64_t>(plan.y_row[k]) * W;
            const acc_t w = plan.y_w[k];
            for (int q = 0; q < Q; ++q) row[q] += w * G[q];
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// host functions
// ---------------------------------------------------------------------------------------

void check_rois(const char* op, const at::Tensor& rois, const at::Tensor& like) {
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5, "maskray::", op,
      ": rois must be [K, 5] (batch index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(
      like.scalar_type() == rois.scalar_type(), "maskray::", op, ": rois dtype ", rois.scalar_type(),
      " differs from ", like.scalar_type());
  TORCH_CHECK(
      like.device() == rois.device(), "maskray::", op, ": tensors on different devices (", like.device(), " vs ",
      rois.device(), ")");
  TORCH_CHECK(like.is_cpu(), "maskray::", op, ": CPU kernel got a ", like.device(), " tensor");
}

at::Tensor forward_levels(
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
  TORCH_CHECK(!features.empty(), "maskray::", op, ": no feature maps");
  const bool quantize = quantize_arg(op, mode);
  TORCH_CHECK(scales.size() == features.size(), "maskray::", op, ": ", features.size(), " feature maps but ",
              scales.size(), " scales");
  check_params(op, scales, pooled_height, pooled_width, sampling_ratio);
  const at::Tensor& first = features[0];
  std::vector<at::Tensor> inputs;
  std::vector<Level> levels;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "maskray::", op, ": feature map ", l, " must be [N, C, H, W], got ", f.sizes());
    TORCH_CHECK(
        f.size(0) == first.size(0) && f.size(1) == first.size(1) && f.scalar_type() == first.scalar_type() &&
            f.device() == first.device(),
        "maskray::", op, ": feature map ", l, " (", f.sizes(), ", ", f.scalar_type(), ", ", f.device(),
        ") differs from map 0 (", first.sizes(), ", ", first.scalar_type(), ", ", first.device(),
        ") in batch, channels, dtype or device");
    check_map_size(op, f.size(2), f.size(3));
    inputs.push_back(f.contiguous());
    levels.push_back(Level{static_cast<int>(f.size(2)), static_cast<int>(f.size(3)), scales[l]});
  }
  check_rois(op, rois, first);
  at::Tensor output = at::empty({rois.size(0), first.size(1), pooled_height, pooled_width}, first.options());
  if (output.numel() == 0) return output;
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "maskray_roi_align_cpu", [&] {
    forward_impl<scalar_t>(
        op, inputs, levels, map, r, static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        sampling_arg(sampling_ratio), aligned, quantize, output);
  });
  return output;
}

std::vector<at::Tensor> backward_levels(
    const char* op,
    const at::Tensor& grad,
    const at::Tensor& rois,
    const std::vector<double>& scales,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    at::IntArrayRef heights,
    at::IntArrayRef widths,
    int64_t sampling_ratio,
    bool aligned,
    int64_t mode,
    const LevelMap& map) {
  const bool quantize = quantize_arg(op, mode);
  TORCH_CHECK(
      heights.size() == scales.size() && widths.size() == scales.size() && !scales.empty(), "maskray::", op,
      ": need one height, width and scale per level");
  check_params(op, scales, pooled_height, pooled_width, sampling_ratio);
  check_rois(op, rois, grad);
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
          grad.size(2) == pooled_height && grad.size(3) == pooled_width,
      "maskray::", op, ": grad has shape ", grad.sizes(), ", expected [", rois.size(0), ", ", channels, ", ",
      pooled_height, ", ", pooled_width, "]");
  TORCH_CHECK(batch_size >= 0 && channels >= 0, "maskray::", op, ": negative batch size or channels");
  const at::ScalarType acc_type = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> acc;
  std::vector<Level> levels;
  for (size_t l = 0; l < scales.size(); ++l) {
    check_map_size(op, heights[l], widths[l]);
    // backward_impl zeroes every plane (per channel, in parallel); only an empty grad needs zeros here
    const auto options = grad.options().dtype(acc_type);
    acc.push_back(grad.numel() > 0 ? at::empty({batch_size, channels, heights[l], widths[l]}, options)
                                   : at::zeros({batch_size, channels, heights[l], widths[l]}, options));
    levels.push_back(Level{static_cast<int>(heights[l]), static_cast<int>(widths[l]), scales[l]});
  }
  if (grad.numel() > 0) {
    const at::Tensor r = rois.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maskray_roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<acc_t*> ptrs;
      for (at::Tensor& t : acc) ptrs.push_back(t.mutable_data_ptr<acc_t>());
      backward_impl<scalar_t, acc_t>(
          op, grad, r, levels, map, static_cast<int>(pooled_height), static_cast<int>(pooled_width), batch_size,
          channels, sampling_arg(sampling_ratio), aligned, quantize, ptrs);
    });
  }
  for (at::Tensor& t : acc) {
    if (t.scalar_type() != grad.scalar_type()) t = t.to(grad.scalar_type());
  }
  return acc;
}

at::Tensor roi_align_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned,
    int64_t mode) {
  TORCH_CHECK(input.dim() == 4, "maskray::roi_align: input must be [N, C, H, W], got ", input.sizes());
  return forward_levels(
      "roi_align", {input}, rois, {spatial_scale}, pooled_height, pooled_width, sampling_ratio, aligned, mode,
      kSingleLevel);
}

at::Tensor roi_align_backward_cpu(
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
  (void)deterministic;  // the CPU backward is always deterministic
  return backward_levels(
      "roi_align_backward", grad, rois, {spatial_scale}, pooled_height, pooled_width, batch_size, channels,
      {height}, {width}, sampling_ratio, aligned, mode, kSingleLevel)[0];
}

at::Tensor multi_level_roi_align_cpu(
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
  return forward_levels(
      op, features, rois, scales.vec(), pooled_height, pooled_width, sampling_ratio, aligned, mode, map);
}

std::vector<at::Tensor> multi_level_roi_align_backward_cpu(
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
  (void)deterministic;  // the CPU backward is always deterministic
  const char* op = "multi_level_roi_align_backward";
  const LevelMap map = make_level_map(op, scales.size(), k_min, k_max, canonical_scale, canonical_level, eps);
  return backward_levels(
      op, grad, rois, scales.vec(), pooled_height, pooled_width, batch_size, channels, heights, widths,
      sampling_ratio, aligned, mode, map);
}


// ---------------------------------------------------------------------------------------
// RoIPool: maskray::roi_pool, maskray::multi_level_roi_pool, maskray::roi_pool_backward
// ---------------------------------------------------------------------------------------
// Forward returns (output, argmax). argmax is int64, one per output element: the flat index
// of the winning pixel in the call's feature maps taken as ONE vector, levels one after the
// other: level_offset[l] + ((b * C + c) * H_l + h) * W_l + w, level_offset[l] = sum over
// j < l of N * C * H_j * W_j (single level: the index into the input); -1 where the bin is
// empty or the RoI pools nothing. The backward needs nothing but (grad, argmax): it adds
// grad[n, c, ph, pw] to that one element, as torchvision's roi_pool backward does.

struct PoolPlan {
  std::vector<int64_t> batch;  // [K]
  std::vector<int> level;      // [K]; -1: the RoI pools nothing
  std::vector<int> h0, h1;     // [K * PH] rows [h0, h1) of each output row
  std::vector<int> w0, w1;     // [K * PW] columns [w0, w1) of each output column
};

template <typename T, typename scalar_t>
PoolPlan make_pool_plan(
    const char* op,
    const at::Tensor& rois,  // contiguous [K, 5]
    int64_t batch_size,
    const std::vector<Level>& levels,
    const LevelMap& map,
    int PH,
    int PW) {
  const int64_t K = rois.size(0);
  const scalar_t* r = rois.const_data_ptr<scalar_t>();
  PoolPlan plan;
  plan.batch.resize(K);
  plan.level.resize(K);
  plan.h0.assign(K * PH, 0);
  plan.h1.assign(K * PH, 0);
  plan.w0.assign(K * PW, 0);
  plan.w1.assign(K * PW, 0);
  for (int64_t n = 0; n < K; ++n) {
    const scalar_t* roi = r + n * 5;
    const int64_t b = roi_batch<T>(roi, batch_size);
    if (b < 0) reject_roi<T>(op, n, roi, batch_size);
    int l = roi_level<T>(roi, map);
    if (l >= static_cast<int>(levels.size()) || (l >= 0 && (levels[l].height == 0 || levels[l].width == 0))) l = -1;
    plan.batch[n] = b;
    plan.level[n] = l;
    if (l < 0) continue;
    const PoolGeometry<T> g = roi_pool_geometry<T>(roi, batch_size, static_cast<T>(levels[l].scale), PH, PW);
    for (int ph = 0; ph < PH; ++ph) {
      pool_bin(g.start_h, g.bin_h, ph, levels[l].height, plan.h0[n * PH + ph], plan.h1[n * PH + ph]);
    }
    for (int pw = 0; pw < PW; ++pw) {
      pool_bin(g.start_w, g.bin_w, pw, levels[l].width, plan.w0[n * PW + pw], plan.w1[n * PW + pw]);
    }
  }
  return plan;
}

template <typename scalar_t>
void pool_forward_impl(
    const char* op,
    const std::vector<at::Tensor>& inputs,  // contiguous [N, C, H_l, W_l] per level
    const std::vector<Level>& levels,
    const LevelMap& map,
    const at::Tensor& rois,  // contiguous [K, 5]
    int PH,
    int PW,
    at::Tensor& output,   // contiguous [K, C, PH, PW]
    at::Tensor& argmax) {  // contiguous [K, C, PH, PW] int64
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), N = inputs[0].size(0), C = inputs[0].size(1);
  const PoolPlan plan = make_pool_plan<acc_t, scalar_t>(op, rois, N, levels, map, PH, PW);
  std::vector<const scalar_t*> in;
  std::vector<int64_t> offset(levels.size(), 0);
  for (size_t l = 0; l < levels.size(); ++l) {
    in.push_back(inputs[l].const_data_ptr<scalar_t>());
    if (l > 0) offset[l] = offset[l - 1] + inputs[l - 1].numel();
  }
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  int64_t* am = argmax.mutable_data_ptr<int64_t>();
  const int64_t bins = int64_t(PH) * PW;
  // torchvision starts every non-empty bin from -FLT_MAX (also for double)
  const acc_t lowest = static_cast<acc_t>(std::numeric_limits<float>::lowest());

  at::parallel_for(0, C, channel_grain(K, PH, PW), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t n = 0; n < K; ++n) {
        scalar_t* dst = out + (n * C + c) * bins;
        int64_t* dst_arg = am + (n * C + c) * bins;
        const int l = plan.level[n];
        if (l < 0) {
          std::fill(dst, dst + bins, scalar_t(0));
          std::fill(dst_arg, dst_arg + bins, int64_t(-1));
          continue;
        }
        const int64_t W = levels[l].width;
        const int64_t plane_index = (plan.batch[n] * C + c) * (int64_t(levels[l].height) * W);
        const scalar_t* plane = in[l] + plane_index;
        const int64_t base = offset[l] + plane_index;
        for (int ph = 0; ph < PH; ++ph) {
          const int h0 = plan.h0[n * PH + ph], h1 = plan.h1[n * PH + ph];
          for (int pw = 0; pw < PW; ++pw) {
            const int w0 = plan.w0[n * PW + pw], w1 = plan.w1[n * PW + pw];
            const bool empty = h1 <= h0 || w1 <= w0;
            acc_t best = empty ? acc_t(0) : lowest;
            int64_t arg = -1;
            for (int h = h0; h < h1; ++h) {
              const scalar_t* row = plane + int64_t(h) * W;
              for (int w = w0; w < w1; ++w) {
                const acc_t v = static_cast<acc_t>(row[w]);
                if (v > best) {
                  best = v;
                  arg = int64_t(h) * W + w;
                }
              }
            }
            dst[int64_t(ph) * PW + pw] = static_cast<scalar_t>(best);
            dst_arg[int64_t(ph) * PW + pw] = arg < 0 ? int64_t(-1) : base + arg;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pool_forward_levels(
    const char* op,
    at::TensorList features,
    const at::Tensor& rois,
    const std::vector<double>& scales,
    int64_t pooled_height,
    int64_t pooled_width,
    const LevelMap& map) {
  TORCH_CHECK(!features.empty(), "maskray::", op, ": no feature maps");
  TORCH_CHECK(scales.size() == features.size(), "maskray::", op, ": ", features.size(), " feature maps but ",
              scales.size(), " scales");
  check_params(op, scales, pooled_height, pooled_width, 0);
  const at::Tensor& first = features[0];
  std::vector<at::Tensor> inputs;
  std::vector<Level> levels;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "maskray::", op, ": feature map ", l, " must be [N, C, H, W], got ", f.sizes());
    TORCH_CHECK(
        f.size(0) == first.size(0) && f.size(1) == first.size(1) && f.scalar_type() == first.scalar_type() &&
            f.device() == first.device(),
        "maskray::", op, ": feature map ", l, " (", f.sizes(), ", ", f.scalar_type(), ", ", f.device(),
        ") differs from map 0 (", first.sizes(), ", ", first.scalar_type(), ", ", first.device(),
        ") in batch, channels, dtype or device");
    check_map_size(op, f.size(2), f.size(3));
    inputs.push_back(f.contiguous());
    levels.push_back(Level{static_cast<int>(f.size(2)), static_cast<int>(f.size(3)), scales[l]});
  }
  check_rois(op, rois, first);
  at::Tensor output = at::empty({rois.size(0), first.size(1), pooled_height, pooled_width}, first.options());
  at::Tensor argmax = at::empty(output.sizes(), first.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, argmax};
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "maskray_roi_pool_cpu", [&] {
    pool_forward_impl<scalar_t>(
        op, inputs, levels, map, r, static_cast<int>(pooled_height), static_cast<int>(pooled_width), output, argmax);
  });
  return {output, argmax};
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width) {
  TORCH_CHECK(input.dim() == 4, "maskray::roi_pool: input must be [N, C, H, W], got ", input.sizes());
  return pool_forward_levels("roi_pool", {input}, rois, {spatial_scale}, pooled_height, pooled_width, kSingleLevel);
}

std::tuple<at::Tensor, at::Tensor> multi_level_roi_pool_cpu(
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
  return pool_forward_levels(op, features, rois, scales.vec(), pooled_height, pooled_width, map);
}

template <typename scalar_t, typename acc_t>
void pool_backward_impl(
    const at::Tensor& grad,    // [K, C, PH, PW], any strides
    const at::Tensor& argmax,  // contiguous [K, C, PH, PW], validated
    const std::vector<int64_t>& offset,
    const std::vector<int64_t>& planes,  // H_l * W_l
    int64_t N,
    int64_t C,
    const std::vector<acc_t*>& grad_inputs) {  // contiguous [N, C, H_l, W_l] per level, zeroed here
  const int64_t K = grad.size(0), PH = grad.size(2), PW = grad.size(3);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t* am = argmax.const_data_ptr<int64_t>();
  const int64_t sn = grad.stride(0), sc = grad.stride(1), sh = grad.stride(2), sw = grad.stride(3);
  const size_t num_levels = offset.size();
  at::parallel_for(0, C, channel_grain(K, static_cast<int>(PH), static_cast<int>(PW)), [&](int64_t c_begin,
                                                                                          int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      // this thread owns channel c of every level and image (argmax of channel c points there)
      for (size_t l = 0; l < num_levels; ++l) {
        for (int64_t b = 0; b < N; ++b) std::fill_n(grad_inputs[l] + (b * C + c) * planes[l], planes[l], acc_t(0));
      }
      for (int64_t n = 0; n < K; ++n) {
        const int64_t* a = am + (n * C + c) * PH * PW;
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            const int64_t idx = a[ph * PW + pw];
            if (idx < 0) continue;
            size_t l = 0;
            while (l + 1 < num_levels && idx >= offset[l + 1]) ++l;
            grad_inputs[l][idx - offset[l]] += static_cast<acc_t>(g[n * sn + c * sc + ph * sh + pw * sw]);
          }
        }
      }
    }
  });
}

std::vector<at::Tensor> roi_pool_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& argmax,
    int64_t batch_size,
    int64_t channels,
    at::IntArrayRef heights,
    at::IntArrayRef widths,
    bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  const char* op = "roi_pool_backward";
  std::vector<int64_t> offset = check_pool_backward(op, grad, argmax, batch_size, channels, heights, widths);
  TORCH_CHECK(grad.is_cpu(), "maskray::", op, ": CPU kernel got a ", grad.device(), " tensor");
  const int64_t total = offset.back();
  offset.pop_back();
  const at::Tensor a = argmax.contiguous();
  std::vector<int64_t> planes;
  for (size_t l = 0; l < heights.size(); ++l) planes.push_back(heights[l] * widths[l]);
  {  // every index is -1 or an element of channel c of some level (c: the output's channel)
    const int64_t* p = a.const_data_ptr<int64_t>();
    const int64_t bins = grad.size(2) * grad.size(3);
    for (int64_t i = 0; i < a.numel(); ++i) {
      const int64_t idx = p[i];
      if (idx == -1) continue;
      size_t l = 0;
      while (l + 1 < planes.size() && idx >= offset[l + 1]) ++l;
      TORCH_CHECK_VALUE(
          idx >= 0 && idx < total && ((idx - offset[l]) / planes[l]) % channels == (i / bins) % channels,
          "maskray::", op, ": argmax[", i, "] = ", idx, " is not an element of its channel of the feature maps");
    }
  }
  const at::ScalarType acc_type = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> acc;
  for (size_t l = 0; l < heights.size(); ++l) {
    const auto options = grad.options().dtype(acc_type);
    acc.push_back(grad.numel() > 0 ? at::empty({batch_size, channels, heights[l], widths[l]}, options)
                                   : at::zeros({batch_size, channels, heights[l], widths[l]}, options));
  }
  if (grad.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maskray_roi_pool_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<acc_t*> ptrs;
      for (at::Tensor& t : acc) ptrs.push_back(t.mutable_data_ptr<acc_t>());
      pool_backward_impl<scalar_t, acc_t>(grad, a, offset, planes, batch_size, channels, ptrs);
    });
  }
  for (at::Tensor& t : acc) {
    if (t.scalar_type() != grad.scalar_type()) t = t.to(grad.scalar_type());
  }
  return acc;
}

}  // namespace

TORCH_LIBRARY(maskray, m) {
  // mode: 0 = RoIAlign (aligned=False: torchvision's default, True: ROIAlignV2), 1 = RoIWarp
  // (RoIAlign on the box rounded to the feature grid). RoIPool (mode 2) has its own ops below.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int sampling_ratio, bool aligned, int mode=0) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool deterministic, int mode=0) -> Tensor");
  // All FPN levels in one call; RoI n is pooled from features[level(n)] with scales[level(n)],
  // level(n) as torchvision's LevelMapper(k_min, k_max, canonical_scale, canonical_level, eps).
  m.def(
      "multi_level_roi_align(Tensor[] features, Tensor rois, float[] scales, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned, int k_min, int k_max, float canonical_scale, "
      "float canonical_level, float eps, int mode=0) -> Tensor");
  m.def(
      "multi_level_roi_align_backward(Tensor grad, Tensor rois, float[] scales, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt[] heights, SymInt[] widths, "
      "int sampling_ratio, bool aligned, int k_min, int k_max, float canonical_scale, float canonical_level, "
      "float eps, bool deterministic, int mode=0) -> Tensor[]");
  // RoIPool (torchvision.ops.roi_pool's semantics) -> (output, argmax): argmax (int64) indexes
  // the feature maps taken as one flat vector, levels one after the other (-1: nothing pooled);
  // the backward (one op for both) scatters grad to those elements.
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width) "
      "-> (Tensor, Tensor)");
  m.def(
      "multi_level_roi_pool(Tensor[] features, Tensor rois, float[] scales, int pooled_height, int pooled_width, "
      "int k_min, int k_max, float canonical_scale, float canonical_level, float eps) -> (Tensor, Tensor)");
  m.def(
      "roi_pool_backward(Tensor grad, Tensor argmax, SymInt batch_size, SymInt channels, SymInt[] heights, "
      "SymInt[] widths, bool deterministic) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(maskray, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
  m.impl("multi_level_roi_align", &multi_level_roi_align_cpu);
  m.impl("multi_level_roi_align_backward", &multi_level_roi_align_backward_cpu);
  m.impl("roi_pool", &roi_pool_forward_cpu);
  m.impl("multi_level_roi_pool", &multi_level_roi_pool_cpu);
  m.impl("roi_pool_backward", &roi_pool_backward_cpu);
}

}  // namespace maskray
