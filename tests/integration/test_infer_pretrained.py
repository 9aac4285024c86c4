"""``maskray infer`` with a torchvision Mask R-CNN file, end to end on local Ray: the same instances
as torchvision's model in a plain loop on real photos, COCO ids and names (never "N/A"), a COCO
results JSON that pycocotools loads against the input's image ids, provenance naming the source,
and a gallery of the results."""

from __future__ import annotations

import hashlib
import json

import pretrained_files as pf
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools.coco import COCO

from pipeline.show.gallery import build_gallery
from pipeline import results
from pipeline.infer.driver import run_inference
from pipeline.infer.config import InferConfig

PHOTOS = ("chelsea", "rocket", "astronaut")  # 451x300, 640x427, 512x512
UNUSED = torch.tensor([12, 26, 29, 30, 45, 66, 68, 69, 71, 83])


def test_torchvision_file_in_infer_matches_torchvisions_loop(ray_local, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    arrays = {}
    for name in PHOTOS:
        arrays[name] = pf.photo(name)
        Image.fromarray(arrays[name]).save(photos / f"{name}.png")  # lossless: the loop sees the same pixels
    torch.manual_seed(0)
    path, reference = pf.write_torchvision_file(str(tmp_path / "weights"), "maskrcnn_resnet50_fpn", seed=7,
                                                calibrate_on=pf.as_tensor(arrays["rocket"]), na_offset=3.0)
    out, coco_json = str(tmp_path / "out"), str(tmp_path / "pool.json")

    summary = run_inference(InferConfig(input=str(photos), output=out, checkpoint=path, score_threshold=0.05,
                                        coco_json=coco_json))
    assert (summary.images, summary.errors) == (3, 0)

    rows = {}
    for unit in results.unit_names(out):
        for row in pq.read_table(f"{out}/{unit}").to_pylist():
            rows[row["file_name"].rsplit("/", 1)[-1]] = row
    assert sorted(rows) == sorted(f"{n}.png" for n in PHOTOS)
    dropped = 0
    for name in PHOTOS:
        with torch.inference_mode():
            expected = reference([pf.as_tensor(arrays[name])])[0]
        keep = (expected["scores"] >= 0.05) & ~torch.isin(expected["labels"], UNUSED)
        dropped += int(torch.isin(expected["labels"], UNUSED).sum())
        expected = {k: v[keep] for k, v in expected.items()}
        assert len(expected["boxes"]) >= 20
        expected["rles"] = pf.rles_of(expected["masks"])
        instances = rows[f"{name}.png"]["instances"]
        got = {"boxes": torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (i["bbox"] for i in instances)]),
               "labels": torch.tensor([i["category_id"] for i in instances]),
               "scores": torch.tensor([i["score"] for i in instances]),
               "rles": [dict(i["segmentation"]) for i in instances]}
        pf.assert_same_detections(expected, got)

    assert dropped > 0  # the model does score "N/A" labels: the pipeline left them out

    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["model_source"]["uri"] == path and record["model_source"]["format"] == "torchvision-state-dict"
    assert record["model_source"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert len(record["categories"]) == 80 and {"id": 1, "name": "person"} in record["categories"]
    assert all(c["name"] != "N/A" for c in record["categories"])

    # COCO results load against the input's image ids; category ids are COCO's, never an N/A slot
    gt = COCO()
    gt.dataset = {"images": [{"id": int(r["image_id"]), "width": int(arrays[n.split(".")[0]].shape[1]),
                              "height": int(arrays[n.split(".")[0]].shape[0])} for n, r in rows.items()],
                  "categories": record["categories"], "annotations": []}
    gt.createIndex()
    detections = gt.loadRes(coco_json)
    assert len(detections.getAnnIds()) == summary.instances
    used = {a["category_id"] for a in detections.dataset["annotations"]}
    assert used and not used & set(UNUSED.tolist())

    build_gallery(out, str(tmp_path / "gallery"))
    html = (tmp_path / "gallery" / "index.html").read_text()
    assert html.count('<figure class="entry"><a href=') == 3  # three drawn overlays, none missing
    names = {c["name"] for c in record["categories"] if c["id"] in used}
    assert names and all(n in html for n in names)  # the page names the COCO categories found


def test_torchvision_file_and_import_through_s3(s3, tmp_path):
    """``--checkpoint s3://.../x.pth`` (a plain torchvision file) and ``maskray import`` to and from
    object storage: one self-describing file that a cluster reads."""
    from jobs import cli
    from model.checkpoint import read_checkpoint
    from pipeline import storage
    from pipeline.weights import read_model

    path, _ = pf.write_torchvision_file(str(tmp_path), "maskrcnn_resnet50_fpn_v2", seed=3)
    uri = f"s3://{s3.bucket}/models/{pf.TORCHVISION_FILES['maskrcnn_resnet50_fpn_v2']}"
    storage.write_bytes(uri, open(path, "rb").read())
    config, _, extra, source = read_model(uri)
    assert (config.variant, extra["source_format"]) == ("v2", "torchvision-state-dict")
    assert source.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()

    out = f"s3://{s3.bucket}/models/imported.pt"
    assert cli.invoke(["import", uri, out]) == 0
    imported_config, _, imported_extra = read_checkpoint(storage.read_bytes(out))
    assert imported_extra["source"] == uri and imported_extra["source_sha256"] == source.sha256
    assert imported_config.categories == config.categories
