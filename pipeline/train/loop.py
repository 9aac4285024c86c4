"""What each Ray Train worker runs: a step function and the hooks around it.

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

import numpy as np
import torch
from torch import Tensor

from model.errors import MaskrayError
from pipeline.train.config import TrainConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
STOP_KEY = "stopped"  # metrics key: why the workers stopped before the last iteration
EVAL_KINDS = ("bbox", "segm", "keypoints")  # COCOeval IoU types in evaluation metrics (keypoints: kp models)
LOSS_NAMES = {  # torchvision loss key -> short name on the console
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
    "loss_keypoint": "kp",
    "loss_objectness": "rpn",
    "loss_rpn_box_reg": "rpn_box",
}


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


def collate(batch: dict[str, np.ndarray]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A Ray Data numpy batch of decoded rows -> (list of float CHW images in [0, 1],
    list of target dicts with boxes [N, 4] float32, labels [N] int64, masks [N, H, W] uint8,
    and for a keypoint model keypoints [N, K, 3] float32: x, y pixels, v).

    ``masks`` arrive bit-packed along x ([N, H, ceil(W / 8)] uint8) with their ``mask_width``.
    """
    images = [torch.from_numpy(np.ascontiguousarray(im)).float().div_(255.0) for im in batch["image"]]
    targets = []
    for boxes, labels, packed, width in zip(batch["boxes"], batch["labels"], batch["masks"], batch["mask_width"],
                                            strict=True):
        masks = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=int(width))
        targets.append({
            "boxes": torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "masks": torch.from_numpy(masks),
        })
    if "keypoints" in batch:
        for target, keypoints in zip(targets, batch["keypoints"], strict=True):
            kp = np.asarray(keypoints, dtype=np.float32)  # [N, K, 3] (Ray keeps each row's shape)
            target["keypoints"] = torch.from_numpy(kp if kp.ndim == 3 else kp.reshape(len(target["boxes"]), -1, 3))
    return images, targets


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


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

    save_checkpoint(os.path.join(directory, MODEL_FILE), _unwrap(w.model), w.model_config,
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
        _unwrap(w.model).load_state_dict(blob["model"], strict=True)
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


# --------------------------------------------------------------------------- intervals and hooks


@dataclass
class Meters:
    """Per-interval sums of the losses, images and data wait of this rank."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0  # images of all ranks (batch x world)
    wait_s: float = 0.0  # seconds this rank waited for its next batch
    started: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, float], images: int, wait_s: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images
        self.wait_s += wait_s

    def reduce(self, world: int) -> dict[str, float]:
        """Mean losses over ranks, images/s and the slowest rank's data-wait share (a collective)."""
        if not self.steps:
            return {}
        elapsed = time.perf_counter() - self.started
        names = list(self.sums)
        means = torch.tensor([self.sums[k] / self.steps for k in names], dtype=torch.float64)
        wait = torch.tensor([self.wait_s / elapsed if elapsed > 0 else 0.0], dtype=torch.float64)
        if world > 1:  # ranks wait for each other in DDP: the slowest rank's wait is the interval's
            torch.distributed.all_reduce(means)
            means /= world
            torch.distributed.all_reduce(wait, op=torch.distributed.ReduceOp.MAX)
        out = dict(zip(names, means.tolist(), strict=True))
        out["images_per_s"] = self.images / elapsed if elapsed > 0 else 0.0
        out["data_wait"] = float(wait)
        return out


@dataclass
class Due:
    """What is due at the end of an iteration."""

    log: bool
    eval: bool
    checkpoint: bool

    @classmethod
    def at(cls, it: int, config: TrainConfig, total: int) -> Due:
        last = it == total
        return cls(log=it % config.log_every == 0 or last,
                   eval=bool(config.data.val) and bool((config.eval.every and it % config.eval.every == 0)
                                                       or (last and config.eval.at_end)),
                   checkpoint=last or bool(config.checkpoint.every and it % config.checkpoint.every == 0))

    def any(self) -> bool:
        return self.log or self.eval or self.checkpoint


class Hook:
    """Called on rank 0 at the end of an interval; may add to ``metrics`` or set ``w.stop_reason``."""

    def after_interval(self, w: Worker, metrics: dict[str, Any], due: Due) -> None:  # pragma: no cover
        pass

    def after_train(self, w: Worker) -> None:
        pass


class Console:
    """Rank 0's one-line messages to the driver (the run's ``RunChannel`` actor), or to the log when there is none."""

    def __init__(self, channel: Any):
        self.channel = channel

    def __call__(self, line: str) -> None:
        if self.channel is not None:
            try:
                self.channel.say.remote(line)
                return
            except Exception:  # noqa: BLE001 - the driver went away: keep training, log locally
                self.channel = None
        logger.info("%s", line)


def format_line(it: int, total: int, losses: dict[str, float], lr: float, ips: float, epoch: float,
                data_wait: float = 0.0) -> str:
    """One console line per interval; ``data_wait`` is the fraction of the interval spent waiting for batches."""
    parts = " ".join(f"{LOSS_NAMES.get(k, k)} {v:.2f}" for k, v in losses.items() if k in LOSS_NAMES)
    return (f"iter {it}/{total}  epoch {epoch:.2f}  loss {losses.get('loss', float('nan')):.3f} ({parts})  "
            f"lr {lr:.4f}  {ips:.1f} img/s  data {100 * data_wait:.0f}%")


def format_eval_line(it: int, metrics: dict[str, dict[str, float]], images: int, seconds: float) -> str:
    def part(kind: str) -> str:
        m = {k: (float("nan") if v is None else v) for k, v in (metrics.get(kind) or {}).items()}
        return f"{kind} AP {m.get('AP', float('nan')):.3f} AP50 {m.get('AP50', float('nan')):.3f}"
    kinds = [kind for kind in EVAL_KINDS if kind in metrics] or ["bbox", "segm"]  # a keypoint-only model: no segm
    parts = " | ".join(part(kind) for kind in kinds)
    return f"eval iter {it}: {parts}  ({images} images, {seconds:.1f} s)"


class ConsoleHook(Hook):
    def __init__(self, console: Console):
        self.console = console

    def after_interval(self, w: Worker, metrics: dict[str, Any], due: Due) -> None:
        if "loss" in metrics:
            self.console(format_line(w.iteration, w.plan.total_iters, metrics, metrics["lr"],
                                     metrics["images_per_s"], metrics["epoch"], metrics["data_wait"]))


class TensorBoardHook(Hook):
    """Events under ``<run>/tensorboard``: written in place for local runs, mirrored to object storage otherwise."""

    def __init__(self, run_uri: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = None
        if "://" in run_uri:
            self.local = tempfile.mkdtemp(prefix="maskray-tb-")
            self.remote = run_uri.rstrip("/") + "/tensorboard"
        else:
            self.local = os.path.join(run_uri, "tensorboard")
            os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(self.local)

    def after_interval(self, w: Worker, metrics: dict[str, Any], due: Due) -> None:
        for k, v in metrics.items():
            if k in ("iteration", "epoch") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            group = "eval" if k.startswith(tuple(f"{kind}_" for kind in EVAL_KINDS)) else "train"
            self.writer.add_scalar(f"{group}/{k}", v, w.iteration)
        if due.checkpoint:
            self.sync()

    def sync(self) -> None:
        self.writer.flush()
        if self.remote is None:
            return
        from pipeline import storage

        for fname in sorted(os.listdir(self.local)):
            with open(os.path.join(self.local, fname), "rb") as f:
                storage.write_bytes(f"{self.remote}/{fname}", f.read())

    def after_train(self, w: Worker) -> None:
        self.sync()
        self.writer.close()


def flat_eval(metrics: dict) -> dict[str, float | None]:
    """``{"bbox": {"AP": ..}, ..}`` -> ``{"bbox_AP": .., ..}`` (None: undefined, as maskray eval)."""
    out = {}
    for kind in EVAL_KINDS:
        for k, v in (metrics.get(kind) or {}).items():
            if v is None or isinstance(v, (int, float)):
                out[f"{kind}_{k}"] = None if v is None else float(v)
    return out


class EvalHook(Hook):
    """COCO metrics of the model on ``data.val`` (at most ``data.val_max_images``); back in train mode after."""

    def __init__(self, console: Console):
        self.console = console

    def after_interval(self, w: Worker, metrics: dict[str, Any], due: Due) -> None:
        if not due.eval:
            return
        from pipeline.evaluate import evaluate_model

        config, start = w.config, time.perf_counter()
        limit = config.data.val_max_images or None
        skipped: list = []
        # a keypoint model is scored on OKS too, with the config's sigmas (none: COCO person's 17)
        kp = {"kpt_oks_sigmas": config.eval.kpt_oks_sigmas or None} if w.model_config.num_keypoints else {}
        try:
            result = evaluate_model(_unwrap(w.model), config.data.val, w.plan.categories, limit=limit,
                                    device=w.device, batch_size=max(1, config.images_per_worker),
                                    skipped=skipped, max_bad_fraction=config.data.max_bad_fraction, **kp)
        except MaskrayError as exc:  # too many bad val images: a clean stop, not a crash Ray Train would retry
            w.stop_reason = f"data.val={config.data.val}: {exc}"
            return
        finally:
            w.model.train()
        images = min(w.plan.val_images, limit or w.plan.val_images)
        metrics.update(flat_eval(result))
        metrics["val_skipped"] = len(skipped)
        line = format_eval_line(w.iteration, result, images - len(skipped), time.perf_counter() - start)
        self.console(line + (f"  [{len(skipped)} undecodable val images skipped]" if skipped else ""))


class BadRowsHook(Hook):
    """Rows the train stream skipped, as counted by the run's :class:`~pipeline.train.engine.RunChannel` actor.

    ``fetch(start)`` returns (distinct bad rows so far, entries from ``start`` on); more than
    ``limit`` stops the run.
    """

    def __init__(self, fetch: Any, console: Console, limit: int):
        self.fetch, self.console, self.limit = fetch, console, limit
        self.shown = 0

    def after_interval(self, w: Worker, metrics: dict[str, Any], due: Due) -> None:
        count, entries = self.fetch(self.shown)
        for image_id, shard, reason in entries:
            self.console(f"skipped train image {image_id} in {shard}: {reason}")
        self.shown += len(entries)
        metrics["bad_rows"] = count
        if count > self.limit:
            w.stop_reason = (f"data.train: {count} rows could not be decoded, more than data.max_bad_fraction="
                             f"{w.config.data.max_bad_fraction:g} of {w.plan.train_images} images allow ({self.limit}); "
                             f"fix or drop them (the log names each), or raise data.max_bad_fraction")


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
