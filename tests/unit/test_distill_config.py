"""Distill config loading/validation (pipeline.distill.config) and the student's mixed dataset (pipeline.distill.run)."""

import re

import pytest
import yaml

from model.errors import MaskrayError
from pipeline.distill import run as distill
from pipeline.distill.config import load_distill_config
from pipeline.data.format import Manifest, ShardWriter, read_manifest, read_rows, write_manifest

TRAIN = {"model": {"backbone": "resnet18", "min_size": 64, "max_size": 64},
         "schedule": {"max_iters": 10, "warmup_iters": 1}}


def _config(tmp_path, **extra):
    data = {"work_dir": str(tmp_path / "work"), "train": TRAIN, "prepare": {"enabled": True}, **extra}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_config_loads_and_fills_the_data_uris():
    c = load_distill_config("configs/distill-shapes-cpu.yaml", ["work_dir=/tmp/x", "rounds=2"])
    assert c.rounds == 2 and c.data.labeled == "/tmp/x/data/labeled" and c.data.unlabeled == "/tmp/x/data/unlabeled"
    assert c.prepare.labeled * 9 == c.prepare.unlabeled  # 10% labeled
    teacher = c.train_config(c.data.labeled, "run", "/tmp/x/rounds/round-0/teacher")
    assert teacher.data.train == c.data.labeled and teacher.data.val == "" and teacher.name == "run"


def test_demo_config_loads_with_the_demos_overrides():
    c = load_distill_config("configs/distill-demo.yaml", ["work_dir=/tmp/d", "data.labeled=/l", "data.unlabeled=/u",
                                                          "data.val=/v", "teacher=/t.pt", "train.seed=2"])
    assert (c.data.labeled, c.data.unlabeled, c.data.val, c.teacher) == ("/l", "/u", "/v", "/t.pt")
    student = c.train_config("/mixed", "run", "/o", c.student.overrides)
    assert student.seed == 2 and student.model.min_size == 64  # the demo's training config (shapes-64-cpu.yaml)
    assert 0 < c.student.mix_ratio < 1 and c.student.init == "scratch"
    assert student.to_dict() | {"data": None} == c.train_config("/l", "run", "/o").to_dict() | {"data": None}


def test_student_overrides_and_fingerprint(tmp_path):
    c = load_distill_config(_config(tmp_path, student={"overrides": {"schedule.max_iters": 20}}))
    student = c.train_config("/d/mixed", "run", "/out", c.student.overrides)
    assert student.schedule.max_iters == 20 and c.train_config("/d", "run", "/o").schedule.max_iters == 10
    other = load_distill_config(_config(tmp_path), ["min_gain=1"])
    assert c.fingerprint() != other.fingerprint()


def test_student_override_of_one_key_keeps_the_sections_other_keys(tmp_path):
    """`--set student.overrides.optim.base_lr=X` replaces the file's dotted key `optim.base_lr`; it
    never becomes an `optim` section that resets optim's other keys (reference_batch, grad_clip)
    to their defaults. A mapping in the file's overrides names keys the same way."""
    train = {**TRAIN, "optim": {"base_lr": 0.02, "reference_batch": 4, "grad_clip": 10.0}}
    c = load_distill_config(_config(tmp_path, train=train, student={"overrides": {"optim.base_lr": 0.01}}),
                            ["student.overrides.optim.base_lr=0.03", "student.overrides.schedule.max_iters=20"])
    assert c.student.overrides == {"optim.base_lr": 0.03, "schedule.max_iters": 20}
    student = c.train_config("/d", "run", "/o", c.student.overrides)
    assert (student.optim.base_lr, student.optim.reference_batch, student.optim.grad_clip) == (0.03, 4, 10.0)
    assert student.schedule.max_iters == 20 and student.schedule.warmup_iters == 1
    nested = load_distill_config(_config(tmp_path, train=train, student={"overrides": {"optim": {"base_lr": 0.05}}}))
    assert nested.student.overrides == {"optim.base_lr": 0.05}
    assert nested.train_config("/d", "run", "/o", nested.student.overrides).optim.reference_batch == 4
    with pytest.raises(MaskrayError, match=r"student\.overrides\.optim\.base_lr: given twice"):
        load_distill_config(_config(tmp_path, train=train,
                                    student={"overrides": {"optim.base_lr": 0.01, "optim": {"base_lr": 0.05}}}))


def test_train_section_from_a_train_config_file(tmp_path):
    train_file = tmp_path / "configs" / "train.yaml"
    train_file.parent.mkdir()
    train_file.write_text(yaml.safe_dump({**TRAIN, "name": "mine", "storage_path": "runs",
                                          "data": {"train": "a", "val": "b", "shuffle_buffer": 8}}))
    path = tmp_path / "configs" / "distill.yaml"  # "train.yaml" resolves next to it, not in the CWD
    path.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "w"), "train": "train.yaml",
                                    "prepare": {"enabled": True}}))
    c = load_distill_config(str(path), ["train.schedule.max_iters=7"])
    run = c.train_config("/d", "run", "/o")
    # the run keys of the file are the distill job's; everything else comes from the file
    assert (run.name, run.storage_path, run.data.train, run.data.val) == ("run", "/o", "/d", "")
    assert run.data.shuffle_buffer == 8 and run.model.min_size == 64 and run.schedule.max_iters == 7
    path.write_text(yaml.safe_dump({"work_dir": "w", "train": "missing.yaml", "prepare": {"enabled": True}}))
    with pytest.raises(MaskrayError, match="missing.yaml"):
        load_distill_config(str(path))


