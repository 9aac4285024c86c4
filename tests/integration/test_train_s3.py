"""maskray train on local Ray with 2 workers, data and checkpoints on S3 (SeaweedFS); resume by name."""

import argparse
import io
import json
import logging

import pytest
import torch

from pipeline import storage
from pipeline.train.config import ConfigError
from train_support import make_shapes_dataset, run_uri, tiny_config, write_config


@pytest.fixture(scope="module")
def s3_data(s3):
    base = f"s3://{s3.bucket}/train-tests"
    make_shapes_dataset(f"{base}/train", images=16, seed=0)
    make_shapes_dataset(f"{base}/val", images=4, seed=1, first_id=1000)
    return base


def run_train(path: str, *overrides: str, resume_anyway: bool = False) -> int:
    from jobs import train

    return train.run(argparse.Namespace(config=path, overrides=list(overrides), verbose=False,
                                        resume_anyway=resume_anyway))


@pytest.mark.slow
def test_two_workers_checkpoint_to_s3_and_resume_by_name(ray_local, s3_data, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="pipeline.train.engine")
    config = tiny_config(f"{s3_data}/train", f"{s3_data}/val", f"{s3_data}/runs", "resume",
                         **{"schedule.max_iters": 4, "eval.at_end": True})
    path = write_config(tmp_path / "train.yaml", config)
    run = run_uri(config)

    assert run_train(path) == 0
    out = capsys.readouterr().out
    assert f"last checkpoint: {run}/checkpoint_0000004" in out
    assert "segm" in out  # the AP table
    final = json.loads(storage.read_bytes(f"{run}/final_metrics.json"))
    assert final["iteration"] == 4 and final["checkpoint"] == f"{run}/checkpoint_0000004"
    assert set(final["segm"]) >= {"AP", "AP50"} and set(final["bbox"]) >= {"AP", "AP50"}
    state = torch.load(io.BytesIO(storage.read_bytes(f"{run}/checkpoint_0000004/train_state.pt")),
                       weights_only=True)
    assert state["iteration"] == 4 and state["optimizer"]["state"]
    from model.checkpoint import load_checkpoint

    model, model_config, extra = load_checkpoint(storage.read_bytes(f"{run}/checkpoint_0000004/model.pt"))
    assert extra["iteration"] == 4
    assert [c["name"] for c in model_config.categories] == ["circle", "square", "triangle", "star"]
    assert model_config.num_classes == 5 and model_config.backbone == "resnet18"
    assert storage.list_files(f"{run}/tensorboard"), "TensorBoard events mirrored to the run folder"
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.engine"]
    assert any(line.startswith("iter 2/4 ") for line in lines)
    assert any(line.startswith("eval iter 4: bbox AP") for line in lines)

    # same name, longer schedule: refused (the run remembers its config) unless asked; then it
    # resumes at the saved iteration 4, never re-runs 1..4
    with pytest.raises(ConfigError, match=r"was made with other settings: schedule\.max_iters \(4 -> 6\).*--resume-anyway"):
        run_train(path, "schedule.max_iters=6")
    caplog.clear()
    assert run_train(path, "schedule.max_iters=6", resume_anyway=True) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.engine"]
    assert any("at iteration 4" in line and line.startswith("resumed from") for line in lines), lines
    assert not any(line.startswith(("iter 2/6 ", "iter 4/6 ")) for line in lines), lines
    assert any(line.startswith("iter 6/6 ") for line in lines), lines
    final = json.loads(storage.read_bytes(f"{run}/final_metrics.json"))
    assert final["iteration"] == 6 and final["checkpoint"] == f"{run}/checkpoint_0000006"
    # checkpoint.keep = 2: the oldest were deleted from the bucket
    kept = sorted({u.split("/")[-2] for u in storage.list_files(run, suffixes=["model.pt"])})
    assert kept == ["checkpoint_0000004", "checkpoint_0000006"]


def test_bad_configs_fail_before_any_worker(ray_local, s3_data, tmp_path):
    config = tiny_config(f"{s3_data}/train", f"{s3_data}/val", f"{s3_data}/runs", "bad")
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(ConfigError, match=r"num_workers=3 x cpus_per_worker=1 needs 3 CPUs but the Ray cluster has 2"):
        run_train(path, "num_workers=3", "cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"data\.train=s3://.*/nowhere"):
        run_train(path, f"data.train={s3_data}/nowhere")
    with pytest.raises(ConfigError, match=r"unknown key optim\.lr "):
        run_train(path, "optim.lr=0.1")
    with pytest.raises(ConfigError, match=r"model\.options\.anchors: not a keyword of build_maskrcnn"):
        run_train(path, "model.options.anchors=[[8]]")
    assert not storage.exists(f"{run_uri(config)}/final_metrics.json")
