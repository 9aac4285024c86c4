"""The training engine: :func:`fit` runs a training run with Ray Train and returns a :class:`TrainResult`.

Driver side only (the workers' loop is :mod:`pipeline.train.loop`): :func:`plan_run` reads the
train/val manifests (classes come from the train manifest: model label ``i`` =
``categories[i - 1]``), checks the model options and sizes the schedule;
:func:`check_run_config` compares the config with the one the run folder remembers
(``run_config.json``) and refuses a rerun under the same name whose results-affecting keys
differ; :func:`check_resources` refuses a worker group the cluster cannot hold;
:func:`train_dataset` builds the Ray Data stream (read shards -> decode + augment in CPU
tasks, undecodable rows skipped and counted by the run's :class:`RunChannel` actor).

Ray Train's settings are grouped as Ray Train groups them when :func:`fit` builds the trainer:
``ScalingConfig`` (``num_workers``, ``use_gpu``, ``cpus_per_worker``, ``placement_strategy``),
``RunConfig`` (``name``, ``storage_path``, ``checkpoint.keep``), ``FailureConfig``
(``max_failures``, ``wait_for_resources``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from model.errors import MaskrayError
from pipeline.train.config import NON_RESULT_KEYS, ConfigError, TrainConfig
from pipeline.train.hooks import EVAL_KINDS
from pipeline.train.loop import STOP_KEY, RunPlan, train_loop_per_worker
from pipeline.train.data import train_dataset

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"  # in the run folder: the config the run was started with
FINAL_METRICS_FILE = "final_metrics.json"


@dataclass
class TrainResult:
    """What :func:`fit` hands back.

    ``checkpoint_uri``: the last checkpoint's ``model.pt`` (a maskray checkpoint: loads with
    ``pipeline.evaluate.load_checkpoint_uri`` / ``model.checkpoint.load_checkpoint``);
    ``metrics``: the last report (iteration, losses, ``bbox_AP``... when evaluated);
    ``run_dir``: ``<storage_path>/<name>`` (checkpoints, TensorBoard, ``final_metrics.json``).
    """

    checkpoint_uri: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # driver-side seconds (start-up breakdown)

    def eval_metrics(self) -> dict[str, dict[str, float | None]]:
        """``{"bbox": {"AP": ..}, "segm": {..}, "keypoints": {..}}`` from the flat ``bbox_AP``... metrics
        (empty when not evaluated; ``keypoints`` only for a keypoint model)."""
        out = {kind: {k.split("_", 1)[1]: v for k, v in self.metrics.items() if k.startswith(kind + "_")}
               for kind in EVAL_KINDS}
        return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------- planning


def check_model_options(options: dict[str, Any]) -> None:
    """Every ``model.options`` key must be a plain keyword of ``model.build_maskrcnn``."""
    from model.checkpoint import ModelConfig
    from model.maskrcnn import build_maskrcnn

    params = inspect.signature(build_maskrcnn).parameters
    top_level = {f for f in ModelConfig.__dataclass_fields__} | {"num_classes"}
    for key in options:
        if key not in params or key.endswith("_module") or key in top_level or key in (
                "rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor",
                "mask_roi_pool", "mask_head", "mask_predictor"):
            plain = [p for p in params if p not in top_level and not p.endswith(("_module", "_head", "_pool",
                                                                                  "_predictor", "_generator"))]
            raise ConfigError(f"model.options.{key}: not a keyword of build_maskrcnn that a config can set "
                              f"(known: {', '.join(plain)})")


def plan_run(config: TrainConfig) -> RunPlan:
    """Read the manifests and size the run; every error here happens before any worker starts."""
    from model import pretrained
    from pipeline import storage
    from pipeline.data.format import read_manifest

    def manifest(uri: str, key: str):
        try:
            return read_manifest(uri)
        except MaskrayError as exc:
            raise ConfigError(f"{key}={uri}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}={uri}: cannot read the dataset manifest ({exc})") from None

    train = manifest(config.data.train, "data.train")
    categories = [dict(c) for c in train.categories]
    if not categories:
        raise ConfigError(f"data.train={config.data.train}: the manifest lists no categories")
    train_images = sum(int(s.images) for s in train.shards)
    per_worker = train_images // config.num_workers
    if per_worker < config.images_per_worker:
        raise ConfigError(
            f"data.train={config.data.train}: {train_images} images give each of {config.num_workers} workers "
            f"{per_worker} per epoch, fewer than images_per_worker={config.images_per_worker}")
    val_images = 0
    if config.data.val:
        val = manifest(config.data.val, "data.val")
        val_images = sum(int(s.images) for s in val.shards)
        train_ids = [int(c["id"]) for c in categories]
        val_ids = [int(c["id"]) for c in val.categories]
        if val_ids and val_ids != train_ids:
            raise ConfigError(f"data.val={config.data.val}: categories {val_ids} differ from the train "
                              f"manifest's {train_ids}")
    for key in ("weights", "backbone_weights"):
        uri = getattr(config.model, key)
        if not uri:
            continue
        try:
            if pretrained.is_name(uri):  # resolved, downloaded once and hash-checked before any worker starts
                pretrained.fetch(pretrained.resolve(uri))
                continue
            found = storage.exists(uri)
        except MaskrayError as exc:
            raise ConfigError(f"model.{key}={uri}: {exc}") from None
        if not found:
            raise ConfigError(f"model.{key}={uri}: no such file")
    check_model_options(config.model.options)
    keypoint_flip = plan_keypoints(config, categories)
    too_big = [s for s in config.augment.min_sizes if s > config.model.max_size]
    if too_big:
        raise ConfigError(f"augment.min_sizes: {too_big[0]} is above model.max_size={config.model.max_size}")
    total = config.total_iters(train_images)
    for step in config.schedule.steps:
        if step >= total:
            raise ConfigError(f"schedule.steps: step {step} is not below the {total} iterations of the run")
    return RunPlan(categories=categories, train_images=train_images, val_images=val_images, total_iters=total,
                   lr=config.lr, global_batch=config.global_batch,
                   run_uri=storage.join(config.storage_path, config.name), keypoint_flip=keypoint_flip)


def plan_keypoints(config: TrainConfig, categories: list[dict]) -> list[int]:
    """Check a keypoint model (``model.num_keypoints`` K > 0) against the train manifest's
    categories and ``eval.kpt_oks_sigmas``; returns the flip permutation of the K keypoints
    (``pipeline.data.keypoints.flip_map`` of their names and ``data.keypoint_flip_map``), ``[]``
    for a model without keypoints.

    Every category that names keypoints must name K of them (a category naming none trains
    boxes and masks only). The names give the default flip map, so categories naming different
    keypoints need ``data.keypoint_flip_map``. OKS sigmas: K values, or none for COCO person's 17.
    """
    from pipeline.data.keypoints import KeypointError, flip_map, keypoint_names

    k = config.model.num_keypoints
    if not k:
        return []
    named = [c for c in categories if keypoint_names(c)]
    if not named:
        raise ConfigError(f"model.num_keypoints={k}: no category of data.train={config.data.train} names keypoints")
    for c in named:
        if len(keypoint_names(c)) != k:
            raise ConfigError(f"model.num_keypoints={k}: category {c['id']} ({c.get('name')}) of data.train names "
                              f"{len(keypoint_names(c))} keypoints")
    names = keypoint_names(named[0])
    given = config.data.keypoint_flip_map
    if given is None and any(keypoint_names(c) != names for c in named):
        raise ConfigError(f"data.keypoint_flip_map: categories of data.train name different keypoints "
                          f"({named[0]['id']} and {next(c['id'] for c in named if keypoint_names(c) != names)}); "
                          f"give the left/right pairs of the K keypoints")
    try:
        flip = flip_map(names, given)
    except KeypointError as exc:
        raise ConfigError(f"data.keypoint_flip_map: {exc}") from None
    sigmas = config.eval.kpt_oks_sigmas
    if sigmas and len(sigmas) != k:
        raise ConfigError(f"eval.kpt_oks_sigmas: {len(sigmas)} sigmas for model.num_keypoints={k}")
    if not sigmas and k != 17 and config.data.val:
        raise ConfigError(f"eval.kpt_oks_sigmas: needed for model.num_keypoints={k} (the default is COCO "
                          f"person's 17 sigmas)")
    return flip


def check_resources(config: TrainConfig, resources: dict[str, float], *, autoscaling: bool = False) -> None:
    """Refuse a worker group larger than the cluster (``resources`` = ``ray.cluster_resources()``).

    Ray Train would otherwise wait for the resources forever; ``autoscaling`` (the config's
    ``wait_for_resources``) skips the check where an autoscaler can add nodes.
    """
    if autoscaling:
        return
    need_cpu = config.num_workers * config.cpus_per_worker
    have_cpu = float(resources.get("CPU", 0.0))
    if need_cpu > have_cpu + 1e-9:
        raise ConfigError(
            f"num_workers={config.num_workers} x cpus_per_worker={config.cpus_per_worker:g} needs {need_cpu:g} CPUs "
            f"but the Ray cluster has {have_cpu:g}; lower num_workers or cpus_per_worker (on an autoscaling "
            "cluster set wait_for_resources: true)")
    if config.use_gpu and config.num_workers > float(resources.get("GPU", 0.0)):
        raise ConfigError(f"use_gpu with num_workers={config.num_workers} needs as many GPUs but the Ray cluster "
                          f"has {resources.get('GPU', 0):g}; set use_gpu: false or fewer workers")


class RunChannel:
    """A tiny Ray actor on the driver's node: the workers' console lines, and the distinct
    (image id, shard) rows the train stream skipped, with reasons.

    One actor for both (each actor is a Python process to start). Bad rows are distinct, so a
    row met again in a later epoch (or after a restart) counts once.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.entries: list[tuple[int, str, str]] = []
        self.keys: set[tuple[int, str]] = set()

    def say(self, line: str) -> None:
        self.lines.append(line)

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def add(self, image_id: int, shard: str, reason: str) -> None:
        if (image_id, shard) not in self.keys:
            self.keys.add((image_id, shard))
            self.entries.append((image_id, shard, reason))

    def since(self, start: int) -> tuple[int, list[tuple[int, str, str]]]:
        """(distinct bad rows so far, the entries from index ``start`` on)."""
        return len(self.entries), self.entries[start:]


