"""``maskray demo``: the whole product end to end on synthetic shapes, on a local Ray.

Steps (each skipped when its output is already there, so a rerun resumes; ``--fresh`` starts
over): synthesize + convert/pack the data → train on few labels (Ray Train) → evaluate → batch
segmentation of the unlabeled pool (Ray Data) → one data-distillation round (40 labels, a pool 9x
larger, the student from scratch with the teacher's own schedule; the report says plainly what the
student scored against its teacher and whether that comparison is compute-matched; with
``--distill-control`` also what the pseudo-labels gave over the same run on the labels alone) → a
keypoint & mask model fine-tuned from the best shapes model on stick figures (scored with OKS AP) →
overlay PNGs →
``report.md``. Everything is written under ``--out`` (or ``--storage`` for the datasets, runs
and predictions, e.g. an ``s3://`` prefix), and each step is the same code as its command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs import cli

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# The distillation round's regime (issue 25): few labeled 64-px images (configs/shapes-64-cpu.yaml trains
# 300 iterations on them: 30 epochs) and an unlabeled pool 9x larger.
TRAIN_IMAGES = 40
POOL_IMAGES = 360
SHAPES_SYNTH = ("--size", "64", "--categories", "3", "--max-objects", "3")
# The keypoint stage (issue 22): a joint keypoint & mask model on 96-px stick figures and shapes
# (`maskray synth --keypoints`), trained by configs/keypoints-cpu.yaml, scored with OKS. It
# fine-tunes the demo's best shapes model, the round's student when it beat its teacher, else the
# teacher (`model.weights`, as users start from COCO weights: the backbone, FPN and RPN that fit are
# loaded; the predictors and the keypoint head start new) for 240 iterations, where the config's 400
# from scratch reach kp AP50 0.78-0.81; 160 gave 0.38-0.69 (benchmarks/RESULTS.md, "make demo").
KEYPOINT_IMAGES = 600
KEYPOINT_SYNTH = ("--size", "96", "--categories", "2", "--max-objects", "3", "--keypoints")
KEYPOINT_SCHEDULE = ("schedule.max_iters=240", "schedule.steps=[192]", "schedule.warmup_iters=30")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="local folder for report.md, overlays and (by default) all data (default demo-out)")
    parser.add_argument("--storage", metavar="URI",
                        help="object storage prefix for datasets, runs and predictions (default: OUT)")
    parser.add_argument("--fresh", action="store_true", help="delete what an earlier demo left in OUT and start over")
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES, metavar="N",
                        help=f"labeled training images to synthesize (default {TRAIN_IMAGES}: few labels, the "
                             "semi-supervised regime the distillation round is for)")
    parser.add_argument("--val-images", type=int, default=200, metavar="N",
                        help="held-out labeled images (default 200)")
    parser.add_argument("--pool-images", type=int, default=POOL_IMAGES, metavar="N",
                        help=f"unlabeled images for batch segmentation and distillation (default {POOL_IMAGES})")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the synthetic data (train + pool: S, val: 1000 + S) and of every training "
                             "run (default 0)")
    parser.add_argument("--train-config", default=str(REPO / "configs" / "shapes-64-cpu.yaml"), metavar="FILE",
                        help="training config (default configs/shapes-64-cpu.yaml)")
    parser.add_argument("--distill-config", default=str(REPO / "configs" / "distill-demo.yaml"), metavar="FILE",
                        help="distillation config (default configs/distill-demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="extra override for the training config (repeatable), e.g. schedule.max_iters=50")
    parser.add_argument("--skip-distill", action="store_true", help="stop after batch segmentation")
    parser.add_argument("--distill-control", action="store_true",
                        help="also train the round's control (the student's run on the labeled images alone) and "
                             "report the pseudo-labels' own gain over it (costs one more training run)")
    parser.add_argument("--keypoint-images", type=int, default=KEYPOINT_IMAGES, metavar="N",
                        help=f"training images of the keypoint stage's stick figures (default {KEYPOINT_IMAGES})")
    parser.add_argument("--keypoint-config", default=str(REPO / "configs" / "keypoints-cpu.yaml"), metavar="FILE",
                        help="the keypoint stage's training config (default configs/keypoints-cpu.yaml)")
    parser.add_argument("--skip-keypoints", action="store_true", help="leave out the keypoint stage")


@dataclass
class Timings:
    """Wall time per demo step, in seconds, in the order run."""

    steps: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, seconds: float) -> None:
        self.steps[name] = round(seconds, 1)


def _timed(timings: Timings, name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, logged and timed as demo step ``name``."""
    logger.info("demo: ── %s ──", name)
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings.record(name, time.perf_counter() - start)


