"""The one config loader (pipeline.config) and the one run record (pipeline.runrecord), no Ray."""

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from pipeline import runrecord
from pipeline.config import RUN_ONLY, ConfigError, build, load, require, run_only_keys
from pipeline.train.config import NON_RESULT_KEYS, TrainConfig


@dataclass
class Inner:
    rate: float = 0.1
    every: int = field(default=10, metadata=RUN_ONLY)

    def __post_init__(self):
        require(self.rate > 0, "inner.rate", f"must be > 0, got {self.rate}")


@dataclass
class Job:
    CONFIG_ROOT: ClassVar[bool] = True
    name: str = field(default="j", metadata=RUN_ONLY)
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=list)


@dataclass
class Outer:
    job: Job = field(default_factory=Job)
    rounds: int = field(default=1, metadata=RUN_ONLY)


def test_types_keys_and_values_are_checked_naming_the_dotted_key():
    assert build(Job, {"inner": {"rate": 2}, "sizes": [1, 2]}).inner.rate == 2.0
    with pytest.raises(ConfigError, match=r"^f\.yaml: sizes\[1\]: expected int, got str 'x'$"):
        build(Job, {"sizes": [1, "x"]}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"unknown key inner\.rat \(known keys in inner: rate, every\)"):
        build(Job, {"inner": {"rat": 1}})
    with pytest.raises(ConfigError, match=r"inner\.rate: must be > 0, got -1"):
        build(Job, {"inner": {"rate": -1}})


def test_a_job_config_inside_another_gets_its_keys_prefixed():
    with pytest.raises(ConfigError, match=r"^config: job\.inner\.rate: must be > 0"):
        build(Outer, {"job": {"inner": {"rate": -1}}})
    with pytest.raises(ConfigError, match=r"unknown key job\.inner\.x "):
        build(Outer, {"job": {"inner": {"x": 1}}})
    with pytest.raises(ConfigError, match=r"^config: train\.optim\.base_lr: must be > 0"):
        @dataclass
        class Distillish:
            train: TrainConfig
        build(Distillish, {"train": {"data": {"train": "d"}, "optim": {"base_lr": -1}}})


def test_load_merges_flags_file_and_overrides_in_that_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {rate: 0.5}\nsizes: [1]\n")
    cfg = load(Job, str(path), ["sizes=[3, 4]"], base={"name": "from-flag", "inner": {"rate": 9.0}})
    assert (cfg.name, cfg.inner.rate, cfg.sizes) == ("from-flag", 0.5, [3, 4])
    assert load(Job, None, ["inner.every=3"]).inner.every == 3


def test_run_only_keys_come_from_the_field_declarations():
    assert run_only_keys(Outer) == ("job.name", "job.inner.every", "rounds")
    for key in ("name", "log_every", "eval", "checkpoint", "data.val", "data.decode_cpus"):
        assert key in NON_RESULT_KEYS
    for key in ("data.train", "optim", "model", "schedule", "seed"):
        assert not any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def test_the_run_record_refuses_a_changed_setting_and_the_flag_overrides(tmp_path):
    uri = str(tmp_path / "record.json")
    old = {"a": {"b": 1, "c": 2}, "log": 5}
    assert runrecord.check(uri, old, ignore=("log",), what="x", flag="--overwrite", alternative="y",
                           override=False) == []  # nothing recorded yet
    runrecord.write(uri, old)
    assert json.loads(open(uri).read()) == old
    same_but_log = {"a": {"b": 1, "c": 2}, "log": 9}
    assert runrecord.check(uri, same_but_log, ignore=("log",), what="x", flag="--overwrite", alternative="y",
                           override=False) == []
    changed = {"a": {"b": 7, "c": 2}, "log": 5}
    with pytest.raises(runrecord.RunChangedError,
                       match=r"^out/ was made with other settings: a\.b \(1 -> 7\); pass --overwrite to "
                             r"recompute them, or choose another --output$"):
        runrecord.check(uri, changed, ignore=("log",), what="out/", flag="--overwrite",
                        alternative="choose another --output", override=False)
    assert runrecord.check(uri, changed, ignore=(), what="out/", flag="--overwrite", alternative="z",
                           override=True) == ["a.b"]


def test_an_unreadable_record_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(runrecord.RunChangedError, match=r"r\.json: not readable JSON"):
        runrecord.check(str(bad), {}, ignore=(), what="x", flag="--resume-anyway", alternative="y", override=False)


def test_job_flags_and_set_map_onto_the_config_fields():
    from jobs import cli
    from pipeline.data.ingest import IngestConfig

    args = cli.build_parser().parse_args(["pack", "--images", "i", "--out", "o", "--images-per-shard", "50",
                                          "--set", "row_group_size=16", "--set", "runner=local"])
    cfg = cli.config_from_args(IngestConfig, args)
    assert (cfg.images_per_shard, cfg.row_group_size, cfg.runner, cfg.workers) == (50, 16, "local", 8)
    assert "images_per_shard" in cfg.planning() and "workers" not in cfg.planning()  # run-only
    bad = cli.build_parser().parse_args(["convert", "--coco", "c", "--images", "i", "--out", "o",
                                         "--set", "workers=0"])
    with pytest.raises(ConfigError, match=r"^the command line: workers: must be >= 1, got 0$"):
        cli.config_from_args(IngestConfig, bad)
