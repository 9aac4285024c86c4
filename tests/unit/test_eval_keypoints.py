"""Keypoint evaluation: OKS AP equals pycocotools called directly (K = 5 with given sigmas, K = 17
with COCO's), sigmas are checked against K, and a keypoint model's metrics and table."""

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.errors import MaskrayError
from pipeline.data.keypoints import COCO_PERSON_KEYPOINTS
from pipeline.evaluate import (coco_ground_truth, coco_metrics, default_iou_types, evaluate_model,
                               format_table)
from pipeline.instances import encode_masks

SIZE = 96
SIGMAS5 = [0.05, 0.08, 0.1, 0.06, 0.12]


def _categories(k):
    names = COCO_PERSON_KEYPOINTS if k == 17 else [f"p{i}" for i in range(k)]
    return [{"id": 1, "name": "thing", "keypoints": names, "skeleton": [[1, 2]]},
            {"id": 2, "name": "plain"}]


def _data(k, seed=0):
    """Shard-like rows (3 images; a K-keypoint instance per image with v = 0/1/2, one with no
    labeled keypoint, a keypoint-free category) and predictions: noisy keypoints with scattered
    scores, a duplicate and a false positive, and boxes for the plain category."""
    rng = np.random.default_rng(seed)
    rows, preds = [], []
    for image_id in (1, 2, 3):
        anns = []
        for j, (cat, x0, y0, side) in enumerate(((1, 10, 10, 40 + 8 * image_id), (1, 55, 50, 30), (2, 5, 60, 25))):
            mask = np.zeros((1, SIZE, SIZE), np.uint8)
            mask[0, y0:y0 + side, x0:x0 + side] = 1
            rle = encode_masks(mask)[0]
            ann = {"id": 0, "category_id": cat, "bbox": [float(x0), float(y0), float(side), float(side)],
                   "area": float(side * side), "iscrowd": False, "score": None,
                   "segmentation": {"size": rle["size"], "counts": rle["counts"].encode()},
                   "keypoints": None, "num_keypoints": None}
            if cat == 1:
                xy = rng.uniform([x0, y0], [x0 + side, y0 + side], size=(k, 2)).round()
                v = rng.integers(0, 3, size=k)
                v[:3] = [0, 1, 2]
                if image_id == 3 and j == 1:
                    v[:] = 0  # labeled person without a labeled keypoint: ignored
                kp = np.concatenate([xy * (v[:, None] > 0), v[:, None]], 1).reshape(-1)
                ann["keypoints"], ann["num_keypoints"] = kp.tolist(), int((v > 0).sum())
                noise = rng.normal(0, 1 + 3 * j + image_id, size=(k, 2))
                guess = np.concatenate([xy + noise, rng.uniform(0, 5, (k, 1))], 1).reshape(-1)
                preds.append({"image_id": image_id, "category_id": 1, "score": float(rng.uniform(0.3, 1)),
                              "bbox": ann["bbox"], "keypoints": guess.tolist(), "segmentation": rle})
            else:
                preds.append({"image_id": image_id, "category_id": 2, "score": 0.9, "bbox": ann["bbox"]})
            anns.append(ann)
        # a false positive with keypoints
        fp = rng.uniform(0, SIZE, size=(k, 2))
        preds.append({"image_id": image_id, "category_id": 1, "score": 0.5, "bbox": [0.0, 0.0, 9.0, 9.0],
                      "keypoints": np.concatenate([fp, np.ones((k, 1))], 1).reshape(-1).tolist()})
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": SIZE, "height": SIZE,
                     "annotations": anns})
    return rows, preds


def _direct(rows, preds, categories, sigmas=None):
    """pycocotools as its users call it: COCO(gt), loadRes(keypoint results), COCOeval('keypoints')."""
    dataset = {"images": [{"id": r["image_id"], "width": r["width"], "height": r["height"]} for r in rows],
               "annotations": [], "categories": copy.deepcopy(categories)}
    for r in rows:
        for a in r["annotations"]:
            if a["category_id"] != 1:
                continue
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": r["image_id"],
                                           "category_id": 1, "bbox": a["bbox"], "area": a["area"], "iscrowd": 0,
                                           "keypoints": a["keypoints"], "num_keypoints": a["num_keypoints"]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes([{k: p[k] for k in ("image_id", "category_id", "score", "keypoints")}
                         for p in preds if "keypoints" in p])
        ev = COCOeval(gt, dt, iouType="keypoints")
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.array(sigmas)
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _ours(metrics):
    m = metrics["keypoints"]
    return [m["AP"], m["AP50"], m["AP75"], m["APm"], m["APl"]]


