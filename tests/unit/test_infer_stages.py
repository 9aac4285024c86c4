"""pipeline.infer stages and driver without Ray: read/decode units (row ranges, bad images, EXIF),
post-process + atomic write (and the --retry-errors merge), planning, provenance refusals,
resume without Ray, streamed COCO JSON, storage retries and the job's arguments."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from model.errors import MaskrayError
from pipeline.data import format as fmt
from pipeline import results
from pipeline.infer import driver, stages
from pipeline.infer.config import InferConfig
from pipeline.infer.predictor import Predictor, read_model_config

CATEGORIES = [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig.for_categories(
        CATEGORIES, backbone="resnet18", min_size=64, max_size=96, box_detections_per_img=5,
        options={"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30})
    model = build_from_config(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "a.pt"
    save_checkpoint(str(path), model, config)
    return model, config, str(path)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root, rows_per_shard: list[list[bytes]], row_group_size: int = 3) -> str:
    root.mkdir(parents=True, exist_ok=True)
    infos, next_id = [], 1
    for index, datas in enumerate(rows_per_shard):
        path = fmt.SHARD_PATTERN.format(index=index)
        rows = [fmt.make_row(image_id=next_id + i, file_name=f"{next_id + i}.png", width=1, height=1, image=d)
                for i, d in enumerate(datas)]
        next_id += len(datas)
        pq.write_table(fmt.rows_to_table(rows), str(root / path), row_group_size=row_group_size)
        infos.append(fmt.ShardInfo(path=path, images=len(datas), instances=0, bytes=(root / path).stat().st_size))
    fmt.write_manifest(str(root), fmt.Manifest(categories=CATEGORIES, shards=infos))
    return str(root)


def test_read_units_takes_exact_row_ranges_and_makes_bad_images_error_rows(tmp_path):
    rng = np.random.default_rng(0)
    good = png(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8))
    datas = [good, good[: len(good) // 2], b"", b"not an image",
             png(rng.integers(0, 65535, (30, 50), dtype=np.uint16)),
             png(rng.integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA"), png(np.zeros((100, 100, 3), np.uint8)),
             good]
    data = write_dataset(tmp_path / "d", [datas])
    units, identity = driver.plan(data, images_per_unit=3)
    assert [u.unit for u in units] == ["part-00000.rows-0000000-0000003.parquet",
                                       "part-00000.rows-0000003-0000006.parquet",
                                       "part-00000.rows-0000006-0000008.parquet"]
    assert identity["kind"] == "shards" and len(identity["manifest_sha256"]) == 64
    out = stages.read_units(pa.Table.from_pylist([u.row() for u in units]), max_pixels=5_000)
    assert out.num_rows == 3
    ids = [i for row in out.column("image_ids").to_pylist() for i in row]
    assert ids == list(range(1, 9))
    errors = [e for row in out.column("errors").to_pylist() for e in row]
    assert [e is not None for e in errors] == [False, True, True, True, False, False, True, False]
    assert all(e.startswith("decode failed:") for e in errors if e)
    assert "MP" in errors[6] and not stages.is_transient(errors[6])
    h, w = out.column("heights")[0].as_py()[0], out.column("widths")[0].as_py()[0]
    pix = out.column("pixels")[0].as_py()[0]
    assert (h, w) == (40, 72) and len(pix) == 3 * 40 * 72  # uint8 at the original size, never float32
    assert stages.pixel_bytes(out) == 3 * 40 * 72 * 2 + 3 * 30 * 50 * 2

    retry = pa.Table.from_pylist([driver.dataclasses.replace(units[2], only=(1,)).row()])
    part = stages.read_units(retry, max_pixels=None)
    assert part.column("positions").to_pylist() == [[1]] and part.column("image_ids").to_pylist() == [[8]]
    assert part.column("merge").to_pylist() == [True]

    wrong = [dict(units[0].row(), total=9)]
    with pytest.raises(MaskrayError, match="has 8 rows but the manifest says 9"):
        stages.read_units(pa.Table.from_pylist(wrong), max_pixels=None)


def test_read_groups_bundle_small_units_and_ship_large_ones_alone(tmp_path, monkeypatch):
    """A read task's units travel in groups of >= GROUP_BYTES of pixels (the last may hold less);
    a unit of that size is a group alone; ungroup gives back exactly read_units' rows."""
    rng = np.random.default_rng(1)
    small = png(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))  # 1,800 bytes of pixels
    large = png(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))  # 10,800 bytes
    data = write_dataset(tmp_path / "d", [[small] * 2, [small] * 2, [large], [small] * 2, [small]])
    units, _ = driver.plan(data, images_per_unit=64)
    rows = pa.Table.from_pylist([u.row() for u in units])
    calls = []
    real = stages.read_units
    monkeypatch.setattr(stages, "read_units", lambda batch, **kw: calls.append(batch.num_rows) or real(batch, **kw))

    groups = list(stages.read_groups(rows, max_pixels=None, group_bytes=6_000))

    assert calls == [1] * 5  # one unit decoded at a time
    assert [g.num_rows for g in groups] == [1, 1, 1]  # each group is ONE row (one Ray Data block)
    per_group = [g.column("unit")[0].as_py() for g in groups]
    # 2 x 3,600 bytes >= 6,000 -> a group; the 10,800-byte unit alone; the last two units (5,400) last
    assert per_group == [[units[0].unit, units[1].unit], [units[2].unit], [units[3].unit, units[4].unit]]
    assert pa.concat_tables(stages.ungroup(g) for g in groups).equals(real(rows, max_pixels=None))
    assert stages.ungroup(groups[1]).column("pixels")[0].as_py()[0] == real(rows.slice(2, 1), max_pixels=None).column(
        "pixels")[0].as_py()[0]


