"""pipeline.results: the maskray-results schema, writer, readers and COCO export."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import results
from pipeline.infer import stages
from pipeline.results import ResultsError

SIZE = (40, 60)  # (height, width)
K = 17  # COCO person: pycocotools' default OKS sigmas
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]

# maskray-results/1, as every file written before keypoints: no keypoints field, tagged "/1"
OLD_INSTANCE = pa.struct([
    pa.field("category_id", pa.int32()), pa.field("score", pa.float32()),
    pa.field("bbox", pa.list_(pa.float32(), 4)), pa.field("segmentation", results.RLE_TYPE)])
OLD_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()), pa.field("file_name", pa.string()),
    pa.field("instances", pa.list_(OLD_INSTANCE)), pa.field("error", pa.string()), pa.field("model", pa.string())],
    metadata={b"maskray.format": b"maskray-results/1"})


def predictions(n: int, seed: int, keypoints: bool, masks: bool = True) -> dict:
    """One image's predictor output (numpy, original frame): boxes inside the image, 28x28 masks,
    keypoints (x, y, score) inside each box with scores on both sides of the visibility rule."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    x0, y0 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(8, w / 2, n), y0 + rng.uniform(8, h / 2, n)], 1).astype(np.float32)
    out = {"boxes": boxes, "labels": rng.integers(1, 3, n), "scores": np.sort(rng.uniform(0.1, 1, n))[::-1].astype(np.float32)}
    if masks:
        out["masks"] = rng.uniform(0, 1, (n, 1, 28, 28)).astype(np.float32)
    if keypoints:
        u = rng.uniform(0, 1, (n, K, 2))
        xy = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
        score = rng.uniform(-3, 6, (n, K, 1))
        out["keypoints"] = np.concatenate([xy, score], 2).astype(np.float32)
    return out


def instances_of(pred: dict) -> list[dict]:
    return results.to_result_instances(pred["boxes"], pred["labels"], pred["scores"], pred.get("masks"), *SIZE,
                                       [3, 9], keypoints=pred.get("keypoints"))


def write(tmp_path, name: str, preds: list[dict], errors=None) -> str:
    out = str(tmp_path / "out")
    errors = errors or [None] * len(preds)
    table = results.result_table([10 + i for i in range(len(preds))], [f"{i}.png" for i in range(len(preds))],
                                 [[] if e else instances_of(p) for p, e in zip(preds, errors)], errors, "m#sha256:1")
    results.write_unit(out, name, table)
    return out


def test_schema_names_and_version_tag():
    r = results.RESULT_SCHEMA
    assert r.names == ["image_id", "file_name", "instances", "error", "model"]
    inst = r.field("instances").type.value_type
    assert [f.name for f in inst] == ["category_id", "score", "bbox", "segmentation", "keypoints"]
    assert inst.field("keypoints").type == pa.list_(pa.float32()) and inst.field("keypoints").nullable
    assert r.metadata[b"maskray.format"] == results.FORMAT.encode()


