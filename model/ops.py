"""Our RoIAlign: ``torch.ops.maskray.roi_align`` / ``multi_level_roi_align`` plus the Python API.

The ops (schemas, CPU and CUDA kernels) live in ``model/cuda`` and are compiled by
:mod:`model.build`; importing this module loads them (building first if needed). Here we
register their autograd formulas and fake (meta) kernels with ``torch.library`` and expose:

* :func:`roi_align` — same signature and semantics as ``torchvision.ops.roi_align``;
* :func:`roi_warp` — RoIWarp: RoIAlign on the box rounded to the feature grid (op mode 1);
* :func:`roi_pool` — same signature and semantics as ``torchvision.ops.roi_pool``
  (``torch.ops.maskray.roi_pool`` returns ``(output, argmax)``; argmax feeds the backward);
* :class:`RoIAlign` — module form;
* :class:`MultiScaleRoIAlign` — drop-in for ``torchvision.ops.MultiScaleRoIAlign`` that pools
  all FPN levels in ONE op call, the level of each RoI (torchvision's LevelMapper) being
  chosen inside the kernel; ``mode`` picks the pooling of Mask R-CNN's Table 2
  (:data:`POOLER_MODES`: "roialign" default, "roialign_v2", "roiwarp", "roipool").

Op schema: ``maskray::roi_align`` / ``multi_level_roi_align`` (and their backwards) take a
trailing ``int mode=0``: 0 RoIAlign, 1 RoIWarp (``aligned`` applies to both). RoIPool needs an
argmax and has its own ops ``maskray::roi_pool`` / ``multi_level_roi_pool`` -> (output, argmax)
and ``maskray::roi_pool_backward(grad, argmax, ...)``.

Hostile input: non-finite boxes, batch indices that are not integers in [0, N), a spatial
scale that is not finite and positive, ``sampling_ratio`` above 64 → :class:`RoIAlignInputError`
here (one device sync per call to check the boxes). The kernels define what happens when the
raw ops are called directly: the CPU ops raise ValueError, the CUDA ops write zeros (and no
gradient; RoIPool's argmax -1) for invalid RoIs. The same checks hold in every pooling mode.
The adaptive sampling grid (``sampling_ratio <= 0``) is capped at 64 samples per bin side
(see ``model/cuda/roi_align_common.h``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import poolers as _tv_poolers

from model import build as _build
from model.errors import MaskrayError

__all__ = [
    "roi_align", "roi_warp", "roi_pool", "RoIAlign", "MultiScaleRoIAlign", "multi_level_roi_align",
    "convert_boxes_to_roi_format", "RoIAlignInputError", "POOLER_MODES",
]


class RoIAlignInputError(MaskrayError, ValueError):
    """Malformed input or boxes given to :func:`roi_align` (also a ValueError)."""


_build.load()

MAX_SAMPLING_GRID = 64  # = kMaxSamplingGrid in roi_align_common.h
MAX_POOLED_SIZE = 4096  # = kMaxPooledSize
# the `mode` argument of maskray::roi_align / multi_level_roi_align (= kModeAlign, kModeWarp);
# RoIPool (kModePool) has its own ops, maskray::roi_pool / multi_level_roi_pool
MODE_ALIGN, MODE_WARP, MODE_POOL = 0, 1, 2
# the pooling modes of Mask R-CNN's Table 2 by name: (op mode, aligned)
POOLER_MODES = {
    "roialign": (MODE_ALIGN, False),     # torchvision's RoIAlign (aligned=False): what its weights need
    "roialign_v2": (MODE_ALIGN, True),   # aligned=True: detectron2's ROIAlignV2
    "roiwarp": (MODE_WARP, False),       # RoIAlign on the box rounded to the feature grid
    "roipool": (MODE_POOL, False),       # torchvision.ops.roi_pool: quantized max pooling
}


# ----------------------------------------------------------------------------------------
# torch.library registrations: fake kernels, autograd, autocast
# ----------------------------------------------------------------------------------------


@torch.library.register_fake("maskray::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode=0):
    torch._check(input.dim() == 4, lambda: f"input must be [N, C, H, W], got {tuple(input.shape)}")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"rois must be [K, 5], got {tuple(rois.shape)}")
    torch._check(input.dtype == rois.dtype, lambda: f"input and rois dtypes differ ({input.dtype} vs {rois.dtype})")
    torch._check(mode in (MODE_ALIGN, MODE_WARP), lambda: f"mode must be {MODE_ALIGN} or {MODE_WARP}, got {mode}")
    return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))


@torch.library.register_fake("maskray::roi_align_backward")
def _roi_align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
    sampling_ratio, aligned, deterministic, mode=0,
):
    torch._check(grad.dtype == rois.dtype, lambda: "grad and rois dtypes differ")
    return grad.new_empty((batch_size, channels, height, width))


@torch.library.register_fake("maskray::multi_level_roi_align")
def _multi_level_fake(
    features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned, k_min, k_max,
    canonical_scale, canonical_level, eps, mode=0,
):
    torch._check(len(features) >= 1 and len(features) == len(scales), lambda: "one scale per feature map")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"rois must be [K, 5], got {tuple(rois.shape)}")
    return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))


@torch.library.register_fake("maskray::multi_level_roi_align_backward")
def _multi_level_backward_fake(
    grad, rois, scales, pooled_height, pooled_width, batch_size, channels, heights, widths, sampling_ratio,
    aligned, k_min, k_max, canonical_scale, canonical_level, eps, deterministic, mode=0,
):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _rest(ctx) -> tuple[None, ...]:
    """Nones for every argument after the first, as many as the call passed: the dispatcher drops
    arguments equal to their schema default (``mode=0``), and list-of-tensor ops check the count."""
    return (None,) * (len(ctx.needs_input_grad) - 1)


def _forward_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode)


def _forward_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = torch.ops.maskray.roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
        sampling_ratio, aligned, torch.are_deterministic_algorithms_enabled(), mode,
    )
    return (grad_input,) + _rest(ctx)


torch.library.register_autograd(
    "maskray::roi_align", _forward_backward, setup_context=_forward_setup_context
)


def _backward_setup_context(ctx, inputs, output):
    (grad, rois, spatial_scale, pooled_height, pooled_width, _b, _c, _h, _w, sampling_ratio, aligned, _d,
     mode) = inputs
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode)


def _backward_backward(ctx, grad_grad_input):
    # roi_align_backward is the adjoint of the (linear) forward, so its own derivative
    # with respect to `grad` is the forward again: double backward comes for free.
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode = ctx.params
    grad_grad = torch.ops.maskray.roi_align(
        grad_grad_input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode
    )
    return (grad_grad,) + _rest(ctx)


torch.library.register_autograd(
    "maskray::roi_align_backward", _backward_backward, setup_context=_backward_setup_context
)

def _multi_level_setup_context(ctx, inputs, output):
    features, rois = inputs[0], inputs[1]
    ctx.save_for_backward(rois)
    ctx.sizes = (features[0].size(0), features[0].size(1), [f.size(2) for f in features], [f.size(3) for f in features])
    # scales, pooled_height, pooled_width, sampling_ratio, aligned, k_min, k_max, canonical_scale, canonical_level,
    # eps, mode
    ctx.params = inputs[2:]


def _multi_level_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    scales, ph, pw, sampling_ratio, aligned, k_min, k_max, canonical_scale, canonical_level, eps, mode = ctx.params
    batch_size, channels, heights, widths = ctx.sizes
    grads = torch.ops.maskray.multi_level_roi_align_backward(
        grad, rois, scales, ph, pw, batch_size, channels, heights, widths, sampling_ratio, aligned,
        k_min, k_max, canonical_scale, canonical_level, eps, torch.are_deterministic_algorithms_enabled(), mode,
    )
    return (list(grads),) + _rest(ctx)


torch.library.register_autograd(
    "maskray::multi_level_roi_align", _multi_level_backward, setup_context=_multi_level_setup_context
)


def _multi_level_backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    # scales, ph, pw, sampling_ratio .. eps, mode: the forward's arguments after rois
    ctx.params = tuple(inputs[2:5]) + tuple(inputs[9:16]) + (inputs[17],)
    ctx.grad_like = (inputs[0].shape, inputs[0].dtype, inputs[0].device)
    ctx.level_shapes = [(inputs[5], inputs[6], h, w) for h, w in zip(inputs[7], inputs[8])]


def _multi_level_backward_backward(ctx, grad_grad_inputs):
    # the backward is the adjoint of the (linear) forward: its derivative is the forward again
    (rois,) = ctx.saved_tensors
    shape, dtype, device = ctx.grad_like
    filled = [g if g is not None else torch.zeros(s, dtype=dtype, device=device)
              for g, s in zip(grad_grad_inputs, ctx.level_shapes)]
    grad_grad = torch.ops.maskray.multi_level_roi_align(filled, rois, *ctx.params)
    return (grad_grad,) + _rest(ctx)


torch.library.register_autograd(
    "maskray::multi_level_roi_align_backward", _multi_level_backward_backward,
    setup_context=_multi_level_backward_setup_context,
)


# RoIPool: the forward returns (output, argmax), argmax indexing the feature maps taken as one
# flat vector, levels one after the other (-1: nothing pooled); the backward op needs only
# (grad, argmax) and scatters each output gradient to its argmax element (torchvision's rule).


@torch.library.register_fake("maskray::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    torch._check(input.dim() == 4, lambda: f"input must be [N, C, H, W], got {tuple(input.shape)}")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"rois must be [K, 5], got {tuple(rois.shape)}")
    torch._check(input.dtype == rois.dtype, lambda: f"input and rois dtypes differ ({input.dtype} vs {rois.dtype})")
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("maskray::multi_level_roi_pool")
def _multi_level_pool_fake(
    features, rois, scales, pooled_height, pooled_width, k_min, k_max, canonical_scale, canonical_level, eps,
):
    torch._check(len(features) >= 1 and len(features) == len(scales), lambda: "one scale per feature map")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"rois must be [K, 5], got {tuple(rois.shape)}")
    shape = (rois.size(0), features[0].size(1), pooled_height, pooled_width)
    return features[0].new_empty(shape), features[0].new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("maskray::roi_pool_backward")
def _roi_pool_backward_fake(grad, argmax, batch_size, channels, heights, widths, deterministic):
    torch._check(argmax.dtype == torch.int64, lambda: f"argmax must be int64, got {argmax.dtype}")
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _roi_pool_backward_call(ctx, grad):
    (argmax,) = ctx.saved_tensors
    batch_size, channels, heights, widths = ctx.sizes
    return torch.ops.maskray.roi_pool_backward(
        grad, argmax, batch_size, channels, heights, widths, torch.are_deterministic_algorithms_enabled()
    )


def _roi_pool_setup_context(ctx, inputs, output):
    input = inputs[0]
    ctx.save_for_backward(output[1])
    ctx.sizes = (input.size(0), input.size(1), [input.size(2)], [input.size(3)])


def _roi_pool_backward(ctx, grad, _grad_argmax):
    return (_roi_pool_backward_call(ctx, grad)[0],) + _rest(ctx)


torch.library.register_autograd("maskray::roi_pool", _roi_pool_backward, setup_context=_roi_pool_setup_context)


def _multi_level_pool_setup_context(ctx, inputs, output):
    features = inputs[0]
    ctx.save_for_backward(output[1])
    ctx.sizes = (features[0].size(0), features[0].size(1), [f.size(2) for f in features], [f.size(3) for f in features])


def _multi_level_pool_backward(ctx, grad, _grad_argmax):
    return (list(_roi_pool_backward_call(ctx, grad)),) + _rest(ctx)


torch.library.register_autograd(
    "maskray::multi_level_roi_pool", _multi_level_pool_backward, setup_context=_multi_level_pool_setup_context
)


def _roi_pool_backward_setup_context(ctx, inputs, output):
    grad, argmax, batch_size, channels, heights, widths, _deterministic = inputs
    ctx.save_for_backward(argmax)
    ctx.grad_like = (grad.dtype, grad.device)
    ctx.level_shapes = [(batch_size, channels, h, w) for h, w in zip(heights, widths)]


def _roi_pool_backward_backward(ctx, grad_grad_inputs):
    # the backward is linear in grad (a scatter by argmax): its derivative is the gather
    (argmax,) = ctx.saved_tensors
    dtype, device = ctx.grad_like
    flat = torch.cat([(g if g is not None else torch.zeros(s, dtype=dtype, device=device)).reshape(-1)
                      for g, s in zip(grad_grad_inputs, ctx.level_shapes)])
    hit = argmax >= 0
    if flat.numel() == 0:
        grad_grad = torch.zeros(argmax.shape, dtype=dtype, device=device)
    else:
        grad_grad = torch.where(hit, flat[argmax.clamp(min=0)], torch.zeros((), dtype=dtype, device=device))
    return (grad_grad,) + _rest(ctx)


torch.library.register_autograd(
    "maskray::roi_pool_backward", _roi_pool_backward_backward, setup_context=_roi_pool_backward_setup_context
)

# Like torchvision: under autocast, RoIAlign and RoIPool run in float32 (boxes in half precision
# would lose whole pixels at Mask R-CNN image sizes).
for _device in ("cuda", "cpu"):
    torch.library.register_autocast("maskray::roi_align", _device, torch.float32)
    torch.library.register_autocast("maskray::roi_pool", _device, torch.float32)


# ----------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------


def convert_boxes_to_roi_format(boxes: list[Tensor]) -> Tensor:
    """List of Tensor[L_i, 4] boxes (one per image) -> Tensor[K, 5] (batch index, x1, y1, x2, y2).

    Same as torchvision.ops._utils.convert_boxes_to_roi_format.
    """
    concat_boxes = torch.cat(list(boxes), dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat_boxes], dim=1)


def _describe(t: Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _check_boxes(input: Tensor, boxes: Union[Tensor, list[Tensor]], name: str = "roi_align") -> Tensor:
    """Validate `boxes` against `input` and return rois [K, 5]; raise MaskrayError when malformed."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        got = _describe(input) if isinstance(input, Tensor) else type(input).__name__
        raise RoIAlignInputError(f"{name}: input must be a Tensor[N, C, H, W], got {got}")
    if not input.is_floating_point():
        raise RoIAlignInputError(f"{name}: input must be floating point, got {_describe(input)}")
    # under autocast the op casts input and boxes to float32 itself (as torchvision's does)
    autocast = input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type)
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
                got = _describe(b) if isinstance(b, Tensor) else type(b).__name__
                raise RoIAlignInputError(f"{name}: boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {got}")
            if (b.dtype != input.dtype and not autocast) or b.device != input.device:
                raise RoIAlignInputError(
                    f"{name}: boxes[{i}] is {_describe(b)} but input is {_describe(input)}; "
                    "hint: boxes must have the input's dtype and device"
                )
        if len(boxes) > input.size(0):
            raise RoIAlignInputError(
                f"{name}: {len(boxes)} box lists for an input batch of {input.size(0)} images"
            )
        if len(boxes) == 0:
            return input.new_zeros((0, 5))
        rois = convert_boxes_to_roi_format(boxes)
        _check_roi_values(rois, input.size(0), name)
        return rois
    if not isinstance(boxes, Tensor):
        raise RoIAlignInputError(
            f"{name}: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )
    if boxes.dim() != 2 or boxes.size(1) != 5:
        raise RoIAlignInputError(
            f"{name}: boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got {_describe(boxes)}; "
            "hint: pass a list of Tensor[L, 4] for per-image boxes"
        )
    if (boxes.dtype != input.dtype and not autocast) or boxes.device != input.device:
        raise RoIAlignInputError(
            f"{name}: boxes is {_describe(boxes)} but input is {_describe(input)}; "
            "hint: boxes must have the input's dtype and device"
        )
    _check_roi_values(boxes, input.size(0), name)
    return boxes


def _check_roi_values(rois: Tensor, batch_size: int, name: str = "roi_align") -> None:
    """Raise RoIAlignInputError naming the first row of rois [K, 5] with a non-finite coordinate or a
    batch index that is not an integer in [0, batch_size). One device sync (skipped while compiling)."""
    if not rois.numel() or torch.compiler.is_compiling() or rois.is_meta:
        return
    index = rois[:, 0]
    good = torch.isfinite(rois[:, 1:]).all(dim=1) & (index >= 0) & (index < batch_size) & (index == index.floor())
    if bool(good.all()):
        return
    row = int(torch.nonzero(~good)[0, 0])
    values = ", ".join(f"{v:g}" for v in rois[row].tolist())
    if not bool(torch.isfinite(rois[row, 1:]).all()):
        raise RoIAlignInputError(f"{name}: boxes row {row} = ({values}) has a non-finite coordinate")
    raise RoIAlignInputError(
        f"{name}: boxes[:, 0] must hold batch indices in [0, {batch_size - 1}] (integers), "
        f"got {float(index[row]):g} in row {row}"
    )


def _check_params(output_size, spatial_scale: float, sampling_ratio: int, name: str = "roi_align") -> tuple[int, int]:
    """Validate the scalar arguments; returns (pooled_height, pooled_width)."""
    try:
        pooled_height, pooled_width = (int(v) for v in _pair(output_size))
    except (TypeError, ValueError):
        raise RoIAlignInputError(f"{name}: output_size must be an int or (height, width), got {output_size!r}")
    if not (0 < pooled_height <= MAX_POOLED_SIZE and 0 < pooled_width <= MAX_POOLED_SIZE):
        raise RoIAlignInputError(
            f"{name}: output_size must be in [1, {MAX_POOLED_SIZE}] per side, got {pooled_height}x{pooled_width}"
        )
    if not (isinstance(spatial_scale, (int, float)) and math.isfinite(spatial_scale) and spatial_scale > 0):
        raise RoIAlignInputError(f"{name}: spatial_scale must be finite and positive, got {spatial_scale!r}")
    if int(sampling_ratio) > MAX_SAMPLING_GRID:
        raise RoIAlignInputError(
            f"{name}: sampling_ratio must be at most {MAX_SAMPLING_GRID} (<= 0 for adaptive), got {sampling_ratio}"
        )
    return pooled_height, pooled_width


def _roi_align(
    input: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool,
    mode: int = MODE_ALIGN,
):
    if mode == MODE_POOL:
        pooled_height, pooled_width = _check_params(output_size, spatial_scale, 0, "roi_pool")
        out, _ = torch.ops.maskray.roi_pool(input, rois, float(spatial_scale), pooled_height, pooled_width)
    else:
        name = "roi_warp" if mode == MODE_WARP else "roi_align"
        pooled_height, pooled_width = _check_params(output_size, spatial_scale, sampling_ratio, name)
        args = (float(spatial_scale), int(pooled_height), int(pooled_width), int(sampling_ratio), bool(aligned))
        if mode == MODE_ALIGN:
            out = torch.ops.maskray.roi_align(input, rois, *args)
        else:
            out = torch.ops.maskray.roi_align(input, rois, *args, int(mode))
    # Under autocast the op runs in float32; like torchvision, hand back the input's dtype.
    return out if out.dtype == input.dtype else out.to(input.dtype)


def roi_align(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign from Mask R-CNN, with the semantics of ``torchvision.ops.roi_align``.

    Args:
        input: feature map Tensor[N, C, H, W].
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of Tensor[L, 4]
            (x1, y1, x2, y2), one per image of the batch; in input-image coordinates.
        output_size: int or (height, width) of each pooled region.
        spatial_scale: feature-map size / input-image size (e.g. 1/4 for stride 4).
        sampling_ratio: samples per bin along each axis (at most 64); <= 0 means adaptive
            (``ceil(roi_size / output_size)``, capped at 64).
        aligned: shift box coordinates by -0.5 pixel (pixel-centre convention).

    Returns:
        Tensor[K, C, output_height, output_width].

    Raises:
        RoIAlignInputError: malformed boxes (wrong shape, dtype or device; a non-finite
            coordinate; a batch index that is not an integer in [0, N)), a spatial_scale that
            is not finite and positive, sampling_ratio > 64 or an output size outside [1, 4096].

    The adaptive grid (``sampling_ratio <= 0``) is ``min(ceil(roi_size / output_size), 64)``
    samples per bin side: torchvision's value whenever a bin spans at most 64 feature pixels.
    """
    rois = _check_boxes(input, boxes)
    return _roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


def roi_warp(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIWarp (the paper's Table 2 baseline, from MNC): RoIAlign on the box quantized to the feature grid.

    Same arguments, checks and errors as :func:`roi_align`. Definition, per RoI
    ``(b, x1, y1, x2, y2)`` and ``s = spatial_scale``:

    1. quantize each corner to the feature grid, as RoIPool does:
       ``x1' = round(x1 * s)``, ``y1' = round(y1 * s)``, ``x2' = round(x2 * s)``, ``y2' = round(y2 * s)``
       (round half away from zero, computed in the boxes' precision; float32 for half inputs);
    2. then exactly RoIAlign on that box: corners ``x1' - o`` ... with ``o = 0.5`` when ``aligned``
       else 0; extent ``w = x2' - x1'``, ``h = y2' - y1'`` (raised to at least 1 when not ``aligned``);
       bins of ``h / PH`` by ``w / PW`` (not quantized); per bin a grid of ``sampling_ratio`` (or
       adaptively ``min(ceil(h / PH), 64)`` by ``min(ceil(w / PW), 64)``) bilinear samples at
       ``y1' - o + ph * h / PH + (iy + 0.5) * h / (PH * grid_h)`` (likewise x), averaged.

    So ``roi_warp(x, boxes, ...)`` equals ``roi_align`` of the rounded boxes (in feature-map
    units, ``spatial_scale=1``): gradients flow to the features only, by the same bilinear weights.
    """
    rois = _check_boxes(input, boxes, "roi_warp")
    return _roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned, MODE_WARP)


def roi_pool(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size,
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoIPool (Fast R-CNN), with the signature and semantics of ``torchvision.ops.roi_pool``.

    Per RoI, corners are rounded to the feature grid (``round(x1 * spatial_scale)``, ...), the
    box is ``max(x2' - x1' + 1, 1)`` by ``max(y2' - y1' + 1, 1)`` pixels, bin ``p`` spans rows
    ``[floor(p * bin_h), ceil((p + 1) * bin_h))`` from ``y1'`` (clipped to the map), and the
    output is the bin's maximum (0 for an empty bin). The gradient flows to the argmax element
    only (the first maximum in row-major order). The argmax is an output of the forward op
    (``torch.ops.maskray.roi_pool`` returns ``(output, argmax)``), saved for the backward.

    Raises:
        RoIAlignInputError: as :func:`roi_align` (malformed or non-finite boxes, bad batch
            indices, a spatial_scale that is not finite and positive, output sizes outside [1, 4096]).
    """
    rois = _check_boxes(input, boxes, "roi_pool")
    return _roi_align(input, rois, output_size, spatial_scale, 0, False, MODE_POOL)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (same constructor as ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Union[Tensor, list[Tensor]]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )


def multi_level_roi_align(
    features: list[Tensor],
    rois: Tensor,
    output_size: tuple[int, int],
    sampling_ratio: int,
    scales: list[float],
    mapper: _tv_poolers.LevelMapper,
    *,
    mode: str = "roialign",
) -> Tensor:
    """Pool every RoI from its FPN level in ONE op call (``maskray::multi_level_roi_align``, or
    ``maskray::multi_level_roi_pool`` for ``mode="roipool"``).

    Args:
        features: the levels, Tensor[N, C, H_l, W_l] each, finest first.
        rois: Tensor[K, 5] (batch index, x1, y1, x2, y2), image coordinates, checked by the caller.
        scales: feature-map pixels per image pixel of each level (powers of 2).
        mapper: torchvision's LevelMapper; its constants go to the kernel, which assigns
            ``level = clamp(floor(k0 + log2(sqrt(area) / s0) + eps), k_min, k_max) - k_min``
            (a RoI with a negative or NaN area maps to no level and pools to zeros, as in torchvision).
        mode: one of :data:`POOLER_MODES` ("roialign", "roialign_v2", "roiwarp", "roipool"); the
            level of a RoI is chosen from its unquantized box in every mode.

    Returns:
        Tensor[K, C, output_height, output_width] in features[0]'s dtype.
    """
    op_mode, aligned = _pooler_mode(mode)
    if not features or len(features) != len(scales):
        raise RoIAlignInputError(f"roi_align: {len(features)} feature maps but {len(scales)} scales")
    for scale in scales:
        if op_mode == MODE_POOL:
            pooled_height, pooled_width = _check_params(output_size, scale, 0, "roi_pool")
        else:
            pooled_height, pooled_width = _check_params(output_size, scale, sampling_ratio)
    dtype = features[0].dtype
    device_type = features[0].device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # like torchvision's roi_align under autocast: pool in float32, hand back the input dtype
        features = [f.float() for f in features]
        rois = rois.float()
    level_map = (int(mapper.k_min), int(mapper.k_max), float(mapper.s0), float(mapper.lvl0), float(mapper.eps))
    scales = [float(s) for s in scales]
    if op_mode == MODE_POOL:
        out, _ = torch.ops.maskray.multi_level_roi_pool(list(features), rois, scales, pooled_height, pooled_width,
                                                        *level_map)
    elif op_mode == MODE_ALIGN:
        out = torch.ops.maskray.multi_level_roi_align(
            list(features), rois, scales, pooled_height, pooled_width, int(sampling_ratio), aligned, *level_map,
        )
    else:
        out = torch.ops.maskray.multi_level_roi_align(
            list(features), rois, scales, pooled_height, pooled_width, int(sampling_ratio), aligned, *level_map,
            op_mode,
        )
    return out if out.dtype == dtype else out.to(dtype)


def _pooler_mode(mode: str) -> tuple[int, bool]:
    """(op mode, aligned) of a pooler mode name; RoIAlignInputError naming the allowed values."""
    if mode not in POOLER_MODES:
        raise RoIAlignInputError(f"pooler mode {mode!r} is not one of {', '.join(POOLER_MODES)}")
    return POOLER_MODES[mode]


class MultiScaleRoIAlign(nn.Module):
    """Multi-scale RoI pooling (FPN), a drop-in for ``torchvision.ops.MultiScaleRoIAlign``.

    Each box is pooled from the FPN level chosen by eq. 1 of the FPN paper
    (``canonical_scale`` / ``canonical_level`` = 224 / k0 = 4), all levels in one op call with
    the level chosen inside the kernel; scales are inferred from the feature-map and image
    sizes on the first call by torchvision's own ``_setup_scales``. The module has
    no parameters or buffers, so torchvision Mask R-CNN state dicts load unchanged.

    Args:
        featmap_names: names of the feature maps (keys of ``x``) to pool from.
        output_size: int or (height, width) of the pooled regions.
        sampling_ratio: RoIAlign / RoIWarp sampling ratio (RoIPool has none).
        mode: the pooling of Mask R-CNN's Table 2, one of :data:`POOLER_MODES`: "roialign"
            (default: torchvision's, ``aligned=False``, what its weights were trained with),
            "roialign_v2" (``aligned=True``, detectron2's ROIAlignV2), "roiwarp"
            (:func:`roi_warp`), "roipool" (:func:`roi_pool`).
        canonical_scale, canonical_level: FPN level-mapping constants.
    """

    __annotations__ = {"scales": Optional[list[float]], "map_levels": Optional[_tv_poolers.LevelMapper]}

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int], list[int]],
        sampling_ratio: int,
        *,
        mode: str = "roialign",
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        self._op_mode, self._aligned = _pooler_mode(mode)
        self.mode = mode
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None
        self.map_levels = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool ``boxes`` (list of Tensor[L_i, 4], image coordinates) from the feature maps ``x``.

        ``image_shapes`` are the (height, width) of the images before the backbone, used to
        infer each level's scale. Returns Tensor[sum L_i, C, output_height, output_width].
        """
        x_filtered = _tv_poolers._filter_input(x, self.featmap_names)
        if not x_filtered:
            raise MaskrayError(
                f"MultiScaleRoIAlign: none of the feature maps {self.featmap_names} is in the input "
                f"(keys: {list(x)})"
            )
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _tv_poolers._setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _check_boxes(x_filtered[0], boxes)
        if len(x_filtered) == 1:  # torchvision maps no level then (negative-area boxes are pooled too)
            return _roi_align(x_filtered[0], rois, self.output_size, self.scales[0], self.sampling_ratio,
                              self._aligned, self._op_mode)
        return multi_level_roi_align(
            x_filtered, rois, self.output_size, self.sampling_ratio, self.scales, self.map_levels, mode=self.mode
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
            + ("" if self.mode == "roialign" else f", mode={self.mode!r}")
            + ")"
        )
