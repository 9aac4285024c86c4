"""``maskray convert``: COCO json + images -> maskray shards + manifest.json.

With ``--runner ray`` (or ``auto`` where ``RAY_ADDRESS`` is set) the plan runs in one task and
each shard in its own Ray Data task on the cluster (:mod:`pipeline.data.ingest`); rerunning the same
command after an interruption completes it without redoing finished shards.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.data import ingest

    parser.add_argument("--coco", "--coco-json", dest="coco", required=True,
                        help="COCO annotations json (path or s3:// URI)")
    parser.add_argument("--images", required=True,
                        help="folder or s3:// prefix the COCO file_names are relative to")
    parser.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    ingest.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.data import ingest
    from pipeline.data.convert import convert_coco

    report = convert_coco(args.coco, args.images, args.out, **ingest.options_from_args(args))
    print(report.summary())
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("convert"))
