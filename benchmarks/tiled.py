"""Tiled inference (``maskray infer --tile``) on a seam-cut mosaic: accuracy against inference on
the small images one by one, throughput against a plain loop over the same tiles, and time and
memory as the image grows.

    python benchmarks/tiled.py --checkpoint CKPT [--grid 12] [--tile 0] [--overlap 0.25]
        [--speed-size 4096] [--sizes 2048,4096,8192] [--noop-sizes 4096,8192,16384] [--json FILE]

The model is a trained one (``--checkpoint``: e.g. ``configs/shapes-cpu.yaml``'s run, 4 shape
categories at 128 px); ``--tile 0`` takes the model's own ``min_size`` (tiles at native
resolution and at the model's input size: nothing is resized).

1. Accuracy. A mosaic of ``grid`` x ``grid`` small synthetic labelled images
   (:func:`pipeline.data.synth.make_image`, the model's training size each, after 37 px of
   background so seams fall anywhere in them). The model runs (a) on each small image alone
   (``Predictor.segment``; instances moved to mosaic coordinates) and (b) through
   ``run_inference`` with ``--tile`` on the mosaic (CLI defaults otherwise). Both are scored
   against the ground truth on detections scoring >= ``--score`` (0.5): recall at mask IoU >= 0.5,
   objects split (two or more detections lying mostly, IoS >= 0.5, inside one object), and
   duplicates (two or more at IoU >= 0.5 with one object).
2. Speed, in one run. Megapixels/s of ``run_inference --tile`` (CLI defaults otherwise: one
   actor) end to end (Ray start excluded; the actor's start, its model load, the read, every
   part file and the merge included), against a plain loop over the same tiles in this process
   with its model already loaded: decode the PNG once, cut the tiles,
   ``Predictor.forward_uint8`` in batches of 4 with lanes on every core (what the actor runs),
   paste each tile's instances (:func:`pipeline.infer.tiles.tile_instances`) and merge them
   (:func:`~pipeline.infer.tiles.merge_instances`). On the accuracy mosaic and on a large one
   (``--speed-size`` px square, the mosaic's cells repeated), where the start-up (seconds, paid
   once per run) no longer dominates.
3. Growth. ``run_inference --tile`` on mosaics of ``--sizes`` px square, each in a fresh process:
   wall time, MP/s, the driver's peak RSS and the largest peak RSS (``VmHWM``) of any Ray worker.
   The same with the model's call taken out (``--noop-sizes``, up to 16k x 16k: the predictor of
   ``benchmarks/infer.py --noop`` with 5 synthetic instances per tile): the pipeline's own cost
   (decode, cut, paste, seam merge, parts, memory) as the image grows, in minutes not hours.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.infer.config import InferConfig  # noqa: E402

import infer as infer_benchmark  # noqa: E402  (benchmarks/infer.py: this script's folder is on sys.path)

OFFSET = 37


def model_info(ckpt: str) -> dict:
    from pipeline.infer.predictor import read_model_config

    config, _ = read_model_config(ckpt)
    return {"min_size": config.min_size, "max_size": config.max_size, "categories": list(config.categories)}


def mosaic(cell: int, grid: int, categories: list[dict], seed: int = 5) -> tuple[np.ndarray, list[np.ndarray],
                                                                                  list[dict], list[tuple[int, int]]]:
    """``(mosaic uint8 HWC, small images, ground truth in mosaic coordinates, cell offsets (x, y))``."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from pipeline.data.synth import make_image

    size = OFFSET + grid * cell + 29
    canvas = np.full((size, size, 3), 127, dtype=np.uint8)
    smalls, truth, offsets = [], [], []
    for k in range(grid * grid):
        data, anns = make_image(seed, k, cell, categories, crowd_fraction=0.0)
        x0, y0 = OFFSET + (k % grid) * cell, OFFSET + (k // grid) * cell
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        canvas[y0:y0 + cell, x0:x0 + cell] = image
        smalls.append(image)
        offsets.append((x0, y0))
        for ann in anns:
            seg = ann["segmentation"]
            if isinstance(seg, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, cell, cell))
            elif isinstance(seg["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, cell, cell)
            else:  # compressed RLE (a str in the synth annotations)
                rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            m = mask_utils.decode(rle).astype(bool)
            if m.sum() < 30:
                continue
            full = np.zeros((size, size), dtype=np.uint8)
            full[y0:y0 + cell, x0:x0 + cell] = m
            truth.append({"category_id": ann["category_id"], "rle": mask_utils.encode(np.asfortranarray(full))})
    return canvas, smalls, truth, offsets


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def shift(instances: list[dict], x0: int, y0: int, size: tuple[int, int]) -> list[dict]:
    """Instances of a small image moved into the mosaic's frame (RLE re-encoded at the mosaic size)."""
    from pycocotools import mask as mask_utils

    out = []
    for inst in instances:
        small = mask_utils.decode(inst["segmentation"])
        full = np.zeros(size, dtype=np.uint8)
        full[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
        x, y, w, h = inst["bbox"]
        out.append({**inst, "bbox": [x + x0, y + y0, w, h], "segmentation": mask_utils.encode(np.asfortranarray(full))})
    return out


def score(instances: list[dict], truth: list[dict], min_score: float) -> dict:
    """Recall (IoU >= 0.5), split objects and duplicated objects among detections >= ``min_score``."""
    from pycocotools import mask as mask_utils

    kept = [i for i in instances if i["score"] >= min_score]
    preds = [i["segmentation"] for i in kept]
    gts = [t["rle"] for t in truth]
    if not preds:
        return {"detections": 0, "recall": 0.0, "split": 0, "duplicates": 0}
    iou = np.asarray(mask_utils.iou(preds, gts, [0] * len(gts))).reshape(len(preds), len(gts))
    same = np.array([[p["category_id"] == t["category_id"] for t in truth] for p in kept])
    # one call per mask: pycocotools 2.0.x area() of a list of more than 255 masks overflows on numpy 2
    area = np.array([mask_utils.area(p) for p in preds], dtype=np.float64)
    inside = np.zeros_like(iou)
    for i, j in zip(*np.nonzero(iou > 0)):
        inside[i, j] = mask_utils.area(mask_utils.merge([preds[i], gts[j]], intersect=True)) / max(area[i], 1)
    hit = (iou >= 0.5) & same
    return {"detections": len(kept), "recall": float(hit.any(0).mean()),
            "split": int(((inside >= 0.5) & same).sum(0).__ge__(2).sum()), "duplicates": int(hit.sum(0).__ge__(2).sum())}


def per_image(ckpt: str, smalls: list[np.ndarray], offsets, size, threshold: float) -> list[dict]:
    import torch

    from pipeline.infer.predictor import Predictor

    predictor = Predictor(ckpt, score_threshold=threshold, threads=os.cpu_count() or 1)
    out = []
    for k in range(0, len(smalls), 4):
        images = [torch.from_numpy(np.ascontiguousarray(s.transpose(2, 0, 1))) for s in smalls[k:k + 4]]
        for found, (x0, y0) in zip(predictor.segment(images), offsets[k:k + 4]):
            out.extend(shift(found, x0, y0, size))
    return out


def plain_tile_loop(ckpt: str, data: bytes, tile: int, overlap: float, threshold: float) -> dict:
    """The same tiles in one process (see the module docstring); its instances and timing."""
    import torch

    from pipeline.infer import tiles
    from pipeline.infer.predictor import Predictor, to_numpy
    from pipeline.infer.stages import decode_pixels

    predictor = Predictor(ckpt, score_threshold=threshold, threads=os.cpu_count() or 1)
    start = time.perf_counter()
    image = decode_pixels(data, max_pixels=None)
    h, w = image.shape[1:]
    boxes = tiles.plan_tiles(w, h, tile, overlap)
    instances, regions = [], []
    for k in range(0, len(boxes), 4):
        chunk = boxes[k:k + 4]
        crops = [torch.from_numpy(np.ascontiguousarray(image[:, y0:y1, x0:x1])) for x0, y0, x1, y1 in chunk]
        for out, box, crop in zip(predictor.forward_uint8(crops), chunk, crops):
            found = tiles.tile_instances(to_numpy(out), box, tuple(crop.shape[1:]), (h, w), predictor.category_ids)
            instances.extend(found)
            regions.extend([box] * len(found))
    merged = tiles.merge_instances(instances, regions, (h, w))
    seconds = time.perf_counter() - start
    return {"tiles": len(boxes), "seconds": seconds, "mp_per_s": w * h / 1e6 / seconds, "instances": merged}


class WorkerPeak:
    """The largest ``VmHWM`` (peak RSS) of any Ray worker process, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                if b"ray::" not in cmd and b"default_worker.py" not in cmd:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> WorkerPeak:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def tiled_run(input_uri: str, out_uri: str, ckpt: str, tile: int, overlap: float, noop: bool = False,
              queue=None) -> dict:
    """``run_inference --tile`` over ``input_uri`` (Ray started first, not timed); its figures.
    ``noop``: the model's call taken out (``benchmarks/infer.py``'s no-op predictor, model loaded)."""
    import ray

    from pipeline import raysetup
    from pipeline.infer.driver import run_inference

    factory = None
    if noop:
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(infer_benchmark)  # the Ray workers cannot import it
        factory = infer_benchmark.noop_predictor(5)
    raysetup.init("local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with WorkerPeak() as peak:
            start = time.perf_counter()
            summary = run_inference(InferConfig(input=input_uri, output=out_uri, checkpoint=ckpt, tile=tile,
                                                tile_overlap=overlap, overwrite=True), predictor_factory=factory)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    result = {"seconds": seconds, "images": summary.images, "instances": summary.instances,
              "errors": summary.errors, "worker_peak_rss_mb": peak.peak / 2**20,
              "driver_peak_rss_mb": infer_benchmark.own_peak_rss() / 2**20}
    if queue is not None:
        queue.put(result)
    return result


def in_fresh_process(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=tiled_run, args=args, kwargs={"queue": queue})
    proc.start()
    result = queue.get()
    proc.join()
    return result


def repeated(image: np.ndarray, side: int, folder: str) -> None:
    """``folder/mosaic.png``: ``image`` tiled to ``side`` x ``side`` px (its cells repeated)."""
    reps = -(-side // image.shape[0])
    big = np.tile(image, (reps, reps, 1))[:side, :side]
    os.makedirs(folder)
    with open(os.path.join(folder, "mosaic.png"), "wb") as f:
        f.write(png(big))


def speed_large(image: np.ndarray, args: argparse.Namespace, work: str, tile: int) -> dict:
    """MP/s of the pipeline vs the plain loop on one ``args.speed_size`` px square mosaic."""
    side, folder = args.speed_size, os.path.join(work, "speed")
    repeated(image, side, folder)
    with open(os.path.join(folder, "mosaic.png"), "rb") as f:
        loop = plain_tile_loop(args.checkpoint, f.read(), tile, args.overlap,
                               InferConfig.__dataclass_fields__["score_threshold"].default)
    run = in_fresh_process(folder, os.path.join(work, "speed-out"), args.checkpoint, tile, args.overlap)
    mp = side * side / 1e6
    out = {"side": side, "tiles": loop["tiles"], "loop_seconds": loop["seconds"], "loop_mp_per_s": loop["mp_per_s"],
           **run, "mp_per_s": mp / run["seconds"], "ratio_to_loop": mp / run["seconds"] / loop["mp_per_s"]}
    print(f"MP/s at {side}x{side}: pipeline {out['mp_per_s']:.3f} ({run['seconds']:.1f} s), plain loop over the same "
          f"{loop['tiles']} tiles {loop['mp_per_s']:.3f} ({loop['seconds']:.1f} s): ratio {out['ratio_to_loop']:.2f}",
          flush=True)
    return out


def growth(image: np.ndarray, sides: list[int], args: argparse.Namespace, work: str, tile: int,
           noop: bool = False) -> list[dict]:
    """Time and memory of the pipeline on mosaics of each side, each run in a fresh process."""
    rows = []
    for side in sides:
        folder = os.path.join(work, f"in{side}{'-noop' if noop else ''}")
        repeated(image, side, folder)
        g = in_fresh_process(folder, folder + "-out", args.checkpoint, tile, args.overlap, noop)
        g.update(side=side, mp=side * side / 1e6, mp_per_s=side * side / 1e6 / g["seconds"], noop=noop)
        rows.append(g)
        print(f"{side}x{side}{' (no-op model)' if noop else ''}: {g['seconds']:.1f} s, {g['mp_per_s']:.3f} MP/s, "
              f"{g['instances']} instances, driver peak RSS {g['driver_peak_rss_mb']:.0f} MB, largest worker peak "
              f"RSS {g['worker_peak_rss_mb']:.0f} MB", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder + "-out", ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--grid", type=int, default=12, help="small images per side of the mosaic")
    parser.add_argument("--tile", type=int, default=0, help="tile size (0: the model's min_size)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--score", type=float, default=0.5, help="score of detections counted in the accuracy")
    parser.add_argument("--speed-size", type=int, default=4096,
                        help="side of the large mosaic of the speed comparison (0: skip)")
    parser.add_argument("--sizes", default="2048,4096,8192", help="mosaic sides for the growth figures (0: skip)")
    parser.add_argument("--noop-sizes", default="4096,8192,16384",
                        help="mosaic sides for the growth figures with the model's call taken out (0: skip)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    from pycocotools import mask as mask_utils

    from pipeline.results import iter_rows

    info = model_info(args.checkpoint)
    cell = info["min_size"]
    tile = args.tile or info["min_size"]
    threshold = InferConfig.__dataclass_fields__["score_threshold"].default
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
                    "cpus": os.cpu_count(), "load": os.getloadavg(), "tile": tile, "overlap": args.overlap,
                    "cell": cell, "grid": args.grid}
    with tempfile.TemporaryDirectory(prefix="maskray-tiled-") as work:
        image, smalls, truth, offsets = mosaic(cell, args.grid, info["categories"])
        size = image.shape[:2]
        data = png(image)
        os.makedirs(os.path.join(work, "in"))
        with open(os.path.join(work, "in", "mosaic.png"), "wb") as f:
            f.write(data)
        report["mosaic"] = {"size": list(size), "objects": len(truth)}
        print(f"mosaic {size[1]}x{size[0]}: {len(smalls)} images, {len(truth)} objects; tile {tile}, "
              f"overlap {args.overlap}", flush=True)

        small = per_image(args.checkpoint, smalls, offsets, size, threshold)
        report["per_image"] = score(small, truth, args.score)
        loop = plain_tile_loop(args.checkpoint, data, tile, args.overlap, threshold)
        report["loop"] = {k: v for k, v in loop.items() if k != "instances"}
        report["loop"]["accuracy"] = score(loop["instances"], truth, args.score)
        run = in_fresh_process(os.path.join(work, "in"), os.path.join(work, "out"), args.checkpoint, tile, args.overlap)
        tiled = [dict(i, segmentation={"size": i["segmentation"]["size"], "counts": bytes(i["segmentation"]["counts"])})
                 for row in iter_rows(os.path.join(work, "out")) for i in row["instances"]]
        mp = size[0] * size[1] / 1e6
        report["tiled"] = {**run, "mp_per_s": mp / run["seconds"], "accuracy": score(tiled, truth, args.score),
                           "ratio_to_loop": (mp / run["seconds"]) / loop["mp_per_s"]}
        assert all(mask_utils.area(i["segmentation"]) >= 0 for i in tiled)
        print(f"per small image: {report['per_image']}", flush=True)
        print(f"tiled pipeline:  {report['tiled']['accuracy']}", flush=True)
        print(f"plain tile loop: {report['loop']['accuracy']}", flush=True)
        print(f"MP/s: pipeline {report['tiled']['mp_per_s']:.3f} ({run['seconds']:.1f} s), plain loop over the same "
              f"{loop['tiles']} tiles {loop['mp_per_s']:.3f} ({loop['seconds']:.1f} s): ratio "
              f"{report['tiled']['ratio_to_loop']:.2f}", flush=True)

        if args.speed_size:
            report["speed_large"] = speed_large(image, args, work, tile)
        report["growth"] = growth(image, [int(v) for v in args.sizes.split(",") if int(v) > 0], args, work, tile)
        report["growth_noop"] = growth(image, [int(v) for v in args.noop_sizes.split(",") if int(v) > 0], args, work,
                                       tile, noop=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
