"""Tiled inference's pure parts (``pipeline.infer.tiles``): the grid, a tile's instances in
full-image coordinates, and the seam merge on synthetic RLEs cut by seams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.infer import tiles
from pipeline.infer.paste import encode_instance_masks


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": bytes(rle["counts"])}


def instance(mask: np.ndarray, score: float = 0.9, category: int = 1) -> dict:
    rle = rle_of(mask)
    return {"category_id": category, "score": score, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "segmentation": rle, "keypoints": None}


def disc(size: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size[0], :size[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def crop_to(mask: np.ndarray, box: tiles.Box) -> np.ndarray:
    out = np.zeros_like(mask)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


# --------------------------------------------------------------------------- grid


@pytest.mark.parametrize("width,height,tile,overlap", [
    (1000, 700, 256, 0.2), (513, 512, 512, 0.25), (4096, 300, 1024, 0.0), (777, 1333, 200, 0.5)])
def test_grid_covers_the_image_with_the_overlap_and_flush_borders(width, height, tile, overlap):
    boxes = tiles.plan_tiles(width, height, tile, overlap)
    covered = np.zeros((height, width), dtype=np.int32)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(tile, width) and y1 - y0 == min(tile, height)  # every tile full size
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel in some tile
    xs = sorted({b[0] for b in boxes})
    stride = tiles.tile_stride(tile, overlap)
    assert xs[0] == 0 and max(b[2] for b in boxes) == width  # first at 0, last flush with the border
    assert all(b - a == stride for a, b in zip(xs[:-2], xs[1:-1]))  # regular stride but the last
    assert 0 < xs[-1] - xs[-2] <= stride if len(xs) > 1 else True
    if len(xs) > 1:  # neighbours share at least the overlap
        assert min(tile, width) - (xs[1] - xs[0]) >= int(round(tile * overlap))


def test_tiny_and_exact_images_are_one_tile():
    assert tiles.plan_tiles(64, 48, 512, 0.2) == [(0, 0, 64, 48)]
    assert tiles.plan_tiles(512, 512, 512, 0.2) == [(0, 0, 512, 512)]
    assert not tiles.needs_tiles(512, 512, 512) and tiles.needs_tiles(513, 10, 512)
    assert not tiles.needs_tiles(10_000, 10_000, 0)  # off
    assert tiles.plan_tiles(513, 10, 512, 0.0) == [(0, 0, 512, 10), (1, 0, 513, 10)]


def test_full_pass_size_follows_the_model_rule_and_never_enlarges():
    assert tiles.full_pass_size(20_000, 10_000, 800, 1333) == (1333, 666) or \
        tiles.full_pass_size(20_000, 10_000, 800, 1333) == (1333, 667)
    assert tiles.full_pass_size(300, 200, 800, 1333) == (300, 200)


def test_rect_rle_is_the_rectangle():
    size = (37, 53)
    for box in [(0, 0, 53, 37), (3, 5, 20, 9), (0, 4, 53, 37), (10, 0, 11, 37), (52, 36, 53, 37)]:
        expected = np.zeros(size, dtype=np.uint8)
        expected[box[1]:box[3], box[0]:box[2]] = 1
        assert np.array_equal(mask_utils.decode(tiles.rect_rle(box, size)), expected), box


# --------------------------------------------------------------------------- translation


def test_tile_instances_are_the_plain_paste_shifted_into_the_full_frame():
    torch.manual_seed(0)
    full = (300, 400)
    region = (150, 90, 350, 250)  # x0, y0, x1, y1: a 200 x 160 tile
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [150.0, 100.0, 199.0, 159.0]])
    masks = torch.rand(2, 1, 28, 28)
    pred = {"boxes": boxes.numpy(), "labels": np.array([1, 2]), "scores": np.array([0.9, 0.6], np.float32),
            "masks": masks.numpy(), "keypoints": np.array([[[5.0, 6.0, 1.0]], [[7.0, 8.0, 2.0]]], np.float32)}
    out = tiles.tile_instances(pred, region, (160, 200), full, [7, 9])
    counts, _ = encode_instance_masks(masks, boxes, (160, 200))  # pasted in the tile's own frame
    for inst, c, box in zip(out, counts, boxes.tolist()):
        in_tile = mask_utils.decode({"size": [160, 200], "counts": c})
        expected = np.zeros(full, dtype=np.uint8)
        expected[90:250, 150:350] = in_tile
        assert inst["segmentation"]["size"] == list(full)
        assert np.array_equal(mask_utils.decode(inst["segmentation"]), expected)
        assert inst["bbox"] == pytest.approx([box[0] + 150, box[1] + 90, box[2] - box[0], box[3] - box[1]])
    assert [i["category_id"] for i in out] == [7, 9]
    assert out[0]["keypoints"] == pytest.approx([155.0, 96.0, 1.0])


def test_shrunk_region_boxes_scale_back():
    pred = {"boxes": np.array([[10.0, 10.0, 20.0, 30.0]], np.float32), "labels": np.array([1]),
            "scores": np.array([0.5], np.float32)}
    out = tiles.tile_instances(pred, (0, 0, 400, 300), (150, 200), (300, 400), [1])  # pixels at half size
    assert out[0]["bbox"] == pytest.approx([20.0, 20.0, 20.0, 40.0])
    assert out[0]["segmentation"] is None


# --------------------------------------------------------------------------- seam merge


def test_object_cut_by_a_seam_becomes_one_instance_with_the_union_mask():
    size = (400, 800)
    obj = disc(size, 400, 200, 150)  # much wider than the seam band x in [370, 430)
    left, right = (0, 0, 430, 400), (370, 0, 800, 400)
    a, b = crop_to(obj, left), crop_to(obj, right)
    merged = tiles.merge_instances([instance(a, 0.8), instance(b, 0.95)], [left, right], size)
    assert len(merged) == 1
    m = merged[0]
    assert np.array_equal(mask_utils.decode(m["segmentation"]), obj.astype(np.uint8))  # union = uncut mask
    assert m["bbox"] == pytest.approx(list(mask_utils.toBbox(rle_of(obj))))
    assert m["score"] == pytest.approx(0.95)  # the maximum
    # whole-mask IoS (SAHI's) would not have joined these fragments: the band is a small part of each
    whole = mask_utils.area(mask_utils.merge([rle_of(a), rle_of(b)], intersect=True)) / min(a.sum(), b.sum())
    assert whole < tiles.MATCH_THRESHOLD


def test_object_cut_by_two_seams_joins_through_the_middle_tile():
    size = (100, 600)
    obj = np.zeros(size, dtype=bool)
    obj[40:60, 50:550] = True  # a long bar over three tiles
    regions = [(0, 0, 250, 100), (200, 0, 450, 100), (400, 0, 600, 100)]
    parts = [crop_to(obj, r) for r in regions]
    # the outer fragments do not touch; the highest score is an outer one
    merged = tiles.merge_instances([instance(parts[0], 0.9), instance(parts[1], 0.5), instance(parts[2], 0.7)],
                                   regions, size)
    assert len(merged) == 1
    assert np.array_equal(mask_utils.decode(merged[0]["segmentation"]), obj.astype(np.uint8))
    assert merged[0]["bbox"] == pytest.approx([50.0, 40.0, 500.0, 20.0])


def test_object_at_a_four_tile_corner_is_one_instance():
    size = (300, 300)
    obj = disc(size, 150, 150, 40)
    regions = [(0, 0, 170, 170), (130, 0, 300, 170), (0, 130, 170, 300), (130, 130, 300, 300)]
    merged = tiles.merge_instances([instance(crop_to(obj, r), 0.5 + 0.1 * k) for k, r in enumerate(regions)],
                                   regions, size)
    assert len(merged) == 1
    assert np.array_equal(mask_utils.decode(merged[0]["segmentation"]), obj.astype(np.uint8))


def test_duplicates_in_the_overlap_are_suppressed():
    size = (200, 400)
    obj = disc(size, 200, 100, 20)  # wholly inside the band: both tiles see all of it
    regions = [(0, 0, 240, 200), (160, 0, 400, 200)]
    slightly_off = disc(size, 201, 100, 20)
    merged = tiles.merge_instances([instance(obj, 0.9), instance(slightly_off, 0.8)], regions, size)
    assert len(merged) == 1 and merged[0]["score"] == pytest.approx(0.9)


def test_categories_neighbours_and_same_tile_detections_stay_apart():
    size = (200, 400)
    obj = disc(size, 200, 100, 60)
    left, right = (0, 0, 230, 200), (170, 0, 400, 200)
    # same pixels, other category
    out = tiles.merge_instances([instance(crop_to(obj, left), 0.9, 1), instance(crop_to(obj, right), 0.9, 2)],
                                [left, right], size)
    assert len(out) == 2
    # two different objects on either side of the seam, touching the band but not each other
    a, b = disc(size, 185, 40, 20), disc(size, 215, 160, 20)
    assert len(tiles.merge_instances([instance(a), instance(b)], [left, right], size)) == 2
    # two overlapping detections of one tile: the model's NMS kept them apart, so does the merge
    c, d = disc(size, 100, 100, 30), disc(size, 110, 100, 30)
    assert len(tiles.merge_instances([instance(c), instance(d, 0.8)], [left, left], size)) == 2


def test_no_overlap_means_no_join():
    size = (100, 200)
    obj = disc(size, 100, 50, 30)
    left, right = (0, 0, 100, 100), (100, 0, 200, 100)
    out = tiles.merge_instances([instance(crop_to(obj, left)), instance(crop_to(obj, right))], [left, right], size)
    assert len(out) == 2  # documented: matching needs overlap > 0


def test_box_grid_candidates_hold_every_box_meeting_the_query():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-20, 900, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 150, (500, 2))], 1)
    boxes[0] = [0, 0, 1000, 1000]  # a whole-image box (the full pass) touches every cell
    grid = tiles.BoxGrid(boxes, 128)
    for q in np.concatenate([boxes[:50], [[128, 128, 128, 128], [-5, -5, 0, 0]]]):
        meets = np.flatnonzero((boxes[:, 0] <= q[2]) & (q[0] <= boxes[:, 2]) & (boxes[:, 1] <= q[3]) & (q[1] <= boxes[:, 3]))
        got = grid.candidates(q)
        assert set(meets) <= set(got) and list(got) == sorted(set(got))
        assert len(got) < len(boxes) or q[2] - q[0] >= 900  # a small query does not see everything


def test_part_names_parse_back():
    names = [tiles.base_name(7), tiles.part_name(3, 0, 4, 5), tiles.part_name(3, 4, 5, 5), tiles.part_name(9, 0, 1, 2)]
    expected, done = tiles.parse_parts(names)
    assert expected == 7 and done == {3: (5, 5), 9: (1, 2)}
    assert tiles.complete_positions(names) == {3}


def test_parts_spread_an_image_and_stay_bounded():
    # enough parts to spread over MIN_PARTS_PER_IMAGE actors, never more tiles or bytes than the caps
    assert tiles.tiles_per_part(128, 1849) == tiles.MAX_TILES_PER_PART  # 29 parts of a 4096^2 image
    assert tiles.tiles_per_part(128, 81) == 5  # 17 parts
    assert tiles.tiles_per_part(128, 5) == 1
    assert tiles.tiles_per_part(512, 2401) == tiles.PART_BYTES // (3 * 512 * 512) == 5
    assert tiles.tiles_per_part(1024, 2401) == 1
    assert tiles.tiles_per_part(8192, 400) == 1  # one tile even above PART_BYTES
    for tile, n in [(128, 81), (512, 1000), (1024, 2401)]:
        per = tiles.tiles_per_part(tile, n)
        assert -(-n // per) >= min(n, tiles.MIN_PARTS_PER_IMAGE) and 3 * tile * tile * per <= max(
            tiles.PART_BYTES, 3 * tile * tile)


def test_parts_cut_otherwise_by_another_version_are_stale_whole():
    now = sorted(tiles.image_part_names(3, 81, 128, False))  # 5 tiles a part
    assert len(now) == 17 and tiles.stale_parts(now + [tiles.base_name(81)], 128, False) == []
    assert tiles.stale_parts(now[:5], 128, False) == []  # a resumed run's first parts
    older = [tiles.part_name(3, 0, 8, 81), tiles.part_name(3, 8, 16, 81)]  # 8 tiles a part
    mixed = older + now[2:4] + [tiles.part_name(4, 0, 1, 2)]
    # every part of position 3 goes (merged with the new ones they would count tiles twice)
    assert sorted(tiles.stale_parts(mixed, 128, False)) == sorted(older + now[2:4])
    with_pass = sorted(tiles.image_part_names(3, 81, 128, True))
    assert tiles.stale_parts(with_pass, 128, True) == [] and tiles.stale_parts(with_pass, 128, False) == with_pass


# --------------------------------------------------------------------------- read + write, no Ray


def fake_predictions(row: dict, obj: tiles.Box) -> list[dict]:
    """Per tile of a decoded row, one detection of the rectangle ``obj`` (full-image x0, y0, x1,
    y1) where the tile sees it, in the tile's pixel frame (scaled for a shrunk whole-image pass)."""
    preds = []
    for region, h, w in zip(row["regions"] or [None] * len(row["positions"]), row["heights"], row["widths"]):
        boxes = np.zeros((0, 4), np.float32)
        if region is not None:
            x0, y0, x1, y1 = region
            ax0, ay0, ax1, ay1 = max(obj[0], x0), max(obj[1], y0), min(obj[2], x1), min(obj[3], y1)
            if ax1 > ax0 and ay1 > ay0:
                sx, sy = w / (x1 - x0), h / (y1 - y0)
                boxes = np.array([[(ax0 - x0) * sx, (ay0 - y0) * sy, (ax1 - x0) * sx, (ay1 - y0) * sy]],
                                 np.float32)
        n = len(boxes)
        preds.append({"boxes": boxes, "labels": np.ones(n, np.int64), "scores": np.full(n, 0.9, np.float32),
                      "masks": np.ones((n, 1, 28, 28), np.float32)})
    return preds