def test_segment_and_write_commits_and_reports_each_unit_of_a_group_in_turn(tiny, tmp_path):
    """The model stage yields a unit's metadata row right after writing its file (the driver
    hears of every commit, not of every group), and writes nothing ahead."""
    model, config, _ = tiny
    rng = np.random.default_rng(2)
    data = write_dataset(tmp_path / "d", [[png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))] * n
                                          for n in (2, 1, 3)])
    units, _ = driver.plan(data, images_per_unit=64)
    (g,) = list(stages.read_groups(pa.Table.from_pylist([u.row() for u in units]), max_pixels=None))
    out = tmp_path / "out"
    actor = stages.SegmentAndWrite(output_uri=str(out), category_ids=config.category_ids(), model=model,
                                   config=config, model_id="m#sha256:1", score_threshold=1.0)
    seen = []
    for meta in actor(g):
        seen.append(meta.to_pylist())
        assert sorted(p.name for p in out.iterdir()) == sorted(u.unit for u in units[:len(seen)])
    assert [[(r["unit"], r["images"]) for r in m] for m in seen] == [[(u.unit, u.images)] for u in units]
    assert [pq.read_table(out / u.unit).num_rows for u in units] == [2, 1, 3]


def test_segment_and_write_runs_the_next_unit_while_the_last_is_written(tiny, tmp_path, monkeypatch):
    """Write-behind: unit k+1 goes through the model while unit k's file is written (a slow
    storage call never idles the model), and each metadata row still comes after its file."""
    import threading

    model, config, _ = tiny
    rng = np.random.default_rng(3)
    data = write_dataset(tmp_path / "d", [[png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))] for _ in range(3)])
    units, _ = driver.plan(data, images_per_unit=64)
    (g,) = list(stages.read_groups(pa.Table.from_pylist([u.row() for u in units]), max_pixels=None))
    events = []
    real_write = stages.write_units

    def slow_write(batch, **kw):
        events.append(("write start", batch[0]["unit"], threading.current_thread().name))
        time.sleep(0.3)  # a slow PUT
        out = real_write(batch, **kw)
        events.append(("write end", batch[0]["unit"], threading.current_thread().name))
        return out

    monkeypatch.setattr(stages, "write_units", slow_write)
    actor = stages.SegmentAndWrite(output_uri=str(tmp_path / "out"), category_ids=config.category_ids(), model=model,
                                   config=config, model_id="m#sha256:1", score_threshold=1.0)
    real_run = actor.predictor.run_units
    actor.predictor.run_units = lambda table: events.append(("model", table.column("unit")[0].as_py(), "")) or \
        real_run(table)
    metas = [m.column("unit")[0].as_py() for m in actor(g)]
    assert metas == [u.unit for u in units]
    order = [(kind, unit) for kind, unit, _ in events]
    for k in range(len(units) - 1):  # the model starts unit k+1 before unit k's write ends
        assert order.index(("model", units[k + 1].unit)) < order.index(("write end", units[k].unit))
    assert {name for kind, _, name in events if kind.startswith("write")} != {threading.current_thread().name}


