"""``run_inference`` end to end on local Ray: SeaweedFS S3 round trip with COCO JSON, bad images,
an actor killed mid-run, and an interrupted run resumed without recomputation.

The model is a random-init resnet18 Mask R-CNN at 64 px with few proposals (CPU, seconds).
Runs that only check row accounting use ``score_threshold=1.0``: every image then has no
detections, which exercises the "no detections" path (empty predictions through pickling, mask
pasting, RLE and Arrow empty lists) exactly as a model that finds nothing would.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from pipeline import format as fmt
from pipeline import inference, storage
from pipeline.inference import Predictor, run_inference
from pipeline.synth import categories_for, make_image

SIZE = 64
CATEGORIES = categories_for(3)


def tiny_checkpoint(uri: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig.for_categories(
        CATEGORIES, backbone="resnet18", min_size=SIZE, max_size=SIZE, box_detections_per_img=5,
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


def results(output_uri: str, dataset_uri: str):
    """All result rows (manifest order), checking one results file per shard."""
    rows = []
    for info in fmt.read_manifest(dataset_uri).shards:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output_uri, info.path))))
        assert table.schema.equals(fmt.RESULT_SCHEMA), table.schema
        assert table.num_rows == info.images
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

    summary = run_inference(data_uri, out_uri, ckpt, batch_size=3, actors=1, score_threshold=0.0,
                            coco_json=coco_json, rows_per_task=2)  # ranges cut across row groups

    rows = results(out_uri, data_uri)
    assert sorted(r["image_id"] for r in rows) == sorted(names)  # exactly one row per image
    assert summary.images == len(names) and summary.shards_done == 3 and summary.shards_skipped == 0
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
    from pipeline.dataset import decode_image

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

    summary = run_inference(data_uri, out_uri, ckpt, batch_size=2, actors=1, score_threshold=1.0,
                            predictor_factory=dying_predictor(marker), rows_per_task=4)

    assert os.path.exists(marker), "the fault was not injected"
    pid, threads = (int(v) for v in open(marker).read().split())
    assert pid > 0
    assert threads == 2  # the 2-CPU cluster's cores go to its one CPU actor (cpu_actor_threads)
    rows = results(out_uri, data_uri)
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == sorted(names) and len(set(ids)) == len(ids)
    assert all(r["error"] is None and r["instances"] == [] for r in rows)
    assert summary.images == 10 and summary.errors == 0


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing(ray_local, tmp_path, capsys):
    data_uri, out_uri, ckpt = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt)
    names = write_dataset(data_uri, [good_images(3), good_images(3, start=3), good_images(3, start=6)])
    committed: list[str] = []

    def stop_after_first(uri: str) -> None:
        committed.append(uri)
        raise Interrupt(uri)

    with pytest.raises(Interrupt):
        run_inference(data_uri, out_uri, ckpt, batch_size=3, actors=1, score_threshold=1.0,
                      on_shard_committed=stop_after_first)
    assert len(committed) == 1
    done = committed[0]
    stamp = os.stat(done).st_mtime_ns
    leftovers = [f for f in os.listdir(out_uri) if f.endswith(".parquet")]
    assert leftovers == [os.path.basename(done)], "only the committed shard may have a results file"

    recommitted: list[str] = []
    summary = run_inference(data_uri, out_uri, ckpt, batch_size=3, actors=1, score_threshold=1.0,
                            on_shard_committed=recommitted.append)

    assert summary.shards_skipped == 1 and summary.shards_done == 2 and summary.images == 6
    assert done not in recommitted and len(recommitted) == 2
    assert os.stat(done).st_mtime_ns == stamp  # the finished shard was not rewritten
    ids = [r["image_id"] for r in results(out_uri, data_uri)]
    assert sorted(ids) == sorted(names) and len(set(ids)) == len(ids)

    # the CLI on a finished output: nothing recomputed, the summary line, a (here empty) COCO JSON
    from jobs import cli

    coco_json = str(tmp_path / "all.json")
    assert cli.module_main("infer", ["--checkpoint", ckpt, "--input", data_uri, "--output", out_uri,
                                     "--coco-json", coco_json]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("images: 0  errors: 0  instances: 0  images/s: ") and "3 skipped" in line
    assert json.load(open(coco_json)) == []
    assert os.stat(done).st_mtime_ns == stamp
    assert inference.result_uri(out_uri, "part-00000.parquet") == os.path.join(out_uri, "part-00000.parquet")
