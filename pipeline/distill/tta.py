"""The teacher's test-time augmentation as a predictor that ``pipeline.infer.driver.run_inference`` runs.

The teacher sees every unlabeled image under several transforms (horizontal flip x scales).
Each transform's detections are mapped back to the original frame (boxes un-flipped and
rescaled, soft masks un-flipped and resized), then **ensembled**: detections of one class that
overlap across transforms form a cluster (:func:`clusters`) whose box is the top one
(``merge="nms"``) or the score-weighted average (``merge="wbv"``, weighted box voting), whose soft
masks are averaged before binarization and whose scores are combined (``score_mode``).

:class:`TTAPredictor` is a :class:`pipeline.infer.predictor.Predictor` whose per-image output is
the merged result instances themselves (RLE in the image's frame), so the inference engine's
stages write them as any results file: one file per unit, exactly once, resumable, with
provenance (the TTA options are recorded under ``options.tta``), progress and bounded retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import MaskrayError
from pipeline.distill.config import TTAConfig
from pipeline.infer.predictor import Predictor, to_float


@dataclasses.dataclass(frozen=True)
class Transform:
    """A horizontal flip and/or a rescale of the input, and the maps of its predictions back."""

    scale: float = 1.0
    hflip: bool = False

    def size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, int(round(height * self.scale))), max(1, int(round(width * self.scale)))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """float image [C,H,W] -> the transformed image (bilinear resize, then flip)."""
        height, width = image.shape[-2:]
        new_size = self.size(height, width)
        if new_size != (height, width):
            image = F.interpolate(image[None], size=new_size, mode="bilinear", align_corners=False)[0]
        if self.hflip:
            image = image.flip(-1)
        return image

    def invert_boxes(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boxes float[N,4] (xyxy pixels) predicted on ``apply(image)`` -> boxes in the original
        ``height x width``."""
        th, tw = self.size(height, width)
        out = boxes.clone()
        if self.hflip:
            out[:, 0], out[:, 2] = tw - boxes[:, 2], tw - boxes[:, 0]
        if (th, tw) != (height, width):
            out[:, 0::2] *= width / tw
            out[:, 1::2] *= height / th
        out[:, 0::2] = out[:, 0::2].clamp(0, width)
        out[:, 1::2] = out[:, 1::2].clamp(0, height)
        return out

    def invert_masks(self, masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Soft masks float[N, th, tw] predicted on ``apply(image)`` -> float[N, height, width] in
        [0, 1] (each mask on its own: the same values whether N is 1 or many)."""
        th, tw = self.size(height, width)
        if self.hflip:
            masks = masks.flip(-1)
        if (th, tw) != (height, width):
            if masks.shape[0]:
                masks = F.interpolate(masks[:, None], size=(height, width), mode="bilinear",
                                      align_corners=False)[:, 0]
            else:
                masks = masks.new_zeros(0, height, width)
        return masks.clamp(0, 1)


def transforms(config: TTAConfig) -> list[Transform]:
    """The transforms of ``config``: every scale, each also flipped when ``hflip``."""
    flips = (False, True) if config.hflip else (False,)
    return [Transform(scale=s, hflip=f) for s in config.scales for f in flips]


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def clusters(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, tidx: torch.Tensor, num_t: int,
             config: TTAConfig) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], list[torch.Tensor]]:
    """Merge the detections of ``num_t`` transforms of one image (all in the original frame):
    ``boxes`` float[N,4] xyxy, ``scores`` float[N], ``labels`` int64[N], ``tidx`` int64[N] (the
    transform of each). Returns ``(boxes, scores, labels, members)`` per merged detection,
    ``members`` indexing the inputs whose soft masks it averages.

    Greedy clustering per class in score order: the best unassigned detection takes every
    unassigned same-class detection with IoU >= ``iou_threshold``. From each transform only its
    best member of the cluster counts (a transform votes once). The merged score is the mean over
    *all* transforms (a transform that missed the object contributes 0) or the max; the box is the
    top member's (nms) or the score-weighted mean of the members' (wbv).
    """
    out_boxes, out_scores, out_labels, out_members = [], [], [], []
    for label in labels.unique().tolist():
        idx = torch.nonzero(labels == label).flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        iou = _box_iou(boxes[idx], boxes[idx])
        assigned = torch.zeros(len(idx), dtype=torch.bool)
        for i in range(len(idx)):
            if assigned[i]:
                continue
            members = (~assigned) & (iou[i] >= config.iou_threshold)
            members[i] = True
            assigned |= members
            # each transform's best member: members are in score order, so its first one
            best: dict[int, int] = {}
            for j in torch.nonzero(members).flatten().tolist():
                best.setdefault(int(tidx[idx[j]]), int(idx[j]))
            sel = torch.tensor(list(best.values()), dtype=torch.int64)
            s = scores[sel]
            merged_score = s.sum() / num_t if config.score_mode == "mean" else s.max()
            if config.merge == "nms":
                box = boxes[int(idx[i])]
            else:
                box = (boxes[sel] * s[:, None]).sum(0) / s.sum().clamp(min=1e-12)
            out_boxes.append(box)
            out_scores.append(merged_score)
            out_labels.append(label)
            out_members.append(sel)
    return out_boxes, out_scores, out_labels, out_members


@contextlib.contextmanager
def model_scale(predictor: Any, scale: float) -> Iterator[None]:
    """Scale a predictor's own resize (integer ``min_size``/``max_size``, as
    :class:`~pipeline.infer.predictor.Predictor`) for one transform, so the network really sees the
    image at ``scale``; restored on exit."""
    if scale == 1.0:
        yield
        return
    min_size, max_size = predictor.min_size, predictor.max_size
    predictor.min_size = max(1, int(round(min_size * scale)))
    predictor.max_size = max(1, int(round(max_size * scale)))
    try:
        yield
    finally:
        predictor.min_size, predictor.max_size = min_size, max_size


def tta_instances(predictor: Any, images: Sequence[torch.Tensor], config: TTAConfig,
                  category_ids: Sequence[int]) -> list[list[dict]]:
    """Per image, the merged TTA result instances (RESULT_SCHEMA ``instances``: ``category_id``,
    ``score``, COCO xywh ``bbox``, RLE ``segmentation`` of the binarized averaged soft mask),
    in merged-score order; an instance whose mask binarizes empty is left out.

    ``images`` are float ``[3,H,W]`` in [0,1]; ``predictor`` is a
    :class:`~pipeline.infer.predictor.Predictor` (``forward_uint8`` takes floats too). Bounded
    memory: the model's boxes and 28x28 mask probabilities of every transform are kept,
    clustering runs on boxes (:func:`clusters`), and each merged instance's soft mask is pasted,
    mapped back and averaged from its members only, encoded, and dropped before the next. Peak:
    one instance's members at the image size (<= transforms x H x W).
    """
    from pycocotools import mask as mask_utils
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    parts: list[list[tuple]] = [[] for _ in images]
    with torch.inference_mode():
        for t in transforms(config):
            transformed = [t.apply(img) for img in images]
            with model_scale(predictor, t.scale):
                outs = predictor.forward_uint8(transformed)
            for i, (img, timg, out) in enumerate(zip(images, transformed, outs)):
                h, w = int(img.shape[-2]), int(img.shape[-1])
                boxes_t = out["boxes"].float().reshape(-1, 4)
                parts[i].append((t, t.invert_boxes(boxes_t, h, w), out["scores"].float().reshape(-1),
                                 out["labels"].to(torch.int64).reshape(-1), boxes_t, out["masks"].float(),
                                 (int(timg.shape[-2]), int(timg.shape[-1]))))
    results = []
    for img, per_t in zip(images, parts):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        scores = torch.cat([p[2] for p in per_t])
        keep = scores >= config.min_score
        tidx = torch.cat([torch.full((len(p[2]),), k, dtype=torch.int64) for k, p in enumerate(per_t)])[keep]
        local = torch.cat([torch.arange(len(p[2])) for p in per_t])[keep]
        boxes, labels = torch.cat([p[1] for p in per_t])[keep], torch.cat([p[3] for p in per_t])[keep]
        c_boxes, c_scores, c_labels, members = clusters(boxes, scores[keep], labels, tidx, len(per_t), config)
        instances: list[dict] = []
        if c_scores:
            merged = torch.stack(c_scores).float()
            order = torch.argsort(merged, descending=True, stable=True)[: config.max_detections]
            for c in order.tolist():
                soft = []
                for m in members[c].tolist():
                    t, _, _, _, boxes_t, masks28, size_t = per_t[int(tidx[m])]
                    j = int(local[m])
                    pasted = paste_masks_in_image(masks28[j:j + 1], boxes_t[j:j + 1], size_t)[:, 0]
                    soft.append(t.invert_masks(pasted, h, w)[0])
                binary = (torch.stack(soft).mean(0) >= config.mask_threshold).to(torch.uint8).numpy()
                if not binary.any():
                    continue
                label = int(c_labels[c])
                if not 1 <= label <= len(category_ids):
                    raise MaskrayError(f"teacher predicted label {label}, but it has {len(category_ids)} categories")
                rle = mask_utils.encode(np.asfortranarray(binary[:, :, None]))[0]
                x1, y1, x2, y2 = (float(v) for v in c_boxes[c].tolist())
                instances.append({
                    "category_id": int(category_ids[label - 1]),
                    "score": float(merged[c]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
                })
        results.append(instances)
    return results


class TTAPredictor(Predictor):
    """A :class:`~pipeline.infer.predictor.Predictor` whose per-image output is the merged TTA
    result instances (:func:`tta_instances`): what ``run_inference(InferConfig(input=..., tta=asdict(config)), predictor_factory=TTAPredictor)`` runs in its model actors. ``tta`` is a :class:`TTAConfig` or its
    ``asdict``; the other arguments are the Predictor's (``score_threshold`` should be
    ``tta.min_score``: weaker detections never reach the merge)."""

    def __init__(self, checkpoint_uri: str | None = None, *, tta: TTAConfig | dict, **kwargs: Any) -> None:
        super().__init__(checkpoint_uri, **kwargs)
        self.tta = tta if isinstance(tta, TTAConfig) else TTAConfig(**tta)

    def unit_predictions(self, images: Sequence[torch.Tensor]) -> list[dict]:
        """uint8 (or float [0,1]) ``[3,H,W]`` images -> per image ``{"instances": [...]}``, the
        ready result instances that the results writer stores as they are."""
        floats = [to_float(im) for im in images]
        return [{"instances": inst} for inst in tta_instances(self, floats, self.tta, self.category_ids)]
