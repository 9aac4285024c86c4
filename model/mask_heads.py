"""The mask-branch ablations of Mask R-CNN's Table 2: softmax loss, class-agnostic masks, MLP head.

``build_maskrcnn`` uses these only when asked; its defaults keep torchvision's own ``RoIHeads``,
``MaskRCNNHeads`` and ``MaskRCNNPredictor`` (and so its ``maskrcnn_loss`` / ``maskrcnn_inference``).

Definitions (``x`` the mask logits ``[R, C, M, M]`` of R RoIs, ``k`` a RoI's class, 1..K;
``t`` its ground-truth mask cropped to the RoI, torchvision's ``project_masks_on_boxes``: values
in [0, 1]; every loss is a mean over the R * M * M pixels):

* **class-agnostic**: the predictor outputs one channel (``C == 1``); loss and inference use
  channel 0 whatever the class. A mask output of one channel *is* class-agnostic here.
* **sigmoid** (the paper's default, Table 2b "sigmoid"): per-pixel binary cross-entropy on the
  class's own channel, ``-(t log s(x_k) + (1 - t) log(1 - s(x_k)))``, ``s`` the sigmoid: the
  other classes' masks take no part (torchvision's ``maskrcnn_loss``). Inference: ``s(x_k)``.
* **softmax** (Table 2b "softmax", the FCN-style multinomial loss in which classes compete):
  at each pixel a (K+1)-way softmax over a background score pinned at 0 and the K class
  logits ``x_1..x_K``: ``p_j = exp(x_j) / (1 + sum_i exp(x_i))``, ``p_bg = 1 / (1 + sum_i exp(x_i))``.
  The loss is the cross-entropy against the pixel's soft label (class k with weight t,
  background with weight 1 - t): ``-(t log p_k + (1 - t) log p_bg)``. Inference: ``p_k`` of the
  detected class. Channel 0 of a class-specific predictor (the background label's, unused by the
  sigmoid loss too) stays unused: pinning the background score costs nothing, a softmax being
  unchanged when one score is subtracted from all. With a class-agnostic predictor ``K = 1``
  and the softmax is the sigmoid: the two losses coincide.

  This is the paper's 2b "softmax" (its Section 3: "a per-pixel softmax and a multinomial
  cross-entropy loss", as FCNs use for semantic segmentation, "masks across classes compete"):
  with binary targets it is exactly FCN's (K+1)-way cross-entropy of the pixel labels k inside
  the mask and background outside (``F.cross_entropy``, unit-tested). The targets are the sigmoid
  loss's own (torchvision's soft crops), so the switch changes the loss and nothing else. The
  probability returned to the paste is the paper's "k-th mask", binarized at 0.5 like the
  sigmoid's. Because classes compete, ``p_k = 1 - p_bg - sum_{j != k} p_j``: a mask head that
  separates foreground from background but has not yet learned to tell the classes apart at a
  pixel spreads the foreground mass over the K classes, ``p_k ~ (1 - p_bg) / K``, at most 1/K:
  not above 0.5 for any K >= 2. Trained from scratch on a short schedule that is what happens
  (benchmarks/RESULTS.md, "Ablations (Table 2)", 2b: p_k < 0.3 on 95 % of foreground pixels with
  K = 4, mask AP 0.0): the definition's cost, the one Table 2b measures, not a scoring error.
* **mlp head** (Table 2e): the ``[C, 14, 14]`` RoI features flattened, fully connected layers
  with ReLU (:class:`MaskMLPHead`), then one fully connected layer to ``num_masks * 28 * 28``
  logits reshaped to ``[R, num_masks, 28, 28]`` (:class:`MaskMLPPredictor`); the paper's widths
  are 1024, 1024.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    keypointrcnn_inference,
    keypointrcnn_loss,
    project_masks_on_boxes,
)

from model.errors import MaskrayError

MASK_LOSSES = ("sigmoid", "softmax")
MASK_HEAD_TYPES = ("fcn", "mlp")


def check_mask_loss(mask_loss: str) -> None:
    if mask_loss not in MASK_LOSSES:
        raise MaskrayError(f"model mask_loss {mask_loss!r} is not one of {', '.join(MASK_LOSSES)}")


def _class_channel(mask_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each RoI's channel: its label, or 0 for a one-channel (class-agnostic) output."""
    return labels if mask_logits.shape[1] > 1 else torch.zeros_like(labels)


def softmax_log_probs(mask_logits: torch.Tensor) -> torch.Tensor:
    """``[R, K+1, M, M]`` float32 log-probabilities: index 0 background (score pinned at 0),
    index j >= 1 class j. A class-specific ``[R, K+1, M, M]`` output has its channel 0 replaced by
    the background's 0; a class-agnostic ``[R, 1, M, M]`` output gets the 0 put in front."""
    x = mask_logits.float()
    background = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    scores = torch.cat([background, x[:, 1:] if x.shape[1] > 1 else x], dim=1)
    return F.log_softmax(scores, dim=1)


def mask_loss(
    mask_logits: torch.Tensor,
    proposals: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    mask_matched_idxs: list[torch.Tensor],
    *,
    kind: str = "sigmoid",
) -> torch.Tensor:
    """The mask loss ``kind`` ("sigmoid" or "softmax", see the module docstring) of positive RoIs:
    torchvision's ``maskrcnn_loss`` arguments, class-agnostic when ``mask_logits`` has one channel."""
    check_mask_loss(kind)
    size = mask_logits.shape[-1]
    labels = torch.cat([gt_label[idxs] for gt_label, idxs in zip(gt_labels, mask_matched_idxs)], dim=0)
    targets = torch.cat(
        [project_masks_on_boxes(m, p, i, size) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)], dim=0
    )
    if targets.numel() == 0:  # no positive RoI: a zero that keeps the graph
        return mask_logits.sum() * 0
    rows = torch.arange(labels.shape[0], device=labels.device)
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(mask_logits[rows, _class_channel(mask_logits, labels)], targets)
    log_p = softmax_log_probs(mask_logits)
    index = labels if mask_logits.shape[1] > 1 else torch.ones_like(labels)
    targets = targets.float()
    return -(targets * log_p[rows, index] + (1 - targets) * log_p[:, 0]).mean()


