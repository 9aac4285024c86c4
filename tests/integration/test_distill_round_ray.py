"""Teacher TTA pseudo-labeling through Ray Data, storage and the density rule, end to end on a
tiny synthetic set with a (random-weight) checkpoint, then a resumed scheduler round."""

import pytest
import torch

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from pipeline.distill import label as pseudo
from pipeline.distill import rounds
from pipeline.data.convert import convert_coco, pack_images
from pipeline.data.format import read_manifest, read_rows
from pipeline.data.synth import synthesize


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    synthesize(str(root / "raw"), images=4, unlabeled=6, size=64, num_categories=3, max_objects=3, seed=1)
    convert_coco(str(root / "raw/annotations.json"), str(root / "raw/images"), str(root / "labeled"), workers=1)
    categories = read_manifest(str(root / "labeled")).categories
    pack_images(str(root / "raw/unlabeled"), str(root / "unlabeled"), categories=categories, workers=1)
    torch.manual_seed(0)
    config = ModelConfig.for_categories(categories, backbone="resnet18", min_size=64, max_size=64,
                                        box_score_thresh=0.0, box_detections_per_img=10)
    teacher = str(root / "teacher.pt")
    save_checkpoint(teacher, build_from_config(config), config)
    return root, teacher, categories


def test_pseudo_labels_follow_the_density_rule(ray_local, data):
    root, teacher, categories = data
    tta = pseudo.TTAConfig(scales=(0.75, 1.0), hflip=True, min_score=0.0, max_detections=10)
    result = pseudo.run_pseudo_labels(1, teacher, str(root / "round-1/pseudo"), unlabeled=str(root / "unlabeled"),
                                      labeled=str(root / "labeled"), tta=tta,
                                      thresholds=pseudo.ThresholdConfig(mode="density", floor=0.0),
                                      keep_empty=True, batch_size=3, threads=1)
    cand = read_manifest(str(root / "round-1/pseudo/candidates"))
    assert cand.num_images == 6 and cand.extra["teacher"] == teacher and cand.extra["round"] == 1
    manifest = read_manifest(result.dataset)
    assert manifest.extra["round"] == 1 and manifest.extra["teacher"] == teacher
    assert result.images == 6  # keep_empty: every unlabeled image stays

    labeled = list(read_rows(str(root / "labeled"), columns=["annotations"]))
    density = pseudo.labeled_density([r["annotations"] for r in labeled], [c["id"] for c in categories])
    pseudo_rows = list(read_rows(result.dataset))
    for cid, per_image in density.items():
        kept = [a for r in pseudo_rows for a in r["annotations"] if a["category_id"] == cid]
        available = sum(a["category_id"] == cid for r in read_rows(str(root / "round-1/pseudo/candidates"))
                        for a in r["annotations"])
        # ties can keep a few more; never fewer than asked for unless the candidates run out
        assert len(kept) >= min(round(per_image * 6), available)
        assert all(a["score"] >= result.thresholds[cid] for a in kept)
    for row in pseudo_rows:
        for ann in row["annotations"]:
            assert ann["segmentation"]["size"] == [row["height"], row["width"]] and ann["area"] > 0
    with pytest.raises(Exception, match="round 1"):
        pseudo.check_pseudo_dataset(result.dataset, round_index=2, teacher=teacher)

    # a second run over the same teacher keeps the candidates and rewrites identical labels
    before = (root / "round-1/pseudo/candidates/part-00000.parquet").stat().st_mtime_ns
    again = pseudo.run_pseudo_labels(1, teacher, str(root / "round-1/pseudo"), unlabeled=str(root / "unlabeled"),
                                     labeled=str(root / "labeled"), tta=tta,
                                     thresholds=pseudo.ThresholdConfig(mode="density", floor=0.0),
                                     keep_empty=True, batch_size=3, threads=1)
    assert (root / "round-1/pseudo/candidates/part-00000.parquet").stat().st_mtime_ns == before
    assert again.thresholds == result.thresholds and list(read_rows(again.dataset)) == pseudo_rows


def test_scheduler_round_with_real_pseudo_labels(ray_local, data, tmp_path):
    root, teacher, _ = data
    calls = []

    def pseudo_label(k, t, out):
        calls.append("pseudo")
        return pseudo.run_pseudo_labels(k, t, out, unlabeled=str(root / "unlabeled"), labeled=str(root / "labeled"),
                                        tta=pseudo.TTAConfig(scales=(1.0,), hflip=False, min_score=0.0),
                                        thresholds=pseudo.ThresholdConfig(mode="fixed", value=0.0), threads=1)

    def train_student(k, dataset, out):
        calls.append("student")
        pseudo.check_pseudo_dataset(dataset, round_index=k, teacher=teacher)
        if calls.count("student") == 1:
            raise KeyboardInterrupt  # killed during the student's training
        return teacher

    steps = rounds.StepFunctions(lambda out: teacher, pseudo_label, train_student,
                                 lambda ckpt: {"bbox": {"AP": 0.1}, "segm": {"AP": 0.1}})
    with pytest.raises(KeyboardInterrupt):
        rounds.RoundScheduler(str(tmp_path), steps, rounds=1).run()
    states = rounds.RoundScheduler(str(tmp_path), steps, rounds=1).run()
    assert calls == ["pseudo", "student", "student"]  # pseudo-labels not redone after the kill
    assert states[1].done and states[1].pseudo_dataset == str(tmp_path / "rounds/round-1/pseudo")
    assert states[1].thresholds == {"1": 0.0, "2": 0.0, "3": 0.0}
