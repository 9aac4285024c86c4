"""``maskray train``: distributed Mask R-CNN training with Ray Train (``python -m jobs.train`` is the same).

Loads a YAML config (``--set key=value`` overrides any key), checks it and the data before any
worker starts, runs a ``TorchTrainer`` (DDP over ``num_workers`` workers; checkpoints and
TensorBoard events under ``<storage_path>/<name>``; ``max_failures`` restarts from the last
checkpoint; re-running with the same name resumes), then writes ``final_metrics.json`` in the
run folder and prints the last checkpoint and the AP table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="training config (YAML; see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set data.train=s3://b/shapes/train "
                             "--set optim.base_lr=0.01 (value parsed as YAML; repeatable)")


def _quiet_ray() -> None:
    """Ray's own progress output off; our one-line-per-interval log is the console."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Their one warning each is about progress bars ("Progress bars disabled"; "tqdm is not
    # installed", when a worker's bar reaches the driver): maskray's own choice here, not news.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)


def _init_ray(verbose: bool) -> None:
    from pipeline import raysetup

    raysetup.init(verbose=verbose)  # RAY_ADDRESS, else a private local instance; no-op when up


def _without_progress_bars(dataset):
    """``dataset`` with Ray Data's progress bars off (the train loop prints one line per interval);
    set on the dataset's own context so a later job in this process (the demo's infer) keeps them."""
    dataset.context.enable_progress_bars = False
    return dataset


def _failure_message(exc: BaseException) -> str:
    """One line for a failed ``fit()``: the first worker's root-cause error, else the controller's."""
    causes = list(getattr(exc, "worker_failures", {}).values())
    if getattr(exc, "controller_failure", None) is not None:
        causes.append(exc.controller_failure)
    for cause in causes or [exc]:
        inner = getattr(cause, "cause", None) or cause
        lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
        if lines:
            errors = [ln for ln in lines if ": " in ln and ln.split(":", 1)[0].replace(".", "").isidentifier()
                      and ln.split(":", 1)[0].split(".")[-1][0].isupper()]
            text = errors[-1] if errors else lines[0]
            return f"{type(inner).__name__}: {text}" if not errors else text
    return type(exc).__name__


def run(args: argparse.Namespace) -> int:
    _quiet_ray()
    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.training import check_resources, plan_run, train_dataset, train_loop_per_worker

    config = load_config(args.config, args.overrides)
    plan = plan_run(config)
    logger.info("train: %d images, %d categories, %d workers x %d images, lr %.4f, %d iterations -> %s",
                plan.train_images, len(plan.categories), config.num_workers, config.images_per_worker,
                plan.lr, plan.total_iters, plan.run_uri)

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    verbose = bool(getattr(args, "verbose", False))
    if not verbose:  # Ray Data sets up its own INFO logging on import
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    _init_ray(verbose)
    check_resources(config, ray.cluster_resources(), autoscaling=config.wait_for_resources)

    if "://" in config.storage_path:
        fs, base = storage.resolve(config.storage_path)
        storage_kwargs = {"storage_path": base, "storage_filesystem": fs}
    else:
        storage_kwargs = {"storage_path": os.path.abspath(config.storage_path)}
    # the console relay lives on the driver's node: it must outlive any worker node
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "plan": plan.to_dict(), "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker},
                                               placement_strategy=config.placement_strategy),
        run_config=ray.train.RunConfig(
            name=config.name,
            # a worker group that cannot start (e.g. a node gone for good) fails the run after a few
            # tries instead of retrying forever, unless the cluster can grow
            failure_config=ray.train.FailureConfig(
                max_failures=config.max_failures,
                controller_failure_limit=-1 if config.wait_for_resources else 3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            **storage_kwargs,
        ),
        datasets={"train": _without_progress_bars(train_dataset(config, plan))},
    )

    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set():
            try:
                line = progress.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty, or the actor is gone at shutdown
                continue
            logger.info("%s", line)

    thread = threading.Thread(target=relay, name="maskray-train-progress", daemon=True)
    thread.start()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        from model.errors import MaskrayError

        raise MaskrayError(f"training run {config.name} failed: {_failure_message(exc)}") from exc
    finally:
        stop.set()
        thread.join(timeout=2)
        while True:  # whatever the workers sent last
            try:
                logger.info("%s", progress.get_nowait())
            except Exception:  # noqa: BLE001
                break
        try:
            ray.kill(progress.actor)
        except Exception:  # noqa: BLE001
            pass

    return _finish(config, plan, result)


def _finish(config, plan, result) -> int:
    """Write ``final_metrics.json`` in the run folder, print the checkpoint and the AP table."""
    import json

    from pipeline import storage

    metrics = dict(result.metrics or {})
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if checkpoint and "://" in config.storage_path:
        scheme = config.storage_path.split("://", 1)[0]
        checkpoint = f"{scheme}://{checkpoint}"
    evals = {kind: {k.split("_", 1)[1]: v for k, v in metrics.items() if k.startswith(kind + "_")}
             for kind in ("bbox", "segm")}
    final = {
        **{k: v for k, v in evals.items() if v},
        "checkpoint": checkpoint,
        "model": f"{checkpoint}/model.pt" if checkpoint else None,
        "dataset": config.data.val or None,
        "iteration": metrics.get("iteration"),
        "train": {k: v for k, v in metrics.items() if not k.startswith(("bbox_", "segm_"))},
        "run": plan.run_uri,
    }
    target = storage.join(plan.run_uri, "final_metrics.json")
    storage.write_bytes(target, json.dumps(final, indent=2, sort_keys=True).encode("utf-8"))
    print(f"final iteration: {metrics.get('iteration')}/{plan.total_iters}")
    print(f"last checkpoint: {checkpoint}")
    print(f"metrics: {target}")
    if final.get("bbox") or final.get("segm"):
        from pipeline.evaluate import format_table

        print(format_table({k: final[k] for k in ("bbox", "segm") if k in final}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("train"))
