"""``maskray import SRC OUT``: a self-describing maskray checkpoint from any model source
(``python -m jobs.import_model`` is the same).

``SRC`` is a ``torchvision:`` name (``torchvision:maskrcnn_resnet50_fpn_v2``: torchvision's weights
API, torch.hub's cache, hash-checked), a plain torchvision state dict or a maskray checkpoint at a
local path or ``s3://`` URI. ``OUT`` (local path or ``s3://``) receives the model with its config,
categories, source and the source file's sha256, so a cluster reads one file from object storage.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="torchvision:NAME, or a torchvision state dict / maskray checkpoint (path or s3://)")
    parser.add_argument("out", metavar="OUT", help="where to write the maskray checkpoint (path or s3://)")


def run(args: argparse.Namespace) -> int:
    from pipeline.weights import import_model

    print(import_model(args.src, args.out).line())
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("import"))
