"""Shards on a real S3 server (SeaweedFS) and through Ray Data: lossless round trip, >1,000
object listing, crash + rerun on S3, and one-line errors for bad credentials, a missing bucket
and an unreachable endpoint."""

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline import storage
from pipeline.data import convert
from pipeline.data import decode as dataset
from pipeline.data import synth
from pipeline.data import format as fmt


def _coco_from(uri: str) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(storage.read_bytes(uri))
    coco.createIndex()
    return coco


def _check_rows_lossless(rows, coco: COCO, images_uri: str) -> int:
    n = 0
    for row in rows:
        info = coco.imgs[row["image_id"]]
        assert row["image"] == storage.read_bytes(storage.join(images_uri, info["file_name"]))
        assert [a["id"] for a in row["annotations"]] == coco.getAnnIds(imgIds=row["image_id"])
        for ann in row["annotations"]:
            seg = ann["segmentation"]
            mask = mask_utils.decode({"size": list(seg["size"]), "counts": seg["counts"]})
            assert np.array_equal(mask, coco.annToMask(coco.anns[ann["id"]]))
            n += 1
    return n


def test_s3_synth_convert_and_ray_read_is_lossless(s3, ray_local):
    raw = f"s3://{s3.bucket}/raw-shapes"
    out = f"s3://{s3.bucket}/datasets/shapes"
    synth.synthesize(raw, images=30, seed=4, size=64)
    report = convert.convert_coco(f"{raw}/annotations.json", f"{raw}/images", out,
                                  images_per_shard=8, row_group_size=4)
    assert (report.images_written, report.images_skipped, len(report.shards)) == (30, 0, 4)
    coco = _coco_from(f"{raw}/annotations.json")
    ds = dataset.read_shards(out)
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert [r["image_id"] for r in rows] == sorted(coco.imgs)
    assert _check_rows_lossless(rows, coco, f"{raw}/images") == len(coco.anns)
    # decode from the Ray rows exactly as training will
    manifest = fmt.read_manifest(out)
    row = rows[0]
    image = dataset.decode_image(row["image"])
    target = dataset.decode_target(row["annotations"], row["height"], row["width"],
                                   manifest.category_ids)
    assert image.shape == (3, 64, 64) and target["masks"].shape[1:] == (64, 64)
    assert sum(len(r["annotations"]) for r in rows) == len(coco.anns) == manifest.num_instances


def test_local_reader_takes_only_manifest_shards(tmp_path, ray_local):
    src = tmp_path / "src"
    synth.synthesize(str(src), images=12, seed=2, size=48)
    out = tmp_path / "ds"
    convert.convert_coco(str(src / "annotations.json"), str(src / "images"), str(out),
                         images_per_shard=5)
    # a shard that no manifest lists (as an interrupted run would leave) is not read
    (out / "part-00099.parquet").write_bytes((out / "part-00000.parquet").read_bytes())
    ds = dataset.read_shards(str(out), columns=["image_id"])
    assert sorted(r["image_id"] for r in ds.take_all()) == list(range(1, 13))


def _tiny_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), i % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_listing_over_1000_objects_pack_and_read(s3, ray_local):
    prefix = f"s3://{s3.bucket}/many"
    n = 1050
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_bytes(f"{prefix}/img-{i:05d}.png", _tiny_png(i)),
                      range(n)))
    storage.write_bytes(f"{prefix}/README.txt", b"not an image")
    listed = storage.list_files(prefix)
    assert len(listed) == n + 1 and listed == sorted(listed)
    assert storage.list_files(prefix, suffixes=[".png"])[-1] == f"{prefix}/img-{n - 1:05d}.png"
    out = f"s3://{s3.bucket}/datasets/many"
    report = convert.pack_images(prefix, out, images_per_shard=400)
    assert (report.images_in, report.images_written, report.images_skipped) == (n + 1, n, 1)
    assert str(report.problems[0]) == f"{prefix}/README.txt: image: not an image (suffix .txt)"
    assert [s.images for s in fmt.read_manifest(out).shards] == [400, 400, 250]
    ds = dataset.read_shards(out, columns=["image_id", "file_name", "annotations"])
    rows = ds.take_all()
    assert sorted(r["image_id"] for r in rows) == list(range(1, n + 1))
    assert all(r["annotations"] == [] or len(r["annotations"]) == 0 for r in rows)


def test_s3_interrupted_convert_then_rerun(s3, tmp_path, monkeypatch):
    src = tmp_path / "src"
    synth.synthesize(str(src), images=12, seed=3, size=48)
    out = f"s3://{s3.bucket}/datasets/crash"
    real = storage.write_bytes

    def crash(uri, data, **kw):
        if uri.endswith("part-00001.parquet"):
            raise KeyboardInterrupt  # the process dies before this shard's PUT completes
        return real(uri, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_coco(str(src / "annotations.json"), str(src / "images"), out,
                             images_per_shard=5)
    monkeypatch.setattr(storage, "write_bytes", real)
    assert [u for u in storage.list_files(out) if "/_ingest/" not in u] == [
        f"{out}/part-00000.parquet"]
    assert f"{out}/_ingest/done-00000.json" in storage.list_files(out)
    with pytest.raises(storage.StorageError, match=f"^{out}/manifest.json: not found"):
        fmt.read_manifest(out)
    report = convert.convert_coco(str(src / "annotations.json"), str(src / "images"), out,
                                  images_per_shard=5)
    assert report.images_written == 12 and report.chunks_reused == 1
    assert [r["image_id"] for r in fmt.read_rows(out, columns=["image_id"])] == list(range(1, 13))


def test_bad_credentials_missing_bucket_unreachable_endpoint(s3, monkeypatch):
    uri = f"s3://{s3.bucket}/errs/x.bin"
    storage.write_bytes(uri, b"x")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    for call in (lambda: storage.read_bytes(uri), lambda: storage.list_files(uri),
                 lambda: storage.write_bytes(uri, b"y"), lambda: fmt.read_manifest(uri)):
        with pytest.raises(storage.StorageError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"s3://{s3.bucket}/errs/") and "\n" not in msg
        assert "access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)" in msg
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)

    missing = "s3://no-such-bucket-here/data/manifest.json"
    for call in (lambda: storage.read_bytes(missing), lambda: storage.list_files(missing),
                 lambda: dataset.read_shards("s3://no-such-bucket-here/data")):
        with pytest.raises(storage.StorageError,
                           match=r"^s3://no-such-bucket-here/data.*: bucket 'no-such-bucket-here'"
                                 r" does not exist$"):
            call()

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    for call in (lambda: storage.read_bytes(uri), lambda: storage.list_files(uri),
                 lambda: convert.convert_coco(uri, uri, uri)):
        start = time.monotonic()
        with pytest.raises(storage.StorageError) as info:
            call()
        assert time.monotonic() - start < 15
        assert str(info.value) == (f"{uri}: cannot reach the S3 endpoint "
                                   f"http://127.0.0.1:{dead} (check AWS_ENDPOINT_URL)")
