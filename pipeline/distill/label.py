"""Pseudo-labels for data distillation: teacher test-time augmentation, ensembling, thresholds.

The teacher sees every unlabeled image under several transforms (horizontal flip x scales).
Each transform's predictions are mapped back to the original frame (boxes un-flipped and
rescaled, soft masks un-flipped and resized), then **ensembled**: detections of one class that
overlap across transforms form a cluster whose box is the top one (``merge="nms"``) or the
score-weighted average (``merge="wbv"``, weighted box voting), whose soft masks are averaged
before binarization and whose scores are combined (``score_mode``).

Per-class thresholds follow the data-distillation rule (Radosavovic et al., CVPR 2018):
choose class ``c``'s threshold so the average number of pseudo instances per unlabeled image
equals the labeled set's average for ``c`` (``density_thresholds``), or use a fixed threshold.

``run_pseudo_labels`` wires it to Ray Data and storage: candidates (every ensembled instance
above ``min_score``) are written once as maskray shards, thresholds are chosen from their
scores, and the pseudo-label dataset is the thresholded copy, with ``round`` and ``teacher`` in
the manifest's ``extra``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import MaskrayError

logger = logging.getLogger(__name__)

MERGE_MODES = ("wbv", "nms")
SCORE_MODES = ("mean", "max")
THRESHOLD_MODES = ("density", "fixed")
# A threshold above every score: no pseudo instance of that class (JSON-safe, unlike inf).
NEVER = 1.0 + 1e-6


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TTAConfig:
    """Which transforms the teacher runs and how their predictions are merged.

    ``scales`` multiply both the image size and the model's ``min_size``/``max_size`` so each
    scale really changes the resolution the network sees. ``min_score`` drops weak detections
    of every transform before merging; ``iou_threshold`` groups same-class detections across
    transforms; ``max_detections`` caps the merged result per image.
    """

    scales: tuple[float, ...] = (1.0,)
    hflip: bool = True
    merge: str = "wbv"
    score_mode: str = "mean"
    iou_threshold: float = 0.55
    min_score: float = 0.05
    mask_threshold: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(not (s > 0 and math.isfinite(s)) for s in self.scales):
            raise MaskrayError(f"tta.scales: expected positive numbers, got {list(self.scales)}")
        if self.merge not in MERGE_MODES:
            raise MaskrayError(f"tta.merge: expected one of {MERGE_MODES}, got {self.merge!r}")
        if self.score_mode not in SCORE_MODES:
            raise MaskrayError(f"tta.score_mode: expected one of {SCORE_MODES}, got {self.score_mode!r}")
        for name in ("iou_threshold", "min_score", "mask_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise MaskrayError(f"tta.{name}: expected a value in [0, 1], got {value}")
        if self.max_detections < 1:
            raise MaskrayError(f"tta.max_detections: expected >= 1, got {self.max_detections}")

    def transforms(self) -> list["Transform"]:
        flips = (False, True) if self.hflip else (False,)
        return [Transform(scale=s, hflip=f) for s in self.scales for f in flips]


@dataclass(frozen=True)
class ThresholdConfig:
    """``mode="density"``: per-class thresholds from the labeled set's instances per image,
    never below ``floor``; ``mode="fixed"``: one threshold ``value`` for every class."""

    mode: str = "density"
    value: float = 0.5
    floor: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise MaskrayError(f"thresholds.mode: expected one of {THRESHOLD_MODES}, got {self.mode!r}")
        for name in ("value", "floor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MaskrayError(f"thresholds.{name}: expected a value in [0, 1], got {getattr(self, name)}")


# --------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One image's detections: ``boxes`` float32[N,4] xyxy pixels, ``scores`` float32[N],
    ``labels`` int64[N] (model labels 1..K), ``masks`` float32[N,H,W] soft masks in [0,1] in the
    frame of the image the prediction belongs to."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[-2]), int(self.masks.shape[-1])

    @classmethod
    def empty(cls, height: int, width: int) -> "Prediction":
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, height, width))

    @classmethod
    def from_output(cls, output: dict, height: int, width: int) -> "Prediction":
        """From a torchvision Mask R-CNN output dict (``masks`` [N,1,H,W])."""
        masks = output["masks"].detach().float()
        if masks.dim() == 4:
            masks = masks[:, 0]
        if masks.shape[0] == 0:
            masks = masks.new_zeros(0, height, width)
        return cls(
            boxes=output["boxes"].detach().float().reshape(-1, 4),
            scores=output["scores"].detach().float().reshape(-1),
            labels=output["labels"].detach().to(torch.int64).reshape(-1),
            masks=masks,
        )

    def select(self, keep: torch.Tensor) -> "Prediction":
        return Prediction(self.boxes[keep], self.scores[keep], self.labels[keep], self.masks[keep])


@dataclass(frozen=True)
class Transform:
    """A horizontal flip and/or a rescale of the input; ``invert`` maps predictions back."""

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
        """Boxes (xyxy) predicted on ``apply(image)`` -> boxes in the original ``height x width``."""
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
        """Soft masks [N, th, tw] predicted on ``apply(image)`` -> [N, height, width] in [0, 1]
        (each mask on its own: the same values whether N is 1 or many)."""
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

    def invert(self, pred: Prediction, height: int, width: int) -> Prediction:
        """Predictions made on ``apply(image)`` -> predictions in the original ``height x width``."""
        return Prediction(self.invert_boxes(pred.boxes, height, width), pred.scores.clone(), pred.labels.clone(),
                          self.invert_masks(pred.masks, height, width))


# --------------------------------------------------------------------------- ensembling


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
    """The clustering of :func:`ensemble` on boxes, scores, labels and transform indices only:
    ``(boxes, scores, labels, members)`` per merged detection, ``members`` indexing the inputs
    whose soft masks it averages (so masks can be made one cluster at a time)."""
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


def ensemble(preds: Sequence[Prediction], config: TTAConfig) -> Prediction:
    """Merge predictions of the same image (all in the original frame) from ``len(preds)``
    transforms into one :class:`Prediction`.

    Greedy clustering per class in score order: the best unassigned detection takes every
    unassigned same-class detection with IoU >= ``iou_threshold``. From each transform only its
    best member of the cluster counts (a transform votes once). The merged score is the mean
    over *all* transforms (a transform that missed the object contributes 0) or the max; the
    box is the top member's (nms) or the score-weighted mean of the members' (wbv); the soft
    mask is the mean of the members' soft masks.
    """
    if not preds:
        raise ValueError("ensemble: no predictions")
    height, width = preds[0].image_size
    for p in preds:
        if p.image_size != (height, width):
            raise ValueError(f"ensemble: predictions in different frames {p.image_size} vs {(height, width)}")
    boxes = torch.cat([p.boxes for p in preds])
    scores = torch.cat([p.scores for p in preds])
    labels = torch.cat([p.labels for p in preds])
    masks = torch.cat([p.masks for p in preds])
    tidx = torch.cat([torch.full((len(p),), i, dtype=torch.int64) for i, p in enumerate(preds)])
    keep = scores >= config.min_score
    masks = masks[keep]
    out_boxes, out_scores, out_labels, members = clusters(boxes[keep], scores[keep], labels[keep], tidx[keep],
                                                          len(preds), config)
    out_masks = [masks[sel].mean(0) for sel in members]
    if not out_scores:
        return Prediction.empty(height, width)
    result = Prediction(torch.stack(out_boxes), torch.stack(out_scores).float(),
                        torch.tensor(out_labels, dtype=torch.int64), torch.stack(out_masks))
    order = torch.argsort(result.scores, descending=True, stable=True)[: config.max_detections]
    return result.select(order)


@contextlib.contextmanager
def _model_scale(model: Callable, scale: float) -> Iterator[None]:
    """Scale a detector's own resize for one transform, so the network really sees the image at
    ``scale``; restored on exit. Handles a ``pipeline.infer.predictor.Predictor`` (integer
    ``min_size``/``max_size``) and a torchvision detector (``model.transform``)."""
    if scale == 1.0:
        yield
        return
    if isinstance(getattr(model, "min_size", None), int) and isinstance(getattr(model, "max_size", None), int):
        target, as_tuple = model, False
    elif hasattr(getattr(model, "transform", None), "min_size"):
        target, as_tuple = model.transform, True
    else:
        yield
        return
    min_size, max_size = target.min_size, target.max_size
    if as_tuple:
        target.min_size = tuple(max(1, int(round(m * scale))) for m in min_size)
    else:
        target.min_size = max(1, int(round(min_size * scale)))
    target.max_size = max(1, int(round(max_size * scale)))
    try:
        yield
    finally:
        target.min_size, target.max_size = min_size, max_size


def predict_tta(model: Callable, images: Sequence[torch.Tensor], config: TTAConfig, *,
                scaler: object | None = None) -> list[Prediction]:
    """Run ``model`` (list of float [3,H,W] images -> torchvision output dicts in each input's
    frame) under every transform of ``config`` and return one ensembled Prediction per image.
    ``scaler`` is the object whose resize is scaled per transform (default: ``model``)."""
    per_image: list[list[Prediction]] = [[] for _ in images]
    with torch.inference_mode():
        for t in config.transforms():
            with _model_scale(model if scaler is None else scaler, t.scale):
                outputs = model([t.apply(img) for img in images])
            for i, (img, out) in enumerate(zip(images, outputs)):
                th, tw = t.size(*img.shape[-2:])
                per_image[i].append(t.invert(Prediction.from_output(out, th, tw), *img.shape[-2:]))
    return [ensemble(p, config) for p in per_image]


def tta_annotations(predictor: Any, images: Sequence[torch.Tensor], config: TTAConfig,
                    category_ids: Sequence[int], *, image_ids: Sequence[int]) -> list[list[dict]]:
    """``to_annotations(predict_tta(predictor.predict, images, config, scaler=predictor)[i], ...)``
    for every image, in bounded memory: the model's boxes and 28x28 mask probabilities of every
    transform are kept, clustering runs on boxes (:func:`clusters`), and each merged instance's
    soft mask is pasted, mapped back and averaged from its members only, encoded, and dropped
    before the next. Peak: one instance's members at the image size (<= transforms x H x W),
    never every instance of every transform (``predictor`` is a ``pipeline.infer.predictor.Predictor``).
    """
    from pycocotools import mask as mask_utils
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    parts: list[list[tuple]] = [[] for _ in images]
    with torch.inference_mode():
        for t in config.transforms():
            transformed = [t.apply(img) for img in images]
            with _model_scale(predictor, t.scale):
                outs = predictor.forward_uint8(transformed)
            for i, (img, timg, out) in enumerate(zip(images, transformed, outs)):
                h, w = int(img.shape[-2]), int(img.shape[-1])
                boxes_t = out["boxes"].float().reshape(-1, 4)
                parts[i].append((t, t.invert_boxes(boxes_t, h, w), out["scores"].float().reshape(-1),
                                 out["labels"].to(torch.int64).reshape(-1), boxes_t, out["masks"].float(),
                                 (int(timg.shape[-2]), int(timg.shape[-1]))))
    results = []
    for img, image_id, per_t in zip(images, image_ids, parts):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        scores = torch.cat([p[2] for p in per_t])
        keep = scores >= config.min_score
        tidx = torch.cat([torch.full((len(p[2]),), k, dtype=torch.int64) for k, p in enumerate(per_t)])[keep]
        local = torch.cat([torch.arange(len(p[2])) for p in per_t])[keep]
        boxes, labels = torch.cat([p[1] for p in per_t])[keep], torch.cat([p[3] for p in per_t])[keep]
        c_boxes, c_scores, c_labels, members = clusters(boxes, scores[keep], labels, tidx, len(per_t), config)
        annotations: list[dict] = []
        if c_scores:
            merged = torch.stack(c_scores).float()
            order = torch.argsort(merged, descending=True, stable=True)[: config.max_detections]
            for rank, c in enumerate(order.tolist()):
                soft = []
                for m in members[c].tolist():
                    t, _, _, _, boxes_t, masks28, size_t = per_t[int(tidx[m])]
                    j = int(local[m])
                    pasted = paste_masks_in_image(masks28[j:j + 1], boxes_t[j:j + 1], size_t)[:, 0]
                    soft.append(t.invert_masks(pasted, h, w)[0])
                binary = (torch.stack(soft).mean(0) >= config.mask_threshold).to(torch.uint8).numpy()
                area = int(binary.sum())
                if area == 0:
                    continue
                label = int(c_labels[c])
                if not 1 <= label <= len(category_ids):
                    raise MaskrayError(f"teacher predicted label {label}, but it has {len(category_ids)} categories")
                rle = mask_utils.encode(np.asfortranarray(binary[:, :, None]))[0]
                x1, y1, x2, y2 = (float(v) for v in c_boxes[c].tolist())
                annotations.append({
                    "id": int(image_id) * 1000 + rank,
                    "category_id": int(category_ids[label - 1]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area),
                    "iscrowd": False,
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
                    "score": float(merged[c]),
                })
        results.append(annotations)
    return results


# --------------------------------------------------------------------------- annotations


def to_annotations(pred: Prediction, category_ids: Sequence[int], *, image_id: int,
                   mask_threshold: float = 0.5) -> list[dict]:
    """Prediction -> shard annotation dicts (COCO xywh bbox, RLE of the binarized mask, score);
    model label ``i`` is ``category_ids[i - 1]``. Instances whose binarized mask is empty are
    dropped."""
    from pycocotools import mask as mask_utils

    if len(pred) == 0:
        return []
    binary = (pred.masks >= mask_threshold).to(torch.uint8).numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    areas = binary.reshape(len(pred), -1).sum(1)
    annotations = []
    for i, rle in enumerate(rles):
        if areas[i] == 0:
            continue
        x1, y1, x2, y2 = (float(v) for v in pred.boxes[i].tolist())
        label = int(pred.labels[i])
        if not 1 <= label <= len(category_ids):
            raise MaskrayError(f"teacher predicted label {label}, but it has {len(category_ids)} categories")
        annotations.append({
            "id": int(image_id) * 1000 + i,
            "category_id": int(category_ids[label - 1]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(areas[i]),
            "iscrowd": False,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
            "score": float(pred.scores[i]),
        })
    return annotations


# --------------------------------------------------------------------------- thresholds


def labeled_density(annotation_lists: Iterable[Sequence[dict]], category_ids: Sequence[int]) -> dict[int, float]:
    """Average number of (non-crowd) instances per image for each category id."""
    counts = {int(c): 0 for c in category_ids}
    images = 0
    for annotations in annotation_lists:
        images += 1
        for ann in annotations or ():
            if ann.get("iscrowd"):
                continue
            cid = int(ann["category_id"])
            if cid in counts:
                counts[cid] += 1
    if images == 0:
        raise MaskrayError("density rule: the labeled dataset has no images")
    return {c: n / images for c, n in counts.items()}


def density_thresholds(scores: dict[int, Sequence[float]], num_images: int,
                       target_per_image: dict[int, float], *, floor: float = 0.0) -> dict[int, float]:
    """Per-class thresholds so that ``#{score >= t_c} / num_images`` matches
    ``target_per_image[c]`` (rounded to whole instances): ``t_c`` is the k-th highest score with
    ``k = round(target * num_images)``; never below ``floor``; :data:`NEVER` when ``k == 0``."""
    if num_images <= 0:
        raise MaskrayError("density rule: no unlabeled images to threshold")
    thresholds = {}
    for cid, target in target_per_image.items():
        k = int(round(target * num_images))
        s = np.sort(np.asarray(scores.get(cid, ()), dtype=np.float64))[::-1]
        if k <= 0:
            t = NEVER
        elif k >= len(s):
            t = floor
        else:
            t = float(s[k - 1])
        thresholds[int(cid)] = float(max(t, floor))
    return thresholds


def apply_thresholds(annotations: Sequence[dict], thresholds: dict[int, float]) -> list[dict]:
    return [a for a in annotations if a["score"] >= thresholds.get(int(a["category_id"]), NEVER)]


# --------------------------------------------------------------------------- Ray Data + storage


CANDIDATES = "candidates"
INPUT_COLUMNS = ["image_id", "file_name", "width", "height", "image"]


class TTALabeler:
    """Ray Data actor stage: a batch of unlabeled shard rows (pyarrow) -> the same rows with
    ``annotations`` = the teacher's ensembled TTA detections (with ``score``). The checkpoint is
    loaded once per actor with :class:`pipeline.infer.predictor.Predictor`."""

    def __init__(self, checkpoint_uri: str, tta: dict, threads: int = 0) -> None:
        from pipeline.infer.predictor import Predictor

        self.config = TTAConfig(**tta)
        self.predictor = Predictor(checkpoint_uri, device="cpu" if not torch.cuda.is_available() else None,
                                   score_threshold=self.config.min_score, threads=int(threads))
        self.category_ids = self.predictor.category_ids

    def label_rows(self, rows: list[dict]) -> list[dict]:
        """The rows whose image decodes, each with its ``annotations``. A row whose image cannot
        be decoded (corrupt, over the pixel limit) is logged by image id and file name and left
        out; :func:`label_candidates` counts what is missing against the source."""
        from pipeline.data.decode import ImageDecodeError, decode_image

        images, good = [], []
        for row in rows:
            try:
                images.append(decode_image(row["image"]).float().div_(255.0))
            except ImageDecodeError as exc:
                logger.warning("pseudo-labels: skipped image_id=%s (%s): %s", row.get("image_id"),
                               row.get("file_name"), exc)
                continue
            good.append(row)
        rows = good
        if not rows:
            return []
        # Bounded memory: never every transform's masks at the image size (tta_annotations).
        annotations = tta_annotations(self.predictor, images, self.config, self.category_ids,
                                      image_ids=[int(r["image_id"]) for r in rows])
        return [{**{k: row[k] for k in INPUT_COLUMNS}, "annotations": anns} for row, anns in zip(rows, annotations)]

    def __call__(self, table):
        from pipeline.data.format import rows_to_table

        return rows_to_table(self.label_rows(table.to_pylist()))


def _annotation_scores(dataset_uri: str) -> tuple[dict[int, list[float]], int]:
    from pipeline.data.format import read_rows

    scores: dict[int, list[float]] = {}
    images = 0
    for row in read_rows(dataset_uri, columns=["annotations"]):
        images += 1
        for ann in row["annotations"] or ():
            scores.setdefault(int(ann["category_id"]), []).append(float(ann["score"]))
    return scores, images


def label_candidates(unlabeled_uri: str, out_uri: str, teacher: str, tta: TTAConfig, *, round_index: int,
                     batch_size: int = 8, actors: int = 1, cpus_per_actor: float = 1.0, threads: int = 0,
                     images_per_shard: int = 1000, max_bad_fraction: float = 0.01) -> str:
    """Teacher TTA inference over every unlabeled image with Ray Data -> candidate shards under
    ``out_uri`` (every ensembled instance >= ``tta.min_score``, with its score). Kept when a
    previous run already wrote them for this very teacher and round. Undecodable images are
    skipped and counted; more than ``max_bad_fraction`` of them stops the round."""
    import dataclasses

    import ray.data

    from pipeline import storage
    from pipeline.data.decode import read_shards
    from pipeline.data.format import Manifest, ShardWriter, read_manifest, write_manifest

    extra = json.loads(json.dumps({"round": round_index, "teacher": teacher, "stage": CANDIDATES,
                                   "tta": dataclasses.asdict(tta)}))
    if storage.exists(storage.join(out_uri, "manifest.json")):
        old = read_manifest(out_uri)
        if {k: old.extra.get(k) for k in extra} == extra:
            logger.info("pseudo-labels: candidates of round %d already at %s; kept", round_index, out_uri)
            return out_uri
    source = read_manifest(unlabeled_uri)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input -> same shards on a rerun
    ds = read_shards(unlabeled_uri, columns=INPUT_COLUMNS)
    ds = ds.map_batches(TTALabeler, fn_constructor_kwargs={"checkpoint_uri": teacher,
                                                           "tta": dataclasses.asdict(tta), "threads": threads},
                        batch_size=batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor)
    with ShardWriter(out_uri, images_per_shard=images_per_shard) as writer:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                writer.add(row)
    shards = writer.close()
    _check_skipped(source.num_images, sum(s.images for s in shards), unlabeled_uri, max_bad_fraction)
    categories = _teacher_categories(teacher, source.categories)
    write_manifest(out_uri, Manifest(categories=categories, shards=shards, source=unlabeled_uri, extra=extra))
    return out_uri


def _check_skipped(images_in: int, images_out: int, source_uri: str, max_bad_fraction: float) -> int:
    """Rows in = rows out + skipped; more than ``max_bad_fraction`` skipped stops the round with
    one line (each skipped row was logged by the labeling actor). Returns the skipped count."""
    skipped = images_in - images_out
    if skipped:
        logger.warning("pseudo-labels: %d of %d images of %s could not be decoded and were skipped",
                       skipped, images_in, source_uri)
    if skipped > max_bad_fraction * images_in:
        raise MaskrayError(f"pseudo-labels: {skipped} of {images_in} images of {source_uri} could not be decoded, "
                           f"more than the {max_bad_fraction:g} allowed (the skipped rows are named above)")
    return skipped


def _teacher_categories(teacher: str, fallback: list[dict]) -> list[dict]:
    from pipeline.evaluate import load_checkpoint_uri

    _, config, _ = load_checkpoint_uri(teacher)
    return [dict(c) for c in config.categories] or list(fallback)


def choose_thresholds(candidates_uri: str, labeled_uri: str, config: ThresholdConfig,
                      category_ids: Sequence[int]) -> dict[int, float]:
    """Per-class thresholds from the candidates' scores (density rule) or the fixed value."""
    if config.mode == "fixed":
        return {int(c): float(config.value) for c in category_ids}
    from pipeline.data.format import read_rows

    density = labeled_density((r["annotations"] for r in read_rows(labeled_uri, columns=["annotations"])),
                              category_ids)
    scores, images = _annotation_scores(candidates_uri)
    thresholds = density_thresholds(scores, images, density, floor=config.floor)
    for cid in category_ids:
        logger.info("pseudo-labels: category %s: labeled %.2f/image -> threshold %.3f", cid, density[int(cid)],
                    thresholds[int(cid)])
    return thresholds


