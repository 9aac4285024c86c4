"""pipeline.data.format: the schemas, manifest, bounded atomic shards, pyarrow row reader."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import format as fmt
from pipeline import storage
from pipeline.data.synth import encode_rle

CATS = [{"id": 3, "name": "circle"}, {"id": 7, "name": "star"}]


def _row(i: int, image_bytes: int = 100, n_anns: int = 2) -> dict:
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:5, 3:9] = True
    rle = encode_rle(mask)
    anns = [fmt.make_annotation(id=10 * i + k, category_id=CATS[k % 2]["id"], bbox=[3, 2, 6, 3],
                                area=18, iscrowd=k == 1, size=rle["size"], counts=rle["counts"],
                                score=None if k == 0 else 0.75) for k in range(n_anns)]
    return fmt.make_row(image_id=i, file_name=f"img/{i}.png", width=10, height=8,
                        image=bytes([i % 256]) * image_bytes, annotations=anns)


def test_shard_schema_matches_guide():
    s = fmt.SHARD_SCHEMA
    assert s.names == ["image_id", "file_name", "width", "height", "image", "annotations"]
    assert s.field("image_id").type == pa.int64() and s.field("width").type == pa.int32()
    assert s.field("image").type == pa.binary()
    ann = s.field("annotations").type.value_type
    assert [f.name for f in ann] == ["id", "category_id", "bbox", "area", "iscrowd",
                                     "segmentation", "score", "keypoints", "num_keypoints"]
    assert ann.field("keypoints").type == pa.list_(pa.float32())
    assert ann.field("num_keypoints").type == pa.int32()
    assert ann.field("bbox").type == pa.list_(pa.float32(), 4)
    assert ann.field("segmentation").type.field("size").type == pa.list_(pa.int32(), 2)
    assert ann.field("segmentation").type.field("counts").type == pa.binary()


def test_manifest_round_trip_and_validation(tmp_path):
    m = fmt.Manifest(categories=CATS, shards=[fmt.ShardInfo("part-00000.parquet", 3, 5, 100)],
                     source="coco.json", extra={"round": 2, "teacher": "ckpt.pt"})
    fmt.write_manifest(str(tmp_path), m)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "maskray-shards/1" and data["images"] == 3
    back = fmt.read_manifest(str(tmp_path))
    assert back == m and back.category_ids == [3, 7]
    assert fmt.read_manifest(str(tmp_path / "manifest.json")) == m
    with pytest.raises(fmt.FormatError, match="duplicate category"):
        fmt.Manifest(categories=CATS + CATS[:1])
    with pytest.raises(fmt.FormatError, match="relative"):
        fmt.ShardInfo("/abs/part.parquet", 1, 1)
    (tmp_path / "manifest.json").write_text('{"format": "other/9"}')
    with pytest.raises(fmt.FormatError, match=r"manifest\.json: unsupported dataset format"):
        fmt.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(fmt.FormatError, match="malformed JSON"):
        fmt.read_manifest(str(tmp_path))
    with pytest.raises(storage.StorageError, match="not a maskray dataset|maskray dataset"):
        fmt.read_manifest(str(tmp_path / "elsewhere"))


def test_shard_writer_bounds_and_round_trip(tmp_path):
    out = str(tmp_path / "ds")
    rows = [_row(i) for i in range(23)]
    with fmt.ShardWriter(out, images_per_shard=10, row_group_size=4) as writer:
        for row in rows:
            writer.add(row)
    assert [(s.path, s.images, s.instances) for s in writer.shards] == [
        ("part-00000.parquet", 10, 20), ("part-00001.parquet", 10, 20),
        ("part-00002.parquet", 3, 6)]
    meta = pq.ParquetFile(os.path.join(out, "part-00000.parquet")).metadata
    assert meta.num_row_groups == 3 and meta.row_group(0).num_rows == 4
    assert all(s.bytes == os.path.getsize(os.path.join(out, s.path)) for s in writer.shards)
    fmt.write_manifest(out, fmt.Manifest(categories=CATS, shards=writer.shards))
    back = list(fmt.read_rows(out))
    assert back == rows
    ids = [r["image_id"] for r in fmt.read_rows(out, columns=["image_id"])]
    assert ids == list(range(23))


def test_shard_writer_bounds_bytes(tmp_path):
    with fmt.ShardWriter(str(tmp_path), images_per_shard=1000, max_shard_bytes=5000) as w:
        for i in range(10):
            w.add(_row(i, image_bytes=2000, n_anns=0))
    assert [s.images for s in w.shards] == [2, 2, 2, 2, 2]


def test_bad_row_is_a_clear_error(tmp_path):
    w = fmt.ShardWriter(str(tmp_path))
    w.add({"image_id": "x", "file_name": 1})
    with pytest.raises(fmt.FormatError, match="shard schema"):
        w.close()


def test_reader_takes_only_manifest_shards(tmp_path):
    out = str(tmp_path)
    with fmt.ShardWriter(out, images_per_shard=5) as w:
        for i in range(10):
            w.add(_row(i))
    fmt.write_manifest(out, fmt.Manifest(categories=CATS, shards=w.shards[:1]))
    # a stray shard (e.g. from an interrupted run) and a temp file are ignored
    (tmp_path / ".part-00009.parquet.abc.tmp").write_bytes(b"PAR1 partial")
    assert [r["image_id"] for r in fmt.read_rows(out)] == [0, 1, 2, 3, 4]


def test_failed_writer_leaves_no_shard(tmp_path):
    out = str(tmp_path)
    with pytest.raises(RuntimeError):
        with fmt.ShardWriter(out, images_per_shard=5) as w:
            for i in range(7):
                w.add(_row(i))
            raise RuntimeError("crash")
    assert sorted(os.listdir(out)) == ["part-00000.parquet"]  # the 2 pending rows not written
