"""evaluate_model plumbing, overlays, and the ``maskray eval`` / ``maskray show`` jobs on a tiny dataset."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import decode_png, encode_png

from jobs import cli
from model import ModelConfig, build_from_config, save_checkpoint
from pipeline.evaluate import evaluate_model
from pipeline.data.format import Manifest, ShardWriter, make_annotation, make_row, write_manifest
from pipeline.instances import Instances, encode_masks
from pipeline.results import RESULT_SCHEMA, result_instances_from_coco
from pipeline.show.draw import draw_instances

CATEGORIES = [{"id": 4, "name": "square"}, {"id": 9, "name": "bar"}]
SIZE = 64


def _image_and_targets(image_id):
    """A dark image with a bright square (category 4) and a bar (category 9), exact masks."""
    g = torch.Generator().manual_seed(image_id)
    image = (torch.rand(3, SIZE, SIZE, generator=g) * 60).to(torch.uint8)
    o = 4 + image_id % 8
    boxes = torch.tensor([[o, o, o + 20, o + 20], [30, 8 + o, 60, 16 + o]], dtype=torch.float32)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[k, y0:y1, x0:x1] = True
        image[k, y0:y1, x0:x1] = 230
    return image, Instances((SIZE, SIZE), boxes, torch.ones(2), torch.tensor([1, 2]), masks)


def _rows(n=3):
    rows = []
    for image_id in range(1, n + 1):
        image, gt = _image_and_targets(image_id)
        anns = [make_annotation(id=0, category_id=r["category_id"], bbox=r["bbox"], area=float(m.sum()),
                                iscrowd=False, size=r["segmentation"]["size"], counts=r["segmentation"]["counts"])
                for r, m in zip(gt.to_coco(image_id, [4, 9]), gt.masks)]
        rows.append(make_row(image_id=image_id, file_name=f"{image_id}.png", width=SIZE, height=SIZE,
                             image=encode_png(image).numpy().tobytes(), annotations=anns))
    return rows


@pytest.fixture()
def dataset(tmp_path):
    uri = str(tmp_path / "data")
    with ShardWriter(uri, images_per_shard=2) as writer:
        for row in _rows():
            writer.add(row)
    write_manifest(uri, Manifest(categories=CATEGORIES, shards=writer.shards, source="test"))
    return uri


class Oracle(torch.nn.Module):
    """Returns the ground truth of each image as torchvision-style predictions (mask probabilities)."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images):
        outputs = []
        for image in images:
            assert image.dtype == torch.float32 and image.max() <= 1.0
            self.seen += 1
            _, gt = _image_and_targets(self.seen)
            outputs.append({"boxes": gt.boxes, "labels": gt.labels, "scores": torch.full((2,), 0.9),
                            "masks": gt.masks[:, None].float() * 0.8})
        return outputs


def test_evaluate_model_on_oracle_predictions_scores_one(dataset):
    metrics = evaluate_model(Oracle(), dataset, batch_size=2)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["APl"] is None  # no large objects in 64 px images


def test_overlay_draws_masks_and_boxes():
    image, gt = _image_and_targets(1)
    gt.scores = torch.tensor([0.9, 0.3])
    out = draw_instances(image, gt, ["square", "bar"], score_thresh=0.5)
    assert out.shape == image.shape and out.dtype == torch.uint8
    changed = (out != image).any(0)
    assert changed[gt.masks[0]].float().mean() > 0.9  # square drawn
    assert torch.equal(out, draw_instances(image, gt[0], ["square", "bar"], score_thresh=0.5))  # bar below it
    assert not torch.equal(out, draw_instances(image, gt, ["square", "bar"], score_thresh=0.2))


def _checkpoint(path):
    torch.manual_seed(0)
    config = ModelConfig.for_categories(CATEGORIES, backbone="resnet18", min_size=64, max_size=64,
                                        options={"rpn_post_nms_top_n_test": 100})
    save_checkpoint(path, build_from_config(config), config)
    return str(path)


def test_eval_job_prints_table_and_writes_metrics(dataset, tmp_path, capsys):
    out = tmp_path / "m" / "metrics.json"
    code = cli.module_main("eval", ["--checkpoint", _checkpoint(tmp_path / "c.pt"), "--data", dataset,
                     "--out", str(out), "--device", "cpu", "--limit", "2"])
    assert code == 0
    assert "AP50" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"bbox", "segm"}
    for values in metrics.values():
        assert set(values) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in values.values())


def test_eval_job_bad_checkpoint_is_one_line(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert cli.module_main("eval", ["--checkpoint", str(bad), "--data", dataset]) == 1
    err = capsys.readouterr().err
    assert "bad.pt" in err and len(err.strip().splitlines()) == 1


def test_show_job_from_checkpoint_and_from_results(dataset, tmp_path):
    out = tmp_path / "png"
    assert cli.module_main("show", ["--checkpoint", _checkpoint(tmp_path / "c.pt"), "--data", dataset,
                     "--out", str(out), "--limit", "2", "--score-thresh", "0", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["1.png", "2.png"]
    # overlays are drawn at --long-side (default 1280 px): the 64-px square images are upscaled, aspect kept
    assert decode_png(torch.frombuffer(bytearray((out / "1.png").read_bytes()), dtype=torch.uint8)).shape == (3, 1280, 1280)

    # stored results: ground truth as predictions, one results file
    results = tmp_path / "results"
    results.mkdir()
    rows = []
    for image_id in (1, 2, 3):
        _, gt = _image_and_targets(image_id)
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "error": None, "model": "t",
                     "instances": result_instances_from_coco(gt.to_coco(image_id, [4, 9]))})
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows, schema=RESULT_SCHEMA), results / "part-00000.parquet")
    out2 = tmp_path / "png2"
    assert cli.module_main("show", ["--results", str(results), "--data", dataset, "--out", str(out2), "--limit", "3",
                                      "--long-side", "64"]) == 0  # the images' own size: pixels comparable
    assert sorted(p.name for p in out2.iterdir()) == ["1.png", "2.png", "3.png"]
    drawn = decode_png(torch.frombuffer(bytearray((out2 / "3.png").read_bytes()), dtype=torch.uint8))
    image, gt = _image_and_targets(3)
    assert (drawn != image).any(0)[gt.masks[0]].float().mean() > 0.9
