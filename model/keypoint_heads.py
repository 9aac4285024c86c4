"""The keypoint branch of Mask R-CNN (the paper's §5, torchvision's Keypoint R-CNN) on our pooler.

Modules (torchvision's ``keypointrcnn_resnet50_fpn`` layout, so its state dicts load with
``strict=True``; ``C`` the FPN width, ``K`` the number of keypoints, ``R`` RoIs)::

    roi_heads.keypoint_roi_pool   model.ops.MultiScaleRoIAlign(["0".."3"], 14, sampling_ratio=2,
                                  mode=pooler): [R, C, 14, 14]
    roi_heads.keypoint_head       torchvision KeypointRCNNHeads(C, [512] * 8): eight 3x3 convs + ReLU
                                  (no norm): [R, 512, 14, 14]
    roi_heads.keypoint_predictor  torchvision KeypointRCNNPredictor(512, K): a 4x4 stride-2 deconv to
                                  28x28, then bilinear x2: [R, K, 56, 56] heatmap logits

**Targets.** With a keypoint branch, torchvision's ``RoIHeads`` reads ``target["keypoints"]`` of
EVERY image: float32 ``[N, K, 3]`` rows ``(x, y, v)`` in the image's pixel frame (the frame of its
``boxes``), ``v > 0`` labelled (COCO's v = 1 and v = 2 both train), ``v = 0`` not labelled. An image
without instances carries a ``[0, K, 3]`` tensor, an instance of a category without keypoints
``K`` rows of zeros (:func:`empty_keypoints`). Coordinates are COCO's as annotated, no half-pixel
shift (torchvision's references train and export them so; its COCO weights expect it).

**Loss** (torchvision's ``keypointrcnn_loss``, the paper's): for each positive RoI and each of its
keypoints with ``v > 0`` that falls inside the RoI, a 56²-way softmax cross-entropy over that
keypoint's heatmap, the target the one pixel ``floor((x - x0) * 56 / w)``, ``floor((y - y0) * 56 /
h)``; the mean over those (RoI, keypoint) pairs. A batch with no such pair gives 0 (``logits.sum()
* 0``, the graph kept): never NaN.

**Inference** (torchvision's ``keypointrcnn_inference``): each detection's heatmaps resized
(bicubic) to its box in pixels, the argmax taken per keypoint at the pixel centre; its **score** is
the resized heatmap's value there: a logit of the spatial softmax, unbounded, not a probability.
torchvision reports ``v = 1`` for every point whatever the score (vision#5872); maskray's outputs
carry ``(x, y, score)`` and derive a visibility from each point's own score
(:func:`visibility`): 2 ("labelled and visible") where ``score >= VISIBLE_LOGIT``, else 1
("labelled but not visible": placed by the model, not seen). ``VISIBLE_LOGIT = 2.0`` is the
threshold at which the paper's authors' Detectron draws keypoints (``kps_thresh``, on these same
logits). COCO keypoint results carry ``[x, y, v] * K`` with that ``v`` (:func:`to_coco_keypoints`);
COCOeval ignores a detection's ``v`` (OKS runs over the ground truth's labelled points), so kp AP
does not depend on the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from model.errors import MaskrayError

if TYPE_CHECKING:  # the rule functions below are imported by results code that never builds a model
    import torch

POOL_SIZE = 14  # the keypoint pooler's output (heatmaps are 4x: 56x56)
HEAD_CHANNELS: tuple[int, ...] = (512,) * 8  # torchvision's and the paper's: eight 3x3 convs of 512
VISIBLE_LOGIT = 2.0  # a keypoint whose score (heatmap logit) reaches this is reported visible (v = 2)


def check_num_keypoints(num_keypoints: object) -> int:
    """``num_keypoints`` as an int >= 0 (0 = no keypoint branch); :class:`MaskrayError` otherwise."""
    if isinstance(num_keypoints, bool) or not isinstance(num_keypoints, int) or num_keypoints < 0:
        raise MaskrayError(f"model num_keypoints {num_keypoints!r} must be an int >= 0 (0 = no keypoint head)")
    return num_keypoints


def empty_keypoints(num_instances: int, num_keypoints: int, device: Any = None) -> torch.Tensor:
    """A float32 ``[num_instances, num_keypoints, 3]`` target of unlabelled keypoints (all zeros, v = 0):
    what an image without instances (``num_instances`` = 0) or a category without keypoints carries."""
    import torch

    return torch.zeros(num_instances, num_keypoints, 3, dtype=torch.float32, device=device)


def visibility(scores: torch.Tensor, threshold: float = VISIBLE_LOGIT) -> torch.Tensor:
    """COCO visibility of predicted keypoints from their scores (any shape): int64, 2 where
    ``score >= threshold``, else 1 (see the module docstring)."""
    import torch

    return torch.where(scores >= threshold, 2, 1).to(torch.int64)


def to_coco_keypoints(points: Sequence[float], threshold: float = VISIBLE_LOGIT) -> list[float]:
    """One instance's predicted ``(x, y, score) * K`` (a flat sequence, e.g. a results row's
    ``keypoints``) as COCO's flat ``[x, y, v] * K``, ``v`` by the rule of :func:`visibility` (plain
    Python: no torch needed)."""
    flat = [float(v) for v in points]
    if len(flat) % 3:
        raise MaskrayError(f"keypoints of length {len(flat)} are not (x, y, score) triples")
    out = []
    for i in range(0, len(flat), 3):
        x, y, score = flat[i:i + 3]
        out += [x, y, 2.0 if score >= threshold else 1.0]
    return out
