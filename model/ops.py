"""Our RoIAlign: ``torch.ops.maskray.roi_align`` plus the Python API around it.

The op (schema, CPU and CUDA kernels) lives in ``model/cuda`` and is compiled by
:mod:`model.build`; importing this module loads it (building it first if needed). Here we
register its autograd formula and fake (meta) kernels with ``torch.library`` and expose:

* :func:`roi_align` — same signature and semantics as ``torchvision.ops.roi_align``;
* :class:`RoIAlign` — module form;
* :class:`MultiScaleRoIAlign` — drop-in for ``torchvision.ops.MultiScaleRoIAlign`` (FPN level
  mapping reused from torchvision) whose pooling runs our op.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import poolers as _tv_poolers

from model import build as _build
from model.errors import MaskrayError

__all__ = ["roi_align", "RoIAlign", "MultiScaleRoIAlign", "convert_boxes_to_roi_format", "RoIAlignInputError"]


class RoIAlignInputError(MaskrayError, ValueError):
    """Malformed input or boxes given to :func:`roi_align` (also a ValueError)."""


_build.load()


# ----------------------------------------------------------------------------------------
# torch.library registrations: fake kernels, autograd, autocast
# ----------------------------------------------------------------------------------------


@torch.library.register_fake("maskray::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(input.dim() == 4, lambda: f"input must be [N, C, H, W], got {tuple(input.shape)}")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"rois must be [K, 5], got {tuple(rois.shape)}")
    torch._check(input.dtype == rois.dtype, lambda: f"input and rois dtypes differ ({input.dtype} vs {rois.dtype})")
    return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))


@torch.library.register_fake("maskray::roi_align_backward")
def _roi_align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
    sampling_ratio, aligned, deterministic,
):
    torch._check(grad.dtype == rois.dtype, lambda: "grad and rois dtypes differ")
    return grad.new_empty((batch_size, channels, height, width))


def _forward_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _forward_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = torch.ops.maskray.roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
        sampling_ratio, aligned, torch.are_deterministic_algorithms_enabled(),
    )
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd(
    "maskray::roi_align", _forward_backward, setup_context=_forward_setup_context
)


def _backward_setup_context(ctx, inputs, output):
    (grad, rois, spatial_scale, pooled_height, pooled_width, _b, _c, _h, _w, sampling_ratio, aligned, _d) = inputs
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _backward_backward(ctx, grad_grad_input):
    # roi_align_backward is the adjoint of the (linear) forward, so its own derivative
    # with respect to `grad` is the forward again: double backward comes for free.
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    grad_grad = torch.ops.maskray.roi_align(
        grad_grad_input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
    )
    return (grad_grad,) + (None,) * 11


torch.library.register_autograd(
    "maskray::roi_align_backward", _backward_backward, setup_context=_backward_setup_context
)

# Like torchvision: under autocast, RoIAlign runs in float32 (boxes in half precision would
# lose whole pixels at Mask R-CNN image sizes).
for _device in ("cuda", "cpu"):
    torch.library.register_autocast("maskray::roi_align", _device, torch.float32)


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


def _check_boxes(input: Tensor, boxes: Union[Tensor, list[Tensor]]) -> Tensor:
    """Validate `boxes` against `input` and return rois [K, 5]; raise MaskrayError when malformed."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        got = _describe(input) if isinstance(input, Tensor) else type(input).__name__
        raise RoIAlignInputError(f"roi_align: input must be a Tensor[N, C, H, W], got {got}")
    if not input.is_floating_point():
        raise RoIAlignInputError(f"roi_align: input must be floating point, got {_describe(input)}")
    # under autocast the op casts input and boxes to float32 itself (as torchvision's does)
    autocast = input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type)
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
                got = _describe(b) if isinstance(b, Tensor) else type(b).__name__
                raise RoIAlignInputError(f"roi_align: boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {got}")
            if (b.dtype != input.dtype and not autocast) or b.device != input.device:
                raise RoIAlignInputError(
                    f"roi_align: boxes[{i}] is {_describe(b)} but input is {_describe(input)}; "
                    "hint: boxes must have the input's dtype and device"
                )
        if len(boxes) > input.size(0):
            raise RoIAlignInputError(
                f"roi_align: {len(boxes)} box lists for an input batch of {input.size(0)} images"
            )
        if len(boxes) == 0:
            return input.new_zeros((0, 5))
        return convert_boxes_to_roi_format(boxes)
    if not isinstance(boxes, Tensor):
        raise RoIAlignInputError(
            f"roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )
    if boxes.dim() != 2 or boxes.size(1) != 5:
        raise RoIAlignInputError(
            f"roi_align: boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got {_describe(boxes)}; "
            "hint: pass a list of Tensor[L, 4] for per-image boxes"
        )
    if (boxes.dtype != input.dtype and not autocast) or boxes.device != input.device:
        raise RoIAlignInputError(
            f"roi_align: boxes is {_describe(boxes)} but input is {_describe(input)}; "
            "hint: boxes must have the input's dtype and device"
        )
    if boxes.numel() and not torch.compiler.is_compiling() and not boxes.is_meta:
        lo, hi = torch.stack(torch.aminmax(boxes[:, 0])).tolist()
        if lo < 0 or hi >= input.size(0):
            raise RoIAlignInputError(
                f"roi_align: boxes[:, 0] must hold batch indices in [0, {input.size(0) - 1}], "
                f"got values in [{lo:g}, {hi:g}]"
            )
    return boxes


def _roi_align(input: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool):
    pooled_height, pooled_width = _pair(output_size)
    out = torch.ops.maskray.roi_align(
        input, rois, float(spatial_scale), int(pooled_height), int(pooled_width), int(sampling_ratio), bool(aligned)
    )
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
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive
            (``ceil(roi_size / output_size)``).
        aligned: shift box coordinates by -0.5 pixel (pixel-centre convention).

    Returns:
        Tensor[K, C, output_height, output_width].

    Raises:
        MaskrayError: malformed boxes (wrong shape, dtype or device, batch index out of range).
    """
    rois = _check_boxes(input, boxes)
    return _roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


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


def _multiscale_roi_align(
    x_filtered: list[Tensor],
    boxes: list[Tensor],
    output_size: tuple[int, int],
    sampling_ratio: int,
    scales: list[float],
    mapper: _tv_poolers.LevelMapper,
) -> Tensor:
    """torchvision.ops.poolers._multiscale_roi_align with our op doing the pooling."""
    rois = _tv_poolers._convert_to_roi_format(boxes)
    if len(x_filtered) == 1:
        return _roi_align(x_filtered[0], rois, output_size, scales[0], sampling_ratio, False)

    levels = mapper(boxes)
    dtype = x_filtered[0].dtype
    # Pool each level's RoIs, then put the rows back in RoI order with ONE gather.
    # (torchvision writes each level into a zero-filled result in place; every in-place
    # write then costs a full copy of the gradient in backward.) A RoI that maps to no
    # level (NaN box) reads the extra zero row, as it stays zero in torchvision.
    order, pooled = [], []
    for level, (feature, scale) in enumerate(zip(x_filtered, scales)):
        idx_in_level = torch.where(levels == level)[0]
        order.append(idx_in_level)
        # levels may differ in dtype under autocast: match the first level's
        pooled.append(_roi_align(feature, rois[idx_in_level], output_size, scale, sampling_ratio, False).to(dtype))
    order_all = torch.cat(order)
    pooled.append(pooled[0].new_zeros((1,) + tuple(pooled[0].shape[1:])))
    position = torch.full((rois.size(0),), order_all.numel(), dtype=torch.int64, device=rois.device)
    position[order_all] = torch.arange(order_all.numel(), device=rois.device)
    return torch.cat(pooled)[position]


class MultiScaleRoIAlign(nn.Module):
    """Multi-scale RoIAlign pooling (FPN), a drop-in for ``torchvision.ops.MultiScaleRoIAlign``.

    Each box is pooled from the FPN level chosen by eq. 1 of the FPN paper
    (``canonical_scale`` / ``canonical_level`` = 224 / k0 = 4); scales are inferred from the
    feature-map and image sizes on the first call, exactly as torchvision does. The module has
    no parameters or buffers, so torchvision Mask R-CNN state dicts load unchanged.

    Args:
        featmap_names: names of the feature maps (keys of ``x``) to pool from.
        output_size: int or (height, width) of the pooled regions.
        sampling_ratio: RoIAlign sampling ratio.
        canonical_scale, canonical_level: FPN level-mapping constants.
    """

    __annotations__ = {"scales": Optional[list[float]], "map_levels": Optional[_tv_poolers.LevelMapper]}

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int], list[int]],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
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
        return _multiscale_roi_align(
            x_filtered, boxes, self.output_size, self.sampling_ratio, self.scales, self.map_levels
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
        )