def mask_inference(
    mask_logits: torch.Tensor, labels: list[torch.Tensor], *, kind: str = "sigmoid"
) -> list[torch.Tensor]:
    """Per image, ``[N, 1, M, M]`` mask probabilities of each detection's class (torchvision's
    ``maskrcnn_inference`` for "sigmoid" with class-specific masks), in ``mask_logits``' dtype."""
    check_mask_loss(kind)
    per_image = [len(label) for label in labels]
    labels_all = torch.cat(labels)
    rows = torch.arange(mask_logits.shape[0], device=labels_all.device)
    if kind == "sigmoid":
        prob = mask_logits.sigmoid()[rows, _class_channel(mask_logits, labels_all)]  # torchvision's order
    else:
        index = labels_all if mask_logits.shape[1] > 1 else torch.ones_like(labels_all)
        prob = softmax_log_probs(mask_logits)[rows, index].exp().to(mask_logits.dtype)
    return list(prob[:, None].split(per_image, dim=0))


class MaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (same arguments, submodules and state dict keys) whose mask
    branch uses :func:`mask_loss` / :func:`mask_inference` of kind ``mask_loss``: class-agnostic
    when the mask predictor outputs one channel. A keypoint branch set on it (``keypoint_roi_pool``,
    ``keypoint_head``, ``keypoint_predictor``, as ``build_maskrcnn`` installs it) runs as in
    torchvision's ``RoIHeads``.

    ``forward`` is torchvision 0.28's ``RoIHeads.forward`` with those two calls changed."""

    def __init__(self, *args, mask_loss: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        check_mask_loss(mask_loss)
        if self.mask_roi_pool is None or self.mask_head is None or self.mask_predictor is None:
            raise MaskrayError("MaskRoIHeads needs mask_roi_pool, mask_head and mask_predictor")
        self.mask_loss = mask_loss

    def extra_repr(self) -> str:
        return f"mask_loss={self.mask_loss!r}"

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if targets is not None:
            for t in targets:
                if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                    raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
                if self.has_keypoint() and t["keypoints"].dtype != torch.float32:
                    raise TypeError(f"target keypoints must of float type, instead got {t['keypoints'].dtype}")
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None when training")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)

        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        result: list[dict[str, torch.Tensor]] = []
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            positive = [torch.where(label > 0)[0] for label in labels]  # masks train on positive RoIs only
            mask_proposals = [p[pos] for p, pos in zip(proposals, positive)]
            pos_matched_idxs = [m[pos] for m, pos in zip(matched_idxs, positive)]
        else:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            result = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)]
            mask_proposals = [r["boxes"] for r in result]

        mask_features = self.mask_roi_pool(features, mask_proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(mask_features))
        if self.training:
            losses["loss_mask"] = mask_loss(
                mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets],
                pos_matched_idxs, kind=self.mask_loss,
            )
        else:
            probs = mask_inference(mask_logits, [r["labels"] for r in result], kind=self.mask_loss)
            for prob, r in zip(probs, result):
                r["masks"] = prob
        if self.has_keypoint():  # torchvision's keypoint branch, on the same positive RoIs as the masks
            keypoint_logits = self.keypoint_predictor(
                self.keypoint_head(self.keypoint_roi_pool(features, mask_proposals, image_shapes)))
            if self.training:
                losses["loss_keypoint"] = keypointrcnn_loss(
                    keypoint_logits, mask_proposals, [t["keypoints"] for t in targets], pos_matched_idxs)
            else:
                points, scores = keypointrcnn_inference(keypoint_logits, mask_proposals)
                for p, sc, r in zip(points, scores, result):
                    r["keypoints"], r["keypoints_scores"] = p, sc
        return result, losses


class MaskMLPHead(nn.Sequential):
    """Table 2e's MLP mask head: ``[R, C, S, S]`` RoI features flattened (``in_features = C*S*S``),
    then one ``Linear`` + ReLU per entry of ``layers`` (``mask_fc1``, ``mask_fc2``, ...)."""

    def __init__(self, in_features: int, layers: Sequence[int]):
        if not layers:
            raise MaskrayError("MaskMLPHead needs at least one fully connected layer")
        blocks: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(start_dim=1))
        width = in_features
        for i, out in enumerate(layers, start=1):
            blocks[f"mask_fc{i}"] = nn.Linear(width, out)
            blocks[f"relu{i}"] = nn.ReLU(inplace=True)
            width = out
        super().__init__(blocks)
        self.out_features = width


class MaskMLPPredictor(nn.Module):
    """A fully connected layer ``mask_fc_logits`` to ``num_masks * resolution**2`` logits, reshaped
    to ``[R, num_masks, resolution, resolution]`` (num_masks: num_classes, or 1 class-agnostic)."""

    def __init__(self, in_features: int, num_masks: int, resolution: int):
        super().__init__()
        self.num_masks, self.resolution = num_masks, resolution
        self.mask_fc_logits = nn.Linear(in_features, num_masks * resolution * resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_fc_logits(x).view(-1, self.num_masks, self.resolution, self.resolution)

    def extra_repr(self) -> str:
        return f"num_masks={self.num_masks}, resolution={self.resolution}"
