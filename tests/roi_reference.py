"""Slow references for the RoI pooling op, shared by the CPU and GPU tests: plain Python in
float64, transcribed from the definitions (torchvision's bilinear rule; RoIAlign; RoIWarp), a
dispatch log that counts op calls, and random RoIs with the hostile corner cases."""

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MAX_GRID = 64  # the op's cap on the adaptive sampling grid per side


def bilinear(plane, height, width, y, x):
    """torchvision's bilinear sample of ``plane`` (nested lists, [H][W]) at (y, x); 0 outside."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * plane[y_low][x_low] + hy * lx * plane[y_low][x_high]
            + ly * hx * plane[y_high][x_low] + ly * lx * plane[y_high][x_high])


def _average_bins(out, n, planes, height, width, start, size, output_size, sampling_ratio):
    """``out[n]`` = the mean of a grid of bilinear samples in each bin of the box at ``start``
    (y, x) of ``size`` (h, w), in feature pixels."""
    (pooled_h, pooled_w), (start_h, start_w), (roi_h, roi_w) = output_size, start, size
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    grid_h = sampling_ratio if sampling_ratio > 0 else min(math.ceil(roi_h / pooled_h), MAX_GRID)
    grid_w = sampling_ratio if sampling_ratio > 0 else min(math.ceil(roi_w / pooled_w), MAX_GRID)
    grid_h, grid_w = max(grid_h, 0), max(grid_w, 0)
    count = max(grid_h * grid_w, 1)
    for c, plane in enumerate(planes):
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                total = 0.0
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += bilinear(plane, height, width, y, x)
                out[n, c, ph, pw] = total / count


def _average_pool(input, rois, output_size, sampling_ratio, aligned, to_feature):
    """Each RoI's corners mapped by ``to_feature`` (image -> feature pixels), then bins averaged."""
    _, channels, height, width = input.shape
    data = input.double().tolist()
    out = torch.zeros(rois.shape[0], channels, *output_size, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for n, (b, *corners) in enumerate(rois.double().tolist()):
        x1, y1, x2, y2 = (to_feature(v) for v in corners)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        _average_bins(out, n, data[int(b)], height, width, (y1 - offset, x1 - offset), (roi_h, roi_w), output_size,
                      sampling_ratio)
    return out


def roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign (torchvision's semantics): [N, C, H, W] features, [K, 5] rois -> [K, C, *output_size]."""
    return _average_pool(input, rois, output_size, sampling_ratio, aligned, lambda v: v * spatial_scale)


def round_half_away(v: float) -> float:
    """C's round(): half away from zero (Python's round() is half to even)."""
    t = math.trunc(v)
    return t + math.copysign(1.0, v) if abs(v - t) >= 0.5 else float(t)


def roi_warp(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIWarp (model.ops.roi_warp): each corner rounded to the feature grid, then RoIAlign on that box."""
    return _average_pool(input, rois, output_size, sampling_ratio, aligned,
                         lambda v: round_half_away(v * spatial_scale))


def ours(mode, input, rois, output_size, spatial_scale, sampling_ratio):
    """maskray's single-level pooling in pooler ``mode`` (model.ops.POOLER_MODES)."""
    from model import ops

    if mode == "roipool":
        return ops.roi_pool(input, rois, output_size, spatial_scale)
    if mode == "roiwarp":
        return ops.roi_warp(input, rois, output_size, spatial_scale, sampling_ratio)
    return ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, mode == "roialign_v2")


class OpLog(TorchDispatchMode):
    """Records the names of the aten/maskray ops dispatched inside it (``.names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


def hostile_rois(batch, height, width, scale, count, generator):
    """[count + 4, 5] rois (batch index, x1, y1, x2, y2 in image pixels) over a [height, width]
    feature map at ``scale``: random boxes partly outside, plus a point, a box wholly outside,
    one covering the map and one over its far corner."""
    x1 = torch.rand(count, generator=generator) * 1.2 * width - 0.2 * width
    y1 = torch.rand(count, generator=generator) * 1.2 * height - 0.2 * height
    w = torch.rand(count, generator=generator) * 0.7 * width
    h = torch.rand(count, generator=generator) * 0.7 * height
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    special = torch.tensor([[2.0, 3.0, 2.0, 3.0], [-6.0, -6.0, -2.0, -2.0],
                            [-2.0, -2.0, width + 2.0, height + 2.0], [width - 1.5, height - 2.0, width + 0.5, height + 0.7]])
    boxes = torch.cat([boxes, special]) / scale
    ids = torch.randint(0, batch, (boxes.shape[0], 1), generator=generator).float()
    return torch.cat([ids, boxes], 1)