def test_units_per_task_leaves_work_for_every_actor():
    assert driver.units_per_task(100) == 40 and driver.units_per_task(1) == driver.MAX_UNITS_PER_TASK
    assert driver.units_per_task(100, units=200, actors=1) == 40  # enough units: ~4,096 images a task
    assert driver.units_per_task(100, units=200, actors=4) == 10  # still 5 tasks per actor
    # more groups per actor than it holds queued: the first actor up never takes them all
    assert driver.TASKS_PER_ACTOR > driver.GROUPS_IN_FLIGHT_PER_ACTOR
    assert driver.units_per_task(64, units=8, actors=2) == 1  # 8 groups, 4 in flight per actor
    assert driver.units_per_task(64, units=40, actors=2) == 4
    assert driver.units_per_task(8, units=1, actors=4) == 1


def test_exif_orientation_6_is_applied_by_default(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    viewed = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert viewed.shape == (50, 30, 3)  # orientation 6: the viewer rotates 90 degrees clockwise
    got = stages.decode(data, max_pixels=None)
    assert tuple(got.shape) == (3, 50, 30)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), viewed)
    raw = stages.decode(data, max_pixels=None, exif=False)
    assert tuple(raw.shape) == (3, 30, 50)
    # Every orientation matches PIL's exif_transpose.
    base = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    pil = Image.fromarray(base.transpose(1, 2, 0)[..., 0])
    for o in range(1, 9):
        e = Image.Exif()
        e[0x0112] = o
        pil.info["exif"] = e.tobytes()
        pil_exif = pil.copy()
        pil_exif.getexif()[0x0112] = o
        want = np.asarray(ImageOps.exif_transpose(pil_exif))
        got_o = stages.apply_orientation(base, o)
        assert got_o.flags.c_contiguous and np.array_equal(got_o[0], want), o


