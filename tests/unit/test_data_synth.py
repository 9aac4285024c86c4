"""pipeline.data.synth: deterministic shapes with exact masks; jobs.synth CLI."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import cli
from pipeline.data import synth


def _ann_mask(ann, h, w):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else \
            {"size": seg["size"], "counts": seg["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth.synthesize(str(out), images=40, seed=5, size=64, unlabeled=3)
    return out, summary, json.loads((out / "annotations.json").read_text())


def test_layout_and_counts(shapes):
    out, summary, coco = shapes
    assert summary.images == 40 and len(coco["images"]) == 40
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle", "star"]
    assert len(os.listdir(out / "images")) == 40 and len(os.listdir(out / "unlabeled")) == 3
    per_image = np.bincount([a["image_id"] for a in coco["annotations"] if not a["iscrowd"]],
                            minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 4
    kinds = {("crowd" if a["iscrowd"] else "poly" if isinstance(a["segmentation"], list)
              else "rle") for a in coco["annotations"]}
    assert kinds == {"crowd", "poly", "rle"}
    assert summary.instances == len(coco["annotations"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    img = Image.open(out / "images" / coco["images"][0]["file_name"])
    assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"


def test_masks_are_exact(shapes):
    """Masks are disjoint, bbox/area agree with them, and each mask covers exactly its painted
    object: pixels inside share the object's colour, the ring just outside does not."""
    out, _, coco = shapes
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for info in coco["images"]:
        pixels = np.asarray(Image.open(out / "images" / info["file_name"])).astype(int)
        anns = by_image.get(info["id"], [])
        masks = [_ann_mask(a, 64, 64) for a in anns]
        assert (np.sum(masks, axis=0) <= 1).all()
        union = np.any(masks, axis=0)
        for ann, m in zip(anns, masks):
            assert m.sum() == ann["area"]
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            if ann["iscrowd"]:
                continue
            mean = pixels[m].mean(axis=0)
            inside = np.abs(pixels[m] - mean).sum(axis=1)
            assert (inside < 60).all()
            ring = np.zeros_like(m)
            ring[1:] |= m[:-1]
            ring[:-1] |= m[1:]
            ring[:, 1:] |= m[:, :-1]
            ring[:, :-1] |= m[:, 1:]
            ring &= ~union
            if ring.sum():
                outside = np.abs(pixels[ring] - mean).sum(axis=1)
                assert (outside >= 60).mean() > 0.9


def test_deterministic(tmp_path):
    a = synth.make_image(9, 3, 64, synth.categories_for(3))
    b = synth.make_image(9, 3, 64, synth.categories_for(3))
    c = synth.make_image(10, 3, 64, synth.categories_for(3))
    assert a == b and a[0] != c[0]


def test_cli_synth_is_deterministic(tmp_path, capsys):
    for name in ("a", "b"):
        argv = ["--out", str(tmp_path / name), "--images", "3", "--seed", "2", "--size", "48",
                "--categories", "5"]
        assert cli.module_main("synth", argv) == 0
    assert "synth: 3 images" in capsys.readouterr().out
    for rel in ("annotations.json", "images/000001.png", "images/000003.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    coco = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert coco["categories"][-1]["name"] == "ellipse"
