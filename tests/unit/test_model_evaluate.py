"""COCO evaluation: ground truth as predictions scores AP = 1; metrics layout; table."""

import json

import numpy as np
import pytest
import torch

from pipeline.evaluate import coco_ground_truth, coco_metrics, format_table, metrics_to_json
from pipeline.instances import encode_masks
from pipeline.results import to_coco_results

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 8, "name": "disc"}]


def _shapes(size, spec):
    """uint8 masks [N, H, W] for (kind, x, y, side) specs: squares and discs."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for kind, x, y, side in spec:
        if kind == "square":
            m = (xx >= x) & (xx < x + side) & (yy >= y) & (yy < y + side)
        else:
            r = side / 2
            m = (xx - x - r + 0.5) ** 2 + (yy - y - r + 0.5) ** 2 <= r * r
        masks.append(m)
    return torch.stack(masks).to(torch.uint8)


def _rows():
    """Shard-like rows: small (<32^2), medium and large objects of both categories, one crowd region."""
    specs = [
        [("square", 2, 2, 20), ("disc", 40, 40, 60)],          # small square, medium disc
        [("disc", 5, 5, 110), ("square", 60, 10, 12)],          # large disc, small square
        [("square", 10, 20, 100), ("disc", 2, 2, 16), ("disc", 90, 90, 30)],
    ]
    rows = []
    for image_id, spec in enumerate(specs, start=11):
        masks = _shapes(128, spec).numpy()
        annotations = []
        for (kind, *_), mask, rle in zip(spec, masks, encode_masks(masks)):
            ys, xs = np.nonzero(mask)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            annotations.append({"id": 0, "category_id": 3 if kind == "square" else 8, "bbox": bbox,
                                "area": float(mask.sum()), "iscrowd": False, "score": None,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].encode()}})
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": 128, "height": 128,
                     "annotations": annotations})
    return rows


def test_ground_truth_as_predictions_scores_one():
    rows = _rows()
    gt = coco_ground_truth(rows, CATEGORIES)
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 8))  # renumbered from the rows' 0s
    predictions = [r for row in rows for r in to_coco_results(row["image_id"], row["annotations"])]
    metrics = coco_metrics(gt, predictions)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        for key, value in metrics[iou_type].items():
            assert value == pytest.approx(1.0), (iou_type, key, value)
    table = format_table(metrics)
    assert "segm" in table and "100.0" in table


def test_no_or_wrong_predictions_score_zero_and_undefined_is_null():
    rows = _rows()[:1]  # small and medium objects only: APl is undefined
    gt = coco_ground_truth(rows, CATEGORIES)
    metrics = coco_metrics(gt, [])
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0
    assert metrics["bbox"]["APl"] is None
    assert json.loads(json.dumps(metrics_to_json(metrics)))["segm"]["APl"] is None
    assert format_table(metrics).splitlines()[1].split()[-1] == "-"

    shifted = [dict(r, bbox=[r["bbox"][0] + 40, r["bbox"][1] + 40, *r["bbox"][2:]], segmentation=None)
               for r in to_coco_results(11, rows[0]["annotations"])]
    metrics = coco_metrics(gt, shifted)
    assert metrics["bbox"]["AP"] < 0.05


def test_half_the_objects_found():
    rows = _rows()
    gt = coco_ground_truth(rows, CATEGORIES)
    predictions = [r for row in rows for r in to_coco_results(row["image_id"], row["annotations"][:1])]
    metrics = coco_metrics(gt, predictions)
    assert 0.2 < metrics["bbox"]["AP"] < 0.8
    assert metrics["bbox"]["AP"] == pytest.approx(metrics["segm"]["AP"], abs=0.05)
