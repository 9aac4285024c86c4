"""convert/pack on Ray (pipeline.data.ingest) against a real S3 server (SeaweedFS): the Ray path
writes the same shards as the one-process path, a run whose driver is killed mid-pack is
completed by a rerun without losing or duplicating an image, no key value leaks into what
crosses process boundaries or lands in storage/logs, and a 100,000-object prefix is listed
and packed."""

import glob
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import convert
from pipeline.data import decode as dataset
from pipeline.data import ingest
from pipeline.data import synth
from pipeline.data import format as fmt

ROOT = Path(__file__).resolve().parents[2]


def _tiny_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), i % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _put_many(prefix: str, n: int, threads: int = 32) -> None:
    """n tiny PNGs under ``prefix`` with many concurrent PUTs (one filesystem, no per-object
    URI parsing)."""
    fs, root = storage.resolve(prefix)
    blobs = [_tiny_png(i) for i in range(256)]

    def put(i: int) -> None:
        with fs.open_output_stream(f"{root}/img-{i:06d}.png") as f:
            f.write(blobs[i % 256])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(n), chunksize=256))


def test_ray_pack_equals_one_process_pack(s3, ray_local):
    prefix = f"s3://{s3.bucket}/ingest-eq/raw"
    _put_many(prefix, 230)
    storage.write_bytes(f"{prefix}/notes.txt", b"not an image")
    storage.write_bytes(f"{prefix}/img-bomb.png", dataset_bomb())
    on_ray = f"s3://{s3.bucket}/ingest-eq/ray"
    local = f"s3://{s3.bucket}/ingest-eq/local"
    r1 = convert.pack_images(prefix, on_ray, images_per_shard=50, runner="ray")
    r2 = convert.pack_images(prefix, local, images_per_shard=50, runner="local")
    for r in (r1, r2):
        assert (r.images_in, r.images_written, r.images_skipped) == (232, 230, 2)
        assert r.image_skip_reasons == {"not an image": 1, "over the pixel limit": 1}
    m1, m2 = fmt.read_manifest(on_ray), fmt.read_manifest(local)
    assert [s.path for s in m1.shards] == [s.path for s in m2.shards]
    for s in m1.shards:  # byte-identical shards: the assignment does not depend on the runner
        assert storage.read_bytes(f"{on_ray}/{s.path}") == storage.read_bytes(f"{local}/{s.path}")
    ids = [r["image_id"] for r in dataset.read_shards(on_ray, columns=["image_id"]).take_all()]
    assert sorted(ids) == list(range(1, 231))


def dataset_bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import ray
    from pipeline.data import convert
    # the test's cluster: killing this driver must not leave a Ray instance behind
    ray.init(address=sys.argv[3], log_to_driver=False)
    seen = []
    def on_record(record):
        seen.append(record["index"])
        if len(seen) == 2:  # two shards reported, others in flight: the driver dies
            os.kill(os.getpid(), signal.SIGKILL)
    convert.pack_images(sys.argv[1], sys.argv[2], images_per_shard=40, runner="ray",
                        on_record=on_record)