@pytest.mark.parametrize("with_keypoints", [False, True])
def test_write_read_round_trip(tmp_path, with_keypoints):
    preds = [predictions(4, seed, with_keypoints) for seed in (1, 2)] + [predictions(0, 3, with_keypoints)]
    out = write(tmp_path, "part-00000.parquet", preds, errors=[None, None, "decode failed: bad"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-00000.parquet"]  # no temporary left
    stored = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert stored.schema.metadata[b"maskray.format"] == b"maskray-results/2"

    rows = list(results.iter_rows(out))
    assert [r["image_id"] for r in rows] == [10, 11, 12] and [r["error"] for r in rows] == [None, None, "decode failed: bad"]
    assert rows[2]["instances"] == [] and {r["model"] for r in rows} == {"m#sha256:1"}
    for row, pred in zip(rows[:2], preds):
        got = row["instances"]
        assert [i["category_id"] for i in got] == [[3, 9][label - 1] for label in pred["labels"]]
        np.testing.assert_allclose([i["score"] for i in got], pred["scores"], rtol=1e-6)
        xywh = np.array([i["bbox"] for i in got])
        np.testing.assert_allclose(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), pred["boxes"], atol=1e-4)
        for inst in got:
            assert inst["segmentation"]["size"] == list(SIZE)
            assert mask_utils.decode({"size": list(SIZE), "counts": inst["segmentation"]["counts"]}).shape == SIZE
        if with_keypoints:
            np.testing.assert_allclose(np.array([i["keypoints"] for i in got]).reshape(-1, K, 3), pred["keypoints"])
        else:
            assert all(i["keypoints"] is None for i in got)
    assert results.read_table(f"{out}/part-00000.parquet").to_pylist() == rows
    only = list(results.iter_rows(out, ["instances"], image_ids=[11]))
    assert [r["image_id"] for r in only] == [11] and only[0]["instances"] == rows[1]["instances"]


def test_keypoint_only_model_has_no_segmentation(tmp_path):
    pred = predictions(3, 4, keypoints=True, masks=False)
    got = instances_of(pred)
    assert [i["segmentation"] for i in got] == [None] * 3 and len(got[0]["keypoints"]) == 3 * K
    with pytest.raises(ResultsError, match=r"keypoints must be \[3, K, 3\]"):
        results.to_result_instances(pred["boxes"], pred["labels"], pred["scores"], None, *SIZE, [3, 9],
                                    keypoints=pred["keypoints"][:, :, :2])


def test_stage_writer_stores_predictor_keypoints(tmp_path):
    """What the model stage hands the writer (numpy dicts per image) ends in the file, keypoints included."""
    preds = [predictions(2, 5, keypoints=True), predictions(3, 6, keypoints=False)]
    unit = {"unit": "u.parquet", "positions": [0, 1], "image_ids": [1, 2], "file_names": ["a", "b"],
            "heights": [SIZE[0]] * 2, "widths": [SIZE[1]] * 2, "errors": [None, None], "preds": preds,
            "merge": False, "model": "m"}
    out = str(tmp_path / "o")
    meta = stages.write_units([unit], output_uri=out, category_ids=[3, 9]).to_pylist()[0]
    assert (meta["images"], meta["instances"]) == (2, 5)
    rows = list(results.iter_rows(out))
    np.testing.assert_allclose(np.array([i["keypoints"] for i in rows[0]["instances"]]).reshape(2, K, 3),
                               preds[0]["keypoints"])
    assert [i["keypoints"] for i in rows[1]["instances"]] == [None] * 3


def old_file(path, image_ids=(1, 2)) -> list[dict]:
    """A maskray-results/1 file of ``image_ids`` (one instance each); returns its rows."""
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((5, 6), np.uint8), ((2, 33), (3, 51)))))
    rows = [{"image_id": i, "file_name": f"{i}.png", "error": None, "model": "old",
             "instances": [{"category_id": 3, "score": 0.75, "bbox": [3.0, 2.0, 6.0, 5.0],
                            "segmentation": {"size": list(SIZE), "counts": rle["counts"]}}]} for i in image_ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=OLD_SCHEMA), path)
    return rows


