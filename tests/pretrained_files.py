"""Test support shared by the tiers: real photographs, torchvision weights files made locally, and
a comparison of detections that is robust to float near-ties.

* :func:`photos`: photographs shipped in scikit-image's wheel (nothing downloads).
* :func:`torchvision_state_dict` / :func:`write_torchvision_file`: a torchvision Mask R-CNN or
  Keypoint R-CNN built by torchvision's own builder from a seed, in the key layout of the published
  COCO files (body BatchNorm as FrozenBatchNorm: no ``num_batches_tracked``; optionally the legacy
  v1 key names), saved under the published file name.
* :func:`calibrate`: rescales a random model's logits and box deltas so that scores spread over
  (0, 1), boxes stay inside images, few mask pixels sit at the 0.5 threshold and keypoint heatmaps
  have one clear maximum. A seeded random detector otherwise gives near-equal scores
  (v1: ~0.01 apart) or saturated ones (v2: 1.0000 for most detections) and boxes clipped onto the
  image border, i.e. thousands of exact or 1e-6 ties in its score ranking and NMS, which float
  noise (thread count, summation order) decides differently from run to run.
* :func:`assert_same_detections`: same boxes, labels, scores, masks and keypoints, one to one.
"""

from __future__ import annotations

import os

import numpy as np
import torch

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field")
TORCHVISION_FILES = {
    "maskrcnn_resnet50_fpn": "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    "maskrcnn_resnet50_fpn_v2": "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
    "keypointrcnn_resnet50_fpn": "keypointrcnn_resnet50_fpn_coco-fc266e95.pth",  # COCO_V1
    "keypointrcnn_resnet50_fpn_legacy": "keypointrcnn_resnet50_fpn_coco-9f466800.pth",  # COCO_LEGACY
}


