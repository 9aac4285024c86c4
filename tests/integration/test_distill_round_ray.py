"""Teacher TTA pseudo-labelling on the inference engine (run_inference with the TTAPredictor), the
density rule and storage, end to end on a tiny synthetic set with a (random-weight) checkpoint;
resume of the labelling step; then a resumed scheduler round."""

import dataclasses
import os

import pytest
import torch

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint
from pipeline.data.convert import convert_coco, pack_images
from pipeline.data.decode import decode_image
from pipeline.data.format import read_manifest, read_rows
from pipeline.data.synth import synthesize
from pipeline.distill import label, rounds, thresholds
from pipeline.distill.config import ThresholdConfig, TTAConfig
from pipeline.distill.tta import TTAPredictor
from pipeline.results import read_provenance, read_table

TTA = TTAConfig(scales=(0.75, 1.0), hflip=True, min_score=0.0, max_detections=10)


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
    out = str(root / "round-1/pseudo")
    result = label.run_pseudo_labels(1, teacher, out, unlabeled=str(root / "unlabeled"),
                                     labeled=str(root / "labeled"), tta=TTA,
                                     thresholds=ThresholdConfig(mode="density", floor=0.0),
                                     keep_empty=True, batch_size=3, threads=1)
    candidates = str(root / "round-1/pseudo/candidates")
    provenance = read_provenance(candidates)  # a results prefix of the inference engine
    assert provenance["options"]["tta"] == {**dataclasses.asdict(TTA), "scales": [0.75, 1.0]}
    assert provenance["options"]["score_threshold"] == 0.0
    manifest = read_manifest(result.dataset)
    assert manifest.extra["round"] == 1 and manifest.extra["teacher"] == teacher
    assert result.images == 6  # keep_empty: every unlabeled image stays

    # the same pseudo-labels as the TTA predictor gives in this process on the same batches
    predictor = TTAPredictor(teacher, tta=TTA, score_threshold=0.0, threads=1, batch_size=3)
    rows = list(read_rows(str(root / "unlabeled")))
    images = [decode_image(r["image"]) for r in rows]
    direct = predictor.unit_predictions(images[:3]) + predictor.unit_predictions(images[3:])
    stored = read_table(os.path.join(candidates, "part-00000.parquet")).to_pylist()
    assert [r["image_id"] for r in stored] == [r["image_id"] for r in rows]
    assert sum(len(d["instances"]) for d in direct) > 0
    for row, d in zip(stored, direct):
        assert row["error"] is None
        assert [(i["category_id"], i["segmentation"]["counts"]) for i in row["instances"]] == \
            [(i["category_id"], i["segmentation"]["counts"]) for i in d["instances"]]
        assert [i["score"] for i in row["instances"]] == pytest.approx([i["score"] for i in d["instances"]], abs=1e-6)

    labeled = list(read_rows(str(root / "labeled"), columns=["annotations"]))
    density = thresholds.labeled_density([r["annotations"] for r in labeled], [c["id"] for c in categories])
    pseudo_rows = list(read_rows(result.dataset))
    for cid, per_image in density.items():
        kept = [a for r in pseudo_rows for a in r["annotations"] if a["category_id"] == cid]
        available = sum(i["category_id"] == cid for r in stored for i in r["instances"])
        # ties can keep a few more; never fewer than asked for unless the candidates run out
        assert len(kept) >= min(round(per_image * 6), available)
        assert all(a["score"] >= result.thresholds[cid] for a in kept)
    for row in pseudo_rows:
        for ann in row["annotations"]:
            assert ann["segmentation"]["size"] == [row["height"], row["width"]] and ann["area"] > 0

    # a second run over the same teacher skips the committed candidates and rewrites identical labels
    before = os.stat(os.path.join(candidates, "part-00000.parquet")).st_mtime_ns
    again = label.run_pseudo_labels(1, teacher, out, unlabeled=str(root / "unlabeled"),
                                    labeled=str(root / "labeled"), tta=TTA,
                                    thresholds=ThresholdConfig(mode="density", floor=0.0),
                                    keep_empty=True, batch_size=3, threads=1)
    assert os.stat(os.path.join(candidates, "part-00000.parquet")).st_mtime_ns == before
    assert again.thresholds == result.thresholds and list(read_rows(again.dataset)) == pseudo_rows
    # another TTA into the same candidates is refused by the engine's provenance check
    with pytest.raises(Exception, match=r"other settings: options\.tta\.hflip \(True -> False\)"):
        label.label_candidates(str(root / "unlabeled"), candidates, teacher, dataclasses.replace(TTA, hflip=False),
                               threads=1)


def test_labelling_resumes_unit_by_unit(ray_local, data):
    """Exactly once: a rerun skips committed units and computes only a missing one (no kill needed:
    a unit's file is there whole or not at all)."""
    root, teacher, _ = data
    out = str(root / "resume")
    tta = TTAConfig(scales=(1.0,), hflip=True, min_score=0.05)
    first = label.label_candidates(str(root / "unlabeled"), out, teacher, tta, threads=1, images_per_unit=2)
    assert (first.units_done, first.units_skipped, first.images) == (3, 0, 6)
    names = sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
    assert len(names) == 3
    kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
    second = label.label_candidates(str(root / "unlabeled"), out, teacher, tta, threads=1, images_per_unit=2)
    assert (second.units_done, second.units_skipped) == (0, 3)
    os.remove(os.path.join(out, names[1]))
    third = label.label_candidates(str(root / "unlabeled"), out, teacher, tta, threads=1, images_per_unit=2)
    assert (third.units_done, third.units_skipped, third.images) == (1, 2, 2)
    assert all(os.stat(os.path.join(out, n)).st_mtime_ns == kept[n] for n in (names[0], names[2]))
    scores, images, errors = label.candidate_scores(str(root / "unlabeled"), out, images_per_unit=2)
    assert (images, errors) == (6, 0)


def test_scheduler_round_with_real_pseudo_labels(ray_local, data, tmp_path):
    root, teacher, _ = data
    calls = []

    def pseudo_label(k, t, out):
        calls.append("pseudo")
        return label.run_pseudo_labels(k, t, out, unlabeled=str(root / "unlabeled"), labeled=str(root / "labeled"),
                                       tta=TTAConfig(scales=(1.0,), hflip=False, min_score=0.0),
                                       thresholds=ThresholdConfig(mode="fixed", value=0.0), threads=1)

    def train_student(k, dataset, out):
        calls.append("student")
        label.check_pseudo_dataset(dataset, round_index=k, teacher=teacher)
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