def test_a_png_is_decoded_once_with_exif_on(monkeypatch):
    """Pillow looks for a PNG's eXIf chunk after the pixels by loading the whole image when the
    chunk is not before them (most PNGs have none): the orientation is read from the decoded
    image, so a PNG (a 12-MP one costs ~0.5 s to decode) is decoded once, not twice."""
    from PIL import ImageFile

    array = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    plain = io.BytesIO()
    Image.fromarray(array).save(plain, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = io.BytesIO()
    Image.fromarray(array).save(tagged, format="PNG", exif=exif.tobytes())
    decodes = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # a load that still has pixels to decode
            decodes.append(self.format)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    got = stages.decode_pixels(plain.getvalue(), max_pixels=None)
    assert np.array_equal(got.transpose(1, 2, 0), array)
    assert decodes == ["PNG"]
    rotated = stages.decode_pixels(tagged.getvalue(), max_pixels=None)
    assert np.array_equal(rotated.transpose(1, 2, 0), np.rot90(array, -1))  # orientation 6
    assert decodes == ["PNG", "PNG"]


def test_the_read_stage_imports_no_torch():
    """The read tasks' processes stay torch-free (a cold torch + torchvision import is ~5 s here)."""
    import subprocess
    import sys

    probe = ("import sys; import pipeline.infer.stages; "
             "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def model_rows(tiny, datas: list[bytes], unit: str = "u.parquet") -> pa.Table:
    """The model stage's output for one unit of ``datas`` (what write_units receives)."""
    model, config, _ = tiny
    decoded = [stages.decode(d, max_pixels=None) for d in datas]
    table = pa.table({
        "unit": [unit], "positions": pa.array([list(range(len(datas)))], pa.list_(pa.int64())),
        "image_ids": pa.array([[10 + i for i in range(len(datas))]], pa.list_(pa.int64())),
        "file_names": pa.array([[f"{i}.png" for i in range(len(datas))]], pa.list_(pa.string())),
        "heights": pa.array([[int(x.shape[1]) for x in decoded]], pa.list_(pa.int32())),
        "widths": pa.array([[int(x.shape[2]) for x in decoded]], pa.list_(pa.int32())),
        "pixels": pa.array([[x.numpy().tobytes() for x in decoded]], pa.list_(pa.large_binary())),
        "errors": pa.array([[None] * len(datas)], pa.list_(pa.string())), "merge": [False]})
    return Predictor(model=model, config=config, model_id="ckpt#sha256:abc")(table)


def test_write_units_commits_one_atomic_file_and_merges_retried_rows(tiny, tmp_path):
    from pycocotools.coco import COCO

    rng = np.random.default_rng(2)
    datas = [png(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(3)]
    rows = model_rows(tiny, datas)
    errors = rows.column("errors")[0].as_py()
    errors[1] = "inference failed: RuntimeError: out of memory"  # as the actor stage writes it
    rows = rows.set_column(rows.column_names.index("errors"), "errors", pa.array([errors], pa.list_(pa.string())))
    out = str(tmp_path / "out")
    meta = stages.write_units(rows, output_uri=out, category_ids=[3, 9])
    assert meta.to_pylist()[0]["images"] == 3 and meta.to_pylist()[0]["errors"] == 1
    assert meta.to_pylist()[0]["transient"] == 1
    table = pq.read_table(f"{out}/u.parquet")
    assert table.schema.equals(results.RESULT_SCHEMA)
    assert table.column("image_id").to_pylist() == [10, 11, 12]
    assert set(table.column("model").to_pylist()) == {"ckpt#sha256:abc"}
    assert driver.transient_positions(f"{out}/u.parquet") == [1]
    before = table.column("instances").to_pylist()
    assert len(before[0]) > 0 and before[1] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["u.parquet"]  # no temporary left

    # --retry-errors: only position 1 is recomputed and merged into the file.
    retry = model_rows(tiny, [datas[1]])
    retry = retry.set_column(retry.column_names.index("positions"), "positions", pa.array([[1]], pa.list_(pa.int64())))
    retry = retry.set_column(retry.column_names.index("image_ids"), "image_ids", pa.array([[11]], pa.list_(pa.int64())))
    retry = retry.set_column(retry.column_names.index("merge"), "merge", pa.array([True]))
    stages.write_units(retry, output_uri=out, category_ids=[3, 9])
    merged = pq.read_table(f"{out}/u.parquet")
    assert merged.column("image_id").to_pylist() == [10, 11, 12]
    assert merged.column("error").to_pylist() == [None, None, None]
    after = merged.column("instances").to_pylist()
    assert after[0] == before[0] and after[2] == before[2] and len(after[1]) > 0

    json_path = str(tmp_path / "j" / "coco.json")
    n = results.write_coco_json(out, ["u.parquet"], json_path)
    assert n == sum(len(x) for x in after) > 0
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 60, "height": 40} for i in (10, 11, 12)], "annotations": [],
                  "categories": CATEGORIES}
    gt.createIndex()
    assert len(gt.loadRes(json_path).getAnnIds()) == n
    assert len(json.load(open(json_path))) == n


