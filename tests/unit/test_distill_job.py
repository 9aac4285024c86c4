"""jobs.distill's training steps with `maskray train` replaced by a recorder (no Ray)."""

import json
import os

import pytest
import yaml

from jobs import distill as job
from model.errors import MaskrayError
from pipeline import rounds
from pipeline.distill import distill_config_from_dict
from pipeline.format import Manifest, ShardWriter, read_manifest, write_manifest


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

    def fake_train(args):
        cfg = yaml.safe_load(open(args.config))
        runs.append(cfg)
        run_dir = os.path.join(cfg["storage_path"], cfg["name"])
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "final_metrics.json"), "w") as f:
            json.dump({"model": os.path.join(run_dir, "ckpt/model.pt")}, f)
        print("final iteration: done")
        return 0

    monkeypatch.setattr("jobs.train.run", fake_train)
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
