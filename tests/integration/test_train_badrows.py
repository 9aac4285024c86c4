"""fit() as a library call on a train shard with corrupt images: trains to the end, counts and names the skipped rows,
and hands back a checkpoint that loads."""

import logging

import pytest

from pipeline.evaluate import load_checkpoint_uri
from pipeline.train import fit
from pipeline.train.config import TrainConfig
from train_support import make_shapes_dataset, tiny_config

CORRUPT = frozenset({3, 17})  # indices in the train set; image ids 4 and 18


@pytest.mark.slow
def test_corrupt_images_are_skipped_counted_and_training_finishes(ray_local, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.train.engine")
    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    make_shapes_dataset(train, images=24, seed=0, corrupt=CORRUPT)
    make_shapes_dataset(val, images=4, seed=1, first_id=1000)
    config = TrainConfig.from_dict(tiny_config(train, val, str(tmp_path / "runs"), "bad-rows", **{
        "schedule.max_iters": 6, "log_every": 3, "checkpoint.every": 0, "eval.at_end": True,
        "data.max_bad_fraction": 0.1, "max_failures": 1}))

    result = fit(config)

    assert result.metrics["iteration"] == 6 and result.metrics["bad_rows"] == len(CORRUPT)
    assert "stopped" not in result.metrics
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.engine"]
    skipped = sorted(line for line in lines if line.startswith("skipped train image"))
    assert len(skipped) == 2, lines  # each bad row named once, although the second epoch met them again
    assert skipped[0].startswith("skipped train image 18 in part-00001") and "corrupt or truncated" in skipped[0]
    assert skipped[1].startswith("skipped train image 4 in part-00000")
    assert not any(line.startswith("resumed from") for line in lines)  # no restart
    assert any(line.startswith("start-up, seconds after fit() began:") and "first batch +" in line for line in lines)
    # the checkpoint fit() hands back loads, with the run's classes
    assert result.checkpoint_uri == f"{result.run_dir}/checkpoint_0000006/model.pt"
    model, model_config, extra = load_checkpoint_uri(result.checkpoint_uri)
    assert extra["iteration"] == 6 and model_config.num_classes == 5
    assert set(result.eval_metrics()) == {"bbox", "segm"}