def test_rerun_refuses_other_model_options_or_input_unless_overwrite(tiny, tmp_path, monkeypatch):
    import ray

    model, config, ckpt = tiny
    data = write_dataset(tmp_path / "d", [[], []])  # two empty shards: no Ray needed
    out = str(tmp_path / "out")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))
    first = driver.run_inference(InferConfig(input=data, output=out, checkpoint=ckpt, score_threshold=0.3))
    assert (first.units_done, first.units_skipped) == (2, 0)
    again = driver.run_inference(InferConfig(input=data, output=out, checkpoint=ckpt, score_threshold=0.3))
    assert (again.units_done, again.units_skipped) == (0, 2)
    with pytest.raises(MaskrayError, match=r"was made with other settings: options\.score_threshold \(0\.3 -> 0\.5\); pass --overwrite"):
        driver.run_inference(InferConfig(input=data, output=out, checkpoint=ckpt, score_threshold=0.5))
    other = tmp_path / "b.pt"
    torch.manual_seed(1)
    save_checkpoint(str(other), build_from_config(config), config)
    with pytest.raises(MaskrayError, match=r"other settings: model \('sha256:.*--overwrite"):
        driver.run_inference(InferConfig(input=data, output=out, checkpoint=str(other), score_threshold=0.3))
    data2 = write_dataset(tmp_path / "d2", [[], [], []])
    with pytest.raises(MaskrayError, match=r"input"):
        driver.run_inference(InferConfig(input=data2, output=out, checkpoint=ckpt, score_threshold=0.3))
    redo = driver.run_inference(InferConfig(input=data, output=out, checkpoint=str(other), score_threshold=0.3,
                                            overwrite=True))
    assert (redo.units_done, redo.units_skipped) == (2, 0)
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["model"] == driver.model_digest(read_model_config(str(other))[1])
    assert record["model_source"] == {"uri": str(other), "format": "maskray-checkpoint/1",
                                      "sha256": hashlib.sha256(other.read_bytes()).hexdigest()}
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(MaskrayError, match="no provenance.json"):
        driver.run_inference(InferConfig(input=data, output=str(tmp_path / "stray"), checkpoint=ckpt))


def test_raw_prefix_plan_is_keyed_by_path(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "sub/c.JPG", "notes.txt"):
        (root / name).write_bytes(b"x")
    units, identity = driver.plan(str(root), images_per_unit=2)
    assert [u.unit for u in units] == ["files-0000000-0000002.parquet", "files-0000002-0000003.parquet"]
    assert [p.rsplit("/", 1)[-1] for u in units for p in u.paths] == ["a.png", "b.jpg", "c.JPG"]
    assert identity["files"] == 3
    assert stages.stable_image_id("sub/c.JPG") == stages.stable_image_id("sub/c.JPG") < 2 ** 63
    (root / "d.jpg").write_bytes(b"y")
    assert driver.plan(str(root), 2)[1]["listing_sha256"] != identity["listing_sha256"]
    with pytest.raises(MaskrayError, match="no manifest.json and no image files"):
        driver.plan(str(tmp_path / "empty"), 2)


