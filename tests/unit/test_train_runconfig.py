"""A training run remembers its config: a rerun under the same name that differs in results is refused (no Ray)."""

import pytest

from pipeline.runrecord import differences as config_diff
from pipeline.train.config import ConfigError, TrainConfig
from pipeline.train.engine import RUN_CONFIG_FILE, check_run_config, remember_run_config


def config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"name": "r", "data": {"train": "/d/train"}, **kw})


def test_a_changed_config_is_refused_naming_the_keys_and_the_override_continues(tmp_path):
    run = str(tmp_path / "runs" / "r")
    first = config(optim={"base_lr": 0.02}, schedule={"max_iters": 100, "warmup_iters": 10})
    assert check_run_config(first, run) == []  # a new run: nothing to compare with
    remember_run_config(first, run)
    assert (tmp_path / "runs" / "r" / RUN_CONFIG_FILE).is_file()

    changed = config(optim={"base_lr": 0.01}, schedule={"max_iters": 200, "warmup_iters": 10})
    with pytest.raises(ConfigError, match=r"run r in .* was made with other settings: optim\.base_lr "
                                          r"\(0\.02 -> 0\.01\), schedule\.max_iters \(100 -> 200\); "
                                          r"pass --resume-anyway .* or pick a new name"):
        check_run_config(changed, run)
    assert check_run_config(changed, run, resume_anyway=True) == ["optim.base_lr", "schedule.max_iters"]
    remember_run_config(changed, run)
    assert check_run_config(changed, run) == []  # the changed config is now the run's


def test_keys_that_do_not_change_results_may_differ(tmp_path):
    run = str(tmp_path / "r")
    remember_run_config(config(), run)
    relaxed = config(log_every=5, eval={"every": 50}, checkpoint={"every": 10, "keep": 5}, max_failures=3,
                     data={"train": "/d/train", "val": "/d/val", "val_max_images": 8, "decode_cpus": 0.5})
    assert check_run_config(relaxed, run) == []
    with pytest.raises(ConfigError, match=r"data\.train"):
        check_run_config(config(data={"train": "/d/other"}), run)
    with pytest.raises(ConfigError, match=r"model\.backbone_weights"):
        check_run_config(config(model={"backbone_weights": "/w/resnet50.pth"}), run)


def test_config_diff_flattens_sections():
    a = {"optim": {"base_lr": 1, "momentum": 0.9}, "model": {"options": {"x": [1, 2]}}, "log_every": 1}
    b = {"optim": {"base_lr": 1, "momentum": 0.8}, "model": {"options": {"x": [1, 3]}}, "log_every": 2}
    assert config_diff(a, b) == ["log_every", "model.options.x", "optim.momentum"]
    assert config_diff(a, b, ("log_every", "model")) == ["optim.momentum"]


def test_a_record_from_before_a_setting_existed_means_its_default(tmp_path):
    """A run recorded before a key was added (e.g. augment.crop) resumes when the key keeps its
    default, and is refused when it does not."""
    import json

    run = tmp_path / "r"
    remember_run_config(config(), str(run))
    record = json.loads((run / RUN_CONFIG_FILE).read_text())
    del record["augment"]["crop"], record["augment"]["crop_min_visible"]  # as an older version wrote it
    (run / RUN_CONFIG_FILE).write_text(json.dumps(record))
    assert check_run_config(config(), str(run)) == []
    with pytest.raises(ConfigError, match=r"augment\.crop \('<unset>' -> 512\)"):
        check_run_config(config(augment={"crop": 512}), str(run))
