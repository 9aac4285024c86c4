"""``run_distill``: the wiring of ``maskray distill`` (and of the demo's round): prepare the data,
check the rounds' run record, and run :class:`pipeline.distill.rounds.RoundScheduler` with the real
steps (:class:`DistillSteps`: training through ``pipeline.train.engine.fit``, pseudo-labels through
:func:`pipeline.distill.label.run_pseudo_labels`, evaluation). The config is
:class:`pipeline.distill.config.DistillConfig`.

``prepare.enabled`` writes the synthetic-shapes data once: ``pipeline.data.synth.synthesize`` (the
code of ``maskray synth``) draws ``labeled`` annotated images plus an ``unlabeled`` pool, and
``val`` held-out annotated images from another seed; ``convert_coco`` (``maskray convert``)
shards the labeled and val sets and ``pack_images`` (``maskray pack``) the unlabeled pool.

The student's batches mix labeled and pseudo-labeled images at ``student.mix_ratio`` (the
fraction of labeled images): :func:`write_mixed_dataset` writes one training dataset per round
in which every block of 64 rows holds exactly that share of labeled rows (the labeled set is
cycled, reshuffled each pass; each pseudo-labeled image appears once per pass), so ``maskray train``
trains on it unchanged.
"""

from __future__ import annotations

import logging
import random

from model.errors import MaskrayError
from pipeline.config import field_defaults
from pipeline.distill.config import DistillConfig, non_result_keys, to_json

logger = logging.getLogger(__name__)

MIX_BLOCK = 64


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


# --------------------------------------------------------------------------- the rounds' run record

RECORD_FILE = "config.json"  # <work_dir>/rounds/config.json: the config the rounds run under


def check_rounds_config(config: DistillConfig, *, resume_anyway: bool = False) -> list[str]:
    """Refuse to continue an unfinished round under a config that differs in results (the one run
    record rule, :mod:`pipeline.runrecord`, ignoring :func:`~pipeline.distill.config.non_result_keys`);
    remember this one. Finished rounds are kept whatever the config (the scheduler logs it).
    Returns the differing keys."""
    from pipeline import runrecord, storage
    from pipeline.distill.rounds import load_states

    uri = storage.join(config.work_dir, "rounds", RECORD_FILE)
    new = to_json(config)
    old = runrecord.read(uri)
    diff: list[str] = []
    unfinished = [s.round for s in load_states(config.work_dir) if not s.done] if old is not None else []
    if unfinished:
        diff = runrecord.compare(old, new, ignore=non_result_keys(),
                                 what=f"round {unfinished[0]} of {config.work_dir} (unfinished)",
                                 flag="--resume-anyway", alternative="use a new work_dir", override=resume_anyway,
                                 defaults=field_defaults(DistillConfig))
    elif old is not None:
        diff = runrecord.differences(old, new, non_result_keys(), field_defaults(DistillConfig))
    runrecord.write(uri, new)
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

        return StepFunctions(self.train_teacher, self.pseudo_label, self.train_student, self.evaluate,
                             train_control=self.train_control if self.config.student.control else None)

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

    def train_control(self, round_index: int, teacher: str, out: str) -> str:
        """The round's control: the student's run (its init, schedule and overrides) on the labeled
        data alone, no pseudo-labels."""
        c = self.config
        overrides = dict(c.student.overrides)
        if c.student.init == "teacher":
            overrides["model.weights"] = teacher
        logger.info("round %d: control: the student's run on %s alone", round_index, c.data.labeled)
        return self._train(c.train_config(c.data.labeled, "run", out, overrides))

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
