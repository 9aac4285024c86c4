"""``maskray infer --tile`` end to end on local Ray: a seam-cut mosaic of small synthetic labelled
images becomes one row per image whose instances are the mosaic's objects (recall, no object
split, no duplicate), its tiles spread over both actors; a run stopped mid-image resumes without
recomputing the tile parts already written.

The predictor is an ORACLE (``oracle_predictor``): for each tile it reads the ground truth of
the tile's region (the ``regions`` the read stage attaches to a tile part) and answers like a
Mask R-CNN would, with boxes and 28 x 28 mask probabilities of the visible part of every object
(torchvision's own mask target: ``roi_align`` of the mask on the box). What is tested is the
tiling machinery and the seam merge, deterministically; the per-small-image reference of an
oracle is the ground truth itself. A real model's comparison is ``benchmarks/tiled.py``.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from model.errors import MaskrayError
from pipeline import storage
from pipeline.data.synth import categories_for, make_image
from pipeline.infer.config import InferConfig
from pipeline.infer.driver import run_inference
from pipeline.infer.predictor import Predictor
from pipeline.infer.tiles import TILES_DIR, plan_tiles
from pipeline.results import RESULT_SCHEMA, unit_names

CATEGORIES = categories_for(3)
CELL = 128  # px of each small image
GRID = 6  # the mosaic is GRID x GRID small images
OFFSET = 37  # px of background before the first cell, so tile seams fall anywhere in the cells
TILE, OVERLAP = 256, 0.25
PART_SECONDS = 1.0
MIN_PIXELS = 8  # a sliver smaller than this at a tile border is not reported (a model would miss it too)


def tiny_checkpoint(uri: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig.for_categories(CATEGORIES, backbone="resnet18", min_size=TILE, max_size=TILE,
                                        options={"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20})
    buf = io.BytesIO()
    save_checkpoint(buf, build_from_config(config), config)
    storage.write_bytes(uri, buf.getvalue())


def mask_of(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) \
            else segmentation
    return mask_utils.decode(rle).astype(bool)


def mosaic() -> tuple[bytes, list[dict], tuple[int, int]]:
    """The mosaic's PNG bytes, its objects (category, x0, y0, mask crop in full coordinates) and
    its size (H, W)."""
    size = OFFSET + GRID * CELL + 29
    canvas = np.full((size, size, 3), 127, dtype=np.uint8)
    objects = []
    for k in range(GRID * GRID):
        data, anns = make_image(11, k, CELL, CATEGORIES, crowd_fraction=0.0, min_objects=2, max_objects=4)
        y0, x0 = OFFSET + (k // GRID) * CELL, OFFSET + (k % GRID) * CELL
        canvas[y0:y0 + CELL, x0:x0 + CELL] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        for ann in anns:
            m = mask_of(ann["segmentation"], CELL, CELL)
            ys, xs = np.nonzero(m)
            if len(ys) < 30:
                continue
            crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            objects.append({"category_id": ann["category_id"], "x0": x0 + int(xs.min()), "y0": y0 + int(ys.min()),
                            "mask": crop})
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), objects, (size, size)


def full_rle(obj: dict, size: tuple[int, int]) -> dict:
    full = np.zeros(size, dtype=np.uint8)
    h, w = obj["mask"].shape
    full[obj["y0"]:obj["y0"] + h, obj["x0"]:obj["x0"] + w] = obj["mask"]
    return mask_utils.encode(np.asfortranarray(full))


def oracle_predictor(truth_path: str, log_dir: str, fail_marker: str | None = None) -> type[Predictor]:
    """A Predictor that answers each tile from the ground truth (see the module docstring), logs
    ``<part> <pid>`` per part it runs into ``log_dir``, and, while ``fail_marker`` exists, fails
    the second tile part it sees after one was written (a run stopped mid-image).
    Defined in a function so it pickles by value."""

    class Oracle(Predictor):
        truth = None

        def objects(self):
            if self.truth is None:
                with open(truth_path) as f:
                    raw = json.load(f)
                self.truth = [dict(o, mask=np.array(o["mask"], dtype=bool)) for o in raw]
            return self.truth

        def tile_prediction(self, region) -> dict:
            from torchvision.ops import roi_align

            x0, y0, x1, y1 = region
            boxes, labels, masks = [], [], []
            for o in self.objects():
                h, w = o["mask"].shape
                ax0, ay0, ax1, ay1 = max(x0, o["x0"]), max(y0, o["y0"]), min(x1, o["x0"] + w), min(y1, o["y0"] + h)
                if ax1 <= ax0 or ay1 <= ay0:
                    continue
                visible = o["mask"][ay0 - o["y0"]:ay1 - o["y0"], ax0 - o["x0"]:ax1 - o["x0"]]
                if visible.sum() < MIN_PIXELS:
                    continue
                ys, xs = np.nonzero(visible)
                bx0, by0 = ax0 - x0 + xs.min(), ay0 - y0 + ys.min()
                tight = visible[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                box = [float(bx0), float(by0), float(bx0 + tight.shape[1]), float(by0 + tight.shape[0])]
                target = roi_align(torch.from_numpy(tight.astype(np.float32))[None, None],
                                   [torch.tensor([[0.0, 0.0, float(tight.shape[1]), float(tight.shape[0])]])],
                                   (28, 28), 1.0)[0]
                boxes.append(box)
                labels.append(o["category_id"])
                masks.append(target.numpy())
            n = len(boxes)
            return {"boxes": np.array(boxes, np.float32).reshape(n, 4), "labels": np.array(labels, np.int64),
                    "scores": np.linspace(0.95, 0.9, n, dtype=np.float32) if n else np.zeros(0, np.float32),
                    "masks": np.array(masks, np.float32).reshape(n, 1, 28, 28)}

        def run_units(self, table, batch_size=None):
            units = []
            for u in range(table.num_rows):
                unit = {n: table.column(n)[u].as_py() for n in table.column_names if n != "pixels"}
                part = unit.get("part")
                if part and part != "check" and not unit["tiled"]:
                    if fail_marker and os.path.exists(fail_marker) and os.listdir(log_dir):
                        raise RuntimeError("stopped by the test mid-image")
                    with open(os.path.join(log_dir, part), "w") as f:
                        f.write(str(os.getpid()))
                    # a model's time per part, so that parts queue: an instant answer leaves the
                    # first actor free for each part as it arrives, and the other never gets one
                    time.sleep(PART_SECONDS)
                    preds = [self.tile_prediction(r) for r in unit["regions"]]
                else:  # the unit's small images: nothing there
                    preds = [{"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                              "scores": np.zeros(0, np.float32), "masks": np.zeros((0, 1, 28, 28), np.float32)}
                             for _ in unit["positions"]]
                units.append(dict(unit, preds=preds, model=self.model_id))
            return units

    return Oracle


@pytest.fixture(scope="module")
def mosaic_input(tmp_path_factory):
    """A raw prefix: the mosaic and two small images (one unit: a base and tile parts); the
    ground truth JSON and a checkpoint beside it."""
    root = tmp_path_factory.mktemp("tiled")
    data, objects, size = mosaic()
    images = root / "images"
    images.mkdir()
    (images / "a-mosaic.png").write_bytes(data)
    for k in range(2):
        (images / f"b-small{k}.png").write_bytes(make_image(3, k, 64, CATEGORIES)[0])
    truth = root / "truth.json"
    truth.write_text(json.dumps([dict(o, mask=o["mask"].astype(int).tolist()) for o in objects]))
    ckpt = root / "ckpt.pt"
    tiny_checkpoint(str(ckpt))
    return {"root": root, "input": str(images), "objects": objects, "size": size, "truth": str(truth),
            "ckpt": str(ckpt)}


def rows_of(out: str) -> list[dict]:
    names = unit_names(out)
    assert names == ["files-0000000-0000003.parquet"]
    table = pq.read_table(os.path.join(out, names[0]))
    assert table.schema.equals(RESULT_SCHEMA)
    return table.to_pylist()


def score_against_truth(instances: list[dict], objects: list[dict], size: tuple[int, int]) -> dict:
    """recall (IoU >= 0.5), split objects (two or more predictions mostly inside one object),
    duplicates (two or more predictions at IoU >= 0.5 with one object)."""
    preds = [i["segmentation"] for i in instances]
    truth = [full_rle(o, size) for o in objects]
    iou = np.asarray(mask_utils.iou(preds, truth, [0] * len(truth))).reshape(len(preds), len(truth))
    inter = np.zeros_like(iou)
    # one call per mask: pycocotools 2.0.x area() of a list of more than 255 masks overflows on numpy 2
    pred_area = np.array([mask_utils.area(p) for p in preds], dtype=np.float64)
    for i, p in enumerate(preds):
        for j in np.flatnonzero(iou[i] > 0):
            inter[i, j] = mask_utils.area(mask_utils.merge([p, truth[j]], intersect=True))
    inside = inter / np.maximum(pred_area[:, None], 1)
    return {"recall": float((iou.max(0) >= 0.5).mean()),
            "split": int(((inside >= 0.5).sum(0) >= 2).sum()),
            "duplicates": int(((iou >= 0.5).sum(0) >= 2).sum()),
            "category_ok": all(instances[i]["category_id"] == objects[j]["category_id"]
                               for i, j in zip(*np.nonzero(iou >= 0.5)))}


def cut_by_seams(objects: list[dict], size: tuple[int, int]) -> int:
    """Objects that some inner tile border crosses."""
    borders_x = {b[2] for b in plan_tiles(size[1], size[0], TILE, OVERLAP) if b[2] < size[1]} | \
        {b[0] for b in plan_tiles(size[1], size[0], TILE, OVERLAP) if b[0] > 0}
    count = 0
    for o in objects:
        h, w = o["mask"].shape
        if any(o["x0"] < x < o["x0"] + w for x in borders_x) or any(o["y0"] < y < o["y0"] + h for y in borders_x):
            count += 1
    return count


def test_seam_cut_mosaic_is_one_row_with_every_object_once(ray_local, mosaic_input, tmp_path):
    m = mosaic_input
    assert cut_by_seams(m["objects"], m["size"]) >= 30, "the mosaic must put objects under the seams"
    out, log = str(tmp_path / "out"), tmp_path / "log"
    log.mkdir()
    summary = run_inference(InferConfig(input=m["input"], output=out, checkpoint=m["ckpt"], tile=TILE,
                                        tile_overlap=OVERLAP, actors="2", score_threshold=0.0),
                            predictor_factory=oracle_predictor(m["truth"], str(log)))
    rows = rows_of(out)
    assert [r["file_name"].rsplit("/", 1)[-1] for r in rows] == ["a-mosaic.png", "b-small0.png", "b-small1.png"]
    assert all(r["error"] is None for r in rows)
    big = rows[0]["instances"]
    assert all(i["segmentation"]["size"] == list(m["size"]) for i in big)  # full-image coordinates
    score = score_against_truth(big, m["objects"], m["size"])
    assert score["recall"] >= 0.98, score
    assert score["split"] == 0 and score["duplicates"] == 0 and score["category_ok"], score
    assert len(big) == len(m["objects"])
    # boxes are those of the masks (merged instances) or the tile's box (lone ones): inside the image
    for inst in big:
        x, y, w, h = inst["bbox"]
        assert 0 <= x and 0 <= y and x + w <= m["size"][1] + 1 and y + h <= m["size"][0] + 1
    # the tiles were units spread over both actors, and their parts are gone after the merge
    pids = {p.read_text() for p in log.iterdir()}
    assert len(list(log.iterdir())) >= 2 and len(pids) == 2, pids
    assert not any(f.endswith(".parquet") for _, _, files in os.walk(os.path.join(out, TILES_DIR)) for f in files)
    assert summary.images == 3 and summary.units_done == 1 and summary.instances == len(big) + sum(
        len(r["instances"]) for r in rows[1:])
    prov = json.loads(open(os.path.join(out, "provenance.json")).read())
    assert prov["options"]["tile"] == TILE and prov["options"]["tile_overlap"] == OVERLAP


def test_run_stopped_mid_image_resumes_without_recomputing_parts(ray_local, mosaic_input, tmp_path):
    m = mosaic_input
    out, log, marker = str(tmp_path / "out"), tmp_path / "log", tmp_path / "fail"
    log.mkdir()
    marker.write_text("")
    # half a CPU per actor: Ray Data left the failed first run's actor alive (observed with Ray
    # 2.60), and a second 1-CPU actor beside it left no CPU for the read task on this 2-CPU cluster
    config = InferConfig(input=m["input"], output=out, checkpoint=m["ckpt"], tile=TILE, tile_overlap=OVERLAP,
                         actors="1", cpus_per_actor=0.5, score_threshold=0.0)
    with pytest.raises(MaskrayError, match="not committed"):
        run_inference(config, predictor_factory=oracle_predictor(m["truth"], str(log), str(marker)))
    assert unit_names(out) == []  # nothing committed: the image is incomplete
    first = set(os.listdir(log))
    parts = os.listdir(os.path.join(out, TILES_DIR, "files-0000000-0000003.parquet"))
    assert first and set(first) <= set(parts)  # the parts run were written
    marker.unlink()
    for p in log.iterdir():
        p.unlink()
    run_inference(config, predictor_factory=oracle_predictor(m["truth"], str(log)))
    assert not (set(os.listdir(log)) & first)  # parts written before were not recomputed
    rows = rows_of(out)
    score = score_against_truth(rows[0]["instances"], m["objects"], m["size"])
    assert score["recall"] >= 0.98 and score["split"] == 0 and score["duplicates"] == 0, score