def write_pseudo_labels(candidates_uri: str, out_uri: str, thresholds: dict[int, float], *, extra: dict,
                        keep_empty: bool = False, images_per_shard: int = 1000) -> tuple[int, int]:
    """The thresholded copy of the candidates as a maskray dataset at ``out_uri``;
    returns (images, instances)."""
    from pipeline.data.format import Manifest, ShardWriter, read_manifest, read_rows, write_manifest

    source = read_manifest(candidates_uri)
    images = instances = 0
    with ShardWriter(out_uri, images_per_shard=images_per_shard) as writer:
        for row in read_rows(candidates_uri):
            anns = apply_thresholds(row["annotations"] or [], thresholds)
            if not anns and not keep_empty:
                continue
            writer.add({**row, "annotations": anns})
            images += 1
            instances += len(anns)
    shards = writer.close()
    write_manifest(out_uri, Manifest(categories=source.categories, shards=shards, source=candidates_uri,
                                     extra=extra))
    return images, instances


def run_pseudo_labels(round_index: int, teacher: str, out_uri: str, *, unlabeled: str, labeled: str,
                      tta: TTAConfig, thresholds: ThresholdConfig, keep_empty: bool = False,
                      batch_size: int = 8, actors: int = 1, cpus_per_actor: float = 1.0, threads: int = 0):
    """The whole pseudo-labeling step of one round: candidates (``<out>/candidates``), thresholds,
    then the pseudo-label dataset at ``out_uri`` whose manifest ``extra`` names the round and
    teacher. Returns a :class:`pipeline.distill.rounds.PseudoLabels`."""
    from pipeline import storage
    from pipeline.data.format import read_manifest
    from pipeline.distill.rounds import PseudoLabels

    start = time.perf_counter()
    candidates = label_candidates(unlabeled, storage.join(out_uri, CANDIDATES), teacher, tta,
                                  round_index=round_index, batch_size=batch_size, actors=actors,
                                  cpus_per_actor=cpus_per_actor, threads=threads)
    manifest = read_manifest(candidates)
    category_ids = [int(c["id"]) for c in manifest.categories]
    chosen = choose_thresholds(candidates, labeled, thresholds, category_ids)
    extra = {"round": round_index, "teacher": teacher, "thresholds": {str(k): v for k, v in chosen.items()},
             "threshold_mode": thresholds.mode, "candidates": candidates}
    images, instances = write_pseudo_labels(candidates, out_uri, chosen, extra=extra, keep_empty=keep_empty)
    logger.info("pseudo-labels of round %d: %d instances on %d of %d images (%d candidates) in %.1f s -> %s",
                round_index, instances, images, manifest.num_images, manifest.num_instances,
                time.perf_counter() - start, out_uri)
    return PseudoLabels(dataset=out_uri, thresholds=chosen, images=images, instances=instances,
                        round=round_index, teacher=teacher)


def check_pseudo_dataset(dataset_uri: str, *, round_index: int, teacher: str) -> None:
    """Refuse a pseudo-label dataset that is not the one of ``round_index`` by ``teacher``."""
    from pipeline.data.format import read_manifest

    extra = read_manifest(dataset_uri).extra
    if extra.get("round") != round_index or extra.get("teacher") != teacher:
        raise MaskrayError(f"{dataset_uri}: pseudo-labels of round {extra.get('round')} by {extra.get('teacher')}, "
                           f"but round {round_index} with teacher {teacher} asked for them")
