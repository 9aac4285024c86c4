"""The training engine: run planning on the driver and the loop each Ray Train worker runs.

Driver side (no workers yet): :func:`plan_run` reads the train/val manifests (classes come from
the train manifest: model label ``i`` = ``categories[i - 1]``), checks the model options and
sizes the schedule; :func:`check_resources` refuses a worker group the cluster cannot hold;
:func:`train_dataset` builds the Ray Data stream (read shards -> decode + augment in CPU tasks).

Worker side: :func:`train_loop_per_worker` builds the model, wraps it in DDP with
``ray.train.torch.prepare_model``, resumes from ``ray.train.get_checkpoint()`` when there is one,
and runs an iteration-based schedule (SGD + momentum, linear warm-up, step or cosine decay,
weight decay, gradient clipping, optional AMP) over its ``get_dataset_shard("train")``
share, reporting metrics every ``log_every`` iterations and checkpoints (model, optimizer,
iteration, config) every ``checkpoint.every`` with ``ray.train.report``. Rank 0 evaluates on
the val shards, writes TensorBoard events under the run folder and sends one console line per
interval to the driver through a small queue actor.

A checkpoint directory holds ``model.pt`` (``model.checkpoint.save_checkpoint``: loads with
``model.checkpoint.load_checkpoint`` for eval/infer) and ``train_state.pt`` (optimizer, AMP
scaler, iteration); both load with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.errors import MaskrayError
from pipeline.config import ConfigError, TrainConfig
from pipeline.transforms import TrainAugment, drop_crowd_and_degenerate

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ["image_id", "width", "height", "image", "annotations"]
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
LOSS_NAMES = {  # torchvision loss key -> short name on the console
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
    "loss_objectness": "rpn",
    "loss_rpn_box_reg": "rpn_box",
}
EVAL_KEYS = ("AP", "AP50", "AP75")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- driver side


def model_config_for(config: TrainConfig, categories: list[dict]):
    """The ``model.checkpoint.ModelConfig`` of this run (classes from ``categories``)."""
    from model.checkpoint import ModelConfig

    m = config.model
    return ModelConfig.for_categories(
        [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
        backbone=m.backbone, variant=m.variant, min_size=m.min_size, max_size=m.max_size, norm=m.norm,
        trainable_layers=m.trainable_layers, box_score_thresh=m.box_score_thresh,
        box_detections_per_img=m.box_detections_per_img, options=dict(m.options),
    )


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
    from pipeline import storage
    from pipeline.format import read_manifest

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
    if config.model.weights:
        try:
            found = storage.exists(config.model.weights)
        except MaskrayError as exc:
            raise ConfigError(f"model.weights={config.model.weights}: {exc}") from None
        if not found:
            raise ConfigError(f"model.weights={config.model.weights}: no such file")
    check_model_options(config.model.options)
    model_config_for(config, categories)  # validates the model section against model.checkpoint
    total = config.total_iters(train_images)
    for step in config.schedule.steps:
        if step >= total:
            raise ConfigError(f"schedule.steps: step {step} is not below the {total} iterations of the run")
    return RunPlan(categories=categories, train_images=train_images, val_images=val_images, total_iters=total,
                   lr=config.lr, global_batch=config.global_batch,
                   run_uri=storage.join(config.storage_path, config.name))


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


class DecodeAugment:
    """Ray Data row function: encoded row -> decoded, augmented numpy arrays (runs in CPU tasks)."""

    def __init__(self, category_ids: list[int], hflip_prob: float = 0.0,
                 scale_range: tuple[float, float] = (1.0, 1.0), seed: int | None = None):
        self.category_ids = list(category_ids)
        self.augment = TrainAugment(hflip_prob, tuple(scale_range), seed)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from pipeline.dataset import decode_image, decode_target

        image = decode_image(row["image"])
        target = decode_target(list(row["annotations"] or []), int(row["height"]), int(row["width"]),
                               self.category_ids)
        image, target = self.augment(image, target)
        target = drop_crowd_and_degenerate(target)
        masks = target["masks"].numpy().astype(bool)
        return {
            "image_id": int(row["image_id"]),
            "image": image.numpy(),
            "boxes": target["boxes"].numpy().astype(np.float32).reshape(-1, 4),
            "labels": target["labels"].numpy().astype(np.int64),
            # bit-packed along x: 8x fewer bytes through the object store than uint8 masks
            # (at 800x1333 one instance is 1 MB as uint8); collate() unpacks them
            "masks": np.packbits(masks, axis=-1),
            "mask_width": masks.shape[-1],
        }


def train_dataset(config: TrainConfig, plan: RunPlan):
    """The Ray Data train stream: shards -> decode + augment (CPU tasks of ``data.decode_cpus``)."""
    from pipeline.dataset import read_shards

    fn = DecodeAugment([int(c["id"]) for c in plan.categories], config.augment.hflip_prob,
                       tuple(config.augment.scale_jitter))
    # read tasks take the decode share too: Ray's default of 1 CPU per read task never fits
    # beside workers that hold all but a fraction of a small node's CPUs (the stream stalls)
    ds = read_shards(config.data.train, columns=TRAIN_COLUMNS, num_cpus=config.data.decode_cpus)
    import ray.data

    pool = ray.data.TaskPoolStrategy(size=config.data.decode_tasks or None)
    return ds.map(fn, num_cpus=config.data.decode_cpus, compute=pool)


# --------------------------------------------------------------------------- worker side


def collate(batch: dict[str, np.ndarray]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A Ray Data numpy batch of :class:`DecodeAugment` rows -> (list of float CHW images in [0, 1],
    list of target dicts with boxes [N, 4] float32, labels [N] int64, masks [N, H, W] uint8).

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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def _format_line(it: int, total: int, losses: dict[str, float], lr: float, ips: float, epoch: float,
                 data_wait: float = 0.0) -> str:
    """One console line per interval; ``data_wait`` is the fraction of the interval spent waiting for batches."""
    parts = " ".join(f"{LOSS_NAMES.get(k, k)} {v:.2f}" for k, v in losses.items() if k != "loss")
    return (f"iter {it}/{total}  epoch {epoch:.2f}  loss {losses.get('loss', float('nan')):.3f} ({parts})  "
            f"lr {lr:.4f}  {ips:.1f} img/s  data {100 * data_wait:.0f}%")


def format_eval_line(it: int, metrics: dict[str, dict[str, float]], images: int, seconds: float) -> str:
    def part(kind: str) -> str:
        m = {k: (float("nan") if v is None else v) for k, v in (metrics.get(kind) or {}).items()}
        return f"{kind} AP {m.get('AP', float('nan')):.3f} AP50 {m.get('AP50', float('nan')):.3f}"
    return f"eval iter {it}: {part('bbox')} | {part('segm')}  ({images} images, {seconds:.1f} s)"


class _Console:
    """Rank 0's one-line messages to the driver (queue actor) or to the log when there is none."""

    def __init__(self, queue: Any):
        self.queue = queue

    def __call__(self, line: str) -> None:
        if self.queue is not None:
            try:
                self.queue.put_nowait(line)
                return
            except Exception:  # noqa: BLE001 - the driver went away: keep training, log locally
                self.queue = None
        logger.info("%s", line)


