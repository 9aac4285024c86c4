"""The hooks around a worker's training step (detectron2's ``HookBase`` shape): at each interval
(``log_every``, ``eval.every``, ``checkpoint.every``, the last iteration) the loop
(:func:`pipeline.train.loop.run_loop`) all-reduces its :class:`Meters` and runs, on rank 0 and
in this order, :class:`BadRowsHook`, :class:`ConsoleHook`, :class:`TensorBoardHook` and
:class:`EvalHook`; each adds to the interval's metrics or asks to stop.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from model.checkpoint import unwrap
from model.errors import MaskrayError

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import Worker

logger = logging.getLogger(__name__)

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
    """COCO metrics of the model on ``data.val`` (at most ``data.val_max_images``; tiled as
    ``maskray infer --tile`` with ``eval.tile``); back in train mode after."""

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
            result = evaluate_model(unwrap(w.model), config.data.val, w.plan.categories, limit=limit,
                                    device=w.device, batch_size=max(1, config.images_per_worker),
                                    skipped=skipped, max_bad_fraction=config.data.max_bad_fraction,
                                    tile=config.eval.tile, tile_overlap=config.eval.tile_overlap,
                                    tile_full_pass=config.eval.tile_full_pass, **kp)
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