def _step(timings: Timings, name: str, argv: list[str]) -> None:
    """Run ``maskray ARGV`` in-process (same code as the command), timing it. A step whose output
    an earlier demo made with other settings (another maskray version's defaults) is refused by
    the step's run record; the demo's own way out is ``--fresh``, not the step's flag."""
    from pipeline.runrecord import RunChangedError

    logger.info("demo: ── %s ── maskray %s", name, " ".join(argv))
    start = time.perf_counter()
    try:
        code = cli.invoke(argv)
    except RunChangedError as exc:
        raise RunChangedError(f"demo step '{name}': {exc.change}; this output folder holds an earlier demo's "
                              "results: `maskray demo --fresh` (or deleting the folder) starts over") from None
    finally:
        timings.record(name, time.perf_counter() - start)
    if code:
        from model.errors import MaskrayError

        raise MaskrayError(f"demo step '{name}' failed with exit code {code}")


def _init_ray(verbose: bool = False) -> None:
    """A local Ray for all steps: logical CPUs = cores, quiet, no dashboard.

    Without ``--verbose`` Ray's C++ log lines stay out of the console: the only one the demo
    triggers is core_worker's notice that the inference actor pool (restartable, so a dead actor
    is replaced) receives its constructor arguments through the object store — expected here.
    Failures still surface as Python exceptions.
    """
    from pipeline import raysetup

    raysetup.init(num_cpus=os.cpu_count() or 2, verbose=verbose)


