"""Pieces of the training engine that need no Ray: schedule, resources check, collate, console lines."""

import numpy as np
import pytest
import torch

from pipeline.train.config import ConfigError, ScheduleConfig, TrainConfig
from pipeline.train.engine import check_model_options, check_resources
from pipeline.train.data import collate
from pipeline.train.hooks import format_eval_line, format_line
from pipeline.train.loop import lr_at


def config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"data": {"train": "/d/train"}, **kw})


def test_step_schedule_with_warmup():
    s = ScheduleConfig(max_iters=100, warmup_iters=10, warmup_factor=0.1, steps=[50, 80], gamma=0.1)
    assert lr_at(0, 1.0, 100, s) == pytest.approx(0.1)
    assert lr_at(5, 1.0, 100, s) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_at(10, 1.0, 100, s) == pytest.approx(1.0)
    assert lr_at(49, 1.0, 100, s) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100, s) == pytest.approx(0.1)
    assert lr_at(99, 1.0, 100, s) == pytest.approx(0.01)


def test_cosine_schedule_reaches_the_floor():
    s = ScheduleConfig(max_iters=110, warmup_iters=10, policy="cosine", min_lr_factor=0.05)
    assert lr_at(10, 2.0, 110, s) == pytest.approx(2.0)
    assert lr_at(60, 2.0, 110, s) == pytest.approx(2.0 * (0.05 + 0.95 * 0.5))
    assert lr_at(110, 2.0, 110, s) == pytest.approx(0.1)
    values = [lr_at(i, 1.0, 110, s) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_resources_check_refuses_an_oversized_group():
    check_resources(config(num_workers=2), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"num_workers=3 x cpus_per_worker=1 needs 3 CPUs but the Ray cluster has 2"):
        check_resources(config(num_workers=3), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="needs 3 CPUs"):
        check_resources(config(num_workers=2, cpus_per_worker=1.5), {"CPU": 2.0})
    check_resources(config(num_workers=3), {"CPU": 2.0}, autoscaling=True)
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(config(num_workers=2, use_gpu=True), {"CPU": 16.0, "GPU": 1.0})


def test_model_options_must_be_builder_keywords():
    check_model_options({"anchor_sizes": [[16], [32]], "rpn_batch_size_per_image": 64, "head_norm": None})
    with pytest.raises(ConfigError, match=r"model\.options\.anchor_size: not a keyword of build_maskrcnn"):
        check_model_options({"anchor_size": [[16]]})
    with pytest.raises(ConfigError, match=r"model\.options\.backbone_module"):
        check_model_options({"backbone_module": None})
    with pytest.raises(ConfigError, match=r"model\.options\.min_size"):
        check_model_options({"min_size": 100})  # a top-level model key, not an option


def objects(*arrays):
    """A 1-D object array of ndarrays (what Ray Data gives for a ragged tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def test_collate_ragged_and_stacked_batches():
    mask = np.zeros((1, 4, 13), np.uint8)
    mask[0, 1, [0, 7, 8, 12]] = 1  # bits on both sides of a byte boundary and in the padded last byte
    ragged = {
        "image": objects(np.full((3, 4, 13), 255, np.uint8), np.zeros((3, 6, 2), np.uint8)),
        "boxes": objects(np.array([[0, 0, 2, 2]], np.float32), np.zeros((0, 4), np.float32)),
        "labels": objects(np.array([3]), np.zeros((0,), np.int64)),
        "masks": objects(np.packbits(mask, axis=-1), np.packbits(np.zeros((0, 6, 2), np.uint8), axis=-1)),
        "mask_width": np.array([13, 2]),
    }
    images, targets = collate(ragged)
    assert [im.shape for im in images] == [(3, 4, 13), (3, 6, 2)]
    assert images[0].dtype == torch.float32 and images[0].max() == 1.0
    assert targets[0]["labels"].tolist() == [3] and targets[0]["labels"].dtype == torch.int64
    assert torch.equal(targets[0]["masks"], torch.from_numpy(mask)) and targets[0]["masks"].dtype == torch.uint8
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["masks"].shape == (0, 6, 2)
    stacked = {"image": np.zeros((2, 3, 4, 4), np.uint8), "boxes": np.zeros((2, 1, 4), np.float32),
               "labels": np.ones((2, 1), np.int64), "masks": np.packbits(np.ones((2, 1, 4, 4), np.uint8), axis=-1),
               "mask_width": np.array([4, 4])}
    images, targets = collate(stacked)
    assert len(images) == 2 and targets[1]["boxes"].shape == (1, 4) and targets[1]["masks"].sum() == 16


def test_console_lines_are_one_readable_line():
    line = format_line(120, 600, {"loss": 0.91, "loss_classifier": 0.21, "loss_box_reg": 0.3, "loss_mask": 0.33,
                                   "loss_objectness": 0.07}, 0.02, 12.34, 0.8, 0.031)
    assert line == ("iter 120/600  epoch 0.80  loss 0.910 (cls 0.21 box 0.30 mask 0.33 rpn 0.07)  lr 0.0200  "
                    "12.3 img/s  data 3%")
    ev = format_eval_line(600, {"bbox": {"AP": 0.5, "AP50": 0.8}, "segm": {"AP": None, "AP50": 0.7}}, 100, 3.0)
    assert ev == "eval iter 600: bbox AP 0.500 AP50 0.800 | segm AP nan AP50 0.700  (100 images, 3.0 s)"


def write_dataset(root, categories, images):
    from pipeline.data.format import Manifest, ShardInfo, manifest_uri, write_manifest

    shards = [ShardInfo(path="part-00000.parquet", images=images, instances=images)]
    write_manifest(manifest_uri(str(root)), Manifest(categories=categories, shards=shards))
    return str(root)


CATS = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]


def test_plan_takes_classes_from_the_train_manifest(tmp_path):
    from pipeline.train.engine import plan_run

    train = write_dataset(tmp_path / "train", CATS, 40)
    val = write_dataset(tmp_path / "val", CATS, 10)
    cfg = config(num_workers=2, images_per_worker=2, storage_path=str(tmp_path / "runs"), name="r",
                 data={"train": train, "val": val}, model={"backbone": "resnet18"},
                 schedule={"epochs": 3, "max_iters": 0, "warmup_iters": 1})
    plan = plan_run(cfg)
    assert plan.categories == CATS and plan.train_images == 40 and plan.val_images == 10
    assert plan.total_iters == 30  # 3 epochs x 40 images / global batch 4
    assert plan.run_uri == str(tmp_path / "runs" / "r")
    mc = cfg.model.model_config(plan.categories)
    assert mc.num_classes == 3 and mc.category_ids() == [3, 7]  # label i = categories[i - 1]


def test_plan_errors_name_the_data_key(tmp_path):
    from pipeline.train.engine import plan_run

    train = write_dataset(tmp_path / "train", CATS, 3)
    with pytest.raises(ConfigError, match=r"data\.train=.*nowhere"):
        plan_run(config(data={"train": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match=r"3 images give each of 2 workers 1 per epoch, fewer than images_per_worker=2"):
        plan_run(config(num_workers=2, images_per_worker=2, data={"train": train}))
    other = write_dataset(tmp_path / "val", [{"id": 1, "name": "x"}], 5)
    with pytest.raises(ConfigError, match=r"data\.val=.*categories \[1\] differ"):
        plan_run(config(num_workers=1, images_per_worker=1, data={"train": train, "val": other}))
    with pytest.raises(ConfigError, match=r"model\.weights=.*gone\.pt: no such file"):
        plan_run(config(num_workers=1, images_per_worker=1, data={"train": train},
                        model={"weights": str(tmp_path / "gone.pt")}))