# --------------------------------------------------------------------------- the run's config


def check_run_config(config: TrainConfig, run_uri: str, *, resume_anyway: bool = False) -> list[str]:
    """Refuse to continue a run folder started with a config that differs in results.

    The one rule of :mod:`pipeline.runrecord`: keys declared run-only on the config classes
    (:data:`~pipeline.train.config.NON_RESULT_KEYS`: logging, eval cadence, retries, placement)
    may differ; any other differing key raises naming them, unless ``resume_anyway``, which
    logs them. Returns the differing keys. The config is recorded by
    :func:`remember_run_config` once the run starts (a run refused for another reason records
    nothing).
    """
    from pipeline import runrecord, storage
    from pipeline.config import field_defaults

    return runrecord.check(storage.join(run_uri, RUN_CONFIG_FILE), config.to_dict(), ignore=NON_RESULT_KEYS,
                           what=f"run {config.name} in {run_uri}", flag="--resume-anyway",
                           alternative="pick a new name (--set name=...)", override=resume_anyway,
                           defaults=field_defaults(TrainConfig))


def remember_run_config(config: TrainConfig, run_uri: str) -> None:
    """Write the config in force to ``<run>/run_config.json`` (what :func:`check_run_config` compares with)."""
    from pipeline import runrecord, storage

    runrecord.write(storage.join(run_uri, RUN_CONFIG_FILE), config.to_dict())