def test_oks_for_k5_equals_pycocotools_called_directly():
    rows, preds = _data(5)
    cats = _categories(5)
    metrics = coco_metrics(coco_ground_truth(rows, cats), preds, kpt_oks_sigmas=SIGMAS5)
    stats = _direct(rows, preds, cats, SIGMAS5)
    assert _ours(metrics) == [None if s < 0 else float(s) for s in stats[:5]]
    assert 0.05 < metrics["keypoints"]["AP"] < 0.95  # a real score, not a trivial one
    assert set(metrics) == {"bbox", "segm", "keypoints"} and "APs" not in metrics["keypoints"]
    # the sigmas are used: wider ones score higher
    wide = coco_metrics(coco_ground_truth(rows, cats), preds, kpt_oks_sigmas=[4 * s for s in SIGMAS5])
    assert wide["keypoints"]["AP"] > metrics["keypoints"]["AP"]
    # without sigmas pycocotools itself fails on K != 17: the failure users meet
    with pytest.raises(ValueError):
        _direct(rows, preds, cats, None)


def test_oks_for_k17_defaults_to_coco_sigmas():
    rows, preds = _data(17, seed=1)
    cats = _categories(17)
    metrics = coco_metrics(coco_ground_truth(rows, cats), preds)
    assert _ours(metrics) == [None if s < 0 else float(s) for s in _direct(rows, preds, cats)[:5]]
    assert 0.05 < metrics["keypoints"]["AP"] < 0.95


@pytest.mark.parametrize("k, sigmas, message", [
    (5, None, "K=5 keypoints need eval.kpt_oks_sigmas (5 values"),
    (5, [0.1] * 17, "kpt_oks_sigmas has 17 values but the keypoint categories have K=5"),
    (17, [0.1] * 6, "kpt_oks_sigmas has 6 values but the keypoint categories have K=17"),
    (5, [0.1, 0.1, 0.0, 0.1, 0.1], "must be > 0"),
])
def test_sigmas_are_checked_against_k(k, sigmas, message):
    rows, preds = _data(k)
    with pytest.raises(MaskrayError) as info:
        coco_metrics(coco_ground_truth(rows, _categories(k)), preds, kpt_oks_sigmas=sigmas)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_iou_types_follow_the_predictions_and_table_prints_keypoints():
    rows, preds = _data(5)
    gt = coco_ground_truth(rows, _categories(5))
    assert default_iou_types(gt, preds) == ("bbox", "segm", "keypoints")  # a keypoint & mask model
    assert default_iou_types(gt, [p for p in preds if "keypoints" not in p]) == ("bbox", "segm")
    kp_only = [{k: v for k, v in p.items() if k != "segmentation"} for p in preds if "keypoints" in p]
    assert default_iou_types(gt, kp_only) == ("bbox", "keypoints")
    plain = coco_ground_truth(rows, [{"id": 1, "name": "thing"}, {"id": 2, "name": "plain"}])
    assert default_iou_types(plain, preds) == ("bbox", "segm")  # nothing to score keypoints against
    table = format_table(coco_metrics(gt, kp_only, kpt_oks_sigmas=SIGMAS5))
    lines = table.splitlines()
    assert lines[-1].startswith("keypoints") and len(lines[-1]) == len(lines[0])
    assert lines[-1].split()[4] == "-"  # no small-object keypoint AP


class KeypointOracle(torch.nn.Module):
    """A torchvision keypoint R-CNN's outputs, holding the ground truth: keypoints [N, K, 3] with
    v = 1 and their scores in ``keypoints_scores``."""

    def __init__(self, rows):
        super().__init__()
        self.outputs = []
        for row in rows:
            anns = [a for a in row["annotations"] if a["category_id"] == 1]
            kp = torch.tensor([a["keypoints"] for a in anns]).reshape(len(anns), -1, 3)
            boxes = torch.tensor([a["bbox"] for a in anns])
            self.outputs.append({"boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                                 "labels": torch.ones(len(anns), dtype=torch.int64),
                                 "scores": torch.full((len(anns),), 0.9),
                                 "keypoints": torch.cat([kp[..., :2], torch.ones_like(kp[..., :1])], -1),
                                 "keypoints_scores": kp[..., 2] * 3.0})

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_evaluate_model_scores_a_keypoint_model():
    rows, _ = _data(5)
    for row in rows:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(buf, format="PNG")
        row["image"] = buf.getvalue()
    metrics = evaluate_model(KeypointOracle(rows), rows, _categories(5), kpt_oks_sigmas=SIGMAS5)
    assert set(metrics) == {"bbox", "keypoints"}  # no masks predicted: no segm row
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
    with pytest.raises(MaskrayError, match="K=5"):
        evaluate_model(KeypointOracle(rows), rows, _categories(5))
