"""Typed training configuration: nested dataclasses that validate themselves, loaded from YAML.

A config file is a YAML mapping whose sections mirror the dataclasses below::

    name: shapes-r18            # run name: the run folder is <storage_path>/<name>
    storage_path: demo-out/runs # local path or s3://bucket/prefix
    num_workers: 2              # Ray Train workers (DDP ranks)
    images_per_worker: 2        # per-worker batch; global batch = num_workers * images_per_worker
    data:     {train: URI, val: URI, ...}
    model:    {backbone: resnet18, min_size: 128, ..., options: {anchor_sizes: ...}}
    optim:    {base_lr: 0.02, reference_batch: 16, ...}
    schedule: {max_iters: 600, warmup_iters: 100, policy: step, steps: [400, 550]}
    augment:  {hflip_prob: 0.5, scale_jitter: [0.8, 1.2], crop: 0}
    checkpoint: {every: 200, keep: 2}
    eval:     {every: 200, tile: 0}

``load_config(path, overrides)`` reads the file, applies ``--set a.b=value`` overrides (the
value parsed with ``yaml.safe_load``, so ``--set optim.base_lr=0.01`` is a float and
``--set schedule.steps=[100,200]`` a list) and builds a :class:`TrainConfig`. An unknown key,
a value of the wrong type or an invalid value raises :class:`ConfigError` whose one-line
message names the file and the dotted key at fault.

The ``model`` section is the model's own :class:`model.checkpoint.ModelConfig` (one definition
of its fields, validated by it) plus ``weights`` / ``backbone_weights``; classes come from
the train manifest.

Ray Train's settings stay flat keys named after Ray's own fields, and
:func:`pipeline.train.engine.fit` groups them as Ray Train does: ``ScalingConfig``
(``num_workers``, ``use_gpu``, ``cpus_per_worker``, ``placement_strategy``), ``RunConfig``
(``name``, ``storage_path``, ``checkpoint.keep``), ``FailureConfig`` (``max_failures``,
``wait_for_resources``). They are not nested sections in the YAML because the submit/KubeRay
manifests and the distill configs set them by these names (``--set num_workers=8``).

The learning rate scales linearly with the global batch: ``optim.base_lr`` is the rate for a
global batch of ``optim.reference_batch`` images, and training uses
``base_lr * num_workers * images_per_worker / reference_batch`` (:meth:`TrainConfig.lr`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.checkpoint import ModelConfig, ModelConfigError
from pipeline.config import RUN_ONLY, ConfigError, build, load, require, require_tiling, run_only_keys

POLICIES = ("step", "cosine")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


_require = require  # section checks name the dotted key from the config's root


@dataclass
class DataConfig:
    """Where the labeled shards are (``maskray-shards/1`` dataset URIs) and how they stream."""

    train: str = ""  # required: train shards (local path or s3://)
    val: str = field(default="", metadata=RUN_ONLY)  # val shards for periodic/final COCO eval; "" = no evaluation
    val_max_images: int = field(default=0, metadata=RUN_ONLY)  # evaluate on at most this many val images (0 = all)
    shuffle_buffer: int = 64  # local shuffle buffer (rows) per worker; 0 = no shuffling
    decode_cpus: float = field(default=0.25, metadata=RUN_ONLY)  # logical CPUs reserved by each decode+augment task in the stream
    decode_tasks: int = field(default=0, metadata=RUN_ONLY)  # at most this many decode+augment tasks at once; 0 = Ray Data decides
    # rows that cannot be decoded (corrupt, over the pixel limit, bad annotations) are skipped,
    # counted and logged; more than this fraction of the train set (or of the evaluated val
    # images) stops the run with one line
    max_bad_fraction: float = field(default=0.01, metadata=RUN_ONLY)
    # keypoint models: the left/right pairs a horizontal flip swaps, as [name, name] or [index,
    # index] (0-based) pairs; None = derived from the keypoint names (left_X <-> right_X,
    # pipeline.data.keypoints.flip_map); [] = swap none
    keypoint_flip_map: list[list[str | int]] | None = None

    def __post_init__(self) -> None:
        _require(bool(self.train.strip()), "data.train", "a train dataset URI is required (--set data.train=URI)")
        _require(self.val_max_images >= 0, "data.val_max_images", f"must be >= 0, got {self.val_max_images}")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _require(self.decode_cpus > 0, "data.decode_cpus", f"must be > 0, got {self.decode_cpus}")
        _require(self.decode_tasks >= 0, "data.decode_tasks", f"must be >= 0, got {self.decode_tasks}")
        _require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction",
                 f"{self.max_bad_fraction} is outside [0, 1]")


@dataclass
class ModelSection(ModelConfig):
    """The model to build: :class:`model.checkpoint.ModelConfig` itself (one definition of its
    fields, validated by it) plus where its initial weights come from.

    Classes come from the train manifest, not from here (``categories`` / ``num_classes`` are
    refused). ``options`` holds further keyword arguments of ``model.build_maskrcnn`` (e.g.
    ``anchor_sizes``, ``fpn_channels``, ``head_norm``); the checkpoint's ``ModelConfig`` keeps
    them, so inference rebuilds the same model.

    ``backbone_weights``: a torchvision ImageNet classification state dict of the ``backbone``
    (``resnet50-0676ba61.pth`` key layout) loaded into the ResNet body before training, as
    ``maskrcnn_resnet50_fpn(weights_backbone=..., trainable_backbone_layers=3)`` does; pair it
    with ``norm: frozen_bn`` and ``trainable_layers: 3``. ``weights``: a whole detector
    (maskray checkpoint or torchvision Mask R-CNN state dict) to fine-tune from; loaded after
    ``backbone_weights`` when both are set. Both take a storage URI or a torchvision name
    (``torchvision:resnet50``, ``torchvision:maskrcnn_resnet50_fpn_v2``: :mod:`model.pretrained`).
    """

    weights: str = ""  # whole-detector init (fine-tuning); "" = none
    backbone_weights: str = ""  # ImageNet classification state dict for the ResNet body; "" = random init

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ModelConfigError as exc:
            raise ConfigError(f"model.{exc.key}: {exc.reason}") from None
        _require(not self.categories and self.num_classes == ModelConfig.num_classes, "model.categories",
                 "classes come from the train manifest (data.train); remove model.categories / model.num_classes")

    def model_config(self, categories: list[dict]) -> ModelConfig:
        """The checkpoint's :class:`ModelConfig` for ``categories`` (model label ``i`` = ``categories[i - 1]``;
        a keypoint model keeps each category's keypoint names and skeleton)."""
        fields = self.model_dict()
        kept = ("keypoints", "skeleton") if self.num_keypoints else ()
        fields.update(categories=[{"id": int(c["id"]), "name": str(c["name"]),
                                   **{k: c[k] for k in kept if c.get(k)}} for c in categories],
                      num_classes=len(categories) + 1)
        return ModelConfig(**fields)


