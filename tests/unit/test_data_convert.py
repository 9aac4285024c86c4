"""pipeline.data.convert: lossless COCO -> shards, every bad input, crash atomicity, pack."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs import cli
from pipeline import storage
from pipeline.data import convert
from pipeline.data import synth
from pipeline.data import format as fmt
from png_bombs import png_header_only



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    synth.synthesize(str(out), images=24, seed=1, size=64, crowd_fraction=0.3)
    return out


def _png(h=16, w=20, value=100) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode(seg) -> np.ndarray:
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"]})


def test_round_trip_is_lossless(shapes, tmp_path):
    out = str(tmp_path / "ds")
    report = convert.convert_coco(str(shapes / "annotations.json"), str(shapes / "images"), out,
                                  images_per_shard=10, row_group_size=4)
    coco = COCO(str(shapes / "annotations.json"))
    assert (report.images_written, report.images_skipped) == (24, 0)
    assert report.instances_written == len(coco.anns) and report.problems == []
    manifest = fmt.read_manifest(out)
    assert [s.images for s in manifest.shards] == [10, 10, 4]
    assert manifest.num_instances == len(coco.anns) and manifest.categories[0]["name"] == "circle"
    seen, kinds = 0, set()
    for row in fmt.read_rows(out):
        info = coco.imgs[row["image_id"]]
        assert row["file_name"] == info["file_name"] and (row["width"], row["height"]) == (64, 64)
        assert row["image"] == (shapes / "images" / info["file_name"]).read_bytes()
        assert [a["id"] for a in row["annotations"]] == coco.getAnnIds(imgIds=row["image_id"])
        for ann in row["annotations"]:
            src = coco.anns[ann["id"]]
            assert np.array_equal(_decode(ann["segmentation"]), coco.annToMask(src))
            assert ann["bbox"] == pytest.approx(src["bbox"]) and ann["area"] == src["area"]
            assert ann["iscrowd"] == bool(src["iscrowd"]) and ann["score"] is None
            assert ann["category_id"] == src["category_id"]
            kinds.add("crowd" if src["iscrowd"] else type(src["segmentation"]).__name__)
            seen += 1
    assert seen == len(coco.anns) and kinds == {"crowd", "list", "dict"}


def _bad_dataset(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "ok.png").write_bytes(_png())
    (images / "ok2.png").write_bytes(_png(value=50))
    (images / "corrupt.png").write_bytes(b"\x89PNG this is not really a png")
    (images / "empty.png").write_bytes(b"")
    (images / "wrongsize.png").write_bytes(_png(h=10, w=10))
    poly = [[2, 2, 12, 2, 12, 10, 2, 10]]
    coco = {
        "categories": [{"id": 5, "name": "thing"}, {"id": 9, "name": "other"}],
        "images": [
            {"id": 1, "file_name": "ok.png", "width": 20, "height": 16},
            {"id": 2, "file_name": "missing.png", "width": 20, "height": 16},
            {"id": 3, "file_name": "corrupt.png", "width": 20, "height": 16},
            {"id": 4, "file_name": "empty.png", "width": 20, "height": 16},
            {"id": 1, "file_name": "ok2.png", "width": 20, "height": 16},  # duplicate id
            {"id": 6, "width": 20, "height": 16},  # no file_name
            {"id": 7, "file_name": "wrongsize.png", "width": 20, "height": 16},
            {"id": 8, "file_name": "ok2.png"},  # no size: read from the file; no annotations
        ],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 101, "image_id": 99, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},
            {"id": 102, "image_id": 2, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},
            {"id": 103, "image_id": 1, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 0, 8]},
            {"id": 104, "image_id": 1, "category_id": 42, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},
            {"id": 105, "image_id": 1, "category_id": 5, "segmentation": [],
             "bbox": [2, 2, 10, 8]},
            {"id": 106, "image_id": 1, "category_id": 9, "segmentation": [[1, 1, 5, 5]],
             "bbox": [1, 1, 4, 4]},
            {"id": 100, "image_id": 1, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},  # duplicate id
            {"id": 107, "image_id": 3, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},
            {"id": 108, "image_id": 1, "category_id": 9,
             "segmentation": {"size": [16, 20], "counts": [320]}, "bbox": [0, 0, 1, 1],
             "iscrowd": 1},  # an RLE with no foreground pixel
            {"id": 109, "image_id": 1, "category_id": 9,
             "segmentation": {"size": [8, 8], "counts": [64]}, "bbox": [0, 0, 1, 1]},
            {"id": 110, "image_id": 7, "category_id": 5, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},
            {"image_id": 1, "category_id": 5},  # no id
            {"id": 111, "image_id": 1, "category_id": 9, "iscrowd": 1, "bbox": [0, 0, 20, 1],
             "segmentation": {"size": [16, 20], "counts": [0, 1, 15, 1, 303]}},
        ],
    }
    ann_path = tmp_path / "ann.json"
    ann_path.write_text(json.dumps(coco))
    return ann_path, images


def test_every_bad_input_is_reported_and_counts_add_up(tmp_path):
    ann_path, images = _bad_dataset(tmp_path)
    out = str(tmp_path / "out")
    report = convert.convert_coco(str(ann_path), str(images), out)
    text = [str(p) for p in report.problems]
    a, i = str(ann_path), str(images)

    def has(prefix, *words):
        hits = [t for t in text if t.startswith(prefix) and all(w in t for w in words)]
        assert hits, f"no problem starting {prefix!r} with {words} in {text}"

    has(f"{a}: image 1:", "duplicate image id")
    has(f"{a}: image images[5]:", "malformed image entry")
    has(f"{a}: annotation 101:", "image not in images", "99")
    has(f"{a}: annotation 103:", "degenerate box")
    has(f"{a}: annotation 104:", "unknown category", "42")
    has(f"{a}: annotation 105:", "empty segmentation")
    has(f"{a}: annotation 106:", "empty segmentation")  # polygon of 2 points
    has(f"{a}: annotation 100:", "duplicate annotation id")
    has(f"{a}: annotation 108:", "empty segmentation", "no pixels")
    has(f"{a}: annotation 109:", "size mismatch")
    has(f"{a}: annotation annotations[12]:", "malformed annotation")
    has(os.path.join(i, "missing.png") + ": image 2:", "missing image file", "1 annotation")
    has(os.path.join(i, "corrupt.png") + ": image 3:", "unreadable image", "1 annotation")
    has(os.path.join(i, "empty.png") + ": image 4:", "unreadable image", "0 bytes")
    has(os.path.join(i, "wrongsize.png") + ": image 7:", "size mismatch", "10x10")
    assert (report.images_in, report.images_written, report.images_skipped) == (8, 2, 6)
    assert (report.instances_in, report.instances_written, report.instances_skipped) == (14, 2, 12)
    rows = list(fmt.read_rows(out))
    assert [r["image_id"] for r in rows] == [1, 8]
    assert [a["id"] for a in rows[0]["annotations"]] == [100, 111]
    crowd = rows[0]["annotations"][1]
    assert crowd["iscrowd"] and _decode(crowd["segmentation"]).sum() == 2
    assert rows[1]["annotations"] == [] and (rows[1]["width"], rows[1]["height"]) == (20, 16)
    summary = report.summary()
    assert "images: 8 in, 2 written, 6 skipped" in summary
    assert "instances: 14 in, 2 written, 12 skipped" in summary
    manifest = fmt.read_manifest(out)
    assert manifest.extra["skipped_instances"]["image skipped"] == 3


def test_fatal_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,\n "oops" }')
    with pytest.raises(convert.ConvertError, match=rf"^{bad}: malformed JSON at line 2 column"):
        convert.convert_coco(str(bad), str(tmp_path), str(tmp_path / "o"))
    bad.write_text('{"images": []}')
    with pytest.raises(convert.ConvertError, match="missing or non-list 'categories'"):
        convert.convert_coco(str(bad), str(tmp_path), str(tmp_path / "o"))
    with pytest.raises(storage.StorageError, match=r"nope\.json: not found"):
        convert.convert_coco(str(tmp_path / "nope.json"), str(tmp_path), str(tmp_path / "o"))
    bad.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(convert.ConvertError, match="not UTF-8"):
        convert.convert_coco(str(bad), str(tmp_path), str(tmp_path / "o"))


def test_cli_convert_prints_counts(shapes, tmp_path, capsys):
    rc = cli.module_main("convert", ["--coco", str(shapes / "annotations.json"), "--images",
                                     str(shapes / "images"), "--out", str(tmp_path / "d"),
                                     "--images-per-shard", "100", "--runner", "local"])
    out = capsys.readouterr().out
    assert rc == 0 and "images: 24 in, 24 written, 0 skipped" in out and "shards: 1" in out
    rc = cli.module_main("convert", ["--coco", str(tmp_path / "x.json"), "--images", ".",
                                     "--out", str(tmp_path / "e"), "--runner", "local"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'x.json'}: not found" in err and len(err.splitlines()) == 1


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pipeline import storage
    from pipeline.data import convert
    real_replace, calls = os.replace, []
    def replace(src, dst):
        if os.path.basename(dst).startswith("part-"):
            calls.append(dst)
            if len(calls) == 3:  # the third shard is fully written to its temp file: die now
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    storage.os.replace = replace
    convert.convert_coco(sys.argv[1], sys.argv[2], sys.argv[3], images_per_shard=5)
""")


