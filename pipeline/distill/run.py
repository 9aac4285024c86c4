"""Configuration and data plumbing of ``maskray distill`` (the rounds live in ``pipeline.distill.rounds``,
the pseudo-labels in ``pipeline.distill.label``).

A distill config is a YAML mapping::

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

``prepare.enabled`` writes the synthetic-shapes data once: ``pipeline.data.synth.synthesize`` (the
code of ``maskray synth``) draws ``labeled`` annotated images plus an ``unlabeled`` pool, and
``val`` held-out annotated images from another seed; ``convert_coco`` (``maskray convert``)
shards the labeled and val sets and ``pack_images`` (``maskray pack``) the unlabeled pool.

The student's batches mix labeled and pseudo-labeled images at ``student.mix_ratio`` (the
fraction of labeled images): :func:`write_mixed_dataset` writes one training dataset per round
in which every block of 64 rows holds exactly that share of labeled rows (the labeled set is
cycled, reshuffled each pass; each pseudo-labeled image appears once), so ``maskray train``
trains on it unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from model.errors import MaskrayError
from pipeline.distill.label import ThresholdConfig, TTAConfig

logger = logging.getLogger(__name__)

MIX_BLOCK = 64


class DistillConfigError(MaskrayError):
    """An invalid distill configuration (the message names the key at fault)."""


@dataclass
class PrepareConfig:
    enabled: bool = False
    size: int = 64
    labeled: int = 40
    unlabeled: int = 360
    val: int = 100
    seed: int = 0
    categories: int = 3
    max_objects: int = 3

    def __post_init__(self) -> None:
        if self.enabled and (self.labeled < 1 or self.unlabeled < 1 or self.val < 1):
            raise DistillConfigError("prepare: labeled, unlabeled and val must be >= 1")


@dataclass
class DataSection:
    labeled: str = ""
    unlabeled: str = ""
    val: str = ""
    val_max_images: int = 0


@dataclass
class StudentConfig:
    mix_ratio: float = 0.5  # fraction of labeled images in each batch
    keep_empty: bool = False  # keep unlabeled images left without pseudo instances
    # "scratch": the student starts from the model's init (the data-distillation recipe);
    # "teacher": it fine-tunes the round's teacher (shorter schedules, e.g. the demo's)
    init: str = "scratch"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted train keys for the student only

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_ratio < 1.0:
            raise DistillConfigError(f"student.mix_ratio: expected a value in [0, 1), got {self.mix_ratio}")
        if self.init not in ("scratch", "teacher"):
            raise DistillConfigError(f"student.init: expected 'scratch' or 'teacher', got {self.init!r}")


@dataclass
class InferenceSection:
    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.actors < 1 or self.cpus_per_actor <= 0 or self.threads < 0:
            raise DistillConfigError("inference: batch_size and actors must be >= 1, cpus_per_actor > 0, threads >= 0")


@dataclass
class DistillConfig:
    work_dir: str
    train: dict[str, Any]
    rounds: int = 1
    min_gain: float = 0.0
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataSection = field(default_factory=DataSection)
    student: StudentConfig = field(default_factory=StudentConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    inference: InferenceSection = field(default_factory=InferenceSection)
    eval_threads: int = 0
    teacher: str = ""  # a checkpoint URI: round 0 evaluates it instead of training a teacher

    def __post_init__(self) -> None:
        from pipeline import storage

        if not str(self.work_dir).strip():
            raise DistillConfigError("work_dir: a local path or s3:// URI is required")
        if self.rounds < 0:
            raise DistillConfigError(f"rounds: expected >= 0, got {self.rounds}")
        for name in ("labeled", "unlabeled", "val"):
            if not getattr(self.data, name):
                if not self.prepare.enabled:
                    raise DistillConfigError(f"data.{name}: a dataset URI is required (or prepare.enabled: true)")
                setattr(self.data, name, storage.join(self.work_dir, "data", name))
        # the train section must be a valid training config once the job fills in the data
        self.train_config(self.data.labeled, "check", self.work_dir)
        self.train_config(self.data.labeled, "check", self.work_dir, self.student.overrides)

    def train_config(self, train_uri: str, name: str, storage_path: str, overrides: dict | None = None):
        """The :class:`pipeline.train.config.TrainConfig` of one training run of the rounds."""
        from pipeline.train.config import ConfigError, TrainConfig, apply_overrides

        data = copy.deepcopy(self.train)
        data.setdefault("data", {})
        for key in RUN_KEYS:
            if key in data:
                raise DistillConfigError(f"train.{key}: set by the distill job; remove it")
        data["data"]["train"], data["data"]["val"] = train_uri, ""
        data["name"], data["storage_path"] = name, storage_path
        try:
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()])
            return TrainConfig.from_dict(data, source="train")
        except ConfigError as exc:
            raise DistillConfigError(str(exc)) from None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:16]


def to_dict(config: DistillConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _section(cls: type, value: Any, key: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise DistillConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise DistillConfigError(f"unknown key {key}.{unknown[0]} (known keys: {', '.join(sorted(known))})")
    try:
        return cls(**value)
    except MaskrayError:
        raise
    except (TypeError, ValueError) as exc:
        raise DistillConfigError(f"{key}: {exc}") from None


def distill_config_from_dict(data: Any, *, source: str = "config") -> DistillConfig:
    if not isinstance(data, dict):
        raise DistillConfigError(f"{source}: expected a mapping at the top level")
    sections = {"prepare": PrepareConfig, "data": DataSection, "student": StudentConfig, "tta": TTAConfig,
                "thresholds": ThresholdConfig, "inference": InferenceSection}
    top = {"work_dir", "train", "rounds", "min_gain", "eval_threads", "teacher", *sections}
    unknown = sorted(set(data) - top)
    if unknown:
        raise DistillConfigError(f"{source}: unknown key {unknown[0]} (known keys: {', '.join(sorted(top))})")
    if "work_dir" not in data or "train" not in data:
        raise DistillConfigError(f"{source}: work_dir and train are required")
    if not isinstance(data["train"], dict):
        raise DistillConfigError(f"{source}: train must be a mapping (a maskray train config)")
    kwargs = {name: _section(cls, data.get(name), name) for name, cls in sections.items()}
    try:
        return DistillConfig(work_dir=str(data["work_dir"]), train=data["train"], rounds=int(data.get("rounds", 1)),
                             min_gain=float(data.get("min_gain", 0.0)), eval_threads=int(data.get("eval_threads", 0)),
                             teacher=str(data.get("teacher") or ""), **kwargs)
    except DistillConfigError as exc:
        raise DistillConfigError(f"{source}: {exc}") from None


RUN_KEYS = ("name", "storage_path")  # set per run by the distill job


def load_distill_config(path: str, overrides: list[str] | None = None) -> DistillConfig:
    """Read a YAML distill config (local path or URI) and apply ``--set a.b=value`` overrides.

    ``train:`` is a mapping or the path of a ``maskray train`` config file (relative paths are
    relative to the distill config's folder); from a file, the keys the distill job sets per
    run (``name``, ``storage_path``, ``data.train``, ``data.val``) are dropped. Overrides
    apply after the file is read, so ``--set train.schedule.max_iters=100`` works either way.
    """
    import os

    from pipeline import storage
    from pipeline.train.config import ConfigError, apply_overrides, read_yaml_config

    try:
        data = read_yaml_config(path)
        if isinstance(data, dict) and isinstance(data.get("train"), str):
            train_path = data["train"]
            if "://" not in train_path and not os.path.isabs(train_path):
                if storage.is_s3(path):
                    train_path = storage.join(path.rsplit("/", 1)[0], train_path)
                else:
                    train_path = os.path.join(os.path.dirname(os.path.abspath(path)), train_path)
            train = read_yaml_config(train_path)
            for key in RUN_KEYS:
                train.pop(key, None)
            for key in ("train", "val"):
                (train.get("data") or {}).pop(key, None)
            data["train"] = train
        data = apply_overrides(data, list(overrides or []))
    except ConfigError as exc:
        raise DistillConfigError(f"{path}: {exc}" if path not in str(exc) else str(exc)) from None
    return distill_config_from_dict(data, source=path)


# --------------------------------------------------------------------------- data


def prepare_data(config: DistillConfig) -> None:
    """Synthesize + convert + pack the shapes data of ``config.prepare`` (skipped when the
    datasets' manifests already exist)."""
    from pipeline import storage
    from pipeline.data.convert import convert_coco, pack_images
    from pipeline.data.format import manifest_uri, read_manifest
    from pipeline.data.synth import synthesize

    p = config.prepare
    if not p.enabled:
        return
    d = config.data
    if all(storage.exists(manifest_uri(u)) for u in (d.labeled, d.unlabeled, d.val)):
        logger.info("distill: prepared data already in place (%s)", storage.join(config.work_dir, "data"))
        return
    raw = storage.join(config.work_dir, "data", "raw")
    common = {"size": p.size, "num_categories": p.categories, "max_objects": p.max_objects}
    train_raw, val_raw = storage.join(raw, "train"), storage.join(raw, "val")
    synthesize(train_raw, images=p.labeled, unlabeled=p.unlabeled, seed=p.seed, **common)
    synthesize(val_raw, images=p.val, seed=p.seed + 1000, first_id=1, **common)
    convert_coco(storage.join(train_raw, "annotations.json"), storage.join(train_raw, "images"), d.labeled).check()
    convert_coco(storage.join(val_raw, "annotations.json"), storage.join(val_raw, "images"), d.val).check()
    categories = read_manifest(d.labeled).categories
    pack_images(storage.join(train_raw, "unlabeled"), d.unlabeled, first_id=10_000_000,
                categories=categories).check()
    logger.info("distill: prepared %d labeled + %d unlabeled training images (%.0f%% labeled), %d val images",
                p.labeled, p.unlabeled, 100 * p.labeled / (p.labeled + p.unlabeled), p.val)


def mix_pattern(ratio: float, block: int = MIX_BLOCK) -> int:
    """Labeled rows in each block of ``block`` rows."""
    return int(round(ratio * block))


def write_mixed_dataset(labeled_uri: str, pseudo_uri: str | None, out_uri: str, *, ratio: float, seed: int = 0,
                        min_rows: int = 0, extra: dict | None = None) -> tuple[int, int]:
    """A training set for one run of the rounds, written as maskray shards at ``out_uri``.

    With ``pseudo_uri``: every pseudo-labeled image once per pass, interleaved with labeled
    images so that each block of :data:`MIX_BLOCK` rows holds ``mix_pattern(ratio)`` labeled
    rows (the labeled set cycled, reshuffled each time round). Without it (the round-0 teacher):
    the labeled set alone. Passes repeat, reshuffled, until at least ``min_rows`` rows are
    written, so a short schedule over a small set is one long epoch of the training stream
    rather than many short ones. Returns (rows, labeled rows).
    """
    from pipeline.data.format import Manifest, ShardWriter, read_manifest, read_rows, write_manifest

    labeled = list(read_rows(labeled_uri))
    pseudo_rows = list(read_rows(pseudo_uri)) if pseudo_uri else []
    if pseudo_uri and not pseudo_rows:
        raise MaskrayError(f"{pseudo_uri}: no pseudo-labeled image to train a student on "
                           "(lower thresholds.floor or check the teacher)")
    if not labeled and (ratio > 0 or not pseudo_uri):
        raise MaskrayError(f"{labeled_uri}: no labeled image to train on")
    rng = random.Random(seed)
    n_lab = mix_pattern(ratio) if pseudo_uri else MIX_BLOCK
    n_pseudo = MIX_BLOCK - n_lab
    if pseudo_uri and n_pseudo <= 0:
        raise MaskrayError(f"student.mix_ratio={ratio}: leaves no pseudo-labeled image in a batch")
    cycle: list[dict] = []
    rows = labeled_rows = 0

    def next_labeled() -> dict:
        nonlocal cycle
        if not cycle:
            cycle = labeled[:]
            rng.shuffle(cycle)
        return cycle.pop()

    with ShardWriter(out_uri) as writer:
        while rows == 0 or rows < min_rows:
            if pseudo_uri:
                order = pseudo_rows[:]
                rng.shuffle(order)
                for start in range(0, len(order), n_pseudo):
                    chunk = order[start:start + n_pseudo]
                    block = [next_labeled() for _ in range(int(round(len(chunk) * n_lab / n_pseudo)))]
                    labeled_rows += len(block)
                    block += chunk
                    rng.shuffle(block)
                    for row in block:
                        writer.add(row)
                    rows += len(block)
            else:
                for _ in range(len(labeled)):
                    writer.add(next_labeled())
                rows += len(labeled)
                labeled_rows += len(labeled)
    shards = writer.close()
    manifest = read_manifest(pseudo_uri or labeled_uri)
    sources = [labeled_uri] + ([pseudo_uri] if pseudo_uri else [])
    write_manifest(out_uri, Manifest(categories=manifest.categories, shards=shards, source=" + ".join(sources),
                                     extra={**(extra or {}), "mix_ratio": ratio if pseudo_uri else 1.0,
                                            "labeled": labeled_uri, "pseudo": pseudo_uri}))
    return rows, labeled_rows


# --------------------------------------------------------------------------- the rounds' config

# Keys (dotted) of a distill config that do not change what a round computes: they may differ
# when an unfinished round is continued (``rounds`` may grow to add rounds).
NON_RESULT_KEYS = ("rounds", "min_gain", "eval_threads", "inference", "data.val_max_images",
                   "train.log_every", "train.eval", "train.checkpoint", "train.max_failures",
                   "train.wait_for_resources", "train.placement_strategy", "train.cpus_per_worker",
                   "train.threads_per_worker", "train.data.decode_cpus", "train.data.decode_tasks",
                   "train.data.max_bad_fraction")
CONFIG_FILE = "config.json"  # <work_dir>/rounds/config.json: the config the unfinished round runs under


def check_rounds_config(config: DistillConfig, *, resume_anyway: bool = False) -> list[str]:
    """Refuse to continue an unfinished round under a config that differs in results; remember this one.

    Finished rounds are kept whatever the config (the scheduler logs it). Returns the differing keys.
    """
    from pipeline import storage
    from pipeline.distill.rounds import load_states
    from pipeline.train.config import config_diff

    uri = storage.join(config.work_dir, "rounds", CONFIG_FILE)
    new = to_dict(config)
    diff: list[str] = []
    if storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        unfinished = [s.round for s in load_states(config.work_dir) if not s.done]
        diff = config_diff(old, new, NON_RESULT_KEYS)
        if diff and unfinished:
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            if not resume_anyway:
                raise DistillConfigError(
                    f"{config.work_dir}: round {unfinished[0]} is unfinished and was started with another config "
                    f"({shown} differ); pass --resume-anyway to continue it under this config, or use a new work_dir")
            logger.warning("round %d: continuing under a changed config (--resume-anyway): %s", unfinished[0], shown)
    storage.write_bytes(uri, (json.dumps(new, indent=2) + "\n").encode())
    return diff


# --------------------------------------------------------------------------- the steps


class DistillSteps:
    """The real step functions of :class:`pipeline.distill.rounds.RoundScheduler` for one config: training
    through :func:`pipeline.train.engine.fit`, pseudo-labels through :func:`pipeline.distill.label.run_pseudo_labels`."""

    def __init__(self, config: DistillConfig, *, resume_anyway: bool = False, verbose: bool = False) -> None:
        self.config = config
        self.resume_anyway = resume_anyway
        self.verbose = verbose

    def functions(self):
        from pipeline.distill.rounds import StepFunctions

        return StepFunctions(self.train_teacher, self.pseudo_label, self.train_student, self.evaluate)

    def _train(self, train_config) -> str:
        """One training run (its config is remembered in its run folder); the checkpoint URI."""
        from pipeline.train import engine

        result = engine.fit(train_config, resume_anyway=self.resume_anyway, verbose=self.verbose)
        if not result.checkpoint_uri:
            raise MaskrayError(f"training run {result.run_dir} ended without a checkpoint")
        return result.checkpoint_uri

    def _rows_for(self, train_config) -> int:
        """Rows that last the whole schedule: one epoch of the training stream, no restarts."""
        return train_config.schedule.max_iters * train_config.global_batch if train_config.schedule.max_iters else 0

    def train_teacher(self, out: str) -> str:
        from pipeline import storage

        c = self.config
        if c.teacher:  # a given round-0 teacher is only evaluated (the eval step loads it)
            logger.info("round 0: teacher given: %s", c.teacher)
            return c.teacher
        data = storage.join(out, "data")
        train_config = c.train_config(data, "run", out)
        rows, _ = write_mixed_dataset(c.data.labeled, None, data, ratio=1.0, seed=train_config.seed,
                                      min_rows=self._rows_for(train_config), extra={"round": 0})
        logger.info("round 0: teacher data %s: %d rows of %s", data, rows, c.data.labeled)
        return self._train(train_config)

    def pseudo_label(self, round_index: int, teacher: str, out: str):
        from pipeline.distill.label import run_pseudo_labels

        c = self.config
        return run_pseudo_labels(round_index, teacher, out, unlabeled=c.data.unlabeled, labeled=c.data.labeled,
                                 tta=c.tta, thresholds=c.thresholds, keep_empty=c.student.keep_empty,
                                 batch_size=c.inference.batch_size, actors=c.inference.actors,
                                 cpus_per_actor=c.inference.cpus_per_actor, threads=c.inference.threads)

    def train_student(self, round_index: int, pseudo_dataset: str, out: str) -> str:
        from pipeline import storage
        from pipeline.distill.label import check_pseudo_dataset
        from pipeline.distill.rounds import load_state

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
                                            min_rows=self._rows_for(train_config),
                                            extra={"round": round_index, "teacher": state.teacher})
        logger.info("round %d: student data %s: %d rows, %d labeled (mix ratio %.2f)", round_index, mixed, rows,
                    labeled, c.student.mix_ratio)
        return self._train(train_config)

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


def run_distill(config: DistillConfig, *, resume_anyway: bool = False, verbose: bool = False):
    """All rounds of ``config`` (``maskray distill`` and the demo): prepare the data, check the
    rounds' config, start Ray by the one rule and run the scheduler. Returns the scheduler
    (``.stop_reason``); the per-round summary is written to ``<work_dir>/rounds/summary.txt``."""
    from pipeline import raysetup, storage
    from pipeline.distill.rounds import RoundScheduler, format_summary, load_states

    check_rounds_config(config, resume_anyway=resume_anyway)
    prepare_data(config)
    started_ray = raysetup.init(verbose=verbose)
    try:
        scheduler = RoundScheduler(config.work_dir, DistillSteps(config, resume_anyway=resume_anyway,
                                                                 verbose=verbose).functions(),
                                   rounds=config.rounds, min_gain=config.min_gain, config_hash=config.fingerprint())
        scheduler.run()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    table = format_summary(load_states(config.work_dir))
    storage.write_bytes(storage.join(config.work_dir, "rounds", "summary.txt"), (table + "\n").encode())
    return scheduler