@pytest.mark.parametrize("overrides, message", [
    (["student.mix_ratio=1.0"], "student.mix_ratio"),
    (["tta.merge=vote"], "tta.merge"),
    (["thresholds.bogus=1"], "thresholds.bogus"),
    (["train.name=x"], "train.name"),
    (["train.schedule.max_iters=-1"], "schedule.max_iters"),
    (["prepare.enabled=false"], "data.labeled"),
    (["colour=red"], "unknown key colour"),
    (["tta.hflip='no'"], "tta.hflip: expected bool, got str 'no'"),
    (["tta.scales=[0.5, -1]"], "tta.scales"),
    (["thresholds.mode=auto"], "thresholds.mode"),
    (["inference.batch_size=0"], "inference.batch_size"),
    (["student.init=student"], "student.init"),
    (["rounds=many"], "rounds: expected int"),
])
def test_invalid_configs_name_the_key(tmp_path, overrides, message):
    with pytest.raises(MaskrayError, match=re.escape(message) if "'" in message else message) as info:
        load_distill_config(_config(tmp_path), overrides)
    assert str(info.value).startswith(str(tmp_path))  # and the file


def test_tta_hflip_no_in_the_file_is_refused_naming_the_key(tmp_path):
    """YAML 1.1 reads an unquoted `no` as false, so the file says "no" in quotes: a string, refused."""
    path = tmp_path / "d.yaml"
    path.write_text(f'work_dir: {tmp_path}/w\ntrain: {{}}\nprepare: {{enabled: true}}\ntta: {{hflip: "no"}}\n')
    with pytest.raises(MaskrayError, match=r"d.yaml: tta.hflip: expected bool, got str 'no'"):
        load_distill_config(str(path))


def _dataset(uri, n, first_id, score):
    ann = {"id": 1, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "area": 4.0, "iscrowd": False,
           "segmentation": {"size": [4, 4], "counts": b"0"}, "score": score}
    with ShardWriter(uri, images_per_shard=7) as w:
        for i in range(n):
            w.add({"image_id": first_id + i, "file_name": f"{i}.png", "width": 4, "height": 4, "image": b"x",
                   "annotations": [ann]})
    write_manifest(uri, Manifest(categories=[{"id": 1, "name": "a"}], shards=w.close(),
                                 extra={"round": 1, "teacher": "t"}))


def test_mixed_dataset_has_the_ratio_in_every_block(tmp_path):
    labeled, pseudo, out = (str(tmp_path / n) for n in ("labeled", "pseudo", "mixed"))
    _dataset(labeled, 5, 1, None)
    _dataset(pseudo, 96, 1000, 0.9)
    rows, n_labeled = distill.write_mixed_dataset(labeled, pseudo, out, ratio=0.25, seed=3, extra={"round": 1})
    assert (rows, n_labeled) == (128, 32)
    ids = [r["image_id"] for r in read_rows(out, columns=["image_id"])]
    assert sorted(i for i in ids if i >= 1000) == list(range(1000, 1096))  # every pseudo image once
    for block in (ids[:64], ids[64:]):
        assert sum(i < 1000 for i in block) == 16
    counts = [ids.count(i) for i in range(1, 6)]
    assert max(counts) - min(counts) <= 1  # labeled images cycled evenly
    assert read_manifest(out).extra == {"round": 1, "mix_ratio": 0.25, "labeled": labeled, "pseudo": pseudo}
    long = str(tmp_path / "long")
    rows, n_labeled = distill.write_mixed_dataset(labeled, pseudo, long, ratio=0.25, seed=3, min_rows=300)
    assert (rows, n_labeled) == (384, 96)  # three passes over the pseudo set
    alone = str(tmp_path / "alone")
    assert distill.write_mixed_dataset(labeled, None, alone, ratio=1.0, min_rows=12) == (15, 15)
    again = str(tmp_path / "again")
    distill.write_mixed_dataset(labeled, pseudo, again, ratio=0.25, seed=3)
    assert [r["image_id"] for r in read_rows(again, columns=["image_id"])] == ids  # deterministic


def test_mixed_dataset_refuses_an_empty_pseudo_set(tmp_path):
    _dataset(str(tmp_path / "l"), 3, 1, None)
    _dataset(str(tmp_path / "p"), 0, 1, 0.5)
    with pytest.raises(MaskrayError, match="no pseudo-labeled image"):
        distill.write_mixed_dataset(str(tmp_path / "l"), str(tmp_path / "p"), str(tmp_path / "m"), ratio=0.5)
