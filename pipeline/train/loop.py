"""What each Ray Train worker runs: set-up, the step function, and the loop that calls the hooks
(:mod:`pipeline.train.hooks`) around it.

:func:`train_loop_per_worker` (``TorchTrainer(train_loop_per_worker, ...)``) sets up one worker
(:func:`setup`: model, optimizer, resume or initial weights, DDP) and then, for every batch
of its ``get_dataset_shard("train")`` share, calls :func:`train_step` (one SGD step: lr for the
iteration, forward under autocast, finite-loss check, backward, clipping, optimizer step). At
an interval (``log_every``, ``eval.every``, ``checkpoint.every``, the last iteration) the
worker all-reduces its meters and runs the hooks in order; the shape of detectron2's
``run_step`` + hooks:

* :class:`BadRowsHook` (rank 0): rows the stream skipped (undecodable, over the pixel limit,
  bad annotations) -> one console line each, the count in the metrics, and a stop when more
  than ``data.max_bad_fraction`` of the train set was bad;
* :class:`ConsoleHook` (rank 0): one line per interval to the driver (queue actor);
* :class:`TensorBoardHook` (rank 0): events under ``<run>/tensorboard``;
* :class:`EvalHook` (rank 0): COCO metrics on ``data.val``;

then every rank agrees whether to stop and calls ``ray.train.report`` with the metrics (and,
when due or stopping, a checkpoint written by rank 0: :func:`save_train_state`).

A checkpoint directory holds ``model.pt`` (``model.checkpoint.save_checkpoint``: loads with
``model.checkpoint.load_checkpoint`` for eval/infer) and ``train_state.pt`` (optimizer, AMP
scaler, iteration); both load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model.checkpoint import unwrap
from model.errors import MaskrayError
from pipeline.train.config import TrainConfig
from pipeline.train.data import collate
from pipeline.train.hooks import (BadRowsHook, Console, ConsoleHook, Due, EvalHook, Hook, Meters,
                                   TensorBoardHook)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
STOP_KEY = "stopped"  # metrics key: why the workers stopped before the last iteration


@dataclass
class RunPlan:
    """What the driver worked out before any worker starts (JSON-able; sent to the workers)."""

    categories: list[dict]
    train_images: int
    val_images: int
    total_iters: int
    lr: float
    global_batch: int
    run_uri: str = ""  # <storage_path>/<name>
    keypoint_flip: list[int] = field(default_factory=list)  # the K keypoints' flip permutation; [] = no keypoints

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# --------------------------------------------------------------------------- the step


def lr_at(iteration: int, base_lr: float, total_iters: int, schedule) -> float:
    """Learning rate for ``iteration`` (0-based) under ``schedule`` (a ``ScheduleConfig``)."""
    if schedule.policy == "cosine":
        span = max(1, total_iters - schedule.warmup_iters)
        progress = min(1.0, max(0.0, (iteration - schedule.warmup_iters) / span))
        floor = schedule.min_lr_factor
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = schedule.gamma ** sum(1 for s in schedule.steps if iteration >= s)
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= schedule.warmup_factor * (1 - alpha) + alpha
    return base_lr * factor


@dataclass
class Worker:
    """One worker's training state (model possibly DDP-wrapped; ``params`` the trainable ones)."""

    config: TrainConfig
    plan: RunPlan
    model: torch.nn.Module
    model_config: Any  # model.checkpoint.ModelConfig
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    device: torch.device
    scaler: Any = None  # torch.amp.GradScaler on CUDA with AMP
    rank: int = 0
    world: int = 1
    iteration: int = 0  # iterations done (the next step is this 0-based index)
    stop_reason: str = ""  # set by a hook: all ranks stop at the end of this interval