def test_killed_convert_leaves_nothing_readable_and_rerun_completes(shapes, tmp_path):
    out = tmp_path / "ds"
    args = [str(shapes / "annotations.json"), str(shapes / "images"), str(out)]
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *args], capture_output=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    names = sorted(os.listdir(out))
    # two complete shards, the third only as its temp file, no manifest; the run's state
    assert len(names) == 4 and names[0].startswith(".part-00002.parquet.")
    assert names[1:] == ["_ingest", "part-00000.parquet", "part-00001.parquet"]
    assert sorted(n for n in os.listdir(out / "_ingest") if n.startswith("done-")) == [
        "done-00000.json", "done-00001.json"]
    with pytest.raises(storage.StorageError, match="manifest.json: not found"):
        list(fmt.read_rows(str(out)))
    kept = (out / "part-00000.parquet").stat().st_ino
    report = convert.convert_coco(*args, images_per_shard=5)
    assert report.images_written == 24 and report.chunks_reused == 2  # resumed, not redone
    assert (out / "part-00000.parquet").stat().st_ino == kept
    assert sorted(os.listdir(out)) == ["_ingest", "manifest.json"] + [
        f"part-0000{k}.parquet" for k in range(5)]
    clean = tmp_path / "clean"
    convert.convert_coco(args[0], args[1], str(clean), images_per_shard=5)
    for k in range(5):
        name = f"part-0000{k}.parquet"
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert list(fmt.read_rows(str(out))) == list(fmt.read_rows(str(clean)))


