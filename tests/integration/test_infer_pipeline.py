"""``run_inference`` end to end on local Ray: SeaweedFS S3 round trip with COCO JSON and bad
images, a raw-image prefix on S3, 12-MP photos within the memory target, an actor killed mid-run,
a model stage that always crashes, an interrupted run resumed without recomputation, a rerun
with another checkpoint refused then accepted with --overwrite, and --retry-errors.

The model is a random-init resnet18 Mask R-CNN at 64 px with few proposals (CPU, seconds).
Runs that only check row accounting use ``score_threshold=1.0``: every image then has no
detections, which exercises the "no detections" path (empty predictions through pickling, mask
pasting, RLE and Arrow empty lists) exactly as a model that finds nothing would.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from pipeline.data import format as fmt
from pipeline import storage
from pipeline.infer import driver
from pipeline.infer.config import InferConfig
from pipeline.infer.driver import run_inference
from pipeline.infer.predictor import Predictor, read_model_config
from pipeline.results import RESULT_SCHEMA, unit_names
from pipeline.data.synth import categories_for, make_image

SIZE = 64
CATEGORIES = categories_for(3)


def tiny_checkpoint(uri: str, seed: int = 0, detections: int = 5) -> None:
    torch.manual_seed(seed)
    config = ModelConfig.for_categories(
        CATEGORIES, backbone="resnet18", min_size=SIZE, max_size=SIZE, box_detections_per_img=detections,
        options={"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50})
    buf = io.BytesIO()
    save_checkpoint(buf, build_from_config(config), config)
    storage.write_bytes(uri, buf.getvalue())


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(uri: str, shards: list[list[tuple[str, bytes]]], first_id: int = 1) -> dict[int, str]:
    """Shards of (file_name, bytes) rows + manifest; returns image_id -> file_name."""
    infos, names = [], {}
    image_id = first_id
    for index, images in enumerate(shards):
        rows = []
        for name, data in images:
            rows.append(fmt.make_row(image_id=image_id, file_name=name, width=SIZE, height=SIZE, image=data))
            names[image_id] = name
            image_id += 1
        path = fmt.SHARD_PATTERN.format(index=index)
        sink = io.BytesIO()
        pq.write_table(fmt.rows_to_table(rows), sink, row_group_size=3)
        storage.write_bytes(storage.join(uri, path), sink.getvalue())
        infos.append(fmt.ShardInfo(path=path, images=len(rows), instances=0))
    fmt.write_manifest(uri, fmt.Manifest(categories=CATEGORIES, shards=infos, source="test"))
    return names


def good_images(count: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"img{start + i:03d}.png", make_image(7, start + i, SIZE, CATEGORIES)[0]) for i in range(count)]


def huge_png() -> bytes:
    """A 10,000 x 10,000 grayscale PNG (a constant image compresses to ~100 kB)."""
    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000), 128).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def bad_images() -> tuple[list[tuple[str, bytes]], set[str]]:
    """The robustness set; returns the rows and the names that must be error rows."""
    good = make_image(7, 99, SIZE, CATEGORIES)[0]
    rng = np.random.default_rng(0)
    rows = [
        ("truncated.png", good[: len(good) // 2]),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3),
        ("zero.png", b""),
        ("huge.png", huge_png()),
        ("gray.png", png(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8), "L")),
        ("gray16.png", png(rng.integers(0, 65535, (SIZE, SIZE), dtype=np.uint16))),
        ("rgba.png", png(rng.integers(0, 255, (SIZE, SIZE, 4), dtype=np.uint8), "RGBA")),
    ]
    return rows, {"truncated.png", "corrupt.jpg", "zero.png", "huge.png"}


def results(output_uri: str, dataset_uri: str, images_per_unit: int = 64):
    """All result rows (input order), checking one results file per unit with its image count
    and that the prefix holds no other results file."""
    rows = []
    units, _ = driver.plan(dataset_uri, images_per_unit)
    assert unit_names(output_uri) == sorted(u.unit for u in units)
    for unit in units:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output_uri, unit.unit))))
        assert table.schema.equals(RESULT_SCHEMA), table.schema
        assert table.num_rows == unit.images
        rows.extend(table.to_pylist())
    return rows


def test_s3_roundtrip_bad_images_and_coco_json(s3, ray_local, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    base = f"s3://{s3.bucket}/infer-roundtrip"
    data_uri, out_uri, ckpt = f"{base}/data", f"{base}/out", f"{base}/ckpt.pt"
    tiny_checkpoint(ckpt)
    bad, must_fail = bad_images()
    names = write_dataset(data_uri, [good_images(4), good_images(3, start=4), bad])
    coco_json = str(tmp_path / "results.json")

    summary = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, batch_size=3,
                                        actors="1", score_threshold=0.0, coco_json=coco_json,
                                        images_per_unit=2))  # ranges cut across row groups

    rows = results(out_uri, data_uri, images_per_unit=2)
    assert sorted(r["image_id"] for r in rows) == sorted(names)  # exactly one row per image
    assert summary.images == len(names) and summary.units_done == 2 + 2 + 4 and summary.units_skipped == 0
    failed = {r["file_name"]: r["error"] for r in rows if r["error"] is not None}
    assert set(failed) == must_fail, failed
    assert "MP" in failed["huge.png"] and "0 bytes" in failed["zero.png"]
    assert summary.errors == len(must_fail)
    for r in rows:
        assert r["model"].startswith(ckpt)
        if r["error"] is not None:
            assert r["instances"] == []
            continue
        assert r["instances"], f"{r['file_name']}: the random model detects something everywhere"
        for inst in r["instances"]:
            seg = inst["segmentation"]
            mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"]})
            assert mask.shape == (SIZE, SIZE)
            assert inst["category_id"] in {c["id"] for c in CATEGORIES}
    assert summary.instances == sum(len(r["instances"]) for r in rows)

    # the pipeline gives what the plain loop gives on the same images
    predictor = Predictor(ckpt, score_threshold=0.0, device="cpu")
    by_name = {r["file_name"]: r for r in rows}
    from pipeline.data.decode import decode_image

    for name, data in good_images(2):
        out = predictor.predict([decode_image(data)])[0]
        got = by_name[name]["instances"]
        assert len(got) == len(out["scores"])
        np.testing.assert_allclose([i["score"] for i in got], out["scores"].numpy(), atol=1e-3)

    gt = COCO()
    gt.dataset = {"images": [{"id": i, "file_name": n, "width": SIZE, "height": SIZE} for i, n in names.items()],
                  "annotations": [], "categories": CATEGORIES}
    gt.createIndex()
    res = gt.loadRes(coco_json)
    assert len(res.getAnnIds()) == summary.instances
    assert len(json.load(open(coco_json))) == summary.instances


def dying_predictor(marker: str, die_on_batch: int = 2) -> type[Predictor]:
    """A Predictor that kills its actor process (os._exit) once, in its ``die_on_batch``-th batch,
    after computing and before returning it; the marker file gets "<pid> <threads>".
    Defined in a function so it pickles by value."""

    class DyingPredictor(Predictor):
        batches = 0

        def _after_batch(self, table):
            self.batches += 1
            if self.batches < die_on_batch:
                return
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, f"{os.getpid()} {self.threads}".encode())
            os.close(fd)
            os._exit(1)

    return DyingPredictor


def test_actor_killed_mid_run_gives_exactly_n_rows(ray_local, tmp_path):
    data_uri, out_uri, ckpt = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt)
    names = write_dataset(data_uri, [good_images(5), good_images(5, start=5)])
    marker = str(tmp_path / "died")

    summary = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, batch_size=2,
                                        actors="1", score_threshold=1.0, images_per_unit=4),
                            predictor_factory=dying_predictor(marker))

    assert os.path.exists(marker), "the fault was not injected"
    pid, threads = (int(v) for v in open(marker).read().split())
    assert pid > 0
    assert threads == 2  # the 2-CPU cluster's cores go to its one CPU actor (cpu_actor_threads)
    rows = results(out_uri, data_uri, images_per_unit=4)
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == sorted(names) and len(set(ids)) == len(ids)
    assert all(r["error"] is None and r["instances"] == [] for r in rows)
    assert sorted(os.listdir(out_uri)) == sorted(unit_names(out_uri) + ["provenance.json"])
    assert summary.images == 10 and summary.errors == 0


class Interrupt(Exception):
    pass


def gated_predictor(gate: str, timeout: float = 120.0) -> type[Predictor]:
    """Commits the first unit of the run; every later unit, while the gate file exists, fails before
    anything is written (a worker stopped mid-unit with the job), but only once the driver has seen
    the first commit (``gate + ".seen"``, written by the test's commit callback; at most ``timeout``
    seconds): a fixed delay was not always enough on a loaded CI box, and the failure then ended the
    dataset before the driver heard of the first commit."""

    class Gated(Predictor):
        def _after_batch(self, table):
            try:  # the first unit anywhere creates the marker and passes
                os.close(os.open(gate + ".first", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                if os.path.exists(gate):
                    deadline = time.monotonic() + timeout
                    while not os.path.exists(gate + ".seen") and time.monotonic() < deadline:
                        time.sleep(0.05)
                    raise RuntimeError("stopped by the test's gate")
            super()._after_batch(table)

    return Gated


def test_interrupted_run_resumes_without_recomputing(ray_local, tmp_path, capsys):
    data_uri, out_uri, ckpt = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt)
    names = write_dataset(data_uri, [good_images(3), good_images(3, start=3), good_images(3, start=6)])
    committed: list[str] = []
    gate = str(tmp_path / "gate")

    def stop_after_first(uri: str) -> None:
        committed.append(uri)
        open(gate + ".seen", "w").close()  # the gated units may fail now
        raise Interrupt(uri)

    # The driver stops after the first commit. Ray Data lets a released actor finish the units it
    # holds, so the gate (never removed) fails those before they write: what the first run leaves
    # is exactly its committed unit.
    open(gate, "w").close()
    with pytest.raises(Interrupt):
        run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, batch_size=3, actors="1",
                                  score_threshold=1.0),
                      predictor_factory=gated_predictor(gate),
                      on_unit_committed=stop_after_first)
    assert len(committed) == 1
    done = os.path.join(out_uri, committed[0])
    stamp = os.stat(done).st_mtime_ns
    present = unit_names(out_uri)
    assert present == [committed[0]] and pq.read_table(done).num_rows == 3
    # nothing partial left by the stopped units: the results and the provenance record only
    assert sorted(os.listdir(out_uri)) == sorted(present + ["provenance.json"])

    recommitted: list[str] = []
    summary = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, batch_size=3,
                                        actors="1", score_threshold=1.0), on_unit_committed=recommitted.append)

    assert summary.units_skipped == 1 and summary.units_done == 2
    assert summary.images == 6 and committed[0] not in recommitted
    assert os.stat(done).st_mtime_ns == stamp  # not rewritten
    ids = [r["image_id"] for r in results(out_uri, data_uri)]
    assert sorted(ids) == sorted(names) and len(set(ids)) == len(ids)

    # the CLI on a finished output: nothing recomputed, the summary line, a (here empty) COCO JSON
    from jobs import cli

    coco_json = str(tmp_path / "all.json")
    assert cli.module_main("infer", ["--checkpoint", ckpt, "--input", data_uri, "--output", out_uri,
                                     "--coco-json", coco_json, "--score-threshold", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("images: 0  errors: 0  instances: 0  images/s: ") and "3 skipped" in line
    assert json.load(open(coco_json)) == []
    assert os.stat(done).st_mtime_ns == stamp

    # Another checkpoint into the same output: refused in one line, then recomputed with --overwrite.
    other = str(tmp_path / "other.pt")
    tiny_checkpoint(other, seed=1)
    assert cli.module_main("infer", ["--checkpoint", other, "--input", data_uri, "--output", out_uri,
                                     "--score-threshold", "1"]) != 0
    err = capsys.readouterr().err
    assert "other settings: model ('sha256:" in err and "--overwrite" in err
    assert os.stat(done).st_mtime_ns == stamp
    summary = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=other, actors="1",
                                        score_threshold=1.0, overwrite=True))
    assert summary.units_done == 3 and summary.images == 9 and summary.units_skipped == 0
    rows = results(out_uri, data_uri)
    assert {r["model"] for r in rows} == {read_model_config(other)[1]}  # each row names the model that computed it


def flaky_predictor(marker: str, bad_name: str) -> type[Predictor]:
    """Fails inference of the image whose first pixel equals the marker's value while the marker
    file exists (a transient fault: gone on the rerun)."""

    class FlakyPredictor(Predictor):
        def forward_uint8(self, images):
            if os.path.exists(marker):
                value = int(open(marker).read())
                if any(int(im[0, 0, 0]) == value for im in images):
                    raise RuntimeError(f"CUDA out of memory (injected for {bad_name})")
            return super().forward_uint8(images)

    return FlakyPredictor


def test_retry_errors_recomputes_only_transient_error_rows(ray_local, tmp_path):
    from pipeline.data.decode import decode_image

    data_uri, out_uri, ckpt = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt)
    images = good_images(4) + [("junk.jpg", b"junk")]
    write_dataset(data_uri, [images[:3], images[3:]])
    marker = str(tmp_path / "flaky")
    with open(marker, "w") as f:
        f.write(str(int(decode_image(images[1][1])[0, 0, 0])))
    summary = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, actors="1",
                                        score_threshold=0.0),
                            predictor_factory=flaky_predictor(marker, images[1][0]))
    rows = {r["file_name"]: r for r in results(out_uri, data_uri)}
    assert rows["img001.png"]["error"].startswith("inference failed:") and rows["img001.png"]["instances"] == []
    assert rows["junk.jpg"]["error"].startswith("decode failed:")
    assert summary.errors == 2
    stamps = {n: os.stat(os.path.join(out_uri, n)).st_mtime_ns for n in unit_names(out_uri)}
    os.remove(marker)

    again = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, actors="1",
                                      score_threshold=0.0, retry_errors=True))
    assert again.images == 1 and again.units_done == 1 and again.units_skipped == 1  # the decode error stays
    fixed = {r["file_name"]: r for r in results(out_uri, data_uri)}
    assert fixed["img001.png"]["error"] is None and fixed["img001.png"]["instances"]
    assert fixed["junk.jpg"]["error"] == rows["junk.jpg"]["error"]
    for name in ("img000.png", "img002.png", "img003.png"):
        assert fixed[name] == rows[name]
    assert os.stat(os.path.join(out_uri, "part-00001.parquet")).st_mtime_ns == stamps["part-00001.parquet"]


def always_dying_predictor() -> type[Predictor]:
    class AlwaysDying(Predictor):
        def _after_batch(self, table):
            os._exit(1)

    return AlwaysDying


@pytest.mark.slow
def test_a_model_stage_that_always_crashes_stops_in_bounded_time(ray_local, tmp_path):
    data_uri, out_uri, ckpt = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt)
    write_dataset(data_uri, [good_images(2), good_images(2, start=2)])
    start = time.perf_counter()
    with pytest.raises(Exception, match=r"inference stopped .*2 units not committed: .*part-0000\d\.parquet rows 0-1"):
        run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, actors="1",
                                  score_threshold=1.0), predictor_factory=always_dying_predictor())
    assert time.perf_counter() - start < 150
    assert unit_names(out_uri) == []


def raw_jpeg(seed: int, width: int, height: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_raw_image_prefix_on_s3_keyed_by_path(s3, ray_local):
    base = f"s3://{s3.bucket}/raw-prefix"
    photos, out_uri, ckpt = f"{base}/photos", f"{base}/out", f"{base}/ckpt.pt"
    tiny_checkpoint(ckpt)
    names = ["a.jpg", "b/c.jpg", "b/d.jpeg", "e.png"]
    for i, name in enumerate(names[:3]):
        storage.write_bytes(f"{photos}/{name}", raw_jpeg(i, 48, 32, orientation=6 if i == 0 else 1))
    storage.write_bytes(f"{photos}/e.png", b"not a png")
    storage.write_bytes(f"{photos}/notes.txt", b"ignored")

    summary = run_inference(InferConfig(input=photos, output=out_uri, checkpoint=ckpt, actors="1",
                                        score_threshold=0.0, images_per_unit=3))
    assert summary.images == 4 and summary.units_done == 2 and summary.errors == 1
    rows = []
    for unit in ("files-0000000-0000003.parquet", "files-0000003-0000004.parquet"):
        rows.extend(pq.read_table(io.BytesIO(storage.read_bytes(f"{out_uri}/{unit}"))).to_pylist())
    assert [r["file_name"] for r in rows] == [f"{photos}/{n}" for n in sorted(names)]
    assert len({r["image_id"] for r in rows}) == 4
    by_name = {r["file_name"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["e.png"]["error"].startswith("decode failed:")
    for inst in by_name["a.jpg"]["instances"]:
        assert inst["segmentation"]["size"] == [48, 32]  # EXIF orientation 6 applied: portrait
    assert by_name["a.jpg"]["instances"] and by_name["c.jpg"]["instances"][0]["segmentation"]["size"] == [32, 48]
    again = run_inference(InferConfig(input=photos, output=out_uri, checkpoint=ckpt, actors="1",
                                      score_threshold=0.0, images_per_unit=3))
    assert again.units_skipped == 2 and again.images == 0
    storage.write_bytes(f"{photos}/f.jpg", raw_jpeg(9, 48, 32))
    with pytest.raises(Exception, match=r"made with other settings: input\.files \(4 -> 5\)"):
        run_inference(InferConfig(input=photos, output=out_uri, checkpoint=ckpt, actors="1",
                                  score_threshold=0.0, images_per_unit=3))


def _ray_worker_peaks(peaks: dict, stop: threading.Event) -> None:
    """Peak RSS (VmHWM, bytes) of every ``ray::`` process, sampled until ``stop``."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read(200)
                if not cmd.startswith(b"ray::"):
                    continue
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]) * 1024)
            except OSError:
                continue
        stop.wait(0.2)


