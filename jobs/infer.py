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
    from pipeline.infer.config import InferConfig

    cli.add_config_arguments(parser, InferConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.infer.config import InferConfig
    from pipeline.infer.driver import run_inference

    summary = run_inference(cli.config_from_args(InferConfig, args))
    print(summary.line())
    if summary.coco_json:
        logger.info("COCO results JSON: %s", summary.coco_json)
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("infer"))
