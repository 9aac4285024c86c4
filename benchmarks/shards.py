"""Streaming read throughput of maskray shards from a SeaweedFS S3 server: Ray Data
(:func:`pipeline.data.decode.read_shards`) vs a plain pyarrow read of the same objects (the anchor,
measured in the same run). Prints MB/s for both and the ratio (target >= 0.8).

    .venv/bin/python benchmarks/shards.py [--rows 3200 --size 256 --images-per-shard 1000]

The dataset is synthetic (``--unique`` rendered PNGs repeated under distinct ids, so the bytes
are real PNG data) and written with :class:`pipeline.data.format.ShardWriter`. Both readers consume
every column of every row; runs alternate between the two readers; the median and the best run
are reported (on a shared machine, best-of-N is the steadier estimate).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.seaweed import seaweed_server_class  # noqa: E402


def build_dataset(uri: str, rows: int, unique: int, size: int, images_per_shard: int) -> None:
    from pipeline.data import format as fmt
    from pipeline.data import synth

    cats = synth.categories_for(4)
    samples = []
    for i in range(unique):
        png, anns = synth.make_image(7, i, size, cats)
        annotations = []
        for k, ann in enumerate(anns):
            from pycocotools import mask as mask_utils

            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, size, size))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, size, size)
            else:
                rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            annotations.append(fmt.make_annotation(
                id=k, category_id=ann["category_id"], bbox=ann["bbox"], area=ann["area"],
                iscrowd=bool(ann["iscrowd"]), size=rle["size"], counts=rle["counts"]))
        samples.append((png, annotations))
    with fmt.ShardWriter(uri, images_per_shard=images_per_shard) as writer:
        for i in range(rows):
            png, annotations = samples[i % unique]
            writer.add(fmt.make_row(image_id=i + 1, file_name=f"{i + 1:07d}.png", width=size,
                                    height=size, image=png, annotations=annotations))
    fmt.write_manifest(uri, fmt.Manifest(categories=cats, shards=writer.shards,
                                         source="benchmarks/shards.py"))


def read_pyarrow(uri: str) -> int:
    """Plain pyarrow: each shard object read whole, one after the other."""
    import pyarrow.parquet as pq

    from pipeline.data import format as fmt
    from pipeline import storage

    n = 0
    for shard in fmt.shard_uris(uri):
        fs, path = storage.resolve(shard)
        n += pq.read_table(path, filesystem=fs).num_rows
    return n


PLAN_TIMES: list[float] = []


def read_ray(uri: str, read_num_cpus: float | None = None) -> int:
    """Ray Data: stream the same shards through read_shards into the driver (planning
    included: manifest read, Ray's Parquet metadata sampling)."""
    from pipeline.data.decode import read_shards

    t0 = time.perf_counter()
    ds = read_shards(uri, **({} if read_num_cpus is None else {"num_cpus": read_num_cpus}))
    PLAN_TIMES.append(time.perf_counter() - t0)
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
        n += batch.num_rows
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3200)
    parser.add_argument("--unique", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--read-num-cpus", type=float, default=None,
                        help="CPUs per Ray read task (default: Ray's, 1)")
    args = parser.parse_args(argv)

    import ray

    from pipeline.data import format as fmt

    with seaweed_server_class()() as server:
        os.environ.update(server.env)
        uri = f"s3://{server.bucket}/bench/shards"
        t0 = time.perf_counter()
        build_dataset(uri, args.rows, args.unique, args.size, args.images_per_shard)
        manifest = fmt.read_manifest(uri)
        total_mb = sum(s.bytes for s in manifest.shards) / 1e6
        print(f"dataset: {manifest.num_images} rows, {len(manifest.shards)} shards, "
              f"{total_mb:.1f} MB on SeaweedFS ({time.perf_counter() - t0:.1f} s to write)")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        try:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            t0 = time.perf_counter()
            ray_read = functools.partial(read_ray, read_num_cpus=args.read_num_cpus)
            assert ray_read(uri) == args.rows  # warm-up: worker start-up is not throughput
            print(f"ray warm-up (cold start): {time.perf_counter() - t0:.1f} s")
            times = {"pyarrow": [], "ray": []}
            for _ in range(args.repeats):
                for name, fn in (("pyarrow", read_pyarrow), ("ray", ray_read)):
                    t0 = time.perf_counter()
                    rows = fn(uri)
                    times[name].append(time.perf_counter() - t0)
                    assert rows == args.rows, (name, rows)
        finally:
            ray.shutdown()
    tput = {k: total_mb / statistics.median(v) for k, v in times.items()}
    best = {k: total_mb / min(v) for k, v in times.items()}
    ratio = tput["ray"] / tput["pyarrow"]
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"ray num_cpus={args.num_cpus}, read task num_cpus={args.read_num_cpus or 1}")
    for name in ("pyarrow", "ray"):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:8s}: {tput[name]:7.1f} MB/s median, {best[name]:7.1f} MB/s best of "
              f"{args.repeats} (runs {runs} s)")
    print(f"ray planning (manifest + Ray's parquet sampling) per read: median "
          f"{statistics.median(PLAN_TIMES[1:]):.2f} s, included above")
    print(f"ratio ray/pyarrow: {ratio:.2f} median, {best['ray'] / best['pyarrow']:.2f} best "
          f"(target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
