"""pipeline.data.synth.make_mosaic: the mosaic holds the small images' pixels at their placements,
its annotations are theirs moved into mosaic coordinates (masks equal pixel for pixel), and the
seams of the given tiling cut objects."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.regions import open_regions
from pipeline.data.synth import make_mosaic, tile_starts


def _mask(coco: COCO, ann: dict) -> np.ndarray:
    return coco.annToMask(ann).astype(bool)


def test_tile_starts_rule():
    assert tile_starts(100, 128, 0.2) == [0]
    assert tile_starts(1000, 256, 0.25) == [0, 192, 384, 576, 744]
    with pytest.raises(ValueError):
        tile_starts(1000, 256, 1.0)


@pytest.mark.parametrize("image_format", ["png", "tiff"])
def test_mosaic_pixels_and_annotations_match_the_small_images(tmp_path, image_format):
    m = make_mosaic(str(tmp_path), grid=(3, 4), cell=96, seed=3, tile=160, overlap=0.1,
                    image_format=image_format, crowd_fraction=0.3)
    assert (m.width, m.height) == (5 * 96, 4 * 96) and len(m.placements) == 12
    small = COCO(m.small_annotations)
    big = COCO(m.annotations)  # pycocotools reads it as any COCO file
    mapping = json.loads(open(m.mapping).read())
    assert m.instances == len(big.dataset["annotations"]) == len(small.dataset["annotations"])
    with open_regions(m.image, max_region_pixels=None, max_whole_pixels=None) as src:
        assert src.region_readable == (image_format == "tiff")
        for p in m.placements:
            own = np.asarray(Image.open(f"{m.small_images}/{p['file_name']}").convert("RGB"))
            got = src.read(p["x"], p["y"], p["x"] + p["width"], p["y"] + p["height"])
            np.testing.assert_array_equal(got, own)
    where = {p["image_id"]: p for p in m.placements}
    kinds = set()
    for entry in mapping["annotations"]:
        a_big, a_small = big.anns[entry["id"]], small.anns[entry["small_id"]]
        assert a_small["image_id"] == entry["image_id"] and a_big["image_id"] == 1
        p = where[entry["image_id"]]
        expected = np.zeros((m.height, m.width), dtype=bool)
        expected[p["y"]:p["y"] + 96, p["x"]:p["x"] + 96] = _mask(small, a_small)
        np.testing.assert_array_equal(_mask(big, a_big), expected)
        bx, by, bw, bh = a_small["bbox"]
        assert a_big["bbox"] == [bx + p["x"], by + p["y"], bw, bh]
        assert a_big["area"] == a_small["area"] and a_big["iscrowd"] == a_small["iscrowd"]
        seg = a_small["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else "crowd" if isinstance(seg["counts"], list) else "rle")
    assert kinds == {"polygon", "rle", "crowd"}  # every segmentation form moved


def test_seams_cut_objects_and_flags_are_right(tmp_path):
    tile, overlap = 192, 0.1
    m = make_mosaic(str(tmp_path), grid=(4, 4), cell=128, seed=0, tile=tile, overlap=overlap)
    big = COCO(m.annotations)
    xs, ys = tile_starts(m.width, tile, overlap), tile_starts(m.height, tile, overlap)
    mapping = json.loads(open(m.mapping).read())["annotations"]
    for entry in mapping:
        rle = big.annToRLE(big.anns[entry["id"]])
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        inside = any(sx <= x and x + w <= sx + tile for sx in xs) and \
            any(sy <= y and y + h <= sy + tile for sy in ys)
        assert entry["split"] == (not inside)
    assert m.split == sum(e["split"] for e in mapping) >= 0.2 * m.instances
    assert m.cut >= m.split


def test_own_tile_rule_is_used(tmp_path):
    calls = []

    def starts(length, tile, overlap):
        calls.append((length, tile, overlap))
        return list(range(0, max(1, length - tile + 1), tile))

    make_mosaic(str(tmp_path), grid=(2, 2), cell=64, tile=100, overlap=0.0, starts=starts)
    assert (192, 100, 0.0) in calls


def test_cli_writes_a_tiled_tiff_mosaic(tmp_path, capsys):
    from jobs import cli

    assert cli.main(["synth", "--out", str(tmp_path), "--mosaic", "2x3", "--size", "64", "--tile", "100",
                     "--tile-overlap", "0.1", "--mosaic-format", "tiff"]) == 0
    assert "mosaic: 256x192, 6 images" in capsys.readouterr().out
    assert (tmp_path / "mosaic.tif").exists() and (tmp_path / "small" / "annotations.json").exists()
