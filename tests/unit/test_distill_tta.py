"""The teacher's TTA (pipeline.distill.tta): mapping back, ensembling, and the TTAPredictor that the
inference engine runs, against a full-size reference implementation kept here (no Ray, no storage)."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipeline.distill.config import TTAConfig
from pipeline.distill.tta import Transform, TTAPredictor, clusters, model_scale, transforms

# --------------------------------------------------------------------------- the full-size reference
# The straightforward TTA: every transform's masks pasted at the image size, mapped back, and merged.
# The production path (tta_instances) pastes one cluster's members at a time; it must give the same.


@dataclass
class Prediction:
    """One image's detections: boxes float32[N,4] xyxy, scores float32[N], labels int64[N],
    masks float32[N,H,W] soft masks in the frame of the image the prediction belongs to."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor

    def __len__(self):
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, height, width):
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, height, width))

    @classmethod
    def from_output(cls, output, height, width):
        masks = output["masks"].detach().float()
        if masks.dim() == 4:
            masks = masks[:, 0]
        if masks.shape[0] == 0:
            masks = masks.new_zeros(0, height, width)
        return cls(output["boxes"].detach().float().reshape(-1, 4), output["scores"].detach().float().reshape(-1),
                   output["labels"].detach().to(torch.int64).reshape(-1), masks)


def invert(t: Transform, pred: Prediction, height: int, width: int) -> Prediction:
    return Prediction(t.invert_boxes(pred.boxes, height, width), pred.scores.clone(), pred.labels.clone(),
                      t.invert_masks(pred.masks, height, width))


def ensemble(preds, config):
    height, width = preds[0].masks.shape[-2:]
    boxes = torch.cat([p.boxes for p in preds])
    scores = torch.cat([p.scores for p in preds])
    labels = torch.cat([p.labels for p in preds])
    masks = torch.cat([p.masks for p in preds])
    tidx = torch.cat([torch.full((len(p),), i, dtype=torch.int64) for i, p in enumerate(preds)])
    keep = scores >= config.min_score
    out_boxes, out_scores, out_labels, members = clusters(boxes[keep], scores[keep], labels[keep], tidx[keep],
                                                          len(preds), config)
    if not out_scores:
        return Prediction.empty(height, width)
    masks = masks[keep]
    result = Prediction(torch.stack(out_boxes), torch.stack(out_scores).float(),
                        torch.tensor(out_labels, dtype=torch.int64), torch.stack([masks[m].mean(0) for m in members]))
    order = torch.argsort(result.scores, descending=True, stable=True)[: config.max_detections]
    return Prediction(result.boxes[order], result.scores[order], result.labels[order], result.masks[order])


def predict_tta(model, images, config, *, scaler=None):
    per_image = [[] for _ in images]
    with torch.inference_mode():
        for t in transforms(config):
            if scaler is None:
                outputs = model([t.apply(img) for img in images])
            else:
                with model_scale(scaler, t.scale):
                    outputs = model([t.apply(img) for img in images])
            for i, (img, out) in enumerate(zip(images, outputs)):
                th, tw = t.size(*img.shape[-2:])
                per_image[i].append(invert(t, Prediction.from_output(out, th, tw), *img.shape[-2:]))
    return [ensemble(p, config) for p in per_image]


def to_instances(pred, category_ids, mask_threshold):
    from pycocotools import mask as mask_utils

    out = []
    for i in range(len(pred)):
        binary = (pred.masks[i] >= mask_threshold).to(torch.uint8).numpy()
        if not binary.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(binary[:, :, None]))[0]
        x1, y1, x2, y2 = (float(v) for v in pred.boxes[i].tolist())
        out.append({"category_id": int(category_ids[int(pred.labels[i]) - 1]), "score": float(pred.scores[i]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]}})
    return out


# --------------------------------------------------------------------------- fakes


class BrightPixelModel:
    """A fake detector that knows one object: the pixels whose red channel is > 0.5, answered in
    the frame of the image it is given (like torchvision's Mask R-CNN): label 1, score 0.9."""

    def __init__(self):
        self.sizes = []

    def __call__(self, images):
        outputs = []
        for img in images:
            self.sizes.append(tuple(img.shape[-2:]))
            m = (img[0] > 0.5).float()
            ys, xs = torch.nonzero(m, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            outputs.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                            "masks": m[None, None]})
        return outputs


