"""The training data path, from a shard row to the model's inputs, in the order it runs:

1. augmentation of decoded ``(image, target)`` pairs (:class:`TrainAugment`: flip, scale jitter;
   with ``augment.crop``, :class:`DecodeAugment` first cuts a random window of a large image, so the
   model sees it at native resolution);
2. :class:`DecodeAugment`, the Ray Data ``flat_map`` of the train stream (CPU tasks): decode
   (``pipeline.data.decode``), target, augment, masks bit-packed for the object store;
3. :func:`train_dataset`: the stream itself (shards -> decode + augment tasks);
4. :func:`collate`, in each worker: a numpy batch -> images and torchvision targets (masks unpacked).

Augmentation:

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

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import RunPlan

logger = logging.getLogger(__name__)

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


class TaskRandom(random.Random):
    """The ``random.Random`` of functions Ray copies into tasks (the train stream's augmentation).

    Invariant: every copy draws its own numbers. Ray pickles the function into every read task of
    every epoch; a plainly pickled generator restarts each copy at one state, so the k-th image of a
    task got the same flip, crop and scale in every epoch (the demo's 40 images for 30 epochs: mask
    AP 13.8 with frozen flips, 18.5 with fresh ones). An unseeded generator therefore pickles as a
    new one, seeded from OS entropy in the copy; a seeded one (tests) keeps its state, so every copy
    draws alike."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self.seeded = seed is not None

    def __reduce__(self):
        if not self.seeded:
            return TaskRandom, ()
        return TaskRandom, (0,), self.getstate()


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
        self._rng = TaskRandom(self.seed)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        rng = self._rng
        if self.hflip_prob and rng.random() < self.hflip_prob:
            image, target = hflip(image, target, self.keypoint_flip)
        lo, hi = self.scale_range
        if hi > lo or lo != 1.0:
            scale = rng.uniform(lo, hi)
            image, target = scale_jitter(image, target, scale, (rng.random(), rng.random()))
        return image, drop_crowd_and_degenerate(target)


def random_window(rng: random.Random, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """A crop window ``(x0, y0, x1, y1)`` of at most ``size`` x ``size`` pixels, uniformly placed in a
    ``width`` x ``height`` image (a side shorter than ``size`` is kept whole)."""
    w, h = min(size, width), min(size, height)
    x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
    return x0, y0, x0 + w, y0 + h


# --------------------------------------------------------------------------- the stream

TRAIN_COLUMNS = ["image_id", "width", "height", "image", "annotations"]


class DecodeAugment:
    """Ray Data ``flat_map`` function: encoded row -> [decoded, augmented numpy row] (CPU tasks).

    A row whose image cannot be decoded (corrupt, unsupported, over the pixel limit) or whose
    annotations cannot become a target yields no row: it is logged with its image id and shard
    and sent to the ``bad_rows`` actor (:class:`RunChannel`), which rank 0 reads.
    """

    def __init__(self, category_ids: list[int], hflip_prob: float = 0.0,
                 scale_range: tuple[float, float] = (1.0, 1.0), seed: int | None = None, bad_rows: Any = None,
                 num_keypoints: int = 0, keypoint_flip: list[int] | None = None, crop: int = 0,
                 crop_min_visible: float = 0.3):
        self.category_ids = list(category_ids)
        self.num_keypoints = int(num_keypoints)
        self.augment = TrainAugment(hflip_prob, tuple(scale_range), seed, keypoint_flip or None)
        self.bad_rows = bad_rows
        self.crop = int(crop)
        self.crop_min_visible = float(crop_min_visible)
        self._crop_rng = TaskRandom(None if seed is None else seed + 1)

    def decode(self, row: dict[str, Any]) -> tuple[Tensor, Target]:
        """The row's image and target: whole, or with ``crop`` a random window of a larger image
        (:func:`random_window`), its pixels read region by region where the format allows
        (``pipeline.data.regions``) and its target cut from the masks' RLE
        (``pipeline.data.decode.decode_target_window``): no full-size mask, no full-size image
        for tiled TIFFs."""
        from pipeline.data.decode import decode_image, decode_target, decode_target_window

        width, height = int(row["width"]), int(row["height"])
        annotations = list(row["annotations"] or [])
        if not self.crop or (width <= self.crop and height <= self.crop):
            return (decode_image(row["image"]),
                    decode_target(annotations, height, width, self.category_ids, self.num_keypoints))
        from pipeline.data.regions import DEFAULT_MAX_WHOLE_PIXELS, open_regions

        window = random_window(self._crop_rng, width, height, self.crop)
        with open_regions(row["image"], max_region_pixels=None, max_whole_pixels=DEFAULT_MAX_WHOLE_PIXELS) as src:
            if (src.width, src.height) != (width, height):
                from pipeline.data.decode import ImageDecodeError

                raise ImageDecodeError(f"image is {src.width}x{src.height}, the row says {width}x{height}")
            pixels = src.read(*window)
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        target = decode_target_window(annotations, height, width, window, self.category_ids,
                                      self.num_keypoints, self.crop_min_visible)
        return image, target

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from pipeline.data.decode import ImageDecodeError, TargetError

        try:
            image, target = self.decode(row)
        except (ImageDecodeError, TargetError) as exc:
            shard = os.path.basename(str(row.get("path") or "?"))
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("skipped train image %s in %s: %s", row.get("image_id"), shard, reason)
            if self.bad_rows is not None:
                self.bad_rows.add.remote(int(row["image_id"]), shard, reason)
            return []
        image, target = self.augment(image, target)
        target = drop_crowd_and_degenerate(target)
        masks = target["masks"].numpy().astype(bool)
        out = {
            "image_id": int(row["image_id"]),
            "image": image.numpy(),
            "boxes": target["boxes"].numpy().astype(np.float32).reshape(-1, 4),
            "labels": target["labels"].numpy().astype(np.int64),
            # bit-packed along x: 8x fewer bytes through the object store than uint8 masks
            # (at 800x1333 one instance is 1 MB as uint8); collate() unpacks them
            "masks": np.packbits(masks, axis=-1),
            "mask_width": masks.shape[-1],
        }
        if self.num_keypoints:  # [N, K, 3] float32 (x, y, v); collate() hands it to the model
            out["keypoints"] = target["keypoints"].numpy().astype(np.float32).reshape(-1, self.num_keypoints, 3)
        return [out]


def train_dataset(config: TrainConfig, plan: RunPlan, bad_rows: Any = None):
    """The Ray Data train stream: shards -> decode + augment (CPU tasks of ``data.decode_cpus``);
    undecodable rows dropped and reported to ``bad_rows`` (a :class:`RunChannel` actor)."""
    from pipeline.data.decode import read_shards

    fn = DecodeAugment([int(c["id"]) for c in plan.categories], config.augment.hflip_prob,
                       tuple(config.augment.scale_jitter), bad_rows=bad_rows,
                       num_keypoints=config.model.num_keypoints, keypoint_flip=plan.keypoint_flip,
                       crop=config.augment.crop, crop_min_visible=config.augment.crop_min_visible)
    # read tasks take the decode share too: Ray's default of 1 CPU per read task never fits
    # beside workers that hold all but a fraction of a small node's CPUs (the stream stalls)
    ds = read_shards(config.data.train, columns=TRAIN_COLUMNS, num_cpus=config.data.decode_cpus, include_paths=True)
    import ray.data

    pool = ray.data.TaskPoolStrategy(size=config.data.decode_tasks or None)
    ds = ds.flat_map(fn, num_cpus=config.data.decode_cpus, compute=pool)
    ds.context.enable_progress_bars = False  # the loop prints one line per interval; infer keeps its bars
    return ds


# --------------------------------------------------------------------------- in the worker


def collate(batch: dict[str, np.ndarray]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A Ray Data numpy batch of decoded rows -> (list of float CHW images in [0, 1],
    list of target dicts with boxes [N, 4] float32, labels [N] int64, masks [N, H, W] uint8,
    and for a keypoint model keypoints [N, K, 3] float32: x, y pixels, v).

    ``masks`` arrive bit-packed along x ([N, H, ceil(W / 8)] uint8) with their ``mask_width``.
    """
    images = [torch.from_numpy(np.ascontiguousarray(im)).float().div_(255.0) for im in batch["image"]]
    targets = []
    for boxes, labels, packed, width in zip(batch["boxes"], batch["labels"], batch["masks"], batch["mask_width"],
                                            strict=True):
        masks = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=int(width))
        targets.append({
            "boxes": torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "masks": torch.from_numpy(masks),
        })
    if "keypoints" in batch:
        for target, keypoints in zip(targets, batch["keypoints"], strict=True):
            kp = np.asarray(keypoints, dtype=np.float32)  # [N, K, 3] (Ray keeps each row's shape)
            target["keypoints"] = torch.from_numpy(kp if kp.ndim == 3 else kp.reshape(len(target["boxes"]), -1, 3))
    return images, targets