class _TensorBoard:
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

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def sync(self) -> None:
        self.writer.flush()
        if self.remote is None:
            return
        from pipeline import storage

        for fname in sorted(os.listdir(self.local)):
            with open(os.path.join(self.local, fname), "rb") as f:
                storage.write_bytes(f"{self.remote}/{fname}", f.read())

    def close(self) -> None:
        self.sync()
        self.writer.close()


def _evaluate(model: torch.nn.Module, config: TrainConfig, plan: RunPlan, device: torch.device) -> tuple[dict, int]:
    """COCO metrics of ``model`` on ``data.val`` (at most ``data.val_max_images``); back in train mode after."""
    from pipeline.evaluate import evaluate_model

    limit = config.data.val_max_images or None
    try:
        metrics = evaluate_model(model, config.data.val, plan.categories, limit=limit, device=device,
                                 batch_size=max(1, config.images_per_worker))
    finally:
        model.train()
    return metrics, min(plan.val_images, limit or plan.val_images)


def _flat_eval(metrics: dict) -> dict[str, float | None]:
    out = {}
    for kind in ("bbox", "segm"):
        for k, v in (metrics.get(kind) or {}).items():
            if v is None or isinstance(v, (int, float)):  # None: undefined (no such objects), as maskray eval
                out[f"{kind}_{k}"] = None if v is None else float(v)
    return out


def _save_checkpoint(directory: str, model: torch.nn.Module, model_config, optimizer, scaler,
                     iteration: int, config: TrainConfig, plan: RunPlan) -> None:
    from model.checkpoint import save_checkpoint

    save_checkpoint(os.path.join(directory, MODEL_FILE), _unwrap(model), model_config,
                    extra={"iteration": iteration, "run": config.name, "train_images": plan.train_images})
    torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "config": config.to_dict()}, os.path.join(directory, STATE_FILE))


