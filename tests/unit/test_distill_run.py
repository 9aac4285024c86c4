"""pipeline.distill.run's training steps with pipeline.train.fit replaced by a recorder (no Ray)."""

import os

import pytest

from pipeline.distill import run as job
from pipeline.train.engine import TrainResult
from model.errors import MaskrayError
from pipeline.distill import rounds
from pipeline.distill.config import distill_config_from_dict
from pipeline.data.format import Manifest, ShardWriter, read_manifest, write_manifest


def _dataset(uri, n, first_id, extra=None):
    with ShardWriter(uri) as w:
        for i in range(n):
            w.add({"image_id": first_id + i, "file_name": f"{i}.png", "width": 4, "height": 4, "image": b"x",
                   "annotations": []})
    write_manifest(uri, Manifest(categories=[{"id": 1, "name": "a"}], shards=w.close(), extra=extra or {}))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    for name in ("labeled", "unlabeled", "val"):
        _dataset(str(tmp_path / name), 3, 1)
    config = distill_config_from_dict({
        "work_dir": str(tmp_path / "work"),
        "data": {n: str(tmp_path / n) for n in ("labeled", "unlabeled", "val")},
        "train": {"images_per_worker": 2, "schedule": {"max_iters": 5, "warmup_iters": 1}},
        "student": {"mix_ratio": 0.5, "overrides": {"schedule.max_iters": 7}},
    })
    runs = []

    def fake_fit(train_config, *, resume_anyway=False, verbose=False):
        cfg = train_config.to_dict()
        runs.append(cfg)
        run_dir = os.path.join(cfg["storage_path"], cfg["name"])
        return TrainResult(checkpoint_uri=os.path.join(run_dir, "ckpt/model.pt"), run_dir=run_dir)

    monkeypatch.setattr("pipeline.train.engine.fit", fake_fit)
    return config, runs, tmp_path


def test_teacher_trains_on_the_labeled_set_only(setup):
    config, runs, tmp_path = setup
    out = str(tmp_path / "work/rounds/round-0/teacher")
    model = job.DistillSteps(config).train_teacher(out)
    assert model == f"{out}/run/ckpt/model.pt"
    [cfg] = runs
    assert cfg["data"]["train"] == f"{out}/data" and cfg["data"]["val"] == "" and cfg["schedule"]["max_iters"] == 5
    data = read_manifest(f"{out}/data")
    assert data.extra["pseudo"] is None and data.num_images == 12  # >= 5 iterations x 2 images: 4 whole passes over 3


def test_student_mixes_its_own_rounds_pseudo_labels_and_refuses_others(setup):
    config, runs, tmp_path = setup
    work = str(tmp_path / "work")
    state = rounds.RoundState.new(1)
    state.teacher = "/teacher.pt"
    rounds.save_state(work, state)
    pseudo = str(tmp_path / "pseudo")
    _dataset(pseudo, 4, 100, extra={"round": 1, "teacher": "/teacher.pt"})
    out = f"{work}/rounds/round-1/student"
    steps = job.DistillSteps(config)
    assert steps.train_student(1, pseudo, out) == f"{out}/run/ckpt/model.pt"
    assert runs[-1]["schedule"]["max_iters"] == 7 and runs[-1]["data"]["train"] == f"{out}/data"
    mixed = read_manifest(f"{out}/data")
    assert mixed.extra["round"] == 1 and mixed.extra["mix_ratio"] == 0.5 and mixed.num_images >= 14
    stale = str(tmp_path / "stale")
    _dataset(stale, 4, 100, extra={"round": 0, "teacher": "/teacher.pt"})
    with pytest.raises(MaskrayError, match="round 0"):
        steps.train_student(1, stale, out)


def test_an_unfinished_round_refuses_a_changed_config_unless_told(setup, tmp_path):
    from pipeline.distill.run import check_rounds_config
    from pipeline.runrecord import RunChangedError

    config, _, _ = setup
    assert check_rounds_config(config) == []  # first run: remembered
    rounds.save_state(config.work_dir, rounds.RoundState.new(0))  # round 0 started, not finished
    config.rounds = 3  # adding rounds and changing inference do not change a round's results
    config.inference.actors = 2
    config.train["log_every"] = 7  # nor do the train section's run-only keys (train's own list)
    assert check_rounds_config(config) == []
    config.student.mix_ratio = 0.25
    config.train["optim"] = {"base_lr": 0.5}
    with pytest.raises(RunChangedError, match=r"round 0 .*unfinished.*student\.mix_ratio.*train\.optim\.base_lr"
                                              r".*--resume-anyway"):
        check_rounds_config(config)
    assert check_rounds_config(config, resume_anyway=True) == ["student.mix_ratio", "train.optim.base_lr"]
    assert check_rounds_config(config) == []  # the new config is now the remembered one


def test_non_result_keys_come_from_the_config_classes():
    from pipeline.distill.config import non_result_keys
    from pipeline.train.config import NON_RESULT_KEYS

    keys = non_result_keys()
    assert {"rounds", "min_gain", "inference", "eval_threads", "data.val_max_images"} <= set(keys)
    assert {f"train.{k}" for k in NON_RESULT_KEYS} <= set(keys)
    assert not {"tta", "thresholds", "student", "train.optim", "train.schedule"} & set(keys)