def train_step(w: Worker, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[dict[str, float], float]:
    """One SGD step on a batch; returns (float losses by torchvision name plus ``loss``, lr used)."""
    if w.device.type == "cuda":
        images = [im.to(w.device, non_blocking=True) for im in images]
        targets = [{k: v.to(w.device, non_blocking=True) for k, v in t.items()} for t in targets]
    lr = lr_at(w.iteration, w.plan.lr, w.plan.total_iters, w.config.schedule)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    amp_dtype = torch.float16 if w.device.type == "cuda" else torch.bfloat16
    with torch.autocast(w.device.type, dtype=amp_dtype, enabled=w.config.optim.amp):
        loss_dict = w.model(images, targets)
    loss = sum(loss_dict.values())
    if not torch.isfinite(loss):
        raise MaskrayError(f"training diverged at iteration {w.iteration}: loss is {loss.item()} "
                           f"(lower optim.base_lr or raise schedule.warmup_iters)")
    w.optimizer.zero_grad(set_to_none=True)
    if w.scaler is not None:
        w.scaler.scale(loss).backward()
        w.scaler.unscale_(w.optimizer)
    else:
        loss.backward()
    if w.config.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(w.params, w.config.optim.grad_clip)
    if w.scaler is not None:
        w.scaler.step(w.optimizer)
        w.scaler.update()
    else:
        w.optimizer.step()
    w.iteration += 1
    losses = {k: float(v.detach()) for k, v in loss_dict.items()}
    losses["loss"] = float(loss.detach())
    return losses, lr


# --------------------------------------------------------------------------- set-up and state


def initial_weights(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """Load ``model.backbone_weights`` then ``model.weights`` (when set) into a new model; console lines."""
    from model.checkpoint import load_backbone_weights, load_weights
    from pipeline.weights import read_model_bytes

    lines = []
    if config.model.backbone_weights:
        n = load_backbone_weights(model, read_model_bytes(config.model.backbone_weights, progress=False)[0])
        lines.append(f"backbone initialised from {config.model.backbone_weights} ({n} tensors)")
    if config.model.weights:
        copied, skipped = load_weights(model, read_model_bytes(config.model.weights, progress=False)[0])
        more = ", ..." if len(skipped) > 3 else ""
        lines.append(f"initialised {copied} tensors from {config.model.weights}"
                     + (f"; {len(skipped)} kept their init ({', '.join(skipped[:3])}{more})" if skipped else ""))
    return lines


def save_train_state(directory: str, w: Worker) -> None:
    """``model.pt`` (a maskray checkpoint) and ``train_state.pt`` (optimizer, scaler, iteration) in ``directory``."""
    from model.checkpoint import save_checkpoint

    save_checkpoint(os.path.join(directory, MODEL_FILE), unwrap(w.model), w.model_config,
                    extra={"iteration": w.iteration, "run": w.config.name, "train_images": w.plan.train_images})
    torch.save({"iteration": w.iteration, "optimizer": w.optimizer.state_dict(),
                "scaler": w.scaler.state_dict() if w.scaler is not None else {},
                "config": w.config.to_dict()}, os.path.join(directory, STATE_FILE))


def restore_train_state(checkpoint, w: Worker) -> None:
    """Model, optimizer, scaler and iteration from a Ray Train checkpoint of :func:`save_train_state`.

    A checkpoint in object storage is downloaded by each rank into its own temporary folder:
    ``Checkpoint.as_directory`` shares one download among a node's processes and deletes it
    when the last one leaves, and under load a rank was seen reading a file another rank's
    exit had already removed ("PytorchStreamReader failed reading file").
    """
    import shutil

    import pyarrow.fs

    local = isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)
    d = checkpoint.path if local else checkpoint.to_directory(tempfile.mkdtemp(prefix="maskray-restore-"))
    try:
        blob = torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True)
        unwrap(w.model).load_state_dict(blob["model"], strict=True)
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    finally:
        if not local:
            shutil.rmtree(d, ignore_errors=True)
    w.optimizer.load_state_dict(state["optimizer"])
    if w.scaler is not None and state.get("scaler"):
        w.scaler.load_state_dict(state["scaler"])
    w.iteration = int(state["iteration"])


def setup(config: TrainConfig, plan: RunPlan, rank: int, world: int, device: torch.device,
          checkpoint=None) -> tuple[Worker, list[str]]:
    """A worker's model and optimizer, resumed from ``checkpoint`` or initialised; (worker, console lines)."""
    from model.checkpoint import build_from_config

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model_config = config.model.model_config(plan.categories)
    model = build_from_config(model_config).to(device)  # before the optimizer: its state follows the params
    if config.augment.min_sizes:  # multi-scale training: torchvision picks one per image; eval uses the last
        model.transform.min_size = tuple(s for s in config.augment.min_sizes if s != model_config.min_size) \
            + (model_config.min_size,)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=plan.lr, momentum=config.optim.momentum,
                                weight_decay=config.optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if (config.optim.amp and device.type == "cuda") else None
    w = Worker(config, plan, model, model_config, optimizer, params, device, scaler, rank, world)
    if checkpoint is not None:
        restore_train_state(checkpoint, w)
        lines = [f"resumed from {checkpoint.path} at iteration {w.iteration}"]
    else:  # every rank loads the same files: DDP starts from equal weights anyway
        lines = initial_weights(model, config)
    model.train()
    return w, lines


