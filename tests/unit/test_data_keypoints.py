"""Keypoints in the data: COCO -> shards -> COCO keeps every value, bad keypoints are reported
naming the annotation, old shards without the columns still read, and the flip map."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import cli
from pipeline.data import convert
from pipeline.data import format as fmt
from pipeline.data import synth
from pipeline.data.keypoints import (COCO_PERSON_KEYPOINTS, COCO_PERSON_SKELETON, KeypointError,
                                     flip_map)

HAND = ["left_top", "right_top", "centre", "left_bottom", "right_bottom"]  # K = 5


def _png(h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rle(h, w, y0, y1, x0, x1) -> dict:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def _keypoints(rng, k, w, h) -> tuple[list, int]:
    """``x, y, v`` × k with every v value, integer and two-decimal coordinates (COCO's kinds)."""
    out = []
    for i in range(k):
        v = int(rng.integers(0, 3)) if i > 2 else i  # v = 0, 1, 2 always present
        if v == 0:
            out += [0, 0, 0]
        elif i % 2:
            out += [int(rng.integers(0, w)), int(rng.integers(0, h)), v]
        else:
            out += [round(float(rng.uniform(0, w)), 2), round(float(rng.uniform(0, h)), 2), v]
    return out, sum(1 for v in out[2::3] if v > 0)


def _coco_files(root, extra_anns=()):
    """Two images; a K=17 person, a K=5 hand and a keypoint-free box category; RLE and
    polygon masks, a crowd person; returns the COCO dict written at root/ann.json."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    images, anns = [], []
    for iid, (h, w) in ((1, (40, 60)), (2, (50, 30))):
        (root / "img" / f"{iid}.png").write_bytes(_png(h, w))
        images.append({"id": iid, "file_name": f"{iid}.png", "width": w, "height": h})
        for cat, k in ((1, 17), (2, 5), (3, 0)):
            aid = 10 * iid + cat
            ann = {"id": aid, "image_id": iid, "category_id": cat,
                   "segmentation": _rle(h, w, 2, 20, 3, 25), "area": 396.0,
                   "bbox": [3.0, 2.0, 22.0, 18.0], "iscrowd": 0}
            if k:
                ann["keypoints"], ann["num_keypoints"] = _keypoints(rng, k, w, h)
            anns.append(ann)
    # a crowd person with all-zero keypoints, as COCO has them
    anns.append({"id": 99, "image_id": 1, "category_id": 1, "segmentation": _rle(40, 60, 30, 38, 40, 58),
                 "area": 144.0, "bbox": [40.0, 30.0, 18.0, 8.0], "iscrowd": 1,
                 "keypoints": [0] * 51, "num_keypoints": 0})
    anns += list(extra_anns)
    cats = [{"id": 1, "name": "person", "supercategory": "person",
             "keypoints": COCO_PERSON_KEYPOINTS, "skeleton": COCO_PERSON_SKELETON},
            {"id": 2, "name": "hand", "keypoints": HAND, "skeleton": [[1, 3], [2, 3], [3, 4], [3, 5]]},
            {"id": 3, "name": "box"}]
    coco = {"images": images, "annotations": anns, "categories": cats}
    (root / "ann.json").write_text(json.dumps(coco))
    return coco


def test_coco_keypoints_round_trip_is_exact(tmp_path):
    coco = _coco_files(tmp_path)
    out = str(tmp_path / "ds")
    report = convert.convert_coco(str(tmp_path / "ann.json"), str(tmp_path / "img"), out)
    assert report.problems == [] and report.instances_written == len(coco["annotations"])
    manifest = fmt.read_manifest(out)
    assert manifest.categories == coco["categories"]
    stored = {a["id"]: a for row in fmt.read_rows(out) for a in row["annotations"]}
    assert stored[23]["keypoints"] is None and stored[23]["num_keypoints"] is None
    assert len(stored[11]["keypoints"]) == 51 and len(stored[12]["keypoints"]) == 15

    back_uri = str(tmp_path / "back.json")
    summary = convert.export_coco(out, back_uri)
    back = json.loads(open(back_uri).read())
    assert summary["annotations"] == len(coco["annotations"])
    assert back["categories"] == coco["categories"]
    assert back["images"] == coco["images"]
    assert sorted(back["annotations"], key=lambda a: a["id"]) == \
        sorted(coco["annotations"], key=lambda a: a["id"])  # every field, every value
    kinds = {v for a in coco["annotations"] for v in a.get("keypoints", [])[2::3]}
    assert kinds == {0, 1, 2}
    # the CLI writes the same file
    assert cli.invoke(["export", "--data", out, "--out", str(tmp_path / "cli.json")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text()) == back


def test_polygons_come_back_as_the_same_mask(tmp_path):
    poly = {"id": 50, "image_id": 2, "category_id": 2, "segmentation": [[2, 2, 20, 2, 20, 30, 2, 30]],
            "area": 504.0, "bbox": [2.0, 2.0, 18.0, 28.0], "iscrowd": 0,
            "keypoints": [2, 2, 2, 20, 2, 2, 11, 16, 1, 2, 30, 2, 20.5, 30.25, 2], "num_keypoints": 5}
    _coco_files(tmp_path, [poly])
    out = str(tmp_path / "ds")
    convert.convert_coco(str(tmp_path / "ann.json"), str(tmp_path / "img"), out)
    convert.export_coco(out, str(tmp_path / "back.json"))
    back = {a["id"]: a for a in json.loads((tmp_path / "back.json").read_text())["annotations"]}[50]
    want = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly["segmentation"], 50, 30)))
    assert np.array_equal(mask_utils.decode({"size": back["segmentation"]["size"],
                                             "counts": back["segmentation"]["counts"]}), want)
    assert back["keypoints"] == poly["keypoints"] and back["num_keypoints"] == 5


@pytest.mark.parametrize("change, reason, detail", [
    ({"keypoints": [1, 2, 2] * 16, "num_keypoints": 16}, "malformed keypoints", "48 values, expected 3*17 = 51"),
    ({"keypoints": [1, 2, 3] + [0] * 48, "num_keypoints": 1}, "malformed keypoints", "v=3 is not 0, 1 or 2"),
    ({"keypoints": [1, 2, 2] + [0] * 48, "num_keypoints": 4}, "malformed keypoints", "num_keypoints 4 but 1"),
    ({"keypoints": ["a", 2, 2] + [0] * 48, "num_keypoints": 1}, "malformed keypoints", "not a finite number"),
    ({"category_id": 3, "keypoints": [1, 2, 2], "num_keypoints": 1},
     "keypoints on a category without keypoints", "category 3"),
])
def test_bad_keypoints_are_reported_naming_the_annotation(tmp_path, change, reason, detail):
    bad = {"id": 77, "image_id": 2, "category_id": 1, "segmentation": _rle(50, 30, 1, 9, 1, 9),
           "area": 64.0, "bbox": [1.0, 1.0, 8.0, 8.0], "iscrowd": 0, **change}
    coco = _coco_files(tmp_path, [bad])
    out = str(tmp_path / "ds")
    report = convert.convert_coco(str(tmp_path / "ann.json"), str(tmp_path / "img"), out)
    assert report.instances_in == len(coco["annotations"])
    assert report.instances_written == len(coco["annotations"]) - 1 and report.instances_skipped == 1
    (problem,) = report.problems
    line = str(problem)
    assert "\n" not in line and "ann.json" in line and "annotation 77" in line and "image 2" in line
    assert problem.reason == reason and detail in line
    assert 77 not in {a["id"] for row in fmt.read_rows(out) for a in row["annotations"]}


@pytest.mark.parametrize("cat, message", [
    ({"keypoints": ["a", "a"]}, "keypoint names repeat"),
    ({"keypoints": ["a", "b"], "skeleton": [[1, 3]]}, "skeleton pair [1, 3]"),
    ({"skeleton": [[1, 2]]}, "skeleton pair [1, 2]"),
    ({"keypoints": "nose"}, "'keypoints' must be a list"),
])
def test_bad_skeleton_is_a_one_line_error(tmp_path, cat, message):
    (tmp_path / "img").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 4, "name": "odd", **cat}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with pytest.raises(convert.ConvertError) as info:
        convert.convert_coco(str(tmp_path / "ann.json"), str(tmp_path / "img"), str(tmp_path / "ds"))
    assert "\n" not in str(info.value) and "ann.json" in str(info.value) and message in str(info.value)
    with pytest.raises(fmt.FormatError, match="category 4"):
        fmt.Manifest(categories=[{"id": 4, "name": "odd", **cat}])


def test_old_shards_without_keypoint_columns_still_read(tmp_path):
    old_ann = pa.struct([f for f in fmt.ANNOTATION_TYPE if f.name not in ("keypoints", "num_keypoints")])
    old_schema = pa.schema([f if f.name != "annotations" else pa.field("annotations", pa.list_(old_ann))
                            for f in fmt.SHARD_SCHEMA])
    ann = fmt.make_annotation(id=1, category_id=1, bbox=[0, 0, 2, 2], area=4, iscrowd=False,
                              size=[4, 4], counts=b"04")
    del ann["keypoints"], ann["num_keypoints"]
    row = fmt.make_row(image_id=1, file_name="a.png", width=4, height=4, image=b"x", annotations=[ann])
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), str(tmp_path / "part-00000.parquet"))
    fmt.write_manifest(str(tmp_path), fmt.Manifest(categories=[{"id": 1, "name": "a"}],
                                                   shards=[fmt.ShardInfo("part-00000.parquet", 1, 1)]))
    (read,) = fmt.read_rows(str(tmp_path))
    assert read["annotations"][0].get("keypoints") is None
    back = convert.export_coco(str(tmp_path), str(tmp_path / "back.json"))
    assert back["annotations"] == 1
    exported = json.loads((tmp_path / "back.json").read_text())["annotations"][0]
    assert "keypoints" not in exported and "num_keypoints" not in exported
    # and a new writer takes rows without the keys (pseudo-labels, older callers)
    table = fmt.rows_to_table([row])
    assert table.column("annotations").to_pylist()[0][0]["keypoints"] is None


# ---------------------------------------------------------------------------------------------
# flip map

COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # detectron2 / torchvision


def test_flip_map_from_coco_names():
    flip = flip_map(COCO_PERSON_KEYPOINTS)
    assert flip == COCO_FLIP
    names = [COCO_PERSON_KEYPOINTS[i] for i in flip]
    assert names[1] == "right_eye" and names[0] == "nose"
    assert sorted(flip) == list(range(17)) and [flip[i] for i in flip] == list(range(17))


def test_flip_map_given_as_names_or_indices_and_empty():
    names = ["head", "neck", "hand_a", "hand_b", "foot_a", "foot_b"]
    assert flip_map(names, [["hand_a", "hand_b"], ["foot_a", "foot_b"]]) == [0, 1, 3, 2, 5, 4]
    assert flip_map(names, [[2, 3], [4, 5]]) == [0, 1, 3, 2, 5, 4]
    assert flip_map(names, []) == list(range(6))
    assert flip_map(["a", "b"]) == [0, 1] and flip_map([]) == []
    # given pairs override the names' left/right
    assert flip_map(["left_x", "right_x", "c"], [["left_x", "c"]]) == [2, 1, 0]


@pytest.mark.parametrize("names, given, message", [
    (["left_eye", "right_ear"], None, "'left_eye' has no partner 'right_eye'"),
    (["a", "b"], [["a", "z"]], "unknown keypoint 'z'"),
    (["a", "b", "c"], [["a", "b"], ["b", "c"]], "'b' is already in another pair"),
    (["a", "b", "c"], [[0, 1], [2, 0]], "'a' is already in another pair"),
    (["a", "b"], [["a", "a"]], "with itself"),
    (["a", "b"], [[0, 2]], "index 2 is outside 0..1"),
    (["a", "b"], [["a"]], "must be [a, b]"),
])
def test_flip_map_errors_are_one_line(names, given, message):
    with pytest.raises(KeypointError) as info:
        flip_map(names, given)
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# synth --keypoints


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    summary = synth.synthesize(str(out), images=30, seed=2, size=80, num_categories=2, keypoints=True)
    return out, summary, json.loads((out / "annotations.json").read_text())


def _mask(seg, h, w):
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else \
        {"size": seg["size"], "counts": seg["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def test_synth_figures_carry_exact_keypoints(figures):
    out, summary, coco = figures
    cat = coco["categories"][-1]
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "figure"]
    assert cat["keypoints"] == synth.FIGURE_KEYPOINTS and cat["skeleton"] == synth.FIGURE_SKELETON
    assert flip_map(cat["keypoints"]) == [0, 1, 2, 4, 3, 6, 5]
    kp_anns = [a for a in coco["annotations"] if a["category_id"] == cat["id"]]
    assert summary.figures == len(kp_anns) >= 10 and "with keypoints" in str(summary)
    assert all("keypoints" not in a for a in coco["annotations"] if a["category_id"] != cat["id"])
    seen = set()
    for ann in kp_anns:
        kp = ann["keypoints"]
        assert len(kp) == 21 and ann["num_keypoints"] == sum(v > 0 for v in kp[2::3])
        visible = _mask(ann["segmentation"], 80, 80)
        for x, y, v in zip(kp[0::3], kp[1::3], kp[2::3]):
            seen.add(v)
            if v == 2:  # on the figure's own visible pixels
                assert visible[int(y), int(x)]
            elif v == 1:  # covered by a later instance
                assert not visible[int(y), int(x)]
            else:
                assert (x, y) == (0, 0)
    assert {1, 2} <= seen


def test_figure_geometry_left_is_left_and_points_are_the_parts():
    for lean in (-0.35, 0.0, 0.35):
        for arms in ((-0.7, 0.87), (0.87, -0.7)):
            polys, points = synth.figure_geometry(50, 50, 30, lean, arms, (0.17, 0.7))
            names = dict(zip(synth.FIGURE_KEYPOINTS, points.tolist()))
            assert names["left_hand"][0] < names["right_hand"][0]
            assert names["left_foot"][0] < names["right_foot"][0]
            assert names["head"][1] < names["neck"][1] < names["hip"][1]
    # the head and the hand/foot discs are centred on their keypoints
    centres = [polys[0].mean(0)] + [p.mean(0) for p in polys[-6:]]
    assert np.allclose(centres, points[[0, 3, 4, 5, 6, 1, 2]], atol=0.02)


def test_synth_keypoints_convert_and_export_unchanged(figures, tmp_path):
    out, _, coco = figures
    report = convert.convert_coco(str(out / "annotations.json"), str(out / "images"), str(tmp_path / "ds"))
    assert report.problems == [] and report.instances_written == len(coco["annotations"])
    convert.export_coco(str(tmp_path / "ds"), str(tmp_path / "back.json"))
    back = {a["id"]: a for a in json.loads((tmp_path / "back.json").read_text())["annotations"]}
    for ann in coco["annotations"]:
        assert back[ann["id"]].get("keypoints") == ann.get("keypoints")
        assert back[ann["id"]].get("num_keypoints") == ann.get("num_keypoints")


def test_synth_cli_keypoints_flag(tmp_path):
    assert cli.invoke(["synth", "--out", str(tmp_path), "--images", "2", "--size", "48", "--keypoints"]) == 0
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert coco["categories"][-1]["name"] == "figure"
    plain = synth.categories_for(4)
    assert all("keypoints" not in c for c in plain) and len(plain) == 4


def test_synth_figures_evaluate_with_their_sigmas(figures, tmp_path):
    """Ground truth as predictions scores keypoint AP 1 with synth.FIGURE_OKS_SIGMAS (K = 7)."""
    from pipeline.evaluate import coco_ground_truth, coco_metrics
    from pipeline.results import to_coco_results

    out, _, coco = figures
    convert.convert_coco(str(out / "annotations.json"), str(out / "images"), str(tmp_path / "ds"))
    rows = list(fmt.read_rows(str(tmp_path / "ds"), columns=["image_id", "width", "height", "annotations"]))
    cats = fmt.read_manifest(str(tmp_path / "ds")).categories
    preds = [r for row in rows for r in to_coco_results(row["image_id"], row["annotations"])
             if not r.get("iscrowd")]
    metrics = coco_metrics(coco_ground_truth(rows, cats), preds, kpt_oks_sigmas=synth.FIGURE_OKS_SIGMAS)
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
    assert len(synth.FIGURE_OKS_SIGMAS) == len(synth.FIGURE_KEYPOINTS)