def test_units_are_bounded_by_images_and_by_encoded_bytes(tmp_path):
    """A unit holds at most images_per_unit images and about unit_bytes of encoded images: a shard
    by its mean bytes per image (its manifest entry), files by their own sizes; a file larger than
    the bound is a unit alone; no bound (0) plans by image count alone, as before the bound."""
    assert driver.shard_unit_images(100, 1_200_000, 128, 16 * 2**20) == 128  # 64-px PNGs: whole shards
    assert driver.shard_unit_images(100, 400_000_000, 128, 16 * 2**20) == 4  # 12-MP JPEGs of 4 MB
    assert driver.shard_unit_images(10, 10**10, 128, 16 * 2**20) == 1
    assert driver.shard_unit_images(100, 0, 128, 16 * 2**20) == 128  # bytes not recorded
    assert driver.shard_unit_images(100, 400_000_000, 128, 0) == 128
    assert driver.file_groups([5, 5, 5, 20, 1, 1, 1], 3, 12) == [(0, 2), (2, 3), (3, 4), (4, 7)]
    assert driver.file_groups([5] * 7, 3, 0) == [(0, 3), (3, 6), (6, 7)]
    assert driver.file_groups([], 3, 10) == []

    rng = np.random.default_rng(3)
    big = [png(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)) for _ in range(6)]  # ~19 KB each
    data = write_dataset(tmp_path / "d", [big])
    shard_bytes = (tmp_path / "d" / "part-00000.parquet").stat().st_size
    units, _ = driver.plan(data, images_per_unit=128, unit_bytes=-(-shard_bytes // 3))
    assert [(u.start, u.stop) for u in units] == [(0, 2), (2, 4), (4, 6)]
    assert [u.unit for u in driver.plan(data, 128, 0)[0]] == ["part-00000.parquet"]

    root = tmp_path / "photos"
    root.mkdir()
    for k, size in enumerate([3000, 3000, 9000, 100, 100]):
        (root / f"{k}.jpg").write_bytes(b"x" * size)
    units, _ = driver.plan(str(root), images_per_unit=128, unit_bytes=6000)
    assert [u.unit for u in units] == ["files-0000000-0000002.parquet", "files-0000002-0000003.parquet",
                                       "files-0000003-0000005.parquet"]
    assert [len(u.paths) for u in units] == [2, 1, 2]


def test_storage_retries_back_off_on_transient_errors_only():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject: 503 Please reduce your request rate")
        return "ok"

    assert stages.with_retries(flaky, "reading x", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0]

    def missing():
        calls.append(1)
        raise OSError("s3://b/k: not found")

    calls.clear()
    with pytest.raises(OSError):
        stages.with_retries(missing, "reading y", sleep=sleeps.append)
    assert len(calls) == 1

    def always():
        raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        stages.with_retries(always, "z", attempts=3, sleep=lambda s: None)


def test_job_arguments():
    from jobs import cli, infer
    from pipeline.config import ConfigError

    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--actors", "1,3"])
    config = cli.config_from_args(InferConfig, args)
    assert config.actor_range == (1, 3) and config.batch_size == 4 and config.gpus_per_actor is None
    assert config.threads is None and config.exif and not config.overwrite and not config.retry_errors
    assert config.images_per_unit == 128 and config.unit_bytes == 16 * 2**20 and config.amp == "auto"
    assert cli.config_from_args(InferConfig, parser.parse_args(
        ["--checkpoint", "c", "--input", "i", "--output", "o", "--no-exif", "--set", "amp=on"])).autocast is True
    for flags, key in ((["--actors", "0"], "actors"), (["--actors", "3,1"], "actors"), (["--actors", "x"], "actors"),
                       (["--batch-size", "0"], "batch_size"), (["--threads", "-1"], "threads"),
                       (["--images-per-unit", "0"], "images_per_unit"), (["--unit-bytes", "-1"], "unit_bytes"),
                       (["--set", "amp=maybe"], "amp"),
                       (["--score-threshold", "2"], "score_threshold")):
        bad = parser.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", *flags])
        with pytest.raises(ConfigError, match=rf"^the command line: {key}: "):
            infer.run(bad)
    with pytest.raises(ConfigError, match=r"input: required \(--input URI\)"):
        infer.run(parser.parse_args(["--checkpoint", "c", "--output", "o"]))


def test_cpu_actor_threads_share_the_cluster_cores():
    assert driver.cpu_actor_threads([2.0], 1) == 2
    assert driver.cpu_actor_threads([2.0], 2) == 1
    assert driver.cpu_actor_threads([2.0], 3) == 1
    assert driver.cpu_actor_threads([16.0, 16.0], 4) == 8
    assert driver.cpu_actor_threads([16.0, 4.0], 1) == 16
    assert driver.cpu_actor_threads([0.0], 1) == 1
    with pytest.raises(MaskrayError, match="actors"):
        driver.cpu_actor_threads([2.0], 0)


def test_intensity_mode_reaches_the_decoder_and_the_provenance(tiny, tmp_path, monkeypatch):
    import ray

    rng = np.random.default_rng(3)
    low = png((rng.integers(0, 236, (20, 30)) ).astype(np.uint16))  # a dim 16-bit image
    by_dtype = stages.decode(low, max_pixels=None, intensity="dtype")
    stretched = stages.decode(low, max_pixels=None, intensity="minmax")
    assert int(by_dtype.max()) <= 1 and int(stretched.max()) == 255
    _, _, ckpt = tiny
    data = write_dataset(tmp_path / "d", [[]])
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))
    driver.run_inference(InferConfig(input=data, output=str(tmp_path / "o"), checkpoint=ckpt, intensity="minmax"))
    assert json.loads((tmp_path / "o" / "provenance.json").read_text())["options"]["intensity"] == "minmax"
    with pytest.raises(MaskrayError, match="intensity"):
        driver.run_inference(InferConfig(input=data, output=str(tmp_path / "o"), checkpoint=ckpt,
                                         intensity="dtype"))
    with pytest.raises(MaskrayError, match="not one of"):
        driver.run_inference(InferConfig(input=data, output=str(tmp_path / "o2"), checkpoint=ckpt,
                                         intensity="gamma"))