def _image():
    # an L-shaped object whose edges sit on even pixels (so x0.5 and x2 resizes are exact)
    img = torch.zeros(3, 40, 56)
    img[0, 8:30, 10:20] = 1.0
    img[0, 22:30, 20:44] = 1.0
    img[1] = 0.3
    return img


def _predictor(**options):
    from model.checkpoint import ModelConfig, build_from_config

    torch.manual_seed(0)
    config = ModelConfig.for_categories([{"id": 3, "name": "a"}, {"id": 9, "name": "b"}], backbone="resnet18",
                                        min_size=64, max_size=96, box_detections_per_img=8,
                                        options={"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30})
    return TTAPredictor(model=build_from_config(config).eval(), config=config, score_threshold=0.05, **options)


# --------------------------------------------------------------------------- tests


def test_every_transform_maps_back_to_the_same_mask_and_box():
    img = _image()
    truth = img[0] > 0.5
    model = BrightPixelModel()
    config = TTAConfig(scales=(0.5, 1.0, 2.0), hflip=True)
    ts = transforms(config)
    assert len(ts) == 6 and {t.hflip for t in ts} == {False, True}
    for t in ts:
        out = model([t.apply(img)])[0]
        h, w = t.size(40, 56)
        assert out["masks"].shape[-2:] == (h, w)
        back = invert(t, Prediction.from_output(out, h, w), 40, 56)
        assert torch.equal(back.masks[0] >= 0.5, truth), t
        assert back.boxes[0].tolist() == [10.0, 8.0, 44.0, 30.0], t
    # the whole TTA: one merged instance, same mask, same box, full score
    [pred] = predict_tta(model, [img], config)
    assert len(pred) == 1 and torch.equal(pred.masks[0] >= 0.5, truth)
    assert torch.allclose(pred.boxes[0], torch.tensor([10.0, 8.0, 44.0, 30.0]))
    assert pred.scores[0].item() == pytest.approx(0.9)
    assert sorted(set(model.sizes)) == [(20, 28), (40, 56), (80, 112)]


def test_flip_of_an_asymmetric_box_is_exact():
    t = Transform(scale=1.0, hflip=True)
    masks = torch.zeros(1, 6, 10)
    masks[0, 1:4, 2:5] = 1
    assert t.invert_boxes(torch.tensor([[2.0, 1.0, 5.0, 4.0]]), 6, 10)[0].tolist() == [5.0, 1.0, 8.0, 4.0]
    assert torch.equal(t.invert_masks(masks, 6, 10)[0].nonzero()[:, 1].unique(), torch.tensor([5, 6, 7]))


def test_model_scale_is_applied_and_restored():
    class Sizes:
        min_size, max_size = 64, 128

    sizes = Sizes()
    seen = []
    for scale in (0.5, 2.0):
        with model_scale(sizes, scale):
            seen.append((sizes.min_size, sizes.max_size))
    assert seen == [(32, 64), (128, 256)] and (sizes.min_size, sizes.max_size) == (64, 128)
    with pytest.raises(KeyboardInterrupt), model_scale(sizes, 0.75):
        raise KeyboardInterrupt
    assert (sizes.min_size, sizes.max_size) == (64, 128)


def _pred(boxes, scores, labels, size=(20, 20)):
    masks = torch.zeros(len(boxes), *size)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, int(y1):int(y2), int(x1):int(x2)] = scores[i]
    return Prediction(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.int64), masks)


def test_clusters_weighted_box_voting_mean_score_and_mask_average():
    a = _pred([[0, 0, 10, 10], [12, 12, 18, 18]], [0.8, 0.6], [1, 2])
    b = _pred([[0, 0, 10, 12]], [0.4], [1])
    merged = ensemble([a, b], TTAConfig(merge="wbv", score_mode="mean", iou_threshold=0.5))
    assert merged.labels.tolist() == [1, 2]
    # class 1: both transforms voted: mean score (0.8+0.4)/2, box weighted 2:1
    assert merged.scores[0].item() == pytest.approx(0.6)
    assert merged.boxes[0].tolist() == pytest.approx([0, 0, 10, (10 * 0.8 + 12 * 0.4) / 1.2])
    assert merged.masks[0, 5, 5].item() == pytest.approx(0.6)      # (0.8 + 0.4) / 2
    assert merged.masks[0, 11, 5].item() == pytest.approx(0.2)     # only b covers row 11
    # class 2: one transform of two saw it: its score is halved
    assert merged.scores[1].item() == pytest.approx(0.3)
    nms = ensemble([a, b], TTAConfig(merge="nms", score_mode="max", iou_threshold=0.5))
    assert nms.boxes[0].tolist() == [0, 0, 10, 10] and nms.scores.tolist() == pytest.approx([0.8, 0.6])


