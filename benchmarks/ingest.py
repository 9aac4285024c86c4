"""Ingestion throughput of ``maskray pack`` from a SeaweedFS S3 server, in one run: the
one-process path (``runner="local"``: this process, ``--workers`` reading threads) against the
Ray path (``runner="ray"``: a plan task, then one Ray Data task per shard) on 1 and on 2
simulated nodes (``ray.cluster_utils.Cluster``, ``--cpus-per-node`` CPUs each). Prints files/s
for each and the ratios to the one-process path.

    .venv/bin/python benchmarks/ingest.py [--files 20000 --images-per-shard 1000 --size 32]

The objects are small PNGs (``--size`` px squares, ~100-300 bytes: the per-object cost, not
bandwidth, is what is measured), loaded once with ``weed filer.copy``. Every pack writes a
fresh output prefix; each Ray cluster first packs a small warm-up prefix so that worker start-up
and imports are not counted. The machine's load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.seaweed import seaweed_server_class  # noqa: E402


def put_pngs(server, folder: str, n: int, size: int) -> float:
    """n small PNGs under ``s3://bucket/folder/raw``, loaded through SeaweedFS's filer with
    ``weed filer.copy`` (Go, no S3 signing); returns objects per second."""
    import shutil
    import subprocess
    import tempfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 64 * 64).save(
            buf, format="PNG")
        blobs.append(buf.getvalue())
    local = tempfile.mkdtemp(prefix="maskray-ingest-bench-")
    try:
        raw = os.path.join(local, "raw")
        os.makedirs(raw)
        for i in range(n):
            with open(os.path.join(raw, f"img-{i:07d}.png"), "wb") as f:
                f.write(blobs[i % len(blobs)])
        weed = os.path.join(os.path.dirname(sys.executable), "weed")
        start = time.perf_counter()
        subprocess.run([weed, "filer.copy", "-c=16", raw,
                        f"http://{server.filer}/buckets/{server.bucket}/{folder}/"],
                       check=True, capture_output=True)
        return n / (time.perf_counter() - start)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _cluster(nodes: int, cpus: int, attempts: int = 3):
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` simulated nodes, retried: on a saturated
    machine a raylet can miss Ray's start-up window."""
    from ray.cluster_utils import Cluster

    for attempt in range(1, attempts + 1):
        cluster = Cluster()
        try:
            for _ in range(nodes):
                cluster.add_node(num_cpus=cpus, include_dashboard=False)
            return cluster
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            cluster.shutdown()
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            time.sleep(5)
    raise AssertionError("unreachable")


def timed_pack(prefix: str, out: str, **kwargs) -> float:
    from pipeline.data import convert

    start = time.perf_counter()
    report = convert.pack_images(prefix, out, **kwargs)
    seconds = time.perf_counter() - start
    assert report.images_written == report.images_in, report.summary()
    return report.images_in / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32, help="PNG side in pixels")
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8, help="reading threads (both paths)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.ERROR)
    import ray

    server = seaweed_server_class()()
    server.start()
    results: dict[str, float] = {}
    try:
        os.environ.update(server.env)
        bucket = f"s3://{server.bucket}"
        prefix, warm = f"{bucket}/bench/raw", f"{bucket}/warm/raw"
        put_rate = put_pngs(server, "bench", args.files, args.size)
        put_pngs(server, "warm", 2 * args.images_per_shard, args.size)
        print(f"PUT {args.files} objects: {put_rate:.0f}/s")
        common = dict(images_per_shard=args.images_per_shard, workers=args.workers)
        results["one process"] = timed_pack(prefix, f"{bucket}/out-local", runner="local",
                                            **common)
        print(f"one process ({args.workers} threads): {results['one process']:.0f} files/s",
              flush=True)
        for nodes in (1, 2):
            cluster = _cluster(nodes, args.cpus_per_node)
            try:
                ray.init(address=cluster.address, log_to_driver=False)
                timed_pack(warm, f"{bucket}/out-warm-{nodes}", runner="ray", **common)
                key = f"ray, {nodes} node{'s' if nodes > 1 else ''}"
                results[key] = timed_pack(prefix, f"{bucket}/out-ray-{nodes}", runner="ray",
                                          **common)
                print(f"{key} x {args.cpus_per_node} CPU: {results[key]:.0f} files/s", flush=True)
            finally:
                ray.shutdown()
                cluster.shutdown()
    finally:
        server.stop()
    base = results["one process"]
    print(f"\n{args.files} PNGs of {args.size}x{args.size}, {args.images_per_shard} per shard, "
          f"{args.workers} threads per reader, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for key, rate in results.items():
        print(f"  {key:14s} {rate:8.0f} files/s  ({rate / base:.2f}x one process)")
    if "ray, 2 nodes" in results:
        print(f"  2 nodes / 1 node: {results['ray, 2 nodes'] / results['ray, 1 node']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