def run(args: argparse.Namespace) -> int:
    from pipeline import storage

    out = Path(args.out).resolve()
    base = args.storage or str(out)
    if args.fresh:
        if out.exists():
            logger.info("demo: --fresh: removing %s", out)
            shutil.rmtree(out)
        if args.storage:
            for uri in storage.list_files(args.storage):
                storage.delete(uri)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "synth_train": storage.join(base, "synth", "train"),
        "synth_val": storage.join(base, "synth", "val"),
        "train": storage.join(base, "shards", "train"),
        "val": storage.join(base, "shards", "val"),
        "pool": storage.join(base, "shards", "pool"),
        "runs": storage.join(base, "runs"),
        "predictions": storage.join(base, "predictions", "pool"),
        "distill": storage.join(base, "distill"),
        "synth_kp_train": storage.join(base, "synth-keypoints", "train"),
        "synth_kp_val": storage.join(base, "synth-keypoints", "val"),
        "kp_train": storage.join(base, "shards-keypoints", "train"),
        "kp_val": storage.join(base, "shards-keypoints", "val"),
    }
    timings = Timings()
    started = time.perf_counter()
    verbose = bool(getattr(args, "verbose", False))
    _init_ray(verbose)  # once for every step: train, infer and distill find it up

    # 1. data: labeled train (+ unlabeled pool) and held-out val, as shards.
    if not storage.exists(storage.join(paths["train"], "manifest.json")):
        _step(timings, "synth train", ["synth", "--out", paths["synth_train"], "--images", str(args.train_images),
                                       "--unlabeled", str(args.pool_images), "--seed", str(args.seed),
                                       *SHAPES_SYNTH])
        _step(timings, "convert train", ["convert", "--coco", storage.join(paths["synth_train"], "annotations.json"),
                                         "--images", storage.join(paths["synth_train"], "images"),
                                         "--out", paths["train"]])
    if not storage.exists(storage.join(paths["val"], "manifest.json")):
        _step(timings, "synth val", ["synth", "--out", paths["synth_val"], "--images", str(args.val_images),
                                     "--seed", str(1000 + args.seed), "--first-id", "1000001", *SHAPES_SYNTH])
        _step(timings, "convert val", ["convert", "--coco", storage.join(paths["synth_val"], "annotations.json"),
                                       "--images", storage.join(paths["synth_val"], "images"), "--out", paths["val"]])
    if not storage.exists(storage.join(paths["pool"], "manifest.json")):
        _step(timings, "pack pool", ["pack", "--images", storage.join(paths["synth_train"], "unlabeled"),
                                     "--out", paths["pool"], "--first-id", "2000001"])

    # 2. train with Ray Train (resumes by name when interrupted).
    run_uri = storage.join(paths["runs"], "shapes")
    final_uri = storage.join(run_uri, "final_metrics.json")
    from pipeline.train import fit, load_config

    teacher_overrides = list(args.overrides)
    teacher_config = load_config(args.train_config, [f"data.train={paths['train']}", f"data.val={paths['val']}",
                                                     f"storage_path={paths['runs']}", "name=shapes",
                                                     # the eval step below scores the model on all val images
                                                     "eval.at_end=false", f"seed={args.seed}", *teacher_overrides])
    if not storage.exists(final_uri):
        result = _timed(timings, "train", fit, teacher_config, verbose=verbose)
        logger.info("demo: Ray Train driver start-up (s): %s", result.timings)
    final = json.loads(storage.read_bytes(final_uri))
    checkpoint = final["model"]

    # 3. evaluate the trained model on the held-out split.
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        _step(timings, "eval", ["eval", "--checkpoint", checkpoint, "--data", paths["val"],
                                "--out", str(metrics_path)])
    metrics = json.loads(metrics_path.read_text())

    # 4. batch segmentation of the unlabeled pool with Ray Data (skips finished shards).
    _step(timings, "infer", ["infer", "--checkpoint", checkpoint, "--input", paths["pool"],
                             "--output", paths["predictions"], "--coco-json", str(out / "pool-results.json"),
                             "--batch-size", "8"])

    # 5. one data-distillation round, the trained model as the round-0 teacher.
    distill_summary, extra_iterations, matched, fine_tuned = None, 0, False, False
    best = checkpoint  # the demo's best shapes model: the student when it beat its teacher
    if not args.skip_distill:
        from pipeline.distill.config import DATA_KEYS, RUN_KEYS, load_distill_config
        from pipeline.distill.run import run_distill

        # the round's train section is the teacher's own training config (file + the demo's overrides),
        # so a student without schedule overrides trains exactly as its teacher did
        distill_config = load_distill_config(args.distill_config, [
            f"work_dir={paths['distill']}", f"data.labeled={paths['train']}", f"data.unlabeled={paths['pool']}",
            f"data.val={paths['val']}", f"teacher={checkpoint}", f"train.seed={args.seed}",
            *(f"train.{o}" for o in teacher_overrides if o.split("=", 1)[0].strip() not in (*RUN_KEYS, *DATA_KEYS)),
            f"student.control={str(args.distill_control).lower()}"])
        _timed(timings, "distill", run_distill, distill_config, verbose=verbose)
        distill_summary = _distill_rounds(paths["distill"])
        student = distill_config.train_config(paths["train"], "student", paths["distill"],
                                              distill_config.student.overrides)
        fine_tuned = distill_config.student.init == "teacher"
        extra_iterations, matched = _extra_training(teacher_config, student, fine_tuned)
        last = distill_summary[-1] if distill_summary else None
        if last is not None and last.student and (last.gain() or 0) > 0:
            best = last.student

    # 6. keypoints: a joint keypoint & mask model on stick figures, trained and scored (OKS).
    keypoints = None if args.skip_keypoints else _keypoint_stage(args, paths, out, timings, verbose, init=best)

    # 7. overlays and the report.
    overlays = out / "overlays"
    _step(timings, "show", ["show", "--checkpoint", checkpoint, "--data", paths["val"],
                            "--out", str(overlays), "--limit", "8"])
    report = out / "report.md"
    report.write_text(_report(paths, final, metrics, distill_summary, timings,
                              time.perf_counter() - started, out, overlays, keypoints=keypoints,
                              extra_iterations=extra_iterations, matched=matched, fine_tuned=fine_tuned,
                              keypoint_init=best))
    print(f"\nmaskray demo finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return 0


def _keypoint_stage(args: argparse.Namespace, paths: dict, out: Path, timings: Timings, verbose: bool,
                    init: str) -> dict:
    """Synthesize stick figures (+ shapes), fine-tune the checkpoint ``init`` with
    ``--keypoint-config`` (:data:`KEYPOINT_SCHEDULE`) with Ray Train, score it on
    held-out figures (bbox, segm and keypoint AP; OKS with the config's ``eval.kpt_oks_sigmas``) and
    draw a few overlays. Each part is skipped when its output is there. Returns ``{"metrics",
    "model", "run", "overlays", "sigmas"}`` for the report."""
    from pipeline import storage
    from pipeline.train import fit, load_config

    for split, images, seed, first_id in (("train", args.keypoint_images, args.seed, 3000001),
                                          ("val", 100, 1000 + args.seed, 4000001)):
        shards, synth = paths[f"kp_{split}"], paths[f"synth_kp_{split}"]
        if not storage.exists(storage.join(shards, "manifest.json")):
            _step(timings, f"synth keypoints {split}", ["synth", "--out", synth, "--images", str(images),
                                                         "--seed", str(seed), "--first-id", str(first_id),
                                                         *KEYPOINT_SYNTH])
            _step(timings, f"convert keypoints {split}", ["convert", "--coco", storage.join(synth, "annotations.json"),
                                                           "--images", storage.join(synth, "images"), "--out", shards])
    config = load_config(args.keypoint_config, [f"data.train={paths['kp_train']}", f"data.val={paths['kp_val']}",
                                                f"storage_path={paths['runs']}", "name=keypoints-cpu",
                                                "eval.at_end=false", f"seed={args.seed}",
                                                f"model.weights={init}", *KEYPOINT_SCHEDULE])
    final_uri = storage.join(paths["runs"], "keypoints-cpu", "final_metrics.json")
    if not storage.exists(final_uri):
        _timed(timings, "train keypoints", fit, config, verbose=verbose)
    final = json.loads(storage.read_bytes(final_uri))
    metrics_path = out / "metrics-keypoints.json"
    sigmas = ",".join(f"{s:g}" for s in config.eval.kpt_oks_sigmas)
    if not metrics_path.exists():
        _step(timings, "eval keypoints", ["eval", "--checkpoint", final["model"], "--data", paths["kp_val"],
                                          "--out", str(metrics_path),
                                          *(["--kpt-oks-sigmas", sigmas] if sigmas else [])])
    overlays = out / "overlays-keypoints"
    _step(timings, "show keypoints", ["show", "--checkpoint", final["model"], "--data", paths["kp_val"],
                                      "--out", str(overlays), "--limit", "4"])
    return {"metrics": json.loads(metrics_path.read_text()), "model": final["model"], "run": final.get("run"),
            "overlays": str(overlays), "sigmas": sigmas}


def _distill_rounds(work_dir: str) -> list:
    """The distillation rounds' states (``pipeline.distill.rounds.RoundState``), in order."""
    from pipeline.distill.rounds import load_states

    return load_states(work_dir)


def _same_training(teacher, student) -> bool:
    """Whether two :class:`~pipeline.train.config.TrainConfig` train alike: every result-changing
    setting equal (init, model, schedule, optim, augmentation, seed, batch), except the data they
    read. A student from scratch that trains like its teacher is compute-matched with it."""
    from pipeline import runrecord
    from pipeline.distill.config import DATA_KEYS
    from pipeline.train.config import NON_RESULT_KEYS  # name and storage_path among them

    return not runrecord.differences(teacher.to_dict(), student.to_dict(), ignore=(*NON_RESULT_KEYS, *DATA_KEYS))


def _extra_training(teacher, student, fine_tuned: bool) -> tuple[int, bool]:
    """``(extra_iterations, matched)`` of a round's student against its teacher (two
    :class:`~pipeline.train.config.TrainConfig`): a student fine-tuned from the teacher trained all its
    iterations more; one from scratch trained ``student - teacher`` more (0 when not longer), and is
    compute-matched when it trains exactly as its teacher did (:func:`_same_training`)."""
    if fine_tuned:
        return student.schedule.max_iters, False
    if _same_training(teacher, student):
        return 0, True
    return max(0, student.schedule.max_iters - teacher.schedule.max_iters), False


def _distill_verdict(state, extra_iterations: int = 0, matched: bool = False, fine_tuned: bool = False) -> str:
    """Plain sentences on whether the round's student beat its teacher (mask AP, points), and its
    control when the round has one. ``extra_iterations``: how many more iterations the student
    trained than its teacher (``fine_tuned``: fine-tuned from it; else from scratch on a longer
    schedule): a gain over the teacher is then not compute-matched, and it says so. ``matched``: the
    student trained from scratch exactly as its teacher did (:func:`_same_training`) on its mixed
    data: the teacher is its control."""
    gain = state.gain()
    if gain is None:
        return f"**Round {state.round} did not finish**: no student to compare with its teacher."
    teacher, student = (100 * state.metrics[k]["segm"]["AP"] for k in ("teacher", "student"))
    if gain <= 0:
        verdict = (f"**Round {state.round} did not gain**: the student's mask AP is {student:.1f} against the "
                   f"teacher's {teacher:.1f} ({gain:+.1f}). The student is not a better model here; the teacher "
                   "stays the result.")
    else:
        verdict = (f"**The student scored {gain:+.1f} mask AP over its teacher** ({teacher:.1f} -> {student:.1f}) "
                   f"in round {state.round}.")
    over_control = state.gain_over_control()
    if over_control is not None:
        control = 100 * state.metrics["control"]["segm"]["AP"]
        if over_control > 0:
            return verdict + (f" Its control, the same run on the labeled images alone, scored {control:.1f}: "
                              f"**the pseudo-labels gave {over_control:+.1f} mask AP**.")
        return verdict + (f" Its control, the same run on the labeled images alone, scored {control:.1f}: **the "
                          f"pseudo-labels did not help** ({over_control:+.1f} mask AP against the control).")
    if matched:
        return verdict + (" The comparison is compute-matched: the student trained from the same initialization "
                          "with the teacher's own schedule, seed and settings, and only half of each batch was "
                          "pseudo-labeled instead of labeled, so the teacher is its control and the difference is "
                          "what the pseudo-labels gave.")
    if gain > 0 and extra_iterations:
        how = ("was fine-tuned from the teacher for" if fine_tuned
               else "trained from scratch on a longer schedule:")
        verdict += (f" This is not a compute-matched comparison: the student {how} "
                    f"{extra_iterations} more iterations, so the figure includes that extra training and does not "
                    "show on its own that the pseudo-labels helped; `--distill-control` also trains the control "
                    "(the same iterations on the labeled images alone) and compares with it.")
    return verdict


def _ap_row(name: str, metrics: dict) -> str:
    def cell(kind: str, key: str) -> str:
        value = (metrics.get(kind) or {}).get(key)
        return "—" if value is None else f"{value:.3f}"

    return (f"| {name} | {cell('bbox', 'AP')} | {cell('bbox', 'AP50')} | {cell('segm', 'AP')} "
            f"| {cell('segm', 'AP50')} | {cell('segm', 'AP75')} | {cell('keypoints', 'AP')} "
            f"| {cell('keypoints', 'AP50')} |")


def _report(paths: dict, final: dict, metrics: dict, rounds: list | None, timings: Timings,
            total_s: float, out: Path, overlays: Path, *, keypoints: dict | None = None,
            extra_iterations: int = 0, matched: bool = False, fine_tuned: bool = False,
            keypoint_init: str = "") -> str:
    lines = [
        "# maskray demo report",
        "",
        f"Finished {time.strftime('%Y-%m-%d %H:%M:%S')}; total wall time {total_s:.0f} s "
        f"on {os.cpu_count()} CPU cores.",
        "",
        "## Accuracy on the held-out split",
        "",
        "| model | bbox AP | bbox AP50 | mask AP | mask AP50 | mask AP75 | kp AP | kp AP50 |",
        "|---|---|---|---|---|---|---|---|",
        _ap_row("trained (round-0 teacher)", metrics),
    ]
    if keypoints:
        lines += [_ap_row("keypoint & mask model (stick figures)", keypoints["metrics"]), "",
                  "The keypoint & mask model (Mask R-CNN's keypoint branch, the paper's §5), fine-tuned from "
                  + ("the distillation round's student" if keypoint_init and keypoint_init != final.get("model")
                     else "the model above") + f" (`{keypoint_init or final.get('model')}`), is scored on its own "
                  "held-out split of stick figures with 7 keypoints beside shapes (`maskray synth --keypoints`); "
                  f"kp AP is COCOeval's OKS AP with the figures' sigmas ({keypoints['sigmas'] or 'COCO'}). "
                  f"Checkpoint `{keypoints['model']}`, overlays `{keypoints['overlays']}`."]
    if rounds:
        from pipeline.distill.rounds import format_summary

        lines += ["", "## Distillation round", "", _distill_verdict(rounds[-1], extra_iterations, matched, fine_tuned), "",
                  "The semi-supervised regime: the teacher (the model above) was trained on the few labeled "
                  "images alone; it pseudo-labels the unlabeled pool, several times larger, with test-time "
                  "augmentation and per-class thresholds; the student trains on batches of half labeled, "
                  "half pseudo-labeled images (the data-distillation recipe, arXiv 1712.04440"
                  + ("; the student fine-tunes the teacher, `student.init: teacher`, a variant of the recipe, "
                     "whose student starts from scratch" if fine_tuned else "")
                  + "). Teacher and student are scored on the same val images, AP in points:",
                  "", "```", format_summary(rounds), "```"]
    lines += ["", "## Step timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds} |" for name, seconds in timings.steps.items()]
    lines += ["", "## Where everything is", "",
              f"- training data: `{paths['train']}`, val: `{paths['val']}`, unlabeled pool: `{paths['pool']}`",
              f"- training run (checkpoints, TensorBoard events): `{final.get('run')}`",
              f"- model checkpoint: `{final.get('model')}`",
              f"- batch-segmentation results (one Parquet file per unit of images, `provenance.json` says what made them): `{paths['predictions']}`",
              f"- COCO results JSON of the pool: `{out / 'pool-results.json'}`",
              f"- distillation rounds (state.json per round): `{paths['distill']}`",
              f"- overlays: `{overlays}`",
              f"- metrics: `{out / 'metrics.json'}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli.module_main("demo"))