""")


def test_pack_resumes_after_driver_killed_mid_pack(s3, ray_local):
    prefix = f"s3://{s3.bucket}/ingest-kill/raw"
    out = f"s3://{s3.bucket}/ingest-kill/out"
    n = 400
    _put_many(prefix, n)
    gcs = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, prefix, out, gcs], cwd=ROOT,
                          capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    files = storage.list_files(out)
    done = [u for u in files if "/_ingest/done-" in u]
    assert f"{out}/manifest.json" not in files and 2 <= len(done) < 10
    with pytest.raises(storage.StorageError, match="manifest.json: not found"):
        fmt.read_manifest(out)
    report = convert.pack_images(prefix, out, images_per_shard=40, runner="ray")
    assert report.chunks_reused >= 2 and report.chunks_reused == len(done)
    assert (report.images_in, report.images_written, report.images_skipped) == (n, n, 0)
    manifest = fmt.read_manifest(out)
    assert [s.path for s in manifest.shards] == [f"part-{k:05d}.parquet" for k in range(10)]
    rows = list(fmt.read_rows(out, columns=["image_id", "file_name"]))
    assert [r["image_id"] for r in rows] == list(range(1, n + 1))  # none lost, none twice
    assert [r["file_name"] for r in rows] == [f"img-{i:06d}.png" for i in range(n)]


def _scan(blob: bytes, secrets: list[bytes], where: str) -> None:
    for value in secrets:
        assert value not in blob, f"a key value appears in {where}"


def test_no_key_value_crosses_processes_or_lands_in_files(s3, ray_local, tmp_path):
    import ray
    import ray.cloudpickle
    from ray.train import RunConfig

    from pipeline import cluster as submit

    secrets = [s3.access_key.encode(), s3.secret_key.encode()]
    src = f"s3://{s3.bucket}/ingest-keys/raw"
    out = f"s3://{s3.bucket}/ingest-keys/ds"
    synth.synthesize(src, images=6, seed=5, size=48)
    report = convert.convert_coco(f"{src}/annotations.json", f"{src}/images", out,
                                  images_per_shard=4, runner="ray")
    assert report.images_written == 6
    # what Ray ships: the ingest job (task argument), the filesystems, a Ray Data read plan
    fs, _ = storage.resolve(out)
    job = ingest.IngestJob(kind="pack", source=src, images_uri=src, out_uri=out,
                           options=ingest.IngestConfig(runner="ray"),
                           plan_items=convert._plan_pack, chunk_rows=convert._pack_rows)
    ds = dataset.read_shards(out)
    for name, obj in (("the ingest job", job), ("the S3 filesystem", fs),
                      ("RunConfig(storage_filesystem)",
                       RunConfig(name="x", storage_path=f"{s3.bucket}/runs", storage_filesystem=fs)),
                      ("a Ray Data read_shards dataset", ds)):
        _scan(ray.cloudpickle.dumps(obj), secrets, name)
    # a task that resolves its own filesystem reads with the node's credentials (its env)
    assert ray.get(ray.remote(lambda uri: len(storage.read_bytes(uri))).remote(
        f"{out}/manifest.json")) > 0
    # everything written: shards, manifest, the run's records
    for uri in storage.list_files(out):
        _scan(storage.read_bytes(uri), secrets, uri)
    # log lines of this Ray session (driver and workers) and of the run
    logs = ray._private.worker._global_node.get_logs_dir_path()
    for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
        if os.path.isfile(path):
            _scan(Path(path).read_bytes(), secrets, path)
    # the runtime env maskray submit sends (AWS keys set in the submitting shell)
    env = submit.load_runtime_env(submit.RUNTIME_ENV_FILE)
    _scan(json.dumps(env).encode(), secrets, "the submit runtime env")


def test_error_lines_never_echo_a_key(s3, monkeypatch):
    """A denied or failing request becomes a one-line error (what logs, reports and results'
    error rows carry) without the key id or secret that was sent."""
    wrong_id, wrong_secret = "MASKRAYWRONGKEYID0001", "maskray-wrong-secret-0001"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    uri = f"s3://{s3.bucket}/ingest-keys/raw/annotations.json"
    for call in (lambda: storage.read_bytes(uri), lambda: storage.list_files(uri),
                 lambda: storage.write_bytes(uri + ".x", b"x")):
        with pytest.raises(storage.StorageError) as info:
            call()
        text = str(info.value)
        assert "access denied" in text
        _scan(text.encode(), [wrong_id.encode(), wrong_secret.encode(), s3.secret_key.encode()],
              "an error line")


def _bulk_load(s3, tmp_path, folder: str, n: int) -> None:
    """n tiny PNGs under s3://bucket/folder/raw, loaded through the filer with `weed filer.copy`
    (Go, no S3 signing: ~8x the rate of PUTs from Python here)."""
    from conftest import find_weed

    raw = tmp_path / "raw"
    raw.mkdir()
    blobs = [_tiny_png(i) for i in range(256)]
    for i in range(n):
        (raw / f"img-{i:06d}.png").write_bytes(blobs[i % 256])
    proc = subprocess.run([find_weed(), "filer.copy", "-c=16", str(raw),
                           f"http://{s3.filer}/buckets/{s3.bucket}/{folder}/"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_100k_object_prefix_listed_and_packed(s3, ray_local, tmp_path):
    prefix = f"s3://{s3.bucket}/ingest-100k/raw"
    out = f"s3://{s3.bucket}/ingest-100k/out"
    n = 100_000
    start = time.monotonic()
    _bulk_load(s3, tmp_path, "ingest-100k", n)
    put_s = time.monotonic() - start
    fs, root = storage.resolve(prefix)
    listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    assert len(listed) == n
    start = time.monotonic()
    report = convert.pack_images(prefix, out, images_per_shard=5000, runner="ray", workers=16)
    pack_s = time.monotonic() - start
    assert (report.images_in, report.images_written, report.images_skipped) == (n, n, 0)
    manifest = fmt.read_manifest(out)
    assert manifest.num_images == n and len(manifest.shards) == 20
    ids = dataset.read_shards(out, columns=["image_id"]).to_pandas()["image_id"]
    assert len(ids) == n and ids.nunique() == n and ids.min() == 1 and ids.max() == n
    print(f"100k objects: PUT {n / put_s:.0f}/s, pack {n / pack_s:.0f} files/s on Ray "
          f"({pack_s:.1f} s)")