def test_clusters_keep_separate_objects_and_classes_apart():
    a = _pred([[0, 0, 8, 8], [10, 10, 18, 18], [0, 0, 8, 8]], [0.9, 0.7, 0.5], [1, 1, 2])
    merged = ensemble([a], TTAConfig(min_score=0.6))
    assert merged.labels.tolist() == [1, 1] and merged.scores.tolist() == pytest.approx([0.9, 0.7])
    assert clusters(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64), 2, TTAConfig()) == ([], [], [], [])


def test_tta_predictor_equals_the_full_size_reference():
    """TTAPredictor (members pasted one cluster at a time, what run_inference's actors run) gives
    exactly the reference's full-size masks + binarization, flips and rescales included."""
    tta = TTAConfig(scales=(1.0, 0.75), hflip=True, min_score=0.05, mask_threshold=0.4)
    predictor = _predictor(tta=tta)
    g = torch.Generator().manual_seed(4)
    # pixel values k/255: the same images as uint8 (what the driver's read stage hands the model stage)
    images = [(torch.rand(3, 50, 70, generator=g) * 255).round() / 255, (torch.rand(3, 61, 45, generator=g) * 255).round() / 255]
    reference = [to_instances(p, predictor.category_ids, tta.mask_threshold)
                 for p in predict_tta(predictor.predict, images, tta, scaler=predictor)]
    ours = predictor.unit_predictions([(im * 255).round().to(torch.uint8) for im in images])
    assert sum(len(r) for r in reference) > 0
    assert [u["instances"] for u in ours] == reference
    assert (predictor.min_size, predictor.max_size) == (64, 96)  # every scale restored


def test_tta_predictor_units_become_a_results_table():
    """The model stage's path: decoded units -> run_units -> the results writer's table, with the
    predictor's instances stored as they are (and a failed decode left an error row)."""
    import pyarrow as pa

    from pipeline.results import INSTANCE_TYPE
    from pipeline.infer.stages import unit_table

    tta = TTAConfig(scales=(1.0,), hflip=True, min_score=0.05)
    predictor = _predictor(tta=tta, batch_size=2)
    g = torch.Generator().manual_seed(1)
    images = [(torch.rand(3, 48, 64, generator=g) * 255).to(torch.uint8) for _ in range(3)]
    table = pa.table({
        "unit": ["part-00000.parquet"], "positions": [[0, 1, 2, 3]], "image_ids": [[11, 12, 13, 14]],
        "file_names": [["a", "b", "c", "d"]], "heights": [[48, 48, 48, 0]], "widths": [[64, 64, 64, 0]],
        "pixels": pa.array([[memoryview(im.numpy()).cast("B").tobytes() for im in images] + [b""]],
                           pa.list_(pa.large_binary())),
        "errors": [[None, None, None, "decode failed: broken"]], "merge": [False]})
    [unit] = predictor.run_units(table)
    result = unit_table(unit, predictor.category_ids).to_pylist()
    direct = predictor.unit_predictions(images[:2]) + predictor.unit_predictions(images[2:])  # its batches of 2
    assert [r["image_id"] for r in result] == [11, 12, 13, 14]
    assert [r["error"] for r in result] == [None, None, None, "decode failed: broken"] and result[3]["instances"] == []
    stored = pa.Table.from_pylist([{"i": d["instances"]} for d in direct],
                                  schema=pa.schema([pa.field("i", pa.list_(INSTANCE_TYPE))])).column("i").to_pylist()
    assert [r["instances"] for r in result[:3]] == stored  # the writer's instances are the predictor's
    assert sum(len(d["instances"]) for d in direct) > 0
