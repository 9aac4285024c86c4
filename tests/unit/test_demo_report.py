"""The demo's report.md (jobs.demo._report) from a finished run's artifacts, and its steps' refusals;
no Ray started, no training."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from jobs import demo
from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from pipeline.data import format as fmt
from pipeline.distill.rounds import RoundState
from pipeline.runrecord import RunChangedError


def _metrics(box: float, mask: float) -> dict:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {"bbox": {k: box for k in keys}, "segm": {k: mask for k in keys} | {"APl": None}}


def test_report_has_the_accuracy_table_the_round_and_the_paths(tmp_path):
    r0 = RoundState.new(0)
    r0.metrics = {"teacher": _metrics(0.5, 0.45)}
    r1 = RoundState.new(1)
    r1.metrics = {"teacher": _metrics(0.5, 0.45), "student": _metrics(0.52, 0.48)}
    r1.pseudo_instances, r1.pseudo_images, r1.thresholds = 1016, 397, {"1": 0.59, "2": 0.53}
    timings = demo.Timings()
    timings.record("train", 561.04)
    paths = {k: f"/s/{k}" for k in ("train", "val", "pool", "predictions", "distill")}
    text = demo._report(paths, {"run": "/s/runs/shapes-cpu", "model": "/s/runs/m.pt"}, _metrics(0.511, 0.697),
                        [r0, r1], timings, 840.0, Path(tmp_path), Path(tmp_path) / "overlays")
    assert "| trained (round-0 teacher) | 0.511 | 0.511 | 0.697 | 0.697 | 0.697 |" in text
    assert "## Distillation round" in text and "+3.0" in text  # 48 - 45 mask AP points
    assert "**The student scored +3.0 mask AP over its teacher** (45.0 -> 48.0)" in text
    assert "not a compute-matched" not in text  # a student from scratch: same footing as its teacher
    tuned = demo._report(paths, {}, _metrics(0.5, 0.5), [r0, r1], timings, 1.0, Path(tmp_path), Path(tmp_path),
                         extra_iterations=150, fine_tuned=True)
    assert "not a compute-matched comparison: the student was fine-tuned from the teacher for 150 more" in tuned
    longer = demo._report(paths, {}, _metrics(0.5, 0.5), [r0, r1], timings, 1.0, Path(tmp_path), Path(tmp_path),
                          extra_iterations=300)
    assert ("not a compute-matched comparison: the student trained from scratch on a longer schedule: 300 more "
            "iterations") in longer
    r1.metrics["control"] = _metrics(0.5, 0.5)  # the same run on labeled data alone beat the student
    controlled = demo._report(paths, {}, _metrics(0.5, 0.5), [r0, r1], timings, 1.0, Path(tmp_path), Path(tmp_path),
                              extra_iterations=150)
    assert "scored 50.0: **the pseudo-labels did not help** (-2.0 mask AP against the control)" in controlled
    assert "not a compute-matched" not in controlled
    r1.metrics["control"] = _metrics(0.5, 0.46)
    assert "**the pseudo-labels gave +2.0 mask AP**" in demo._report(paths, {}, _metrics(0.5, 0.5), [r0, r1], timings,
                                                                       1.0, Path(tmp_path), Path(tmp_path))
    del r1.metrics["control"]
    r1.metrics["student"] = _metrics(0.52, 0.43)  # a round that loses says so, never as a gain
    lost = demo._report(paths, {}, _metrics(0.5, 0.5), [r0, r1], timings, 1.0, Path(tmp_path), Path(tmp_path))
    assert "**Round 1 did not gain**: the student's mask AP is 43.0 against the teacher's 45.0 (-2.0)" in lost
    assert "over its teacher**" not in lost  # never worded as a gain
    r1.metrics.pop("student")
    unfinished = demo._report(paths, {}, _metrics(0.5, 0.5), [r0, r1], timings, 1.0, Path(tmp_path), Path(tmp_path))
    assert "**Round 1 did not finish**" in unfinished
    assert "1:0.59" in text and "| train | 561.0 |" in text and "`/s/runs/m.pt`" in text
    assert "total wall time 840 s" in text
    without = demo._report(paths, {}, _metrics(0.5, 0.5), None, timings, 1.0, Path(tmp_path), Path(tmp_path))
    assert "Distillation round" not in without


def test_report_shows_keypoint_ap_beside_mask_ap(tmp_path):
    timings = demo.Timings()
    timings.record("train keypoints", 150.0)
    paths = {k: f"/s/{k}" for k in ("train", "val", "pool", "predictions", "distill")}
    kp_metrics = _metrics(0.6, 0.5) | {"keypoints": {"AP": 0.412, "AP50": 0.734, "AP75": 0.4, "APm": None, "APl": 0.4}}
    keypoints = {"metrics": kp_metrics, "model": "/s/runs/keypoints-cpu/m.pt", "run": "/s/runs/keypoints-cpu",
                 "overlays": "/o/overlays-keypoints", "sigmas": "0.05,0.06"}
    text = demo._report(paths, {}, _metrics(0.511, 0.697), None, timings, 700.0, Path(tmp_path),
                        Path(tmp_path) / "overlays", keypoints=keypoints)
    assert "| model | bbox AP | bbox AP50 | mask AP | mask AP50 | mask AP75 | kp AP | kp AP50 |" in text
    assert "| trained (round-0 teacher) | 0.511 | 0.511 | 0.697 | 0.697 | 0.697 | — | — |" in text
    assert "| keypoint & mask model (stick figures) | 0.600 | 0.600 | 0.500 | 0.500 | 0.500 | 0.412 | 0.734 |" in text
    assert "0.05,0.06" in text and "`/s/runs/keypoints-cpu/m.pt`" in text and "| train keypoints | 150.0 |" in text
    without = demo._report(paths, {}, _metrics(0.5, 0.5), None, timings, 1.0, Path(tmp_path), Path(tmp_path))
    assert "stick figures" not in without


def test_a_student_trained_like_its_teacher_is_reported_compute_matched(tmp_path):
    """configs/distill-demo.yaml (the demo's round): the student from scratch with the teacher's own
    training config (the demo passes its overrides to the round's train section), so the teacher is
    its control; any result-changing difference (a schedule override) makes it not matched."""
    from pipeline.distill.config import load_distill_config
    from pipeline.train import load_config

    overrides = ["schedule.max_iters=240", "schedule.steps=[192]", "optim.base_lr=0.01"]
    teacher = load_config("configs/shapes-64-cpu.yaml", ["data.train=/l", "data.val=/v", "storage_path=/r",
                                                         "name=shapes", "eval.at_end=false", "seed=3", *overrides])
    round_config = load_distill_config("configs/distill-demo.yaml", [
        "work_dir=/w", "data.labeled=/l", "data.unlabeled=/u", "data.val=/v", "teacher=/t.pt", "train.seed=3",
        *(f"train.{o}" for o in overrides)])
    assert round_config.student.init == "scratch"
    student = round_config.train_config("/mixed", "student", "/w", round_config.student.overrides)
    assert demo._same_training(teacher, student)
    assert demo._extra_training(teacher, student, fine_tuned=False) == (0, True)
    assert not demo._same_training(teacher, round_config.train_config("/mixed", "student", "/w",
                                                                      {"schedule.max_iters": 400}))
    assert not demo._same_training(teacher, round_config.train_config("/mixed", "student", "/w",
                                                                      {"seed": 4}))
    r1 = RoundState.new(1)
    r1.metrics = {"teacher": _metrics(0.5, 0.45), "student": _metrics(0.52, 0.48)}
    paths = {k: f"/s/{k}" for k in ("train", "val", "pool", "predictions", "distill")}
    text = demo._report(paths, {}, _metrics(0.5, 0.5), [r1], demo.Timings(), 1.0, Path(tmp_path), Path(tmp_path),
                        matched=True)
    assert "**The student scored +3.0 mask AP over its teacher**" in text
    assert "The comparison is compute-matched" in text and "not a compute-matched" not in text
    r1.metrics["student"] = _metrics(0.5, 0.44)
    lost = demo._report(paths, {}, _metrics(0.5, 0.5), [r1], demo.Timings(), 1.0, Path(tmp_path), Path(tmp_path),
                        matched=True)
    assert "**Round 1 did not gain**" in lost and "over its teacher**" not in lost


def test_a_longer_student_is_reported_with_its_extra_training(tmp_path):
    """A student from scratch on twice the teacher's schedule is not compute-matched (its 300 extra
    iterations are named); one fine-tuned from the teacher trained all its iterations more. The
    keypoint stage names the model it started from."""
    from pipeline.distill.config import load_distill_config
    from pipeline.train import load_config

    teacher = load_config("configs/shapes-64-cpu.yaml", ["data.train=/l", "data.val=/v", "storage_path=/r",
                                                         "name=shapes", "eval.at_end=false", "seed=0"])
    round_config = load_distill_config("configs/distill-demo.yaml", [
        "work_dir=/w", "data.labeled=/l", "data.unlabeled=/u", "data.val=/v", "teacher=/t.pt", "train.seed=0",
        "student.overrides.schedule.max_iters=600", "student.overrides.schedule.steps=[480]"])
    assert round_config.student.init == "scratch"
    student = round_config.train_config("/mixed", "student", "/w", round_config.student.overrides)
    assert demo._extra_training(teacher, student, fine_tuned=False) == (300, False)
    assert demo._extra_training(teacher, student, fine_tuned=True) == (600, False)
    kp = {"metrics": _metrics(0.6, 0.5), "model": "/k.pt", "run": "/r", "overlays": "/o", "sigmas": ""}
    paths = {k: f"/s/{k}" for k in ("train", "val", "pool", "predictions", "distill")}
    from_student = demo._report(paths, {"model": "/t.pt"}, _metrics(0.5, 0.5), None, demo.Timings(), 1.0,
                                Path(tmp_path), Path(tmp_path), keypoints=kp, keypoint_init="/student.pt")
    assert "fine-tuned from the distillation round's student (`/student.pt`)" in from_student
    from_teacher = demo._report(paths, {"model": "/t.pt"}, _metrics(0.5, 0.5), None, demo.Timings(), 1.0,
                                Path(tmp_path), Path(tmp_path), keypoints=kp, keypoint_init="/t.pt")
    assert "fine-tuned from the model above (`/t.pt`)" in from_teacher


def test_a_step_refused_for_an_earlier_demos_settings_says_to_start_fresh(tmp_path, monkeypatch):
    """An output folder made by an earlier demo with other infer settings: the infer step's run
    record refuses it, and the demo names its own way out (--fresh), not the step's --overwrite."""
    categories = [{"id": 1, "name": "a"}]
    torch.manual_seed(0)
    config = ModelConfig.for_categories(categories, backbone="resnet18", min_size=64, max_size=96)
    ckpt = str(tmp_path / "a.pt")
    save_checkpoint(ckpt, build_from_config(config), config)
    data = tmp_path / "pool"  # two empty shards: the step needs no Ray
    data.mkdir()
    infos = []
    for index in range(2):
        path = fmt.SHARD_PATTERN.format(index=index)
        pq.write_table(fmt.rows_to_table([]), str(data / path))
        infos.append(fmt.ShardInfo(path=path, images=0, instances=0, bytes=(data / path).stat().st_size))
    fmt.write_manifest(str(data), fmt.Manifest(categories=categories, shards=infos))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))
    out = str(tmp_path / "predictions")
    argv = ["infer", "--checkpoint", ckpt, "--input", str(data), "--output", out]
    timings = demo.Timings()
    demo._step(timings, "infer", [*argv, "--images-per-unit", "64"])  # the earlier demo's defaults
    with pytest.raises(RunChangedError) as refused:
        demo._step(timings, "infer", argv)
    message = str(refused.value)
    assert message.startswith("demo step 'infer': ") and "options.images_per_unit (64 -> 128)" in message
    assert "maskray demo --fresh" in message and "--overwrite" not in message
    assert len(message.splitlines()) == 1