@pytest.mark.slow
def test_12mp_photos_stay_within_the_memory_target(ray_local, tmp_path):
    """Two 4000x3000 JPEGs, a model giving 100 detections each: every Ray worker peaks under 2 GB.
    The model actor holds torch + Ray Data (~1.2 GB measured with the tiny model loaded), one
    12-MP unit and the per-instance paste (~0.1 GB); the old full-size paste needed 4.8 GB per
    image, ~20 GB at 100 detections."""
    photos, out_uri, ckpt = str(tmp_path / "photos"), str(tmp_path / "out"), str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt, detections=100)
    os.makedirs(photos)
    for i in range(2):
        with open(f"{photos}/{i}.jpg", "wb") as f:
            f.write(raw_jpeg(i, 4000, 3000))
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_ray_worker_peaks, args=(peaks, stop), daemon=True)
    sampler.start()
    try:
        summary = run_inference(InferConfig(input=photos, output=out_uri, checkpoint=ckpt, actors="1",
                                            score_threshold=0.0, images_per_unit=1))
    finally:
        stop.set()
        sampler.join()
    assert summary.images == 2 and summary.errors == 0
    assert summary.instances >= 100, summary.instances  # up to 100 detections per image
    for unit in unit_names(out_uri):
        for row in pq.read_table(f"{out_uri}/{unit}").to_pylist():
            assert all(i["segmentation"]["size"] == [3000, 4000] for i in row["instances"])
    assert peaks and max(peaks.values()) < 2 * 2**30, {p: v / 2**30 for p, v in peaks.items()}
