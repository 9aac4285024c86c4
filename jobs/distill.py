"""``maskray distill``: data-distillation self-training rounds (``python -m jobs.distill`` is the same).

Round 0 trains a teacher on the labeled data alone (``maskray train``'s code) and evaluates it
on the val split; each round K >= 1 runs the previous round's model with test-time
augmentation over the unlabeled images (Ray Data), keeps the ensembled detections above
per-class thresholds as pseudo-labels, trains a student from scratch on labeled +
pseudo-labeled images mixed in every batch, and evaluates it. The state of every round is in
``<work_dir>/rounds/round-K/state.json``: re-running the same command continues where a killed
run stopped and never redoes a finished round. Prints the per-round summary table at the end.
See ``pipeline/distill.py`` for the config layout and ``configs/distill-shapes-cpu.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="distill config (YAML; see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set rounds=2 --set train.schedule.max_iters=300 "
                             "(value parsed as YAML; repeatable)")


class DistillSteps:
    """The real step functions of :class:`pipeline.rounds.RoundScheduler` for one config."""

    def __init__(self, config, verbose: bool = False) -> None:
        self.config = config
        self.verbose = verbose

    def functions(self):
        from pipeline.rounds import StepFunctions

        return StepFunctions(self.train_teacher, self.pseudo_label, self.train_student, self.evaluate)

    # one `maskray train` run, configured in storage next to its outputs
    def _train(self, train_config, out: str) -> str:
        import contextlib
        import io
        import json

        import yaml

        from jobs import train as train_job
        from pipeline import storage

        config_uri = storage.join(out, "train.yaml")
        storage.write_bytes(config_uri, yaml.safe_dump(train_config.to_dict(), sort_keys=False).encode())
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = train_job.run(argparse.Namespace(config=config_uri, overrides=[], verbose=self.verbose))
        for line in printed.getvalue().splitlines():
            logger.info("train: %s", line)
        if code:
            from model.errors import MaskrayError

            raise MaskrayError(f"training run {config_uri} exited with {code}")
        final = json.loads(storage.read_bytes(storage.join(out, train_config.name, "final_metrics.json")))
        return final["model"]

    def _rows_for(self, train_config) -> int:
        """Rows that last the whole schedule: one epoch of the training stream, no restarts."""
        return train_config.schedule.max_iters * train_config.global_batch if train_config.schedule.max_iters else 0

    def train_teacher(self, out: str) -> str:
        from pipeline import storage
        from pipeline.distill import write_mixed_dataset

        c = self.config
        if c.teacher:  # a given round-0 teacher is only evaluated (the eval step loads it)
            logger.info("round 0: teacher given: %s", c.teacher)
            return c.teacher
        data = storage.join(out, "data")
        train_config = c.train_config(data, "run", out)
        rows, _ = write_mixed_dataset(c.data.labeled, None, data, ratio=1.0, seed=train_config.seed,
                                      min_rows=self._rows_for(train_config), extra={"round": 0})
        logger.info("round 0: teacher data %s: %d rows of %s", data, rows, c.data.labeled)
        return self._train(train_config, out)

    def pseudo_label(self, round_index: int, teacher: str, out: str):
        from pipeline.pseudo import run_pseudo_labels

        c = self.config
        return run_pseudo_labels(round_index, teacher, out, unlabeled=c.data.unlabeled, labeled=c.data.labeled,
                                 tta=c.tta, thresholds=c.thresholds, keep_empty=c.student.keep_empty,
                                 batch_size=c.inference.batch_size, actors=c.inference.actors,
                                 cpus_per_actor=c.inference.cpus_per_actor, threads=c.inference.threads)

    def train_student(self, round_index: int, pseudo_dataset: str, out: str) -> str:
        from pipeline import storage
        from pipeline.distill import write_mixed_dataset
        from pipeline.pseudo import check_pseudo_dataset
        from pipeline.rounds import load_state

        c = self.config
        state = load_state(c.work_dir, round_index)
        check_pseudo_dataset(pseudo_dataset, round_index=round_index, teacher=state.teacher)
        mixed = storage.join(out, "data")
        overrides = dict(c.student.overrides)
        if c.student.init == "teacher":
            overrides["model.weights"] = state.teacher
        train_config = c.train_config(mixed, "run", out, overrides)
        rows, labeled = write_mixed_dataset(c.data.labeled, pseudo_dataset, mixed, ratio=c.student.mix_ratio,
                                            seed=train_config.seed + round_index,
                                            min_rows=self._rows_for(train_config), extra={"round": round_index, "teacher": state.teacher})
        logger.info("round %d: student data %s: %d rows, %d labeled (mix ratio %.2f)", round_index, mixed, rows,
                    labeled, c.student.mix_ratio)
        return self._train(train_config, out)

    def evaluate(self, checkpoint: str) -> dict:
        import torch

        from pipeline.evaluate import evaluate_model, load_checkpoint_uri, metrics_to_json

        c = self.config
        if c.eval_threads:
            torch.set_num_threads(c.eval_threads)
        model, model_config, _ = load_checkpoint_uri(checkpoint)
        metrics = evaluate_model(model, c.data.val, category_ids=model_config.category_ids(),
                                 limit=c.data.val_max_images or None, batch_size=4)
        return metrics_to_json(metrics)


def run(args: argparse.Namespace) -> int:
    import os
    import time

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline import storage
    from pipeline.distill import load_distill_config, prepare_data, to_dict
    from pipeline.rounds import RoundScheduler, format_summary, load_states

    start = time.perf_counter()
    config = load_distill_config(args.config, args.overrides)
    verbose = bool(getattr(args, "verbose", False))
    storage.write_bytes(storage.join(config.work_dir, "rounds", "config.json"),
                        (__import__("json").dumps(to_dict(config), indent=2) + "\n").encode())
    prepare_data(config)

    import ray

    from jobs import train as train_job

    train_job._quiet_ray()
    from pipeline import raysetup

    started_ray = raysetup.init(verbose=verbose)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        scheduler = RoundScheduler(config.work_dir, DistillSteps(config, verbose).functions(),
                                   rounds=config.rounds, min_gain=config.min_gain,
                                   config_hash=config.fingerprint())
        scheduler.run()
    finally:
        if started_ray:
            ray.shutdown()
    table = format_summary(load_states(config.work_dir))
    storage.write_bytes(storage.join(config.work_dir, "rounds", "summary.txt"), (table + "\n").encode())
    print(table)
    print(f"{scheduler.stop_reason}; this invocation took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("distill"))