def test_failed_convert_removes_old_manifest(shapes, tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    convert.convert_coco(str(shapes / "annotations.json"), str(shapes / "images"), out,
                         images_per_shard=4)  # another plan: the rerun below redoes every shard
    real = storage.write_bytes

    def failing(uri, data, **kw):
        if uri.endswith("part-00003.parquet"):
            raise storage.StorageError(f"{uri}: simulated failure")
        return real(uri, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", failing)
    with pytest.raises(storage.StorageError, match="simulated"):
        convert.convert_coco(str(shapes / "annotations.json"), str(shapes / "images"), out,
                             images_per_shard=5)
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_pack_folder(tmp_path, capsys):
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    (src / "b.png").write_bytes(_png(8, 9))
    gray = io.BytesIO()
    Image.fromarray(np.zeros((5, 7), np.uint8), "L").save(gray, format="JPEG")
    (src / "sub" / "a.JPG").write_bytes(gray.getvalue())
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = str(tmp_path / "packed")
    report = convert.pack_images(str(src), out, first_id=10, images_per_shard=1)
    text = [str(p) for p in report.problems]
    assert any(t.startswith(f"{src / 'notes.txt'}: image: not an image") for t in text)
    assert any(t.startswith(f"{src / 'broken.jpg'}: image 11: unreadable image") for t in text)
    assert (report.images_in, report.images_written, report.images_skipped) == (4, 2, 2)
    rows = list(fmt.read_rows(out))
    assert [(r["image_id"], r["file_name"], r["width"], r["height"]) for r in rows] == [
        (10, "b.png", 9, 8), (12, "sub/a.JPG", 7, 5)]
    assert all(r["annotations"] == [] for r in rows)
    assert rows[1]["image"] == (src / "sub" / "a.JPG").read_bytes()
    assert len(fmt.read_manifest(out).shards) == 2
    rc = cli.module_main("pack", ["--images", str(src), "--out", str(tmp_path / "p2"),
                                  "--runner", "local"])
    assert rc == 0 and "not an image: 1" in capsys.readouterr().out


def _coco(images, annotations=()):
    return {"categories": [{"id": 1, "name": "thing"}], "images": images,
            "annotations": list(annotations)}


def test_file_name_escapes_are_reported_and_skipped(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(_png())
    secret = tmp_path / "secret.png"  # outside the images root
    secret.write_bytes(_png(value=7))
    (root / "link.png").symlink_to(secret)
    poly = [[2, 2, 12, 2, 12, 10, 2, 10]]
    names = ["ok.png", "../secret.png", str(secret), "sub/../../secret.png", "link.png",
             "file://" + str(secret)]
    coco = _coco([{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
                 [{"id": 10 + i, "image_id": i + 1, "category_id": 1, "segmentation": poly,
                   "bbox": [2, 2, 10, 8]} for i in range(len(names))])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    report = convert.convert_coco(str(tmp_path / "a.json"), str(root), str(tmp_path / "out"))
    assert (report.images_in, report.images_written, report.images_skipped) == (6, 1, 5)
    assert report.image_skip_reasons["file_name outside the images root"] == 5
    assert (report.instances_written, report.instances_skipped) == (1, 5)
    text = "\n".join(str(p) for p in report.problems)
    for iid in (2, 3, 4, 5, 6):
        assert f"image {iid}: file_name outside the images root" in text
    rows = list(fmt.read_rows(str(tmp_path / "out")))
    assert [r["file_name"] for r in rows] == ["ok.png"]
    assert all(r["image"] != secret.read_bytes() for r in rows)


def test_pixel_bomb_is_refused_from_the_header_in_convert_and_pack(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "bomb.png").write_bytes(png_header_only(30_000, 30_000))
    (root / "ok.png").write_bytes(_png())
    from PIL import ImageFile
    real_load = ImageFile.ImageFile.load

    def guarded_load(self):
        assert self.size[0] * self.size[1] < 1_000_000, "decoded a bomb"
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    coco = _coco([{"id": 1, "file_name": "bomb.png"}, {"id": 2, "file_name": "ok.png"}])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    report = convert.convert_coco(str(tmp_path / "a.json"), str(root), str(tmp_path / "c"))
    assert (report.images_written, report.image_skip_reasons["over the pixel limit"]) == (1, 1)
    assert "30000x30000 = 900.0 MP, over the 50 MP limit" in str(report.problems[0])
    report = convert.pack_images(str(root), str(tmp_path / "p"))
    assert (report.images_written, report.image_skip_reasons["over the pixel limit"]) == (1, 1)


def test_boxes_and_areas_that_overflow_float32_are_rejected(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "ok.png").write_bytes(_png())
    poly = [[2, 2, 12, 2, 12, 10, 2, 10]]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": poly,
             "bbox": [2, 2, 10, 8]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": poly,
             "bbox": [2, 2, 3.5e38, 8]},  # math.isfinite passes; float32 would hold inf
            {"id": 3, "image_id": 1, "category_id": 1, "segmentation": poly,
             "bbox": [2, 2, 10, 8], "area": 1e39}]
    (tmp_path / "a.json").write_text(json.dumps(_coco([{"id": 1, "file_name": "ok.png"}], anns)))
    report = convert.convert_coco(str(tmp_path / "a.json"), str(root), str(tmp_path / "out"))
    assert (report.instances_in, report.instances_written, report.instances_skipped) == (3, 1, 2)
    assert report.instance_skip_reasons == {"malformed bbox": 1, "malformed area": 1}
    row = next(fmt.read_rows(str(tmp_path / "out")))
    assert [a["id"] for a in row["annotations"]] == [1]
    assert all(np.isfinite(v) for v in row["annotations"][0]["bbox"])


def test_access_denied_object_is_reported_and_counted_not_fatal(tmp_path, monkeypatch):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(6):
        (src / f"img-{i}.png").write_bytes(_png(value=i))
    real = storage.read_bytes

    def denied(uri):
        if uri.endswith("img-3.png"):
            raise storage.StorageError(f"{uri}: access denied (check AWS_ACCESS_KEY_ID/"
                                       f"AWS_SECRET_ACCESS_KEY)")
        return real(uri)
    monkeypatch.setattr(storage, "read_bytes", denied)
    report = convert.pack_images(str(src), str(tmp_path / "out"), images_per_shard=2)
    assert (report.images_in, report.images_written, report.images_skipped) == (6, 5, 1)
    assert report.image_skip_reasons == {"access denied": 1}
    assert str(report.problems[0]).startswith(f"{src / 'img-3.png'}: image 4: access denied")
    assert [r["image_id"] for r in fmt.read_rows(str(tmp_path / "out"))] == [1, 2, 3, 5, 6]


def test_shards_and_manifest_are_readable_by_others(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_umask", 0o022)
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    out = tmp_path / "out"
    convert.pack_images(str(src), str(out))
    for name in ("part-00000.parquet", "manifest.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644


def test_rerun_with_other_options_starts_afresh_and_done_run_is_reused(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.png").write_bytes(_png(value=i))
    out = str(tmp_path / "out")
    first = convert.pack_images(str(src), out, images_per_shard=2)
    assert len(first.shards) == 3 and first.chunks_reused == 0
    again = convert.pack_images(str(src), out, images_per_shard=2)
    assert again.chunks_reused == 3 and again.images_written == 5
    other = convert.pack_images(str(src), out, images_per_shard=4)
    assert other.chunks_reused == 0 and [s.images for s in other.shards] == [4, 1]
    assert [r["image_id"] for r in fmt.read_rows(out)] == [1, 2, 3, 4, 5]


def test_driver_keeps_a_bounded_problem_list_and_the_records_keep_all(tmp_path, monkeypatch):
    from pipeline.data import ingest

    monkeypatch.setattr(ingest, "MAX_REPORT_PROBLEMS", 50)
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(120):
        (src / f"note-{i:03d}.txt").write_text("x")
    (src / "a.png").write_bytes(_png())
    out = tmp_path / "out"
    report = convert.pack_images(str(src), str(out))
    assert (report.images_in, report.images_written, report.images_skipped) == (121, 1, 120)
    assert len(report.problems) == 50 and report.problems_total == 120
    assert "... and 100 more problems (all in" in report.summary(max_problems=20)
    everything = json.loads((out / "_ingest" / "plan-problems.json").read_text())
    assert len(everything) == 120 and everything[-1]["source"].endswith("note-119.txt")