def test_old_version_files_read_with_keypoints_null(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rows = old_file(out / "part-00000.parquet")
    got = list(results.iter_rows(str(out)))
    for row in rows:
        row["instances"][0]["keypoints"] = None
    assert got == rows
    assert results.read_table(str(out / "part-00000.parquet")).schema.equals(results.RESULT_SCHEMA)
    assert results.write_coco_json(str(out), ["part-00000.parquet"], str(tmp_path / "c.json")) == 2

    # --retry-errors into an old file: the merged file is in the current schema
    fresh = results.result_table([2], ["2.png"], [instances_of(predictions(1, 7, keypoints=True))], [None], "new")
    results.write_unit(str(out), "part-00000.parquet", fresh, positions=[1])
    merged = pq.read_table(out / "part-00000.parquet")
    assert merged.schema.metadata[b"maskray.format"] == b"maskray-results/2"
    assert merged.column("model").to_pylist() == ["old", "new"]
    instances = merged.column("instances").to_pylist()
    assert instances[0][0]["keypoints"] is None and len(instances[1][0]["keypoints"]) == 3 * K


def test_unknown_version_and_damaged_files_are_refused_naming_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    table = pa.Table.from_pylist([], schema=results.RESULT_SCHEMA).replace_schema_metadata(
        {b"maskray.format": b"maskray-results/9"})
    pq.write_table(table, out / "files-0000000-0000002.parquet")
    for read in (lambda: list(results.iter_rows(str(out))),
                 lambda: results.read_table(str(out / "files-0000000-0000002.parquet"))):
        with pytest.raises(ResultsError) as caught:
            read()
        text = str(caught.value)
        assert "\n" not in text and "files-0000000-0000002.parquet" in text and "'maskray-results/9'" in text

    whole = io.BytesIO()
    old_file(whole)
    (out / "files-0000000-0000002.parquet").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    for read in (lambda: list(results.iter_rows(str(out))),
                 lambda: results.read_table(str(out / "files-0000000-0000002.parquet")),
                 lambda: results.write_coco_json(str(out), ["files-0000000-0000002.parquet"], str(tmp_path / "c.json"))):
        with pytest.raises(ResultsError, match=r"files-0000000-0000002\.parquet: not a results file") as caught:
            read()
        assert "\n" not in str(caught.value)


def test_prefix_listing_and_provenance(tmp_path):
    out = tmp_path / "out"
    (out / "nested").mkdir(parents=True)
    with pytest.raises(ResultsError, match="no .parquet results files"):
        results.result_files(str(out))
    assert results.read_provenance(str(out)) == {}
    old_file(out / "b.parquet")
    old_file(out / "nested" / "x.parquet")
    old_file(out / "a.parquet", image_ids=(5,))
    assert results.unit_names(str(out)) == ["a.parquet", "b.parquet"]
    assert [r["image_id"] for r in results.iter_rows(str(out), ["image_id"])] == [5, 1, 2]
    (out / results.PROVENANCE).write_text(json.dumps({"format": results.FORMAT, "input": {"uri": "x"}}))
    assert results.read_provenance(str(out))["input"] == {"uri": "x"}
    (out / results.PROVENANCE).write_text("{")
    with pytest.raises(ResultsError, match=r"provenance\.json: malformed JSON"):
        results.read_provenance(str(out))


def test_coco_json_loads_and_keypoints_evaluate(tmp_path):
    """The streamed export loads with COCO.loadRes; its keypoints carry v from their scores, and
    evaluated against ground truth at the same points give keypoint AP 1."""
    preds = [predictions(3, 8, keypoints=True), predictions(2, 9, keypoints=True)]
    out = write(tmp_path, "u.parquet", preds)
    path = str(tmp_path / "j" / "coco.json")
    assert results.write_coco_json(out, ["u.parquet"], path) == 5
    exported = json.load(open(path))
    rows = list(results.iter_rows(out))
    stored = [(r["image_id"], i) for r in rows for i in r["instances"]]
    for item, (image_id, inst) in zip(exported, stored):
        assert item["image_id"] == image_id and item["segmentation"]["counts"] == inst["segmentation"]["counts"].decode()
        kp = np.array(item["keypoints"]).reshape(K, 3)
        points = np.array(inst["keypoints"]).reshape(K, 3)
        np.testing.assert_allclose(kp[:, :2], points[:, :2], atol=1e-3)
        assert kp[:, 2].tolist() == [2 if s >= results.KEYPOINT_VISIBLE_SCORE else 1 for s in points[:, 2]]
    assert {v for item in exported for v in item["keypoints"][2::3]} == {1, 2}

    annotations = []
    for image_id, inst in stored:
        points = np.array(inst["keypoints"]).reshape(K, 3)
        points[:, 2] = 2
        x, y, w, h = inst["bbox"]
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": inst["category_id"],
                            "bbox": inst["bbox"], "area": w * h, "iscrowd": 0, "num_keypoints": K,
                            "keypoints": points.ravel().tolist()})
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": SIZE[1], "height": SIZE[0]} for i in (10, 11)],
                  "annotations": annotations, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(path)
        assert len(dt.getAnnIds()) == 5
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_dicts_round_trip():
    pred = predictions(3, 10, keypoints=True)
    items = instances_of(pred)
    coco = results.to_coco_results(17, items)
    assert all(isinstance(c["segmentation"]["counts"], str) for c in coco)
    assert coco[0]["keypoints"] == pytest.approx([float(v) for v in items[0]["keypoints"]])
    back = results.result_instances_from_coco(coco)
    assert all(isinstance(b["segmentation"]["counts"], bytes) for b in back)
    assert results.to_coco_results(17, back) == coco
    # shard annotations (score null, no keypoints) convert the same way
    ann = {"id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12.0, "iscrowd": False,
           "segmentation": None, "score": None}
    assert results.to_coco_results(5, [ann]) == [{"image_id": 5, "category_id": 3, "score": 1.0,
                                                   "bbox": [1.0, 2.0, 3.0, 4.0]}]


def test_to_result_instances_is_torchvisions_paste_and_rle():
    """The masks the writer stores are pycocotools' RLE of torchvision's pasted masks."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    pred = predictions(4, 11, keypoints=False)
    got = instances_of(pred)
    full = paste_masks_in_image(torch.from_numpy(pred["masks"]), torch.from_numpy(pred["boxes"]), SIZE)[:, 0] > 0.5
    expected = mask_utils.encode(np.asfortranarray(full.numpy().transpose(1, 2, 0).astype(np.uint8)))
    assert [g["segmentation"]["counts"] for g in got] == [e["counts"] for e in expected]