# --------------------------------------------------------------------------- fit


def failure_message(exc: BaseException) -> str:
    """One line for a failed Ray Train ``fit()``: the first worker's root-cause error, else the controller's."""
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


def _storage_kwargs(storage_path: str) -> dict[str, Any]:
    from pipeline import storage

    if "://" in storage_path:
        fs, base = storage.resolve(storage_path)
        return {"storage_path": base, "storage_filesystem": fs}
    return {"storage_path": os.path.abspath(storage_path)}


def fit(config: TrainConfig, *, resume_anyway: bool = False, verbose: bool = False) -> TrainResult:
    """Train with Ray Train; the library call behind ``maskray train``, ``maskray distill`` and the demo.

    Plans and checks everything it can before any worker starts (manifests, model options,
    the run folder's remembered config, cluster resources), starts Ray by the one rule
    (:func:`pipeline.raysetup.init`; a no-op when Ray is up), runs a ``TorchTrainer`` (DDP over
    ``num_workers``; checkpoints and TensorBoard under ``<storage_path>/<name>``; rerunning the
    same name resumes from the last checkpoint), relays the workers' console lines to this
    process's log, writes ``final_metrics.json`` in the run folder and returns a
    :class:`TrainResult`. A failed run raises :class:`MaskrayError` with one line.
    """
    from pipeline import raysetup, storage

    t0, wall0 = time.perf_counter(), time.time()  # wall clock: the workers' start-up marks are relative to it
    timings: dict[str, float] = {}
    plan = plan_run(config)
    check_run_config(config, plan.run_uri, resume_anyway=resume_anyway)
    logger.info("train: %d images, %d categories, %d workers x %d images, lr %.4f, %d iterations -> %s",
                plan.train_images, len(plan.categories), config.num_workers, config.images_per_worker,
                plan.lr, plan.total_iters, plan.run_uri)
    timings["plan_s"] = time.perf_counter() - t0

    def mark(name: str) -> None:  # driver-side seconds per phase, in order
        timings[name] = time.perf_counter() - t0 - sum(timings.values())

    raysetup.init(verbose=verbose)
    mark("ray_init_s")
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    mark("import_ray_train_s")
    check_resources(config, ray.cluster_resources(), autoscaling=config.wait_for_resources)
    # the console relay and the bad-row counter live on the driver's node: they outlive any worker node
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    channel = ray.remote(RunChannel).options(num_cpus=0, scheduling_strategy=here).remote()
    dataset = train_dataset(config, plan, channel)
    mark("dataset_s")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "plan": plan.to_dict(), "channel": channel,
                           "t0": wall0},
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
            **_storage_kwargs(config.storage_path),
        ),
        datasets={"train": dataset},
    )
    stop = threading.Event()

    def drain() -> None:
        try:
            lines = ray.get(channel.take_lines.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the actor is busy or gone at shutdown: next time
            return
        for line in lines:
            logger.info("%s", line)

    def relay() -> None:
        while not stop.wait(0.5):
            drain()

    thread = threading.Thread(target=relay, name="maskray-train-progress", daemon=True)
    thread.start()
    remember_run_config(config, plan.run_uri)
    mark("trainer_s")
    t_fit = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise MaskrayError(f"training run {config.name} failed: {failure_message(exc)}") from exc
    finally:
        stop.set()
        thread.join(timeout=12)
        drain()  # whatever the workers sent last
        try:
            ray.kill(channel)
        except Exception:  # noqa: BLE001
            pass
    timings["fit_s"] = time.perf_counter() - t_fit
    metrics = dict(result.metrics or {})
    if metrics.get(STOP_KEY):
        raise MaskrayError(f"training run {config.name} stopped at iteration {metrics.get('iteration')}: "
                           f"{metrics[STOP_KEY]}")
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if checkpoint and "://" in config.storage_path:
        checkpoint = f"{config.storage_path.split('://', 1)[0]}://{checkpoint}"
    out = TrainResult(checkpoint_uri=f"{checkpoint}/model.pt" if checkpoint else None, metrics=metrics,
                      run_dir=plan.run_uri, timings={k: round(v, 2) for k, v in timings.items()})
    final = {
        **out.eval_metrics(),
        "checkpoint": checkpoint,
        "model": out.checkpoint_uri,
        "dataset": config.data.val or None,
        "iteration": metrics.get("iteration"),
        "total_iters": plan.total_iters,
        "train": {k: v for k, v in metrics.items() if not k.startswith(tuple(f"{kind}_" for kind in EVAL_KINDS))},
        "run": plan.run_uri,
    }
    storage.write_bytes(storage.join(plan.run_uri, FINAL_METRICS_FILE),
                        json.dumps(final, indent=2, sort_keys=True).encode("utf-8"))
    return out
