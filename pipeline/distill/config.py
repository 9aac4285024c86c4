"""``DistillConfig``: the typed configuration of ``maskray distill`` (and of the demo's round).

A distill config is a YAML mapping, built by the one loader (:mod:`pipeline.config`: unknown keys
and wrong types refused naming the dotted key; every value checked in ``__post_init__``)::

    work_dir: out/distill-shapes     # rounds/ (and data/ when prepared) go here; local or s3://
    rounds: 1                        # self-training rounds after round 0 (the labeled-only teacher)
    min_gain: 0.0                    # stop after a round whose student gains < this many mask AP points
    prepare: {enabled: true, size: 64, labeled: 40, unlabeled: 360, val: 100, seed: 0, ...}
    data: {labeled: URI, unlabeled: URI, val: URI, val_max_images: 0}   # default: <work_dir>/data/*
    teacher: URI                     # optional: an existing checkpoint as round 0's teacher (no training)
    train: {...}                     # a `maskray train` config (pipeline.train.config.TrainConfig) without
                                     # data.train/val, name, storage_path: the distill job fills them;
                                     # or a train config file: `train: shapes-cpu.yaml` (those keys dropped)
    student: {mix_ratio: 0.5, init: scratch, overrides: {schedule.max_iters: 800}}
    tta: {scales: [0.75, 1.0], hflip: true, merge: wbv, score_mode: mean, iou_threshold: 0.55, ...}
    thresholds: {mode: density, floor: 0.3}           # or {mode: fixed, value: 0.6}
    inference: {batch_size: 8, actors: 1, cpus_per_actor: 1, threads: 2}
    eval_threads: 2

``prepare.enabled`` writes synthetic-shapes data once (:func:`pipeline.distill.run.prepare_data`).
Which keys do not change a round's results is declared on the fields (``metadata=RUN_ONLY``) and,
for the ``train`` section, taken from :data:`pipeline.train.config.NON_RESULT_KEYS`: never retyped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import (RUN_ONLY, ConfigError, apply_overrides, build, parse_override, read_yaml, require,
                             run_only_keys, to_dict)

MERGE_MODES = ("wbv", "nms")
SCORE_MODES = ("mean", "max")
THRESHOLD_MODES = ("density", "fixed")
STUDENT_INITS = ("scratch", "teacher")
RUN_KEYS = ("name", "storage_path")  # keys of the train section set per run by the distill job
DATA_KEYS = ("data.train", "data.val")  # ... and the datasets it fills per run (train_config)


class DistillConfigError(ConfigError):
    """An invalid distill configuration (the message names the key at fault)."""


@dataclass
class PrepareConfig:
    """Synthetic shapes written once under ``<work_dir>/data`` (``enabled``)."""

    enabled: bool = False
    size: int = 64
    labeled: int = 40
    unlabeled: int = 360
    val: int = 100
    seed: int = 0
    categories: int = 3
    max_objects: int = 3

    def __post_init__(self) -> None:
        if self.enabled:
            for name in ("labeled", "unlabeled", "val", "size", "categories", "max_objects"):
                require(getattr(self, name) >= 1, f"prepare.{name}", f"expected >= 1, got {getattr(self, name)}")


@dataclass
class DataSection:
    """Dataset URIs (maskray shards); empty = ``<work_dir>/data/<name>`` when ``prepare.enabled``.
    ``val_max_images`` evaluates on the first N val images (0: all)."""

    labeled: str = ""
    unlabeled: str = ""
    val: str = ""
    val_max_images: int = field(default=0, metadata=RUN_ONLY)

    def __post_init__(self) -> None:
        require(self.val_max_images >= 0, "data.val_max_images", f"expected >= 0, got {self.val_max_images}")


@dataclass
class StudentConfig:
    """How the student trains: ``mix_ratio`` = fraction of labeled images in every batch (the rest
    pseudo-labeled); ``init`` = ``scratch`` (the model's init, the data-distillation recipe) or
    ``teacher`` (fine-tune the round's teacher); ``overrides`` = dotted train keys for the student only.
    ``control``: also train the round's control, the student's run (same init, schedule and
    overrides) on the labeled images alone, and score it: the student's gain over the control is
    what the pseudo-labels gave, the gain over the teacher also counts any extra training."""

    mix_ratio: float = 0.5
    keep_empty: bool = False  # keep unlabeled images left without pseudo instances
    init: str = "scratch"
    overrides: dict[str, Any] = field(default_factory=dict)
    control: bool = False

    def __post_init__(self) -> None:
        require(0.0 <= self.mix_ratio < 1.0, "student.mix_ratio", f"expected a value in [0, 1), got {self.mix_ratio}")
        self.overrides = dotted_overrides(self.overrides)
        require(self.init in STUDENT_INITS, "student.init",
                f"expected one of {', '.join(STUDENT_INITS)}, got {self.init!r}")


def dotted_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``student.overrides`` as dotted train keys only: a nested mapping (``optim: {base_lr: 0.02}``)
    names the keys inside it (``optim.base_lr``), never a whole section (which would reset the
    section's other keys, e.g. ``optim.reference_batch``, to their defaults). One key given twice
    (nested and dotted) is refused, naming it."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                add(f"{prefix}.{key}", inner)
            return
        require(prefix not in flat, f"student.overrides.{prefix}", "given twice (as a dotted key and inside a "
                "mapping); keep one")
        flat[prefix] = value

    for key, value in overrides.items():
        add(str(key), value)
    return flat


@dataclass(frozen=True)
class TTAConfig:
    """Which transforms the teacher runs and how their predictions are merged
    (:class:`pipeline.distill.tta.TTAPredictor`).

    ``scales`` multiply both the image size and the model's ``min_size``/``max_size`` so each
    scale really changes the resolution the network sees; ``hflip`` adds the mirrored image of
    every scale. ``min_score`` drops weak detections of every transform before merging;
    ``iou_threshold`` groups same-class detections across transforms; ``merge`` is the merged
    box (``wbv``: score-weighted mean, ``nms``: the top one), ``score_mode`` the merged score
    (``mean`` over all transforms, a missing one counting 0, or ``max``); ``mask_threshold``
    binarizes the averaged soft mask; ``max_detections`` caps the merged result per image.
    """

    scales: tuple[float, ...] = (1.0,)
    hflip: bool = True
    merge: str = "wbv"
    score_mode: str = "mean"
    iou_threshold: float = 0.55
    min_score: float = 0.05
    mask_threshold: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        require(bool(self.scales) and all(s > 0 and math.isfinite(s) for s in self.scales), "tta.scales",
                f"expected positive numbers, got {list(self.scales)}")
        require(isinstance(self.hflip, bool), "tta.hflip", f"expected true or false, got {self.hflip!r}")
        require(self.merge in MERGE_MODES, "tta.merge", f"expected one of {', '.join(MERGE_MODES)}, got {self.merge!r}")
        require(self.score_mode in SCORE_MODES, "tta.score_mode",
                f"expected one of {', '.join(SCORE_MODES)}, got {self.score_mode!r}")
        for name in ("iou_threshold", "min_score", "mask_threshold"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"tta.{name}", f"expected a value in [0, 1], got {value}")
        require(self.max_detections >= 1, "tta.max_detections", f"expected >= 1, got {self.max_detections}")


@dataclass(frozen=True)
class ThresholdConfig:
    """``mode="density"``: per-class thresholds from the labeled set's instances per image, never
    below ``floor`` (:func:`pipeline.distill.thresholds.density_thresholds`); ``mode="fixed"``:
    one threshold ``value`` for every class."""

    mode: str = "density"
    value: float = 0.5
    floor: float = 0.05

    def __post_init__(self) -> None:
        require(self.mode in THRESHOLD_MODES, "thresholds.mode",
                f"expected one of {', '.join(THRESHOLD_MODES)}, got {self.mode!r}")
        for name in ("value", "floor"):
            require(0.0 <= getattr(self, name) <= 1.0, f"thresholds.{name}",
                    f"expected a value in [0, 1], got {getattr(self, name)}")


@dataclass
class InferenceSection:
    """The teacher's TTA inference (``pipeline.infer.driver.run_inference``): images per model
    call, model actors, CPUs per actor, torch threads per CPU actor (0: the driver's rule)."""

    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors"):
            require(getattr(self, name) >= 1, f"inference.{name}", f"expected >= 1, got {getattr(self, name)}")
        require(self.cpus_per_actor > 0, "inference.cpus_per_actor", f"expected > 0, got {self.cpus_per_actor}")
        require(self.threads >= 0, "inference.threads", f"expected >= 0, got {self.threads}")


@dataclass
class DistillConfig:
    """The whole distill job (see the module docstring)."""

    work_dir: str
    train: dict[str, Any]
    rounds: int = field(default=1, metadata=RUN_ONLY)  # may grow to add rounds
    min_gain: float = field(default=0.0, metadata=RUN_ONLY)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataSection = field(default_factory=DataSection)
    student: StudentConfig = field(default_factory=StudentConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    inference: InferenceSection = field(default_factory=InferenceSection, metadata=RUN_ONLY)
    eval_threads: int = field(default=0, metadata=RUN_ONLY)
    teacher: str = ""  # a checkpoint URI: round 0 evaluates it instead of training a teacher

    def __post_init__(self) -> None:
        from pipeline import storage

        require(bool(str(self.work_dir).strip()), "work_dir", "a local path or s3:// URI is required")
        require(self.rounds >= 0, "rounds", f"expected >= 0, got {self.rounds}")
        require(self.eval_threads >= 0, "eval_threads", f"expected >= 0, got {self.eval_threads}")
        for name in ("labeled", "unlabeled", "val"):
            if not getattr(self.data, name):
                require(self.prepare.enabled, f"data.{name}", "a dataset URI is required (or prepare.enabled: true)")
                setattr(self.data, name, storage.join(self.work_dir, "data", name))
        # the train section must be a valid training config once the job fills in the data
        self.train_config(self.data.labeled, "check", self.work_dir)
        self.train_config(self.data.labeled, "check", self.work_dir, self.student.overrides)

    def train_config(self, train_uri: str, name: str, storage_path: str, overrides: dict | None = None):
        """The :class:`pipeline.train.config.TrainConfig` of one training run of the rounds:
        the ``train`` section, its data/name/storage_path filled, ``overrides`` (dotted keys) applied."""
        from pipeline.train.config import TrainConfig

        data = copy.deepcopy(self.train)
        data.setdefault("data", {})
        for key in RUN_KEYS:
            require(key not in data, f"train.{key}", "set by the distill job; remove it")
        data["data"]["train"], data["data"]["val"] = train_uri, ""
        data["name"], data["storage_path"] = name, storage_path
        data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()])
        return build(TrainConfig, data, source="train")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(to_json(self), sort_keys=True).encode()).hexdigest()[:16]


def to_json(config: DistillConfig) -> dict:
    """The config as plain JSON data (tuples as lists): what the rounds' record holds."""
    return json.loads(json.dumps(to_dict(config)))


def non_result_keys() -> tuple[str, ...]:
    """Dotted keys of a distill config that do not change what a round computes: its own
    ``RUN_ONLY`` fields, and the train section's (:data:`pipeline.train.config.NON_RESULT_KEYS`)."""
    from pipeline.train.config import NON_RESULT_KEYS as TRAIN_KEYS

    return run_only_keys(DistillConfig) + tuple(f"train.{k}" for k in TRAIN_KEYS)


def distill_config_from_dict(data: Any, *, source: str = "config") -> DistillConfig:
    """Build from a plain mapping (``train`` a mapping); errors name ``source`` and the dotted key."""
    return build(DistillConfig, data, source=source)


def load_distill_config(path: str, overrides: list[str] | None = None) -> DistillConfig:
    """Read a YAML distill config (local path or URI) and apply ``--set a.b=value`` overrides.

    ``train:`` is a mapping or the path of a ``maskray train`` config file (relative paths are
    relative to the distill config's folder); from a file, the keys the distill job sets per
    run (``name``, ``storage_path``, ``data.train``, ``data.val``) are dropped. Overrides
    apply after the file is read, so ``--set train.schedule.max_iters=100`` works either way.
    """
    from pipeline import storage

    try:
        data = read_yaml(path)
        if isinstance(data.get("train"), str):
            train_path = data["train"]
            if "://" not in train_path and not os.path.isabs(train_path):
                if storage.is_s3(path):
                    train_path = storage.join(path.rsplit("/", 1)[0], train_path)
                else:
                    train_path = os.path.join(os.path.dirname(os.path.abspath(path)), train_path)
            train = read_yaml(train_path)
            for key in RUN_KEYS:
                train.pop(key, None)
            for key in DATA_KEYS:
                section, _, name = key.partition(".")
                (train.get(section) or {}).pop(name, None)
            data["train"] = train
        # `--set student.overrides.optim.base_lr=0.02` sets the dotted train key `optim.base_lr` of
        # the overrides (replacing the file's), not a nested `optim` section beside it
        prefix = "student.overrides."
        student_keys = [o for o in overrides or [] if o.strip().startswith(prefix)]
        data = apply_overrides(data, [o for o in overrides or [] if o not in student_keys])
        for text in student_keys:
            keys, value = parse_override(text.strip()[len(prefix):])
            student = data.setdefault("student", {})
            if not isinstance(student, dict) or not isinstance(student.setdefault("overrides", {}), dict):
                raise ConfigError(f"--set {text}: student.overrides is not a mapping")
            student["overrides"][".".join(keys)] = value
    except ConfigError as exc:
        raise DistillConfigError(f"{path}: {exc}" if path not in str(exc) else str(exc)) from None
    source = f"{path} (with --set)" if overrides else path
    return distill_config_from_dict(data, source=source)