def photo(name: str) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` photograph from scikit-image's data folder (in its wheel)."""
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def photos(names=PHOTOS) -> list[tuple[str, np.ndarray]]:
    return [(n, photo(n)) for n in names]


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)


def build_torchvision(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """torchvision's own builder (``name`` with an ``_legacy`` suffix: the same model), random
    weights from ``seed``, eval mode; its COCO models' classes (91, Keypoint R-CNN's 2)."""
    from torchvision.models import detection

    name = name.removesuffix("_legacy")
    kwargs.setdefault("num_classes", 2 if name.startswith("keypointrcnn") else 91)
    torch.manual_seed(seed)
    return getattr(detection, name)(weights=None, weights_backbone=None, **kwargs).eval()


def calibrate(model: torch.nn.Module, image: torch.Tensor, *, logit_std: float = 3.0, delta_std: float = 0.3) -> None:
    """Rescale, in place, the RPN and box classifiers, box regressors, mask logits and keypoint
    heatmap logits of a random torchvision detector so that on ``image`` (float ``[3,H,W]``) their
    logits have std ``logit_std`` (keypoint heatmaps: ``3 * logit_std``, so each has one clear
    maximum) and their box deltas std ``delta_std`` (before torchvision's box coder weights)."""
    seen: dict[str, torch.Tensor] = {}
    layers = {"rpn_cls": model.rpn.head.cls_logits, "rpn_box": model.rpn.head.bbox_pred,
              "cls": model.roi_heads.box_predictor.cls_score, "box": model.roi_heads.box_predictor.bbox_pred}
    if model.roi_heads.mask_predictor is not None:
        layers["mask"] = model.roi_heads.mask_predictor.mask_fcn_logits
    if model.roi_heads.keypoint_predictor is not None:
        layers["keypoint"] = model.roi_heads.keypoint_predictor.kps_score_lowres
    # Each layer is calibrated on the outputs it gives once the layers before it are calibrated.
    for key, layer in layers.items():
        hook = layer.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o.detach()))
        with torch.inference_mode():
            model([image])
        hook.remove()
        out = seen[key] if key in ("cls", "box", "mask", "keypoint") else torch.cat([t.flatten() for t in seen[key]]) \
            if isinstance(seen[key], list) else seen[key]
        target = {"rpn_cls": logit_std, "cls": logit_std, "mask": logit_std, "keypoint": 3 * logit_std,
                  "box": 10 * delta_std}.get(key, delta_std)
        scale = target / float(out.float().std().clamp_min(1e-12))
        with torch.no_grad():
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)


def torchvision_state_dict(model: torch.nn.Module, *, legacy: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the published COCO files' layout: the ResNet body's BatchNorm is
    FrozenBatchNorm there (no ``num_batches_tracked``); ``legacy`` renames to the v1 file's old
    names (``rpn.head.conv.weight``, ``roi_heads.mask_head.mask_fcn1.weight``), which torchvision's
    modules convert on load."""
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not (k.startswith("backbone.body.") and k.endswith("num_batches_tracked"))}
    if legacy:
        renamed = {}
        for k, v in state.items():
            if k.startswith("rpn.head.conv.0.0."):
                k = "rpn.head.conv." + k.rsplit(".", 1)[1]
            elif k.startswith("roi_heads.mask_head.") and k.split(".")[3] == "0":
                i = int(k.split(".")[2])
                k = f"roi_heads.mask_head.mask_fcn{i + 1}.{k.rsplit('.', 1)[1]}"
            renamed[k] = v
        state = renamed
    return state


UNUSED_COCO_LABELS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # torchvision's "N/A" slots


def write_torchvision_file(folder: str, name: str, seed: int = 0, *, legacy: bool = False,
                           calibrate_on: torch.Tensor | None = None, na_offset: float = 0.0) -> tuple[str, torch.nn.Module]:
    """``(path, model)``: a seeded torchvision ``name`` model saved as a plain state dict under the
    published file name in ``folder`` (whose hash prefix it therefore does not match).
    ``na_offset`` lowers the "N/A" labels' logits (a trained COCO model never scores them high; a
    random one may favour one of them for every box)."""
    model = build_torchvision(name, seed)
    if calibrate_on is not None:
        calibrate(model, calibrate_on)
    if na_offset:
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.bias[list(UNUSED_COCO_LABELS)] -= na_offset
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, TORCHVISION_FILES[name])
    torch.save(torchvision_state_dict(model, legacy=legacy), path)
    return path, model


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as iou

    return iou(a.double(), b.double())


def assert_same_detections(expected: dict, got: dict, *, box_atol: float = 0.05, score_atol: float = 2e-4,
                           mask_iou: float = 0.99, keypoint_score_atol: float = 2e-3) -> None:
    """Every detection of ``expected`` (torchvision output dict: ``boxes`` xyxy, ``labels``,
    ``scores``, optional ``rles``, optional ``keypoints`` ``[N,K,2+]`` with ``keypoints_scores``
    ``[N,K]``) has exactly one in ``got`` with the same label, boxes within ``box_atol`` px, score
    within ``score_atol``, mask RLE IoU >= ``mask_iou`` and keypoints within ``box_atol`` px with
    scores within ``keypoint_score_atol``, and none is left over. A mask may differ only where the
    two boxes paste onto different pixel grids (:func:`paste_grid`), for at most a tenth of the
    detections; a keypoint may sit elsewhere only where its heatmap has two maxima within
    ``keypoint_score_atol`` (its score then still matches), for at most 1 % of the keypoints.
    Matching is by label and box, not by position, so detections of equal score (sorted in
    either order) still match. 0.05 px leaves room for float rounding: another pooler's or thread
    count's summation order (~3e-4 px on 1000-px photos), norms folded into convs (up to 0.016 px
    and 4e-5 in score through the v2 model's 60 BatchNorm layers), and none for another computation."""
    from pycocotools import mask as mask_utils

    eb, gb = expected["boxes"].double(), got["boxes"].double()
    assert len(eb) == len(gb), f"{len(eb)} detections expected, {len(gb)} got"
    if not len(eb):
        return
    taken = set()
    excused = moved = 0
    for i in range(len(eb)):
        close = ((gb - eb[i]).abs().amax(dim=1) <= box_atol) & (got["labels"] == expected["labels"][i]) \
            & ((got["scores"].double() - float(expected["scores"][i])).abs() <= score_atol)
        candidates = [j for j in torch.nonzero(close).flatten().tolist() if j not in taken]
        assert candidates, (f"detection {i} (label {int(expected['labels'][i])}, score "
                            f"{float(expected['scores'][i]):.5f}, box {eb[i].tolist()}) has no match")
        j = candidates[0]
        taken.add(j)
        if "keypoints" in expected:
            ek, gk = expected["keypoints"][i, :, :2].double(), got["keypoints"][j, :, :2].double()
            es, gs = expected["keypoints_scores"][i].double(), got["keypoints_scores"][j].double()
            assert ((gs - es).abs() <= keypoint_score_atol).all(), \
                f"detection {i}: keypoint scores differ by up to {float((gs - es).abs().max()):.2e}"
            moved += int(((gk - ek).abs().amax(dim=1) > box_atol).sum())
        if "rles" in expected:
            areas = mask_utils.area([got["rles"][j], expected["rles"][i]])
            if areas[0] == areas[1] == 0:
                continue  # both empty (pycocotools gives IoU 0 for two empty masks)
            iou = mask_utils.iou([got["rles"][j]], [expected["rles"][i]], [0])[0][0]
            if iou < mask_iou and not torch.equal(paste_grid(eb[i]), paste_grid(gb[j])):
                excused += 1  # the boxes, equal within float noise, straddle a pixel edge of the paste
                continue
            assert iou >= mask_iou, f"detection {i}: mask IoU {iou:.4f} < {mask_iou} (areas {areas.tolist()})"
    assert excused <= max(1, len(eb) // 10), f"{excused} of {len(eb)} masks differ on boxes straddling pixel edges"
    if "keypoints" in expected:
        points = int(expected["keypoints"].shape[0] * expected["keypoints"].shape[1])
        assert moved <= max(1, points // 100), f"{moved} of {points} keypoints moved by more than {box_atol} px"


def paste_grid(box: torch.Tensor, mask_size: int = 28) -> torch.Tensor:
    """The integer box torchvision's ``paste_masks_in_image`` pastes a ``mask_size`` mask into (its
    ``expand_boxes`` by (M+2)/M, then truncation): a box within 1e-3 px of another can land on
    another pixel grid there, and a thin mask then moves by a pixel (IoU 0.5 on a 3-px-wide one)."""
    from torchvision.models.detection.roi_heads import expand_boxes

    return expand_boxes(box.float().reshape(1, 4), (mask_size + 2) / mask_size).to(torch.int64)[0]


def rles_of(masks: torch.Tensor) -> list[dict]:
    """COCO RLEs of pasted mask probabilities ``[N,1,H,W]`` binarized at > 0.5."""
    from pycocotools import mask as mask_utils

    binary = (masks[:, 0] > 0.5).numpy().astype(np.uint8)
    return [mask_utils.encode(np.asfortranarray(m)) for m in binary]
