"""``maskray convert``: COCO json + images -> maskray shards + manifest.json.

Runs on Ray by default (the plan in one task, one Ray Data task per shard; see
:mod:`pipeline.ingest`); rerunning the same command after an interruption completes it.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.dataset import DEFAULT_MAX_PIXELS


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images-per-shard", type=int, default=1000,
                        help="images per shard (default 1000)")
    parser.add_argument("--max-shard-mb", type=float, default=256,
                        help="approximate shard size limit in MB (default 256)")
    parser.add_argument("--row-group-size", type=int, default=64,
                        help="rows per Parquet row group (default 64)")
    parser.add_argument("--workers", type=int, default=8,
                        help="threads reading images in each shard's task (default 8)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels (read from the header) are skipped "
                             f"before decoding (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--runner", choices=("auto", "ray", "local"), default="auto",
                        help="ray: one Ray Data task per shard on the cluster (RAY_ADDRESS, else "
                             "a local Ray); local: this process only; auto (default): ray when "
                             "RAY_ADDRESS is set (e.g. a submitted job), else local")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco", "--coco-json", dest="coco", required=True,
                        help="COCO annotations json (path or s3:// URI)")
    parser.add_argument("--images", required=True,
                        help="folder or s3:// prefix the COCO file_names are relative to")
    parser.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    add_shard_arguments(parser)


def shard_options(args: argparse.Namespace) -> dict:
    """The writer keyword arguments of ``add_shard_arguments``' flags."""
    return {"images_per_shard": args.images_per_shard, "max_shard_bytes": int(args.max_shard_mb * 1024 * 1024),
            "row_group_size": args.row_group_size, "workers": args.workers,
            "max_pixels": args.max_pixels, "runner": args.runner}


def run(args: argparse.Namespace) -> int:
    from pipeline.convert import convert_coco

    report = convert_coco(args.coco, args.images, args.out, **shard_options(args))
    print(report.summary())
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("convert"))
