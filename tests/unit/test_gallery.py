"""``maskray show --results PREFIX``: the static gallery (pipeline.show.gallery), from hand-made results
prefixes over raw image files and over a maskray shards dataset. No model, no Ray."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import cli
from pipeline.show import gallery
from pipeline.data.format import Manifest, ShardWriter, make_row, write_manifest
from pipeline.results import RESULT_SCHEMA, result_files
from pipeline.instances import encode_masks

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]


def _png(width, height, seed=0):
    """PNG bytes: a dark picture with a bright rectangle (fast to encode even at 12 MP)."""
    pixels = np.full((height, width, 3), 30 + seed % 50, np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = 220
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _instance(category_id, score, height, width):
    """A results-schema instance: a box over the image's upper-left quarter, its exact mask."""
    mask = np.zeros((1, height, width), bool)
    y0, y1, x0, x1 = height // 4, height // 2, width // 4, width // 2
    mask[0, y0:y1, x0:x1] = True
    rle = encode_masks(mask)[0]
    return {"category_id": category_id, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].encode()}}


def _write_results(prefix: Path, files: dict[str, list[dict]], provenance: dict) -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        full = [{"model": "m", "error": None, "instances": [], **r} for r in rows]
        pq.write_table(pa.Table.from_pylist(full, schema=RESULT_SCHEMA), prefix / name)
    (prefix / "provenance.json").write_text(json.dumps(provenance))


def _counts(rows):
    """``category id -> instances`` over result rows."""
    counts = {}
    for r in rows:
        for i in r.get("instances") or []:
            counts[i["category_id"]] = counts.get(i["category_id"], 0) + 1
    return counts


def _page(out: Path):
    """``(html text, entries, category table {id: (name, instances)}, linked files)``."""
    text = (out / "index.html").read_text()
    entries = re.findall(r'<figure class="entry">(.*?)</figure>', text, flags=re.S)
    table = {int(cid): (name, int(n)) for cid, name, n in re.findall(
        r'<tr data-category="(-?\d+)"><td class="n">-?\d+</td><td>(.*?)</td><td class="n">(\d+)</td>', text)}
    links = re.findall(r'(?:src|href)="([^"]+)"', text)
    return text, entries, table, links


