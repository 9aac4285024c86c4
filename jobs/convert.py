"""``maskray convert``: COCO json + images -> maskray shards + manifest.json.

With ``--runner ray`` (or ``auto`` where ``RAY_ADDRESS`` is set) the plan runs in one task and
each shard in its own Ray Data task on the cluster (:mod:`pipeline.data.ingest`); rerunning the same
command after an interruption completes it without redoing finished shards.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.data.ingest import IngestConfig

    parser.add_argument("--coco", "--coco-json", dest="coco", required=True,
                        help="COCO annotations json (path or s3:// URI)")
    parser.add_argument("--images", required=True,
                        help="folder or s3:// prefix the COCO file_names are relative to")
    parser.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    cli.add_config_arguments(parser, IngestConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import to_dict
    from pipeline.data.convert import convert_coco
    from pipeline.data.ingest import IngestConfig

    report = convert_coco(args.coco, args.images, args.out, **to_dict(cli.config_from_args(IngestConfig, args)))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("convert"))
