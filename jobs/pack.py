"""``maskray pack``: a folder or bucket prefix of raw images -> unlabeled maskray shards.

Listing, reading, header checks and shard writing run in Ray tasks with ``--runner ray`` (or
``auto`` where ``RAY_ADDRESS`` is set); see :mod:`pipeline.data.ingest`. Rerun the same command to
complete an interrupted run.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.data.ingest import IngestConfig

    parser.add_argument("--images", required=True, help="folder or s3:// prefix of images")
    parser.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    parser.add_argument("--first-id", type=int, default=1,
                        help="image_id of the first image in sorted order (default 1)")
    parser.add_argument("--categories-from", default=None, metavar="URI",
                        help="copy categories into the manifest from a maskray dataset or a "
                             "COCO json (for pseudo-labelling)")
    cli.add_config_arguments(parser, IngestConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import to_dict
    from pipeline.data.convert import categories_from, pack_images
    from pipeline.data.ingest import IngestConfig

    categories = categories_from(args.categories_from) if args.categories_from else None
    report = pack_images(args.images, args.out, first_id=args.first_id, categories=categories,
                         **to_dict(cli.config_from_args(IngestConfig, args)))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("pack"))