@dataclass
class OptimConfig:
    """SGD with momentum. ``base_lr`` is the rate for a global batch of ``reference_batch`` images."""

    base_lr: float = 0.02
    reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    amp: bool = False  # autocast (bfloat16 on CPU, float16 + GradScaler on GPU)

    def __post_init__(self) -> None:
        _require(self.base_lr > 0, "optim.base_lr", f"must be > 0, got {self.base_lr}")
        _require(self.reference_batch > 0, "optim.reference_batch", f"must be > 0, got {self.reference_batch}")
        _require(0 <= self.momentum < 1, "optim.momentum", f"{self.momentum} is outside [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Iteration-based schedule: set ``max_iters`` or ``epochs`` (converted to iterations).

    Linear warm-up from ``warmup_factor * lr`` over ``warmup_iters``, then ``step`` decay
    (multiply by ``gamma`` at each iteration in ``steps``) or ``cosine`` decay to
    ``min_lr_factor * lr`` at ``max_iters``.
    """

    max_iters: int = 0
    epochs: float = 0.0
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    policy: str = "step"
    steps: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        _require(self.max_iters >= 0 and self.epochs >= 0, "schedule.max_iters", "must be >= 0")
        _require((self.max_iters > 0) != (self.epochs > 0), "schedule.max_iters",
                 f"set exactly one of schedule.max_iters / schedule.epochs (got {self.max_iters} / {self.epochs})")
        _require(self.warmup_iters >= 0, "schedule.warmup_iters", f"must be >= 0, got {self.warmup_iters}")
        _require(0 < self.warmup_factor <= 1, "schedule.warmup_factor", f"{self.warmup_factor} is outside (0, 1]")
        _require(self.policy in POLICIES, "schedule.policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
        _require(list(self.steps) == sorted(self.steps) and all(s > 0 for s in self.steps), "schedule.steps",
                 f"must be increasing positive iterations, got {self.steps}")
        if self.max_iters:
            _require(all(s < self.max_iters for s in self.steps), "schedule.steps",
                     f"every step must be < max_iters={self.max_iters}, got {self.steps}")
        _require(0 < self.gamma <= 1, "schedule.gamma", f"{self.gamma} is outside (0, 1]")
        _require(0 <= self.min_lr_factor <= 1, "schedule.min_lr_factor", f"{self.min_lr_factor} is outside [0, 1]")


@dataclass
class AugmentConfig:
    """Train-time augmentation applied in the Ray Data stream."""

    hflip_prob: float = 0.5
    scale_jitter: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [min, max] resize factor
    # multi-scale training: the model resizes each train image's shorter side to one of these,
    # at random (torchvision's min_size tuple; detectron2's INPUT.MIN_SIZE_TRAIN); evaluation and
    # checkpoints keep model.min_size. [] = model.min_size only
    min_sizes: list[int] = field(default_factory=list)
    # native resolution: train on a random crop of at most crop x crop pixels of every larger image
    # (read region by region where the format allows, pipeline.data.regions) instead of the model
    # shrinking the whole image; 0 = off. Instances with less than crop_min_visible of their mask
    # inside the crop are dropped; masks are cropped and boxes recomputed from them
    crop: int = 0
    crop_min_visible: float = 0.3

    def __post_init__(self) -> None:
        _require(0 <= self.hflip_prob <= 1, "augment.hflip_prob", f"{self.hflip_prob} is outside [0, 1]")
        _require(self.crop == 0 or self.crop >= 32, "augment.crop",
                 f"must be 0 (off) or a crop side >= 32 pixels, got {self.crop}")
        _require(0 <= self.crop_min_visible <= 1, "augment.crop_min_visible",
                 f"{self.crop_min_visible} is outside [0, 1]")
        _require(all(s > 0 for s in self.min_sizes), "augment.min_sizes",
                 f"every size must be > 0, got {self.min_sizes}")
        _require(len(self.scale_jitter) == 2 and 0 < self.scale_jitter[0] <= self.scale_jitter[1],
                 "augment.scale_jitter", f"must be [min, max] with 0 < min <= max, got {self.scale_jitter}")


@dataclass
class CheckpointSection:
    """Checkpoint every ``every`` iterations (0 = only at the end), keeping the last ``keep``."""

    every: int = 1000
    keep: int = 2

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _require(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class EvalConfig:
    """COCO evaluation on ``data.val`` every ``every`` iterations (0 = only at the end).

    ``tile`` > 0 scores val images wider or taller than ``tile`` px the way ``maskray infer
    --tile`` segments them (tiles at native resolution overlapping by ``tile_overlap``, with
    ``tile_full_pass`` the whole image at the model's size too, instances merged across seams:
    :func:`pipeline.evaluate.evaluate_model`); 0 = every image shrunk to the model's size."""

    every: int = 0
    at_end: bool = True
    # keypoint models: COCOeval's OKS sigma per keypoint (K values); [] = COCO person's 17
    kpt_oks_sigmas: list[float] = field(default_factory=list)
    tile: int = 0  # px; 0 = off
    tile_overlap: float = 0.2
    tile_full_pass: bool = False

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _require(all(s > 0 for s in self.kpt_oks_sigmas), "eval.kpt_oks_sigmas",
                 f"every sigma must be > 0, got {self.kpt_oks_sigmas}")
        require_tiling(self.tile, self.tile_overlap, self.tile_full_pass, prefix="eval.", enable="eval.tile > 0")


@dataclass
class TrainConfig:
    """A whole training run; see the module docstring for the YAML layout."""

    CONFIG_ROOT: ClassVar[bool] = True  # a job's config (pipeline.config: embedded ones prefix their keys)

    data: DataConfig
    name: str = field(default="maskray-train", metadata=RUN_ONLY)
    storage_path: str = field(default="runs", metadata=RUN_ONLY)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=RUN_ONLY)
    threads_per_worker: int = field(default=0, metadata=RUN_ONLY)  # torch intra-op threads per worker; 0 = max(1, int(cpus_per_worker))
    images_per_worker: int = 2
    placement_strategy: str = field(default="PACK", metadata=RUN_ONLY)  # Ray placement of the workers: PACK, SPREAD (one per node), STRICT_*
    wait_for_resources: bool = field(default=False, metadata=RUN_ONLY)  # autoscaling cluster: a group larger than the cluster waits for nodes
    max_failures: int = field(default=0, metadata=RUN_ONLY)  # worker-group restarts from the last checkpoint; -1 = unlimited
    seed: int = 0
    log_every: int = field(default=20, metadata=RUN_ONLY)  # iterations between console/TensorBoard lines
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(max_iters=1000))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection, metadata=RUN_ONLY)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=RUN_ONLY)

    def __post_init__(self) -> None:
        name_ok = bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name) and self.name[0] != "."
        _require(name_ok, "name", f"{self.name!r} must be non-empty and use only letters, digits, '-', '_', '.'")
        _require(bool(self.storage_path.strip()), "storage_path", "must be a local path or s3:// URI")
        _require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _require(self.threads_per_worker >= 0, "threads_per_worker", f"must be >= 0, got {self.threads_per_worker}")
        _require(self.images_per_worker >= 1, "images_per_worker", f"must be >= 1, got {self.images_per_worker}")
        _require(self.placement_strategy in PLACEMENTS, "placement_strategy",
                 f"{self.placement_strategy!r} is not one of {', '.join(PLACEMENTS)}")
        _require(self.max_failures >= -1, "max_failures", f"must be >= -1, got {self.max_failures}")
        _require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")

    @property
    def global_batch(self) -> int:
        return self.num_workers * self.images_per_worker

    @property
    def lr(self) -> float:
        """The peak learning rate: ``base_lr`` scaled linearly from ``reference_batch`` to the global batch."""
        return self.optim.base_lr * self.global_batch / self.optim.reference_batch

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def total_iters(self, train_images: int) -> int:
        """``schedule.max_iters``, or ``schedule.epochs`` converted with the train set size."""
        if self.schedule.max_iters:
            return self.schedule.max_iters
        return max(1, round(self.schedule.epochs * train_images / self.global_batch))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config") -> TrainConfig:
        """Build from a plain mapping; errors name ``source`` and the dotted key."""
        return build(cls, data, source=source)


# Keys (dotted; a section covers its keys) that do not change what a run computes: they may
# differ when a run is resumed. Declared on the fields (``metadata=RUN_ONLY``), collected here.
NON_RESULT_KEYS = run_only_keys(TrainConfig)


def load_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (local path or URI), apply ``--set`` overrides, validate."""
    return load(TrainConfig, path, overrides)
