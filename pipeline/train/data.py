"""Train-time augmentation of decoded ``(image, target)`` pairs.

``image`` is a uint8 ``Tensor[3, H, W]`` (``pipeline.data.decode.decode_image``) and ``target`` the
dict of ``pipeline.data.decode.decode_target``: ``boxes`` float32 ``[N, 4]`` xyxy pixels, ``labels``
int64 ``[N]``, ``masks`` uint8 ``[N, H, W]``, ``iscrowd`` bool ``[N]``, ``area`` float32 ``[N]``
and, for a keypoint model, ``keypoints`` float32 ``[N, K, 3]`` (x, y pixels, v; v = 0 points are
(0, 0, 0)). Every transform keeps boxes, masks, keypoints and the image aligned; instances that
leave the image are dropped, and a keypoint that leaves it becomes (0, 0, 0) (not labeled). The
canvas size never changes (scale jitter zooms in/out and crops/pads back), so the model's own
resize (``min_size``/``max_size``) still decides the input resolution while objects appear at
varied scales.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict[str, Tensor]


def flip_keypoints(keypoints: Tensor, width: int, flip_index: Sequence[int] | None = None) -> Tensor:
    """Keypoints ``[N, K, 3]`` of an image mirrored left-right, as torchvision's detection
    reference does (``_flip_coco_person_keypoints``): point ``i`` takes point ``flip_index[i]``
    (left and right swapped; ``None`` = no swap), x -> ``width - x``, and a point with v = 0
    stays (0, 0, 0)."""
    out = keypoints[:, list(flip_index)] if flip_index is not None else keypoints.clone()
    out[..., 0] = width - out[..., 0]
    out[out[..., 2] == 0] = 0
    return out


def hflip(image: Tensor, target: Target, flip_index: Sequence[int] | None = None) -> tuple[Tensor, Target]:
    """Mirror left-right: image, masks, boxes (x1, x2 -> W - x2, W - x1) and keypoints
    (:func:`flip_keypoints` with ``flip_index``, the permutation that swaps left and right)."""
    width = image.shape[-1]
    out = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, 0] = width - target["boxes"][:, 2]
        boxes[:, 2] = width - target["boxes"][:, 0]
        out["boxes"] = boxes
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        out["keypoints"] = flip_keypoints(target["keypoints"], width, flip_index)
    return image.flip(-1), out


def scale_jitter(image: Tensor, target: Target, scale: float, offset: tuple[float, float] = (0.5, 0.5)) -> tuple[Tensor, Target]:
    """Resize the content by ``scale`` on an unchanged ``H x W`` canvas (crop when > 1, zero-pad when < 1).

    ``offset`` in [0, 1]² chooses where the resized image sits: the fraction of the free
    (pad) or excess (crop) room left of / above it. Boxes are scaled, shifted and clipped;
    keypoints are scaled and shifted, and those that leave the canvas become (0, 0, 0);
    instances with no mask pixel or a degenerate box left are dropped.
    """
    if scale == 1.0:
        return image, target
    _, height, width = image.shape
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                            align_corners=False, antialias=scale < 1)[0]
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    # top-left of the resized image on the canvas (negative = cropped)
    dy = round((height - new_h) * offset[1])
    dx = round((width - new_w) * offset[0])
    canvas = torch.zeros_like(image)
    src_y0, src_x0 = max(0, -dy), max(0, -dx)
    dst_y0, dst_x0 = max(0, dy), max(0, dx)
    h = min(new_h - src_y0, height - dst_y0)
    w = min(new_w - src_x0, width - dst_x0)
    canvas[:, dst_y0:dst_y0 + h, dst_x0:dst_x0 + w] = resized[:, src_y0:src_y0 + h, src_x0:src_x0 + w]

    out = dict(target)
    keep = None
    if "masks" in target:
        masks = target["masks"]
        new_masks = torch.zeros((masks.shape[0], height, width), dtype=masks.dtype)
        if masks.shape[0]:
            rm = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="nearest")[0].to(masks.dtype)
            new_masks[:, dst_y0:dst_y0 + h, dst_x0:dst_x0 + w] = rm[:, src_y0:src_y0 + h, src_x0:src_x0 + w]
        out["masks"] = new_masks
        area = new_masks.flatten(1).sum(1).to(torch.float32)
        out["area"] = area
        keep = area > 0
    if "boxes" in target:
        sx, sy = new_w / width, new_h / height
        boxes = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        boxes = boxes + torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        out["boxes"] = boxes
        ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        keep = ok if keep is None else keep & ok
    if "keypoints" in target:
        kp = target["keypoints"].clone()
        kp[..., 0] = kp[..., 0] * (new_w / width) + dx
        kp[..., 1] = kp[..., 1] * (new_h / height) + dy
        inside = (kp[..., 0] >= 0) & (kp[..., 0] <= width) & (kp[..., 1] >= 0) & (kp[..., 1] <= height)
        kp[~inside | (kp[..., 2] == 0)] = 0
        out["keypoints"] = kp
    if keep is not None and not bool(keep.all()):
        out = select(out, keep)
    return canvas, out


def select(target: Target, keep: Tensor) -> Target:
    """The instances of ``target`` where ``keep`` (bool [N]) is true; other keys unchanged."""
    n = int(keep.shape[0])
    return {k: (v[keep] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
            for k, v in target.items()}


def drop_crowd_and_degenerate(target: Target) -> Target:
    """Training targets: no crowd regions, no box narrower than one pixel (torchvision refuses them)."""
    boxes = target["boxes"]
    keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    if "iscrowd" in target:
        keep &= ~target["iscrowd"].bool()
    return target if bool(keep.all()) else select(target, keep)


@dataclass
class TrainAugment:
    """Random horizontal flip (probability ``hflip_prob``) and scale jitter (factor uniform in ``scale_range``).

    ``keypoint_flip``: the permutation of the K keypoints that a mirror swaps (left <-> right;
    ``pipeline.data`` derives it from the keypoint names or ``data.keypoint_flip_map``); ``None``
    mirrors keypoints without swapping any.
    """

    hflip_prob: float = 0.5
    scale_range: tuple[float, float] = (1.0, 1.0)
    seed: int | None = None
    keypoint_flip: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        rng = self._rng
        if self.hflip_prob and rng.random() < self.hflip_prob:
            image, target = hflip(image, target, self.keypoint_flip)
        lo, hi = self.scale_range
        if hi > lo or lo != 1.0:
            scale = rng.uniform(lo, hi)
            image, target = scale_jitter(image, target, scale, (rng.random(), rng.random()))
        return image, drop_crowd_and_degenerate(target)
