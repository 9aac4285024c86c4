"""Per-image detection results: model outputs <-> typed ``Instances`` <-> COCO instance dicts.

COCO side: ``{"image_id", "category_id", "score", "bbox": [x, y, w, h],
"segmentation": {"size": [h, w], "counts": str}}`` (compressed RLE from pycocotools), the
layout ``COCO.loadRes`` reads. Model side: torchvision's output dict (``boxes`` xyxy,
``labels`` 1..K, ``scores``, ``masks`` float [N, 1, H, W] probabilities). Label ``i`` maps to
``category_ids[i - 1]`` (``ModelConfig.category_ids()``); masks are binarized at 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from model.errors import MaskrayError

MASK_THRESHOLD = 0.5


@dataclass
class Instances:
    """The detections of one image (all tensors on one device, N rows each).

    ``boxes`` float32 [N, 4] xyxy pixels, ``scores`` float32 [N], ``labels`` int64 [N]
    (1..K), ``masks`` bool [N, H, W] binary masks at image size (or None: boxes only),
    ``keypoints`` float32 [N, K, 3] ``x, y, score`` pixels (or None: no keypoints; ground truth
    puts COCO's ``v`` where a prediction has its score).
    """

    image_size: tuple[int, int]  # (height, width)
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None
    keypoints: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        n = self.boxes.shape[0]
        if self.boxes.shape != (n, 4):
            raise MaskrayError(f"Instances boxes must be [N, 4], got {tuple(self.boxes.shape)}")
        if self.scores.shape != (n,) or self.labels.shape != (n,):
            raise MaskrayError(
                f"Instances scores {tuple(self.scores.shape)} and labels {tuple(self.labels.shape)} must be [{n}]"
            )
        if self.masks is not None:
            if self.masks.dim() == 4 and self.masks.shape[1] == 1:
                self.masks = self.masks[:, 0]
            if self.masks.shape != (n, *self.image_size):
                raise MaskrayError(
                    f"Instances masks must be [{n}, {self.image_size[0]}, {self.image_size[1]}], "
                    f"got {tuple(self.masks.shape)}"
                )
            if self.masks.dtype != torch.bool:
                self.masks = self.masks > MASK_THRESHOLD if self.masks.is_floating_point() else self.masks != 0
        if self.keypoints is not None and (self.keypoints.dim() != 3 or self.keypoints.shape[0] != n
                                           or self.keypoints.shape[2] != 3):
            raise MaskrayError(f"Instances keypoints must be [{n}, K, 3], got {tuple(self.keypoints.shape)}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, index: Any) -> Instances:
        """A subset by index, slice or boolean mask."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Instances(
            self.image_size, self.boxes[index], self.scores[index], self.labels[index],
            None if self.masks is None else self.masks[index],
            None if self.keypoints is None else self.keypoints[index],
        )

    def to(self, device: torch.device | str) -> Instances:
        return Instances(
            self.image_size, self.boxes.to(device), self.scores.to(device), self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
            None if self.keypoints is None else self.keypoints.to(device),
        )

    def filter(self, score_thresh: float) -> Instances:
        """The instances scoring at least ``score_thresh``."""
        return self[self.scores >= score_thresh]

    @classmethod
    def empty(cls, image_size: tuple[int, int], with_masks: bool = True) -> Instances:
        h, w = image_size
        return cls(image_size, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, h, w, dtype=torch.bool) if with_masks else None)

    @classmethod
    def from_output(cls, output: dict[str, torch.Tensor], image_size: tuple[int, int],
                    mask_threshold: float = MASK_THRESHOLD) -> Instances:
        """From one torchvision Mask R-CNN output dict; mask probabilities > ``mask_threshold`` are kept."""
        masks = output.get("masks")
        if masks is not None:
            masks = (masks[:, 0] if masks.dim() == 4 else masks)
            masks = masks > mask_threshold if masks.is_floating_point() else masks != 0
        keypoints = output.get("keypoints")
        if keypoints is not None:  # torchvision: keypoints [N, K, 3] (v always 1), keypoints_scores [N, K]
            keypoints = keypoints.detach().float().clone()
            if output.get("keypoints_scores") is not None:
                keypoints[:, :, 2] = output["keypoints_scores"].detach().float()
        return cls(
            image_size,
            output["boxes"].detach().float(),
            output["scores"].detach().float(),
            output["labels"].detach().long(),
            masks,
            keypoints,
        )

    def to_coco(self, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
        """COCO result dicts (``COCO.loadRes`` layout); labels become ``category_ids[label - 1]``."""
        inst = self.to("cpu")
        labels = inst.labels.tolist()
        if labels and (min(labels) < 1 or max(labels) > len(category_ids)):
            raise MaskrayError(
                f"image {image_id}: label {min(labels) if min(labels) < 1 else max(labels)} has no category "
                f"(model labels are 1..{len(category_ids)})"
            )
        rles = encode_masks(inst.masks) if inst.masks is not None else [None] * len(inst)
        kps = inst.keypoints.flatten(1).tolist() if inst.keypoints is not None else [None] * len(inst)
        results = []
        for box, score, label, rle, kp in zip(boxes_to_xywh(inst.boxes).tolist(), inst.scores.tolist(), labels,
                                              rles, kps):
            result = {
                "image_id": int(image_id),
                "category_id": int(category_ids[label - 1]),
                "score": float(score),
                "bbox": [float(v) for v in box],
            }
            if rle is not None:
                result["segmentation"] = rle
            if kp is not None:
                result["keypoints"] = kp  # x, y, score x K
            results.append(result)
        return results

    @classmethod
    def from_coco(cls, results: Iterable[dict[str, Any]], image_size: tuple[int, int],
                  category_ids: Sequence[int]) -> Instances:
        """Back from COCO dicts (results or ground-truth annotations; ``score`` defaults to 1).

        ``keypoints`` (``x, y, score`` or ground truth's ``x, y, v`` × K) become [N, K, 3], zeros
        for an instance without them (K the largest given); None when none has any."""
        results = list(results)
        index = {int(c): i + 1 for i, c in enumerate(category_ids)}
        h, w = image_size
        boxes, scores, labels, masks = [], [], [], []
        for r in results:
            if int(r["category_id"]) not in index:
                raise MaskrayError(
                    f"image {r.get('image_id')}: category_id {r['category_id']} is not one of {list(category_ids)}"
                )
            labels.append(index[int(r["category_id"])])
            scores.append(1.0 if r.get("score") is None else float(r["score"]))
            boxes.append([float(v) for v in r["bbox"]])
            segmentation = r.get("segmentation")
            masks.append(None if segmentation is None else torch.from_numpy(decode_mask(segmentation, image_size)))
        kps = [r.get("keypoints") or [] for r in results]
        keypoints = None
        if any(kps):
            k = max(len(kp) for kp in kps) // 3
            keypoints = torch.zeros(len(results), k, 3)
            for i, kp in enumerate(kps):
                if kp:
                    keypoints[i, : len(kp) // 3] = torch.tensor(kp[: len(kp) // 3 * 3], dtype=torch.float32).reshape(-1, 3)
        if not results:
            mask_tensor = torch.zeros(0, h, w, dtype=torch.bool)
        elif all(m is not None for m in masks):
            mask_tensor = torch.stack(masks).bool()
        else:
            mask_tensor = None  # some instances are boxes only
        return cls(
            image_size,
            boxes_to_xyxy(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
            torch.tensor(scores, dtype=torch.float32),
            torch.tensor(labels, dtype=torch.int64),
            mask_tensor,
            keypoints,
        )


def boxes_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def boxes_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (``counts`` as str) of binary masks [N, H, W] (values > 0.5 are foreground)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        masks = (masks > MASK_THRESHOLD if masks.is_floating_point() else masks != 0).numpy()
    else:
        masks = masks > MASK_THRESHOLD if np.issubdtype(masks.dtype, np.floating) else masks != 0
    if masks.ndim != 3:
        raise MaskrayError(f"masks to encode must be [N, H, W], got shape {masks.shape}")
    n, h, w = masks.shape
    if n == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 [H, W, N] array.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")} for rle in rles]


def decode_mask(rle: dict[str, Any], image_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W] mask of a compressed (str/bytes counts) or uncompressed (list counts) RLE."""
    size = [int(v) for v in rle["size"]]
    if image_size is not None and tuple(size) != tuple(image_size):
        raise MaskrayError(f"RLE size {size} does not match the image size {list(image_size)}")
    counts = rle["counts"]
    if isinstance(counts, list):
        obj = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    else:
        obj = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
    return mask_utils.decode(obj)