def test_tiled_read_and_write_commit_one_row_per_image_and_resume(tmp_path):
    from PIL import Image

    from pipeline.infer.stages import tiled_rows, write_units
    from pipeline.results import read_table, unit_names

    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(big).save(tmp_path / "in" / "a.png")
    Image.fromarray(big[:50, :60]).save(tmp_path / "in" / "b.png")
    out = str(tmp_path / "out")
    unit = {"unit": "files-0000000-0000002.parquet", "source": "files", "uri": "", "start": 0, "stop": 0, "total": 0,
            "paths": [str(tmp_path / "in" / n) for n in ("a.png", "b.png")], "prefix": str(tmp_path / "in"), "only": []}
    opts = {"tile": 128, "overlap": 0.25, "full_pass": True, "model_size": (64, 100), "output_uri": out,
            "max_whole_pixels": None, "max_pixels": None}
    rows = [r.to_pylist()[0] | {"pixels_raw": r.column("pixels")[0].as_py()} for r in tiled_rows(unit, **opts)]
    parts = [r for r in rows if r["regions"]]
    grid = tiles.plan_tiles(300, 200, 128, 0.25)
    assert sum(len(r["regions"]) for r in parts) == len(grid) + 1  # the tiles and the whole-image pass
    first = parts[0]
    x0, y0, x1, y1 = first["regions"][0]
    assert np.array_equal(np.frombuffer(first["pixels_raw"][0], np.uint8).reshape(3, y1 - y0, x1 - x0),
                          big[y0:y1, x0:x1].transpose(2, 0, 1))  # a tile is its region's pixels
    whole = parts[-1]
    assert whole["regions"] == [[0, 0, 300, 200]] and (whole["heights"][0], whole["widths"][0]) == (64, 96)
    base = rows[-1]
    assert base["positions"] == [1] and base["part"].startswith("base.") and not base["regions"]

    obj = (140, 60, 180, 100)  # crossed by tile borders at x = 128 and 172 and at y = 72

    def run(row: dict) -> tuple:
        meta = write_units([dict(row, preds=fake_predictions(row, obj), model="m")], output_uri=out,
                           category_ids=[1])
        return meta.column("committed")[0].as_py()

    assert run(parts[0]) is False  # resume: a run stopped after its first part
    again = [r.to_pylist()[0] for r in tiled_rows(unit, **opts)]
    assert [r["part"] for r in again if r["regions"]] == [r["part"] for r in parts[1:]]  # written part skipped
    committed = [run(r) for r in again]
    assert committed[-1] is True and not any(committed[:-1])
    assert unit_names(out) == [unit["unit"]]
    table = read_table(f"{out}/{unit['unit']}").to_pylist()
    assert [r["file_name"].rsplit("/", 1)[-1] for r in table] == ["a.png", "b.png"]
    found = table[0]["instances"]
    assert len(found) == 1 and table[1]["instances"] == [] and table[0]["error"] is None
    assert found[0]["segmentation"]["size"] == [200, 300]
    assert found[0]["bbox"] == pytest.approx([140, 60, 40, 40], abs=2)  # the box of the merged mask
    assert tiles.list_parts(out, unit["unit"]) == []  # parts removed after the commit
