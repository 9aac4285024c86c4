"""``maskray export``: labeled maskray shards -> one COCO JSON file (the reverse of ``convert``).

Writes ``images``, ``annotations`` (compressed RLE masks; ``keypoints``/``num_keypoints`` and
``score`` where stored) and the manifest's ``categories`` (keypoint names and skeleton kept).
Image bytes stay in the shards.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="URI", help="maskray dataset (shards prefix)")
    parser.add_argument("--out", required=True, metavar="URI", help="COCO JSON file to write (path or s3://)")


def run(args: argparse.Namespace) -> int:
    from pipeline.data.convert import export_coco

    summary = export_coco(args.data, args.out)
    print(f"export: {summary['images']} images, {summary['annotations']} annotations -> {summary['out']}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("export"))
