"""Bad rows without Ray: the stream's decode step drops and names them, the hook stops past the limit,
evaluation skips and counts them."""

import numpy as np
import pytest
import torch

from model.errors import MaskrayError
from pipeline.evaluate import evaluate_model
from pipeline.data.synth import categories_for, make_image
from pipeline.train.config import TrainConfig
from pipeline.train.data import DecodeAugment
from pipeline.train.engine import RunChannel
from pipeline.train.hooks import BadRowsHook, Due
from pipeline.train.loop import RunPlan, Worker

CATS = categories_for(2)


def _row(index, corrupt=False, image_id=None):
    png, anns = make_image(0, index, 64, CATS)
    from pycocotools import mask as mask_utils

    annotations = []
    for i, a in enumerate(anns):
        seg = a["segmentation"]
        if isinstance(seg, list):  # polygons
            counts = mask_utils.merge(mask_utils.frPyObjects(seg, 64, 64))["counts"]
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            counts = mask_utils.frPyObjects(seg, 64, 64)["counts"]
        else:
            counts = seg["counts"]
        counts = counts if isinstance(counts, bytes) else counts.encode()
        annotations.append({"id": i + 1, "category_id": a["category_id"], "bbox": a["bbox"], "area": a["area"],
                            "iscrowd": False, "segmentation": {"size": [64, 64], "counts": counts},
                            "score": None})
    return {"image_id": image_id or index + 1, "file_name": f"{index}.png", "width": 64, "height": 64,
            "image": png[: len(png) // 3] if corrupt else png, "annotations": annotations,
            "path": "/data/train/part-00002.parquet"}


class Recorder:
    """Stands in for the RunChannel actor handle: ``add.remote(...)`` runs the real class's method."""

    def __init__(self):
        self.counter = RunChannel()
        self.add = type("M", (), {"remote": staticmethod(self.counter.add)})()


def test_decode_step_drops_an_undecodable_row_and_reports_it_once():
    rec = Recorder()
    fn = DecodeAugment([c["id"] for c in CATS], bad_rows=rec)
    (good,) = fn(_row(0))
    assert good["image"].shape == (3, 64, 64) and good["image_id"] == 1
    assert fn(_row(1, corrupt=True)) == []
    assert fn(_row(1, corrupt=True)) == []  # met again (next epoch): counted once
    bad_target = _row(2)
    bad_target["annotations"][0]["category_id"] = 99
    assert fn(bad_target) == []
    count, entries = rec.counter.since(0)
    assert count == 2
    assert entries[0][:2] == (2, "part-00002.parquet") and "corrupt or truncated" in entries[0][2]
    assert entries[1][:2] == (3, "part-00002.parquet") and "category_id 99" in entries[1][2]
    assert rec.counter.since(1) == (2, entries[1:])


def _worker(fraction=0.01, images=100):
    config = TrainConfig.from_dict({"data": {"train": "/d", "max_bad_fraction": fraction}})
    plan = RunPlan(categories=CATS, train_images=images, val_images=0, total_iters=10, lr=0.01, global_batch=2)
    model_config = config.model.model_config(CATS)
    return Worker(config, plan, torch.nn.Linear(1, 1), model_config, None, [], torch.device("cpu"))


def test_the_hook_names_new_rows_counts_them_and_stops_past_the_fraction():
    counter, lines = RunChannel(), []
    w = _worker(0.01, 100)  # limit: 1 row
    hook = BadRowsHook(counter.since, lines.append, limit=int(0.01 * 100))
    counter.add(7, "part-00000.parquet", "not a recognised image format")
    metrics = {}
    hook.after_interval(w, metrics, Due(True, False, False))
    assert metrics["bad_rows"] == 1 and not w.stop_reason
    assert lines == ["skipped train image 7 in part-00000.parquet: not a recognised image format"]
    counter.add(9, "part-00001.parquet", "image is 9000x9000 = 81.0 MP, over the limit")
    hook.after_interval(w, metrics, Due(True, False, False))
    assert len(lines) == 2 and metrics["bad_rows"] == 2  # each row shown once
    assert w.stop_reason.startswith("data.train: 2 rows could not be decoded, more than data.max_bad_fraction=0.01 "
                                    "of 100 images allow (1)")


class Oracle(torch.nn.Module):
    """Returns each image's ground truth (looked up by its pixels' sum) as predictions."""

    def __init__(self, truth):
        super().__init__()
        self.truth = truth

    def forward(self, images):
        return [self.truth[round(float(im.sum()), 2)] for im in images]


def test_evaluation_skips_undecodable_images_and_refuses_past_the_fraction(caplog):
    from pipeline.data.decode import decode_image, decode_target

    rows = [_row(i) for i in range(4)] + [_row(4, corrupt=True)]
    truth = {}
    for row in rows[:4]:
        image = decode_image(row["image"]).float().div(255)
        target = decode_target(row["annotations"], 64, 64, [c["id"] for c in CATS])
        truth[round(float(image.sum()), 2)] = {"boxes": target["boxes"], "labels": target["labels"],
                                               "scores": torch.ones(len(target["labels"])),
                                               "masks": target["masks"][:, None].float()}
    skipped = []
    metrics = evaluate_model(Oracle(truth), rows, CATS, skipped=skipped, max_bad_fraction=0.25)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert [s[0] for s in skipped] == [5] and "corrupt or truncated" in skipped[0][2]
    with pytest.raises(MaskrayError, match=r"evaluation: 1 of 5 images could not be decoded .*image 5"):
        evaluate_model(Oracle(truth), rows, CATS, max_bad_fraction=0.1)
    assert np.isfinite(metrics["segm"]["AP50"])


def test_too_many_bad_val_images_stop_the_run_cleanly(tmp_path, monkeypatch):
    from pipeline.train import hooks

    def refuse(*args, **kwargs):
        raise MaskrayError("evaluation: 3 of 4 images could not be decoded (more than max_bad_fraction=0.01)")

    monkeypatch.setattr("pipeline.evaluate.evaluate_model", refuse)
    w = _worker()
    w.config.data.val = "/d/val"
    lines, metrics = [], {}
    hooks.EvalHook(lines.append).after_interval(w, metrics, Due(False, True, False))
    assert w.stop_reason == ("data.val=/d/val: evaluation: 3 of 4 images could not be decoded "
                             "(more than max_bad_fraction=0.01)")
    assert lines == [] and not any(k.startswith("segm_") for k in metrics)