@pytest.fixture()
def raw_run(tmp_path):
    """A results prefix of a raw-files run: 5 small PNGs + one 4000x3000 photo, one image
    missing since, one error row; two results files."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"a.png": (64, 48), "b.png": (80, 60), "c.png": (64, 64), "big.png": (4000, 3000),
             "d.png": (50, 70), "gone.png": (64, 48)}
    rows = []
    for k, (name, (w, h)) in enumerate(sizes.items()):
        if name != "gone.png":
            (images / name).write_bytes(_png(w, h, k))
        instances = [_instance(3, 0.9 - 0.1 * k, h, w)] + ([_instance(7, 0.3, h, w)] if k % 2 else [])
        rows.append({"image_id": 100 + k, "file_name": str(images / name), "instances": instances})
    rows.append({"image_id": 200, "file_name": str(images / "broken.png"), "error": "decode failed: not a PNG"})
    results = tmp_path / "results"
    _write_results(results, {"files-0000000-0000004.parquet": rows[:4], "files-0000004-0000007.parquet": rows[4:]},
                   {"format": "maskray-results/2", "model": "sha256:abc",
                    "input": {"uri": str(images), "kind": "files", "files": 6},
                    "options": {"score_threshold": 0.05, "max_pixels": 50_000_000, "exif": True,
                                "intensity": "percentile", "category_ids": [3, 7]}})
    return results, rows


def test_gallery_of_raw_files_needs_no_model_and_no_data(raw_run, tmp_path, capsys):
    results, rows = raw_run
    out = tmp_path / "gallery"
    assert cli.module_main("show", ["--results", str(results), "--out", str(out), "--long-side", "320"]) == 0
    assert "showing 6 of 7 images" in capsys.readouterr().out
    text, entries, table, links = _page(out)
    assert "showing 6 of 7 images" in text  # the error row is not drawn, it is listed
    assert len(entries) == 6
    for link in links:  # relative links only, every one a file that exists
        assert "://" not in link and not link.startswith("/") and (out / link).is_file(), link
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 5 and len(list((out / "thumbs").iterdir())) == 5
    for path in overlays:  # drawn at --long-side, the 12-MP photo included; thumbnails small
        assert max(Image.open(path).size) == 320, path.name
        assert max(Image.open(out / "thumbs" / path.name).size) <= gallery.THUMB_SIDE
    assert Image.open(next(p for p in overlays if p.name.endswith("-103.jpg"))).size == (320, 240)
    # names from nowhere (files input, no categories recorded): the bare id
    assert table == {3: ("3", 6), 7: ("7", 3)} == {c: (str(c), n) for c, n in _counts(rows).items()}
    missing = [e for e in entries if "gone.png" in e]
    assert len(missing) == 1 and "image not found" in missing[0] and "<img" not in missing[0]
    errors = re.findall(r'<tr class="error-row"><td>(.*?)</td><td class="err">(.*?)</td>', text)
    assert errors == [(str(Path(rows[-1]["file_name"])), "decode failed: not a PNG")]
    assert "<script" not in text and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_overlay_draws_the_mask_where_the_results_put_it(raw_run, tmp_path):
    results, _ = raw_run
    out = tmp_path / "gallery"
    summary = gallery.build_gallery(str(results), str(out), limit=1, long_side=64, score_thresh=0.5)
    assert (summary.shown, summary.images, summary.errors, summary.missing) == (1, 7, 1, 0)
    drawn = np.asarray(Image.open(out / "overlays" / "00000-100.jpg").convert("RGB")).astype(int)
    plain = np.asarray(Image.open(io.BytesIO(_png(64, 48, 0))).convert("RGB")).astype(int)
    inside = np.abs(drawn - plain)[16:22, 20:28].sum(-1)  # inside the mask, away from the box edge
    outside = np.abs(drawn - plain)[36:46, 40:60].sum(-1)
    assert inside.mean() > 60 and outside.mean() < 20


def test_showing_n_of_m_when_the_results_outnumber_the_limit(raw_run, tmp_path):
    results, _ = raw_run
    out = tmp_path / "gallery"
    assert cli.module_main("show", ["--results", str(results), "--out", str(out), "--limit", "2",
                                    "--long-side", "64"]) == 0
    text, entries, table, _ = _page(out)
    assert "showing 2 of 7 images" in text and len(entries) == 2
    assert sum(n for _, n in table.values()) == 9  # counted over every row, not the sample


def test_data_overrides_where_the_images_are(raw_run, tmp_path):
    results, _ = raw_run
    moved = tmp_path / "moved"
    (tmp_path / "images").rename(moved)
    out = tmp_path / "gallery"
    summary = gallery.build_gallery(str(results), str(out), limit=3, long_side=64)
    assert summary.missing == 3  # moved away: marked, not a crash
    summary = gallery.build_gallery(str(results), str(tmp_path / "g2"), images_uri=str(moved), limit=3, long_side=64)
    assert summary.missing == 0


@pytest.fixture()
def shards_run(tmp_path):
    """A maskray shards dataset of 5 images (two shards) and a results prefix of a run on it."""
    data = str(tmp_path / "data")
    with ShardWriter(data, images_per_shard=3) as writer:
        for image_id in range(1, 6):
            writer.add(make_row(image_id=image_id, file_name=f"img{image_id}.png", width=64, height=48,
                                image=_png(64, 48, image_id)))
    write_manifest(data, Manifest(categories=CATEGORIES, shards=writer.shards, source="test"))
    rows = [{"image_id": i, "file_name": f"img{i}.png",
             "instances": [_instance(3, 0.8, 48, 64)] + [_instance(7, 0.6, 48, 64)] * (i % 3)} for i in range(1, 6)]
    rows.append({"image_id": 99, "file_name": "img99.png", "instances": [_instance(7, 0.7, 48, 64)]})  # not in data
    results = tmp_path / "results"
    provenance = {"format": "maskray-results/2", "model": "sha256:def",
                  "input": {"uri": data, "kind": "shards", "manifest_sha256": "x"},
                  "options": {"exif": True, "max_pixels": 50_000_000, "intensity": "percentile",
                              "category_ids": [3, 7]}}
    _write_results(results, {"part-00000.parquet": rows[:3], "part-00001.parquet": rows[3:]}, provenance)
    return results, rows, provenance


def test_gallery_of_a_shards_run_names_categories_from_the_manifest(shards_run, tmp_path):
    results, rows, _ = shards_run
    out = tmp_path / "gallery"
    assert cli.module_main("show", ["--results", str(results), "--out", str(out), "--long-side", "96"]) == 0
    text, entries, table, links = _page(out)
    assert "showing 6 of 6 images" in text and len(entries) == 6
    assert _counts(rows) == {3: 5, 7: 7} and table == {3: ("square", 5), 7: ("bar", 7)}
    assert all((out / link).is_file() for link in links)
    assert len(re.findall(r"<img ", text)) == 5
    assert "image not found: image_id 99" in [e for e in entries if "img99.png" in e][0]
    assert max(Image.open(out / "overlays" / "00000-1.jpg").size) == 96


def test_recorded_categories_come_before_the_manifest(shards_run, tmp_path):
    results, _, provenance = shards_run
    provenance["categories"] = [{"id": 7, "name": "stripe"}]
    (results / "provenance.json").write_text(json.dumps(provenance))
    _, _, table, _ = _page(Path(gallery.build_gallery(str(results), str(tmp_path / "g"), limit=1).page).parent)
    assert table == {3: ("square", 5), 7: ("stripe", 7)}


def test_counts_stream_over_many_rows_and_the_error_list_is_bounded(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.png").write_bytes(_png(32, 32))
    inst = [{"category_id": 3, "score": 0.97, "bbox": [0, 0, 4, 4], "segmentation": None},
            {"category_id": 7, "score": 0.12, "bbox": [0, 0, 4, 4], "segmentation": None}]
    files = {}
    for f in range(10):  # 10 files x 1,000 rows, every 10th row an error
        files[f"files-{f:07d}.parquet"] = [
            {"image_id": f * 1000 + i, "file_name": str(images / "one.png"), "instances": [] if i % 10 == 0 else inst,
             "error": "read failed: gone" if i % 10 == 0 else None} for i in range(1000)]
    results = tmp_path / "results"
    _write_results(results, files, {"input": {"uri": str(images), "kind": "files"}, "options": {}})
    stats, sample = gallery.scan_results(result_files(str(results)), score_thresh=0.5, limit=3)
    assert (stats.images, stats.errors, stats.instances) == (10_000, 1000, 18_000)
    assert stats.per_category == {3: [9000, 9000], 7: [9000, 0]}
    assert stats.histogram.sum() == 18_000 and stats.histogram[19] == 9000 and stats.histogram[2] == 9000
    assert len(stats.error_rows) == gallery.MAX_ERRORS_LISTED
    assert sample == [(str(results / "files-0000000.parquet"), [1, 2, 3])]
    summary = gallery.build_gallery(str(results), str(tmp_path / "g"), limit=3, long_side=32)
    text = (tmp_path / "g" / "index.html").read_text()
    assert summary.shown == 3 and "showing 3 of 10000 images" in text
    assert f"the first {gallery.MAX_ERRORS_LISTED} are listed" in text


def test_histogram_is_an_svg_plot():
    svg = gallery.histogram_svg([0, 3, 1] + [0] * 17, 0.5)
    assert svg.startswith("<svg") and svg.count("<rect") == 20 and ">3</text>" in svg


def test_errors_are_one_line_naming_what_is_at_fault(raw_run, tmp_path, capsys):
    results, _ = raw_run
    (results / "provenance.json").unlink()
    assert cli.module_main("show", ["--results", str(results), "--out", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err.strip()
    assert "provenance.json" in err and len(err.splitlines()) == 1
    (results / "files-0000004-0000007.parquet").write_bytes(b"junk")
    with pytest.raises(Exception, match="files-0000004-0000007.parquet"):
        gallery.build_gallery(str(results), str(tmp_path / "g"), images_uri=str(tmp_path / "images"))


def test_overlays_draw_stored_keypoints_and_skeletons(tmp_path):
    """A keypoint model's results: points scoring >= the visibility rule are drawn (joined by the
    category's skeleton from the provenance), a low-scoring one is not."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "p.png").write_bytes(_png(200, 100))
    points = [150.0, 75.0, 5.0, 170.0, 80.0, 5.0, 30.0, 80.0, 0.0]  # x, y, score: the third below the rule
    instance = {"category_id": 3, "score": 0.9, "bbox": [10.0, 60.0, 180.0, 35.0], "segmentation": None,
                "keypoints": points}
    results = tmp_path / "results"
    _write_results(results, {"files-0000000-0000001.parquet": [
        {"image_id": 1, "file_name": str(images / "p.png"), "instances": [instance]}]},
        {"format": "maskray-results/2", "model": "sha256:k", "input": {"uri": str(images), "kind": "files"},
         "categories": [{"id": 3, "name": "figure", "keypoints": ["a", "b", "c"], "skeleton": [[1, 2]]}],
         "options": {"category_ids": [3]}})
    out = tmp_path / "gallery"
    gallery.build_gallery(str(results), str(out), long_side=200, score_thresh=0.5)
    overlay = np.asarray(Image.open(next((out / "overlays").iterdir())).convert("RGB")).astype(int)
    background = overlay[90, 120]  # inside the box, away from every point and line

    def differs(x, y):
        return int(np.abs(overlay[y, x] - background).max())

    assert differs(150, 75) > 40 and differs(170, 80) > 40  # the visible points
    assert max(differs(160, y) for y in range(75, 81)) > 40  # the skeleton line between them
    assert differs(30, 80) < 15  # the low-scoring point is not drawn
