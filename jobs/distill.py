"""``maskray distill``: data-distillation self-training rounds (``python -m jobs.distill`` is the same).

Round 0 trains a teacher on the labeled data alone (:func:`pipeline.train.fit`) and evaluates it
on the val split; each round K >= 1 runs the previous round's model with test-time augmentation
over the unlabeled images (a predictor of the inference engine, ``run_inference``: resumable,
exactly once per unit), keeps the ensembled detections above per-class thresholds as
pseudo-labels, trains a student on labeled + pseudo-labeled images mixed in every batch, and
evaluates it. The state of every round is in ``<work_dir>/rounds/round-K/state.json``: re-running
the same command continues where a killed run stopped and never redoes a finished round; an
unfinished round refuses a changed config unless ``--resume-anyway``. Prints the per-round summary
table at the end. See ``pipeline/distill/config.py`` for the config layout and
``configs/distill-shapes-cpu.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="distill config (YAML; see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set rounds=2 --set train.schedule.max_iters=300 "
                             "(value parsed as YAML; repeatable)")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="continue an unfinished round although the config changed in keys that affect results")


def run(args: argparse.Namespace) -> int:
    from pipeline.distill.config import load_distill_config
    from pipeline.distill.run import run_distill
    from pipeline.distill.rounds import format_summary, load_states

    start = time.perf_counter()
    config = load_distill_config(args.config, args.overrides)
    scheduler = run_distill(config, resume_anyway=bool(getattr(args, "resume_anyway", False)),
                            verbose=bool(getattr(args, "verbose", False)))
    print(format_summary(load_states(config.work_dir)))
    print(f"{scheduler.stop_reason}; this invocation took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("distill"))