def _restore(checkpoint, model: torch.nn.Module, optimizer, scaler) -> int:
    with checkpoint.as_directory() as d:
        blob = torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(blob["model"], strict=True)
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    import ray.train
    import ray.train.torch

    from model.checkpoint import build_from_config

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    config = TrainConfig.from_dict(loop_config["config"], source="train_loop_config")
    plan = RunPlan(**loop_config["plan"])
    console = _Console(loop_config.get("progress"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    model_config = model_config_for(config, plan.categories)
    device = ray.train.torch.get_device()
    model = build_from_config(model_config).to(device)  # before the optimizer: its state follows the params
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=plan.lr, momentum=config.optim.momentum,
                                weight_decay=config.optim.weight_decay)
    use_cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if (config.optim.amp and use_cuda) else None
    amp_dtype = torch.float16 if use_cuda else torch.bfloat16

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start = _restore(checkpoint, model, optimizer, scaler)
        if rank == 0:
            console(f"resumed from {checkpoint.path} at iteration {start}")
    elif config.model.weights:  # every rank loads the same file: DDP starts from equal weights anyway
        from model.checkpoint import load_weights
        from pipeline import storage

        copied, skipped = load_weights(model, storage.read_bytes(config.model.weights))
        if rank == 0:
            console(f"initialised {copied} tensors from {config.model.weights}"
                    + (f"; {len(skipped)} kept their init ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})"
                       if skipped else ""))
    total = plan.total_iters
    model.train()
    model = ray.train.torch.prepare_model(model)

    tb = _TensorBoard(plan.run_uri) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    meters: dict[str, float] = {}
    count = 0
    t_interval = time.perf_counter()
    images_interval = 0
    wait_interval = 0.0  # seconds this rank waited for its next batch in the interval
    it = start
    started = False

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="maskray-ckpt-") as d:
            ckpt = None
            if rank == 0:
                _save_checkpoint(d, model, model_config, optimizer, scaler, it, config, plan)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{it:07d}")
        if tb is not None:
            tb.sync()

    while it < total:
        progressed = False
        for images, targets in shard.iter_torch_batches(
                batch_size=config.images_per_worker, collate_fn=collate, drop_last=True,
                local_shuffle_buffer_size=config.data.shuffle_buffer or None, prefetch_batches=2):
            if it >= total:
                break
            if not started:  # the rate counts from the first batch on, not from start-up
                t_interval, started = time.perf_counter(), True
            else:
                wait_interval += time.perf_counter() - t_step_end
            progressed = True
            if use_cuda:
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            lr = lr_at(it, plan.lr, total, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=config.optim.amp):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise MaskrayError(f"training diverged at iteration {it}: loss is {loss.item()} "
                                   f"(lower optim.base_lr or raise schedule.warmup_iters)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            it += 1
            count += 1
            images_interval += len(images) * world
            meters["loss"] = meters.get("loss", 0.0) + float(loss.detach())
            for k, v in loss_dict.items():
                meters[k] = meters.get(k, 0.0) + float(v.detach())

            t_step_end = time.perf_counter()
            log_now = it % config.log_every == 0 or it == total
            ckpt_now = it == total or (config.checkpoint.every and it % config.checkpoint.every == 0)
            eval_now = bool(config.data.val) and (
                (config.eval.every and it % config.eval.every == 0) or (it == total and config.eval.at_end))
            if not (log_now or ckpt_now or eval_now):
                continue
            metrics: dict[str, Any] = {"iteration": it, "epoch": it * plan.global_batch / plan.train_images,
                                       "lr": lr}
            if count:
                elapsed = time.perf_counter() - t_interval
                names = list(meters)
                # the mean losses and the slowest rank's data wait (ranks wait for each other in DDP)
                means = torch.tensor([meters[k] / count for k in names], dtype=torch.float64)
                wait = torch.tensor([wait_interval / elapsed if elapsed > 0 else 0.0], dtype=torch.float64)
                if world > 1:
                    torch.distributed.all_reduce(means)
                    means /= world
                    torch.distributed.all_reduce(wait, op=torch.distributed.ReduceOp.MAX)
                losses = dict(zip(names, means.tolist(), strict=True))
                ips = images_interval / elapsed if elapsed > 0 else 0.0
                metrics.update(losses)
                metrics["images_per_s"] = ips
                metrics["data_wait"] = float(wait)
                if rank == 0:
                    console(_format_line(it, total, losses, lr, ips, metrics["epoch"], float(wait)))
                    tb.scalars({f"train/{k}": v for k, v in losses.items()} | {"train/lr": lr,
                               "train/images_per_s": ips, "train/data_wait": float(wait)}, it)
            if eval_now and rank == 0:
                t_eval = time.perf_counter()
                result, n_images = _evaluate(_unwrap(model), config, plan, device)
                flat = _flat_eval(result)
                metrics.update(flat)
                console(format_eval_line(it, result, n_images, time.perf_counter() - t_eval))
                tb.scalars({f"eval/{k}": v for k, v in flat.items() if v is not None}, it)
            report(metrics, bool(ckpt_now))
            meters, count, images_interval, wait_interval = {}, 0, 0, 0.0
            t_interval = t_step_end = time.perf_counter()
        if not progressed and it < total:
            raise MaskrayError(f"data.train={config.data.train}: the stream yielded no batch of "
                               f"{config.images_per_worker} images to worker {rank}")

    if tb is not None:
        tb.close()
