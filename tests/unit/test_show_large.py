"""maskray show on huge images (pipeline.show.large): a downsampled overview read region by region,
masks drawn from their RLE over windows only, and full-resolution crops around detections."""

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image

from pipeline.data.regions import open_regions
from pipeline.instances import encode_masks
from pipeline.results import RESULT_SCHEMA
from pipeline.show import gallery
from pipeline.show.large import CROP_MIN_SIDE, crop_window, is_large, overview, render_large

W, H = 1500, 1000
SQUARES = [(200, 150, 60), (900, 600, 40), (1300, 100, 120)]  # x, y, side


def _scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((H, W, 3), 40, np.uint8) + rng.integers(0, 20, (H, W, 1), dtype=np.uint8)
    for x, y, s in SQUARES:
        img[y:y + s, x:x + s] = (230, 230, 230)
    return img


def _instances():
    out = []
    for k, (x, y, s) in enumerate(SQUARES):
        mask = np.zeros((1, H, W), bool)
        mask[0, y:y + s, x:x + s] = True
        rle = encode_masks(mask)[0]
        out.append({"category_id": 3, "score": 0.9 - 0.1 * k, "bbox": [x, y, s, s],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].encode()}})
    return out


def _tiff(img) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, tile=(256, 256), photometric="rgb", compression="zlib")
    return buf.getvalue()


def test_overview_is_the_box_reduced_image():
    img = _scene()
    src = open_regions(_tiff(img), max_region_pixels=None, max_whole_pixels=None)
    small, factor = overview(src, 100)
    assert factor == 15 and small.shape == (67, 100, 3)
    np.testing.assert_array_equal(small, np.asarray(Image.fromarray(img).reduce(15)))


def test_render_large_draws_masks_where_they_are_and_crops_at_full_resolution():
    img = _scene()
    picture, crops = render_large(_tiff(img), _instances(), {3: 1}, ["square"], long_side=300,
                                  score_thresh=0.5, crops=2)
    assert picture.size == (300, 200)
    drawn = np.asarray(picture).astype(int)
    plain = np.asarray(Image.fromarray(img).reduce(5)).astype(int)
    x, y, s = SQUARES[2]  # inside the big square (away from its box outline) vs background
    inside = np.abs(drawn - plain)[y // 5 + 6:(y + s) // 5 - 6, x // 5 + 6:(x + s) // 5 - 6].sum(-1)
    outside = np.abs(drawn - plain)[150:190, 20:120].sum(-1)
    assert inside.mean() > 60 and outside.mean() < 20
    assert [inst["score"] for inst, _ in crops] == [0.9, 0.8]  # the best two
    for inst, crop in crops:
        x0, y0, x1, y1 = crop_window(inst, (H, W))
        k = -(-CROP_MIN_SIDE // max(x1 - x0, y1 - y0))
        assert crop.size == ((x1 - x0) * k, (y1 - y0) * k)  # full resolution, enlarged when small
        bx, by, bw, bh = inst["bbox"]
        pixels = np.asarray(crop).astype(int)
        raw = np.repeat(np.repeat(img[y0:y1, x0:x1], k, 0), k, 1).astype(int)
        centre = (slice((by - y0 + bh // 4) * k, (by - y0 + 3 * bh // 4) * k),
                  slice((bx - x0 + bw // 4) * k, (bx - x0 + 3 * bw // 4) * k))
        assert np.abs(pixels - raw)[centre].sum(-1).mean() > 60  # the mask is tinted


def test_is_large_reads_headers_only():
    png = io.BytesIO()
    Image.fromarray(_scene()).save(png, format="PNG")
    assert is_large(png.getvalue(), 1_000_000) and not is_large(png.getvalue(), 2_000_000)
    assert is_large(_tiff(_scene()), 1_000_000)
    from png_bombs import png_header_only

    assert is_large(png_header_only(30_000, 30_000))  # 900 MP declared: large (no decode, no bomb error)


def test_gallery_links_crops_of_a_huge_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "scene.tif").write_bytes(_tiff(_scene()))
    results = tmp_path / "results"
    results.mkdir()
    row = {"image_id": 1, "file_name": str(images / "scene.tif"), "instances": _instances(), "model": "m",
           "error": None}
    pq.write_table(pa.Table.from_pylist([row], schema=RESULT_SCHEMA), results / "files-0000000-0000001.parquet")
    (results / "provenance.json").write_text(json.dumps({
        "format": "maskray-results/2", "model": "m", "input": {"uri": str(images), "kind": "files", "files": 1},
        "options": {"intensity": "percentile", "category_ids": [3]}}))
    out = tmp_path / "gallery"
    summary = gallery.build_gallery(str(results), str(out), long_side=400, crops=3, large_pixels=1_000_000)
    assert summary.shown == 1
    assert summary.missing == 0
    text = (out / "index.html").read_text()
    links = re.findall(r'<a class="crop" href="([^"]+)">', text)
    assert links == [f"crops/00000-1-{n}.jpg" for n in (1, 2, 3)]
    assert all((out / link).is_file() for link in links)
    assert Image.open(out / "overlays" / "00000-1.jpg").size == (375, 250)  # factor 4: ceil(1500 / 400)
    # the same TIFF under the threshold: the plain overlay, from its bytes, no crops
    plain = gallery.build_gallery(str(results), str(tmp_path / "plain"), long_side=300, crops=3)
    assert plain.missing == 0 and not (tmp_path / "plain" / "crops").exists()
    assert Image.open(tmp_path / "plain" / "overlays" / "00000-1.jpg").size == (300, 200)


def test_draw_masks_equals_torchvision_draw_segmentation_masks():
    import torch
    from torchvision.utils import draw_segmentation_masks

    from pipeline.show.draw import draw_masks

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=gen)
    masks = torch.rand(7, 40, 50, generator=gen) > 0.7
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 0), (1, 2, 3), (90, 90, 90)]
    for alpha in (0.45, 0.8):
        assert torch.equal(draw_masks(image, masks, colors, alpha=alpha),
                           draw_segmentation_masks(image, masks, alpha=alpha, colors=colors))
