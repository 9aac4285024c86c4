"""Per-class thresholds (pipeline.distill.thresholds) and the pseudo-label shards written from a
candidates results prefix (pipeline.distill.label), no Ray: the results files are written here."""

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.errors import MaskrayError
from pipeline.data.format import Manifest, ShardWriter, read_manifest, read_rows, write_manifest
from pipeline.distill import label, thresholds
from pipeline.distill.config import ThresholdConfig
from pipeline.distill.thresholds import NEVER
from pipeline.results import result_table, write_unit


def test_density_rule_on_a_constructed_example():
    labeled = [  # 4 labeled images: class 1 twice per image, class 2 once in two images, class 3 never
        [{"category_id": 1}, {"category_id": 1}, {"category_id": 2}],
        [{"category_id": 1}, {"category_id": 1}, {"category_id": 2, "iscrowd": True}],
        [{"category_id": 1}, {"category_id": 1}, {"category_id": 2}],
        [{"category_id": 1}, {"category_id": 1}],
    ]
    density = thresholds.labeled_density(labeled, [1, 2, 3, 4])
    assert density == {1: 2.0, 2: 0.5, 3: 0.0, 4: 0.0}
    rng = np.random.default_rng(0)
    scores = {1: rng.uniform(0, 1, 50).tolist(), 2: rng.uniform(0, 1, 30).tolist(), 4: [0.9]}
    scores[3] = [0.2, 0.3]
    density[4] = 0.5  # wants 5 instances over 10 images but only one candidate exists
    t = thresholds.density_thresholds(scores, 10, density, floor=0.1)
    assert sum(s >= t[1] for s in scores[1]) == 20          # 2 per image x 10 images
    assert sum(s >= t[2] for s in scores[2]) == 5           # 0.5 per image x 10 images
    assert t[3] == NEVER and t[4] == 0.1                    # none wanted; fewer candidates than wanted
    high = thresholds.density_thresholds({1: [0.05, 0.04]}, 1, {1: 2.0}, floor=0.1)
    assert high == {1: 0.1}                                  # never below the floor
    anns = [{"category_id": 1, "score": 0.5}, {"category_id": 3, "score": 0.99}, {"category_id": 1, "score": 0.01}]
    assert thresholds.apply_thresholds(anns, {1: 0.3, 3: NEVER}) == anns[:1]
    assert thresholds.choose_thresholds(ThresholdConfig(mode="fixed", value=0.7), [1, 2]) == {1: 0.7, 2: 0.7}
    chosen = thresholds.choose_thresholds(ThresholdConfig(mode="density", floor=0.1), [1, 2, 3, 4],
                                          labeled=labeled, scores=scores, images=10)
    assert chosen[1] == t[1] and chosen[3] == NEVER


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _instance(category_id, score, x0):
    mask = np.zeros((8, 10), np.uint8)
    mask[2:6, x0:x0 + 3] = 1
    rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
    return {"category_id": category_id, "score": score, "bbox": [float(x0), 2.0, 3.0, 4.0],
            "segmentation": {"size": [8, 10], "counts": rle["counts"]}}


def test_pseudo_labels_from_a_candidates_prefix(tmp_path):
    """Thresholds applied per class, error rows and images left empty are left out (kept with
    keep_empty), the image bytes come from the unlabeled shard, annotations carry area and score."""
    unlabeled, candidates = str(tmp_path / "unlabeled"), str(tmp_path / "round-1/pseudo/candidates")
    with ShardWriter(unlabeled) as w:
        for i in range(4):
            w.add({"image_id": 100 + i, "file_name": f"{i}.png", "width": 10, "height": 8, "image": _png(i),
                   "annotations": []})
    write_manifest(unlabeled, Manifest(categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                                       shards=w.close()))
    instances = [[_instance(1, 0.9, 0), _instance(2, 0.4, 5)], [_instance(1, 0.2, 1)], [], []]
    write_unit(candidates, "part-00000.parquet",
               result_table([100, 101, 102, 103], ["0.png", "1.png", "2.png", "3.png"], instances,
                            [None, None, None, "decode failed: broken"], "m"))
    scores, images, errors = label.candidate_scores(unlabeled, candidates)
    assert (scores, images, errors) == ({1: [pytest.approx(0.9), pytest.approx(0.2)], 2: [pytest.approx(0.4)]}, 3, 1)
    out = str(tmp_path / "round-1/pseudo")
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    n = label.write_pseudo_labels(unlabeled, candidates, out, {1: 0.5, 2: 0.3}, categories=categories,
                                  extra={"round": 1, "teacher": "t"})
    assert n == (1, 2)
    [row] = list(read_rows(out))
    assert row["image_id"] == 100 and row["image"] == _png(0) and (row["width"], row["height"]) == (10, 8)
    assert [(a["category_id"], a["id"], a["area"]) for a in row["annotations"]] == [(1, 100000, 12.0), (2, 100001, 12.0)]
    assert row["annotations"][0]["score"] == pytest.approx(0.9)
    assert read_manifest(out).extra == {"round": 1, "teacher": "t"}
    label.check_pseudo_dataset(out, round_index=1, teacher="t")
    with pytest.raises(MaskrayError, match="round 1 by t"):
        label.check_pseudo_dataset(out, round_index=2, teacher="t")
    kept = label.write_pseudo_labels(unlabeled, candidates, str(tmp_path / "all"), {1: 0.5, 2: 0.3},
                                     categories=categories, extra={}, keep_empty=True)
    assert kept == (3, 2)  # the error row is never kept


def test_too_many_error_rows_stop_the_round():
    assert label.check_errors(200, 2, "s3://b/pool", 0.01) == 2
    with pytest.raises(MaskrayError, match="3 of 200 images of s3://b/pool could not be labelled"):
        label.check_errors(200, 3, "s3://b/pool", 0.01)


def test_missing_candidates_are_named(tmp_path):
    unlabeled = str(tmp_path / "u")
    with ShardWriter(unlabeled) as w:
        w.add({"image_id": 1, "file_name": "a", "width": 10, "height": 8, "image": _png(1), "annotations": []})
    write_manifest(unlabeled, Manifest(categories=[{"id": 1, "name": "a"}], shards=w.close()))
    with pytest.raises(MaskrayError, match="part-00000.parquet: missing"):
        label.write_pseudo_labels(unlabeled, str(tmp_path / "c"), str(tmp_path / "o"), {1: 0.5}, categories=[],
                                  extra={})