def agree_to_stop(w: Worker) -> bool:
    """True on every rank when any rank's hooks asked to stop (a collective)."""
    flag = torch.tensor([1.0 if w.stop_reason else 0.0], dtype=torch.float64)
    if w.world > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


# --------------------------------------------------------------------------- the loop


def report(w: Worker, metrics: dict[str, Any], with_checkpoint: bool) -> None:
    """``ray.train.report`` on every rank; rank 0 writes the checkpoint when one is due."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="maskray-ckpt-") as d:
        ckpt = None
        if w.rank == 0:
            save_train_state(d, w)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{w.iteration:07d}")


def run_loop(w: Worker, shard: Any, hooks: list[Hook], first_batch: Any = None) -> None:
    """Steps over the dataset shard (epochs as needed) until the last iteration or an agreed stop.

    ``first_batch`` (optional) is called once, when the first batch has arrived.
    """
    config, total = w.config, w.plan.total_iters
    meters = Meters()
    step_end: float | None = None  # None until the first batch: rates count from it, not from start-up
    while w.iteration < total:
        progressed = False
        for images, targets in shard.iter_torch_batches(
                batch_size=config.images_per_worker, collate_fn=collate, drop_last=True,
                local_shuffle_buffer_size=config.data.shuffle_buffer or None, prefetch_batches=2):
            if w.iteration >= total:
                break
            now = time.perf_counter()
            if step_end is None:
                if first_batch is not None:
                    first_batch()
                meters = Meters()
                wait = 0.0
            else:
                wait = now - step_end
            progressed = True
            losses, lr = train_step(w, images, targets)
            meters.add(losses, len(images) * w.world, wait)
            step_end = time.perf_counter()
            due = Due.at(w.iteration, config, total)
            if not due.any():
                continue
            metrics: dict[str, Any] = {"iteration": w.iteration,
                                       "epoch": w.iteration * w.plan.global_batch / w.plan.train_images, "lr": lr}
            metrics.update(meters.reduce(w.world))
            if w.rank == 0:
                for hook in hooks:
                    hook.after_interval(w, metrics, due)
            stop = agree_to_stop(w)
            if stop:
                metrics[STOP_KEY] = w.stop_reason or "stopped by rank 0"
            report(w, metrics, due.checkpoint)
            if stop:
                return
            meters = Meters()
            step_end = time.perf_counter()
        if not progressed and w.iteration < total:
            raise MaskrayError(f"data.train={config.data.train}: the stream yielded no batch of "
                               f"{config.images_per_worker} images to worker {w.rank}")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``).

    ``loop_config``: ``config`` (TrainConfig dict), ``plan`` (RunPlan dict), ``channel`` (the
    run's RunChannel actor: console lines and the stream's bad rows; or None), ``t0`` (the
    driver's wall clock when it started the trainer).
    """
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    marks = {"worker started": time.time()}  # wall clock: comparable with the driver's t0 on one machine
    config = TrainConfig.from_dict(loop_config["config"], source="train_loop_config")
    plan = RunPlan(**loop_config["plan"])
    channel = loop_config.get("channel")
    console = Console(channel)
    ctx = ray.train.get_context()
    w, lines = setup(config, plan, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                     ray.train.get_checkpoint())
    marks["model built"] = time.time()
    if w.rank == 0:
        for line in lines:
            console(line)
    w.model = ray.train.torch.prepare_model(w.model)
    marks["DDP ready"] = time.time()
    hooks: list[Hook] = []
    if w.rank == 0:
        if channel is not None:
            limit = int(config.data.max_bad_fraction * plan.train_images)
            hooks.append(BadRowsHook(lambda start: ray.get(channel.since.remote(start)), console, limit))
        hooks += [ConsoleHook(console), EvalHook(console), TensorBoardHook(plan.run_uri)]
    def first_batch() -> None:
        marks["first batch"] = time.time()
        t0 = loop_config.get("t0")
        if w.rank == 0 and t0:
            console("start-up, seconds after fit() began: "
                    + ", ".join(f"{name} +{t - t0:.1f}" for name, t in marks.items()))

    try:
        run_loop(w, ray.train.get_dataset_shard("train"), hooks, first_batch)
    finally:
        for hook in hooks:
            hook.after_train(w)
