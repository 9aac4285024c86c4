"""``maskray train``: distributed Mask R-CNN training with Ray Train (``python -m jobs.train`` is the same).

Loads a YAML config (``--set key=value`` overrides any key) and calls
:func:`pipeline.train.fit`: checks the config and the data before any worker starts, runs a
``TorchTrainer`` (DDP over ``num_workers`` workers; checkpoints and TensorBoard events under
``<storage_path>/<name>``; ``max_failures`` restarts from the last checkpoint; re-running with
the same name resumes, and refuses a changed config unless ``--resume-anyway``), writes
``final_metrics.json`` in the run folder; then prints the last checkpoint and the AP table.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="training config (YAML; see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set data.train=s3://b/shapes/train "
                             "--set optim.base_lr=0.01 (value parsed as YAML; repeatable)")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="continue a run of this name although its config changed in keys that affect results")


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate import format_table
    from pipeline.train import fit, load_config

    config = load_config(args.config, args.overrides)
    result = fit(config, resume_anyway=bool(getattr(args, "resume_anyway", False)),
                 verbose=bool(getattr(args, "verbose", False)))
    print(f"final iteration: {result.metrics.get('iteration')}")
    print(f"last checkpoint: {result.checkpoint_uri.rsplit('/', 1)[0] if result.checkpoint_uri else None}")
    print(f"model: {result.checkpoint_uri}")
    print(f"run folder: {result.run_dir}")
    evals = result.eval_metrics()
    if evals:
        print(format_table(evals))
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("train"))
