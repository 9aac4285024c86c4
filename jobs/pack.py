"""``maskray pack``: a folder or bucket prefix of raw images -> unlabeled maskray shards."""

from __future__ import annotations

import argparse
import sys

from jobs.convert import add_shard_arguments, shard_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder or s3:// prefix of images")
    parser.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    parser.add_argument("--first-id", type=int, default=1,
                        help="image_id of the first image in sorted order (default 1)")
    parser.add_argument("--categories-from", default=None, metavar="URI",
                        help="copy categories into the manifest from a maskray dataset or a "
                             "COCO json (for pseudo-labelling)")
    add_shard_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.convert import categories_from, pack_images

    categories = categories_from(args.categories_from) if args.categories_from else None
    report = pack_images(args.images, args.out, first_id=args.first_id, categories=categories,
                         **shard_options(args))
    print(report.summary())
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("pack"))
