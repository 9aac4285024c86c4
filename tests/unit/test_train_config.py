"""TrainConfig: YAML loading, --set overrides, validation errors that name the key (no Ray)."""

from pathlib import Path

import pytest

from pipeline.config import apply_overrides, parse_override
from pipeline.train.config import ConfigError, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return str(path)


MINIMAL = """
name: run-1
storage_path: /tmp/runs
num_workers: 2
images_per_worker: 2
data: {train: /data/train, val: /data/val}
optim: {base_lr: 0.02, reference_batch: 16}
schedule: {max_iters: 100, warmup_iters: 10, steps: [60, 80]}
"""


def test_load_minimal_and_lr_scales_with_global_batch(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.data.train == "/data/train" and config.data.val == "/data/val"
    assert config.global_batch == 4
    assert config.lr == pytest.approx(0.02 * 4 / 16)
    assert config.schedule.steps == [60, 80]
    assert config.model.backbone == "resnet50"  # defaults fill what the file leaves out
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config


def test_overrides_parse_yaml_values(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), [
        "optim.base_lr=0.01", "schedule.steps=[50, 90]", "data.train=s3://bucket/shapes/train",
        "name=other", "model.options.anchor_sizes=[[16], [32]]", "optim.amp=true"])
    assert config.optim.base_lr == 0.01
    assert config.schedule.steps == [50, 90]
    assert config.data.train == "s3://bucket/shapes/train"
    assert config.name == "other"
    assert config.model.options == {"anchor_sizes": [[16], [32]]}
    assert config.optim.amp is True


def test_int_is_accepted_for_float_but_bool_is_not_int(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["optim.base_lr=1"])
    assert isinstance(config.optim.base_lr, float)
    with pytest.raises(ConfigError, match=r"num_workers: expected int, got bool"):
        load_config(write(tmp_path, MINIMAL), ["num_workers=true"])


@pytest.mark.parametrize("override, pattern", [
    ("optim.lrr=0.1", r"unknown key optim\.lrr \(known keys in optim: base_lr"),
    ("bogus=1", r"unknown key bogus"),
    ("optim.base_lr=fast", r"optim\.base_lr: expected float, got str 'fast'"),
    ("schedule.steps=[10, x]", r"schedule\.steps\[1\]: expected int, got str"),
    ("optim=3", r"optim: expected a mapping, got int"),
    ("data.train=", r"data\.train: a train dataset URI is required"),
    ("num_workers=0", r"num_workers: must be >= 1"),
    ("schedule.steps=[200]", r"schedule\.steps: every step must be < max_iters=100"),
    ("schedule.epochs=2", r"set exactly one of schedule\.max_iters / schedule\.epochs"),
    ("model.backbone=vgg", r"model\.backbone: 'vgg' is not one of"),
    ("augment.scale_jitter=[1.2, 0.8]", r"augment\.scale_jitter: must be \[min, max\]"),
    ("name=a/b", r"name: 'a/b' must be non-empty"),
])
def test_bad_values_name_the_file_and_key(tmp_path, override, pattern):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path, [override])
    message = str(info.value)
    assert message.startswith(path) and "\n" not in message


def test_missing_data_section_names_data_train(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train: a train dataset URI is required"):
        load_config(write(tmp_path, "name: x\n"))


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_override_syntax():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=") == (["a"], "")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="a is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_epochs_convert_to_iterations(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["schedule.max_iters=0", "schedule.epochs=2.5",
                                                    "schedule.steps=[]"])
    assert config.total_iters(train_images=400) == 250  # 2.5 epochs * 400 images / global batch 4
    assert load_config(write(tmp_path, MINIMAL)).total_iters(train_images=400) == 100


@pytest.mark.parametrize("name", ["shapes-cpu.yaml", "shapes-64-cpu.yaml", "coco-r50-fpn-1x.yaml"])
def test_shipped_configs_load(name):
    config = load_config(str(REPO / "configs" / name))
    assert config.data.train and config.data.val


def test_coco_1x_is_the_standard_schedule():
    config = load_config(str(REPO / "configs" / "coco-r50-fpn-1x.yaml"))
    assert config.global_batch == 16 and config.lr == pytest.approx(0.02)
    # torchvision references/detection maskrcnn_resnet50_fpn: 26 epochs, lr steps after 16 and 22,
    # warm-up 1000 iterations from lr/1000, ImageNet backbone with frozen BN, 3 trainable stages
    per_epoch = -(-117266 // 16)
    assert config.schedule.max_iters == 26 * per_epoch
    assert config.schedule.steps == [16 * per_epoch, 22 * per_epoch]
    assert config.schedule.warmup_iters == 1000 and config.schedule.warmup_factor == pytest.approx(0.001)
    assert config.optim.momentum == 0.9 and config.optim.weight_decay == pytest.approx(1e-4)
    assert config.model.min_size == 800 and config.model.max_size == 1333 and config.model.backbone == "resnet50"
    assert config.model.norm == "frozen_bn" and config.model.trainable_layers == 3
    assert config.model.backbone_weights.endswith("resnet50-0676ba61.pth")
    assert config.augment.hflip_prob == 0.5 and config.augment.scale_jitter == [1.0, 1.0]


def test_job_arguments_and_config_errors_before_ray(tmp_path):
    import argparse

    from jobs import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--config", "c.yaml", "--set", "a.b=1", "--set", "name=x"])
    assert args.config == "c.yaml" and args.overrides == ["a.b=1", "name=x"]
    args.verbose = False
    args.config = write(tmp_path, MINIMAL)
    args.overrides = ["optim.momentum=2"]
    with pytest.raises(ConfigError, match=r"optim\.momentum: 2\.0 is outside \[0, 1\)"):
        train.run(args)  # fails while loading the config: Ray is never imported for this


def test_the_model_section_is_the_models_own_config():
    from model.checkpoint import ModelConfig

    config = TrainConfig.from_dict({"data": {"train": "/d"}, "model": {
        "backbone": "resnet18", "min_size": 128, "max_size": 128, "options": {"fpn_channels": 64},
        "backbone_weights": "/w/resnet18.pth"}})
    assert isinstance(config.model, ModelConfig)  # one definition of the model's fields, not a mirror
    mc = config.model.model_config([{"id": 3, "name": "a"}, {"id": 5, "name": "b"}])
    assert type(mc) is ModelConfig and mc.num_classes == 3 and mc.options == {"fpn_channels": 64}
    assert ModelConfig.from_dict(mc.to_dict()) == mc  # what a checkpoint stores: no train-only keys
    assert "backbone_weights" not in mc.to_dict()
    with pytest.raises(ConfigError, match=r"model\.categories: classes come from the train manifest"):
        TrainConfig.from_dict({"data": {"train": "/d"}, "model": {"num_classes": 5}})
    with pytest.raises(ConfigError, match=r"model\.box_score_thresh: 1\.5 is outside"):
        TrainConfig.from_dict({"data": {"train": "/d"}, "model": {"box_score_thresh": 1.5}})
