"""``maskray convert``: COCO json + images -> maskray shards + manifest.json."""

from __future__ import annotations

import argparse
import sys


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images-per-shard", type=int, default=1000,
                        help="images per shard (default 1000)")
    parser.add_argument("--max-shard-mb", type=float, default=256,
                        help="approximate shard size limit in MB (default 256)")
    parser.add_argument("--row-group-size", type=int, default=64,
                        help="rows per Parquet row group (default 64)")
    parser.add_argument("--workers", type=int, default=8,
                        help="threads reading images (default 8)")


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
            "row_group_size": args.row_group_size, "workers": args.workers}


def run(args: argparse.Namespace) -> int:
    from pipeline.convert import convert_coco

    report = convert_coco(args.coco, args.images, args.out, **shard_options(args))
    print(report.summary())
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("convert"))
