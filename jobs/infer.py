"""``maskray infer``: batch-segment images with Ray Data (``python -m jobs.infer`` is the same).

``--input`` is a maskray dataset (``manifest.json`` + shards) or a prefix of image files
(``s3://bucket/photos/``: keyed by object path, no pack step). Units of images stream through
CPU decode tasks (uint8, EXIF orientation applied unless ``--no-exif``), an actor pool running
the checkpoint (one GPU per actor with AMP when the cluster has GPUs, CPU actors otherwise;
resize and normalize on the actor's device) and CPU tasks that paste/RLE-encode per instance and
write one results Parquet file per unit under ``--output``, atomically (see
``pipeline/infer/driver.py``). ``--output`` records what produced it (``provenance.json``: model
digest, options, input identity): a rerun with the same everything skips finished units; a rerun
that differs refuses in one line unless ``--overwrite``; ``--retry-errors`` recomputes only rows
whose error may be transient. Every input image yields exactly one row (``error`` set when it
could not be processed). Progress every 10 s; ends with one summary line.
Connects to the Ray cluster in ``RAY_ADDRESS`` when set (``maskray submit``), else starts a local one.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="URI", help="maskray checkpoint or torchvision state dict (local path or s3://), or a torchvision "
                             "name: torchvision:maskrcnn_resnet50_fpn_v2, torchvision:maskrcnn_resnet50_fpn")
    parser.add_argument("--input", required=True, metavar="URI", help="dataset prefix (maskray shards, labeled or not)")
    parser.add_argument("--output", required=True, metavar="URI",
                        help="results prefix: one Parquet file per input shard (rerun to resume)")
    parser.add_argument("--coco-json", metavar="FILE",
                        help="also write COCO results JSON (pycocotools COCO.loadRes) covering every shard")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="images per model call (default 4)")
    parser.add_argument("--actors", default="1", metavar="N|MIN,MAX",
                        help="model actors: a fixed count or an autoscaling range MIN,MAX (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                        help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0 = CPU actors)")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="threads per CPU model actor, each batch split in lanes over them (default: the "
                             "cluster's CPUs / actors; 0 = Ray's default, torch on the reserved CPUs)")
    parser.add_argument("--score-threshold", type=float, default=0.05, metavar="T",
                        help="drop detections scoring below T (default 0.05)")
    parser.add_argument("--max-pixels", type=int, default=50_000_000, metavar="P",
                        help="images with more pixels become error rows (default 50,000,000; 0 = no limit)")
    parser.add_argument("--images-per-unit", type=int, default=64, metavar="N",
                        help="images per unit of work and results file (default 64; their uint8 pixels travel "
                             "together, so use ~8 for 12-MP photos)")
    parser.add_argument("--no-exif", action="store_true",
                        help="keep the raw pixel frame (default: apply EXIF orientation, as image viewers do)")
    parser.add_argument("--intensity", default=None, metavar="MODE",
                        help="how 16/32-bit images map to 0..255: percentile (default), minmax or dtype")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="autocast in the model: float16 on GPUs, bfloat16 on CPUs (about 3x faster on CPUs "
                             "with AMX; results differ from float32's). auto (default): on for GPU actors, "
                             "off for CPU actors, whose results then equal torchvision's")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute results that --output holds from another checkpoint, input or options")
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute only the rows whose error may be transient (read or inference failures)")


def parse_actors(text: str) -> int | tuple[int, int]:
    from model.errors import MaskrayError

    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise MaskrayError(f"--actors {text!r}: expected N or MIN,MAX (integers)") from None
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise MaskrayError(f"--actors {text!r}: expected N >= 1 or MIN,MAX with 1 <= MIN <= MAX")


def run(args: argparse.Namespace) -> int:
    from model.errors import MaskrayError
    from pipeline.infer.driver import run_inference

    if args.batch_size < 1:
        raise MaskrayError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise MaskrayError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise MaskrayError(f"--gpus-per-actor must be >= 0, got {args.gpus_per_actor}")
    if args.threads is not None and args.threads < 0:
        raise MaskrayError(f"--threads must be >= 0, got {args.threads}")
    if args.max_pixels < 0:
        raise MaskrayError(f"--max-pixels must be >= 0, got {args.max_pixels}")
    if args.images_per_unit < 1:
        raise MaskrayError(f"--images-per-unit must be >= 1, got {args.images_per_unit}")
    summary = run_inference(
        args.input, args.output, args.checkpoint,
        batch_size=args.batch_size,
        actors=parse_actors(args.actors),
        gpus_per_actor=args.gpus_per_actor,
        threads=args.threads,
        score_threshold=args.score_threshold,
        coco_json=args.coco_json,
        max_pixels=args.max_pixels or None,
        images_per_unit=args.images_per_unit,
        exif=not args.no_exif,
        intensity=args.intensity,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        amp={"auto": None, "on": True, "off": False}[args.amp],
    )
    print(summary.line())
    if summary.coco_json:
        logger.info("COCO results JSON: %s", summary.coco_json)
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("infer"))
