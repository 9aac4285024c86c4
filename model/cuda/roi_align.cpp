// maskray::roi_align — schema and CPU kernels.
//
// Semantics are torchvision.ops.roi_align's (see roi_align_common.h for the geometry).
// The CPU kernels use the separability of the bilinear weights: per RoI we precompute,
// for every output row ph, the list of feature-map rows it reads with their summed weights
// (and likewise columns per output column pw). The forward pass then first blends the
// needed rows into one contiguous vector per ph (vectorisable), and reads the output bins
// from that vector; the backward pass runs the same two steps in reverse. Both passes are
// parallel over channels with at::parallel_for, every thread owning whole (batch, channel)
// planes, so the backward has no races and is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "roi_align_common.h"

namespace maskray {
namespace {

// Merged, per-output-row/column sample weights of every RoI.
template <typename T>
struct RoiPlan {
  std::vector<int64_t> batch;  // [K]
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
// `dense` is scratch of at least size + 2 zeros; it is left zeroed.
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

template <typename T, typename scalar_t>
RoiPlan<T> make_plan(
    const at::Tensor& rois,  // contiguous [K, 5]
    int64_t batch_size,
    int height,
    int width,
    T spatial_scale,
    int pooled_height,
    int pooled_width,
    int sampling_ratio,
    bool aligned) {
  const int64_t K = rois.size(0);
  const scalar_t* r = rois.const_data_ptr<scalar_t>();
  RoiPlan<T> plan;
  plan.batch.resize(K);
  plan.count.resize(K);
  plan.col0.resize(K);
  plan.ncols.resize(K);
  plan.y_off.resize(K * (pooled_height + 1));
  plan.x_off.resize(K * (pooled_width + 1));
  std::vector<T> dense(std::max(height, width) + 2, T(0));
  for (int64_t n = 0; n < K; ++n) {
    const RoiGeometry<T> g = roi_geometry<T>(
        r + n * 5, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
    TORCH_CHECK(
        g.batch >= 0 && g.batch < batch_size,
        "maskray::roi_align: rois[", n, ", 0] = ", static_cast<double>(static_cast<T>(r[n * 5])),
        " is not a batch index of the input (batch size ", batch_size, ")");
    plan.batch[n] = g.batch;
    plan.count[n] = g.count;
    for (int ph = 0; ph < pooled_height; ++ph) {
      plan.y_off[n * (pooled_height + 1) + ph] = static_cast<int64_t>(plan.y_row.size());
      append_bin_taps<T>(g.start_h, g.bin_h, ph, g.grid_h, height, dense, plan.y_row, plan.y_w);
    }
    plan.y_off[n * (pooled_height + 1) + pooled_height] = static_cast<int64_t>(plan.y_row.size());
    const int64_t x_begin = static_cast<int64_t>(plan.x_col.size());
    for (int pw = 0; pw < pooled_width; ++pw) {
      plan.x_off[n * (pooled_width + 1) + pw] = static_cast<int64_t>(plan.x_col.size());
      append_bin_taps<T>(g.start_w, g.bin_w, pw, g.grid_w, width, dense, plan.x_col, plan.x_w);
    }
    plan.x_off[n * (pooled_width + 1) + pooled_width] = static_cast<int64_t>(plan.x_col.size());
    const int64_t x_end = static_cast<int64_t>(plan.x_col.size());
    const bool reads = x_end > x_begin && plan.y_off[n * (pooled_height + 1) + pooled_height] >
                                              plan.y_off[n * (pooled_height + 1)];
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

void check_inputs(const at::Tensor& input, const at::Tensor& rois, int64_t ph, int64_t pw) {
  TORCH_CHECK(input.dim() == 4, "maskray::roi_align: input must be [N, C, H, W], got ", input.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5,
      "maskray::roi_align: rois must be [K, 5] (batch index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(
      input.scalar_type() == rois.scalar_type(), "maskray::roi_align: input and rois dtypes differ (",
      input.scalar_type(), " vs ", rois.scalar_type(), ")");
  TORCH_CHECK(
      input.device() == rois.device(), "maskray::roi_align: input and rois are on different devices (",
      input.device(), " vs ", rois.device(), ")");
  TORCH_CHECK(ph > 0 && pw > 0, "maskray::roi_align: output size must be positive, got ", ph, "x", pw);
}

template <typename scalar_t>
void forward_impl(
    const at::Tensor& input,  // contiguous [N, C, H, W]
    const at::Tensor& rois,   // contiguous [K, 5]
    double spatial_scale,
    int PH,
    int PW,
    int sampling_ratio,
    bool aligned,
    at::Tensor& output) {  // contiguous [K, C, PH, PW]
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1);
  const int H = static_cast<int>(input.size(2)), W = static_cast<int>(input.size(3));
  const RoiPlan<acc_t> plan = make_plan<acc_t, scalar_t>(
      rois, N, H, W, static_cast<acc_t>(spatial_scale), PH, PW, sampling_ratio, aligned);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t plane = static_cast<int64_t>(H) * W;

  at::parallel_for(0, C, channel_grain(K, PH, PW), [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> rowbuf(std::max(plan.max_cols, 1));
    acc_t* V = rowbuf.data();
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t n = 0; n < K; ++n) {
        const scalar_t* src = in + (plan.batch[n] * C + c) * plane + plan.col0[n];
        scalar_t* dst = out + (n * C + c) * PH * PW;
        const int Q = plan.ncols[n];
        const acc_t count = plan.count[n];
        const int64_t* yo = plan.y_off.data() + n * (PH + 1);
        const int64_t* xo = plan.x_off.data() + n * (PW + 1);
        for (int ph = 0; ph < PH; ++ph) {
          const int64_t y0 = yo[ph], y1 = yo[ph + 1];
          if (Q == 0 || y0 == y1) {
            for (int pw = 0; pw < PW; ++pw) dst[ph * PW + pw] = scalar_t(0);
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
            dst[ph * PW + pw] = static_cast<scalar_t>(s / count);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(
    const at::Tensor& grad,  // [K, C, PH, PW], any strides
    const at::Tensor& rois,  // contiguous [K, 5]
    double spatial_scale,
    int PH,
    int PW,
    int64_t N,
    int64_t C,
    int H,
    int W,
    int sampling_ratio,
    bool aligned,
    acc_t* grad_input) {  // zeroed, contiguous [N, C, H, W]
  const int64_t K = rois.size(0);
  const RoiPlan<acc_t> plan = make_plan<acc_t, scalar_t>(
      rois, N, H, W, static_cast<acc_t>(spatial_scale), PH, PW, sampling_ratio, aligned);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t sn = grad.stride(0), sc = grad.stride(1), sh = grad.stride(2), sw = grad.stride(3);
  const int64_t plane = static_cast<int64_t>(H) * W;

  at::parallel_for(0, C, channel_grain(K, PH, PW), [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> rowbuf(std::max(plan.max_cols, 1));
    acc_t* G = rowbuf.data();
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t n = 0; n < K; ++n) {
        const int Q = plan.ncols[n];
        if (Q == 0) continue;
        acc_t* dst = grad_input + (plan.batch[n] * C + c) * plane + plan.col0[n];
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

at::Tensor roi_align_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  check_inputs(input, rois, pooled_height, pooled_width);
  TORCH_CHECK(input.is_cpu(), "maskray::roi_align: CPU kernel got a ", input.device(), " tensor");
  at::Tensor output = at::empty(
      {rois.size(0), input.size(1), pooled_height, pooled_width}, input.options());
  if (output.numel() == 0) return output;
  if (input.size(2) == 0 || input.size(3) == 0) return output.zero_();  // nothing to sample
  const at::Tensor in = input.contiguous();
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "maskray_roi_align_cpu", [&] {
    forward_impl<scalar_t>(
        in, r, spatial_scale, static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        static_cast<int>(sampling_ratio), aligned, output);
  });
  return output;
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
    bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  TORCH_CHECK(grad.is_cpu(), "maskray::roi_align_backward: CPU kernel got a ", grad.device(), " tensor");
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5, "maskray::roi_align_backward: rois must be [K, 5], got ",
      rois.sizes());
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
          grad.size(2) == pooled_height && grad.size(3) == pooled_width,
      "maskray::roi_align_backward: grad has shape ", grad.sizes(), ", expected [", rois.size(0), ", ",
      channels, ", ", pooled_height, ", ", pooled_width, "]");
  TORCH_CHECK(
      grad.scalar_type() == rois.scalar_type(), "maskray::roi_align_backward: grad and rois dtypes differ");
  const at::ScalarType acc_type = at::toOpMathType(grad.scalar_type());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options().dtype(acc_type));
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input.to(grad.scalar_type());
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maskray_roi_align_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t, acc_t>(
        grad, r, spatial_scale, static_cast<int>(pooled_height), static_cast<int>(pooled_width), batch_size,
        channels, static_cast<int>(height), static_cast<int>(width), static_cast<int>(sampling_ratio), aligned,
        grad_input.mutable_data_ptr<acc_t>());
  });
  return grad_input.scalar_type() == grad.scalar_type() ? grad_input : grad_input.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY(maskray, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool deterministic) -> Tensor");
}

TORCH_LIBRARY_IMPL(maskray, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace maskray
