"""TTA mapping, ensembling and the density rule of pipeline.distill.label (no Ray, no storage)."""

import numpy as np
import pytest
import torch

from model.errors import MaskrayError
from pipeline.distill import label as pseudo
from pipeline.distill.label import NEVER, Prediction, TTAConfig, Transform


class BrightPixelModel:
    """A fake detector that knows one object: the pixels whose red channel is > 0.5.

    It answers in the frame of the image it is given (like torchvision's Mask R-CNN): the soft
    mask is the thresholded red channel, the box its pixel extent, label 1, score 0.9."""

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


def test_every_transform_maps_back_to_the_same_mask_and_box():
    img = _image()
    truth = (img[0] > 0.5)
    model = BrightPixelModel()
    config = TTAConfig(scales=(0.5, 1.0, 2.0), hflip=True)
    transforms = config.transforms()
    assert len(transforms) == 6 and {t.hflip for t in transforms} == {False, True}
    for t in transforms:
        out = model([t.apply(img)])[0]
        h, w = t.size(40, 56)
        assert out["masks"].shape[-2:] == (h, w)
        back = t.invert(Prediction.from_output(out, h, w), 40, 56)
        assert torch.equal(back.masks[0] >= 0.5, truth), t
        assert back.boxes[0].tolist() == [10.0, 8.0, 44.0, 30.0], t
    # the whole TTA predictor: one merged instance, same mask, same box, full score
    [pred] = pseudo.predict_tta(model, [img], config)
    assert len(pred) == 1
    assert torch.equal(pred.masks[0] >= 0.5, truth)
    assert torch.allclose(pred.boxes[0], torch.tensor([10.0, 8.0, 44.0, 30.0]))
    assert pred.scores[0].item() == pytest.approx(0.9)
    assert sorted(set(model.sizes)) == [(20, 28), (40, 56), (80, 112)]


def test_flip_of_an_asymmetric_box_is_exact():
    t = Transform(scale=1.0, hflip=True)
    pred = Prediction(torch.tensor([[2.0, 1.0, 5.0, 4.0]]), torch.tensor([0.5]), torch.tensor([1]),
                      torch.zeros(1, 6, 10))
    pred.masks[0, 1:4, 2:5] = 1
    flipped = t.invert(pred, 6, 10)  # flip is its own inverse
    assert flipped.boxes[0].tolist() == [5.0, 1.0, 8.0, 4.0]
    assert torch.equal(flipped.masks[0].nonzero()[:, 1].unique(), torch.tensor([5, 6, 7]))


def test_model_scale_is_applied_and_restored():
    class Resize:
        min_size, max_size = (64,), 128

    class Model(BrightPixelModel):
        transform = Resize()

        def __call__(self, images):
            self.seen = getattr(self, "seen", []) + [(self.transform.min_size, self.transform.max_size)]
            return super().__call__(images)

    model = Model()
    pseudo.predict_tta(model, [_image()], TTAConfig(scales=(0.5, 2.0), hflip=False))
    assert model.seen == [((32,), 64), ((128,), 256)]
    assert (model.transform.min_size, model.transform.max_size) == ((64,), 128)


def _pred(boxes, scores, labels, size=(20, 20)):
    masks = torch.zeros(len(boxes), *size)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, int(y1):int(y2), int(x1):int(x2)] = scores[i]
    return Prediction(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.int64), masks)


def test_ensemble_weighted_box_voting_mean_score_and_mask_average():
    a = _pred([[0, 0, 10, 10], [12, 12, 18, 18]], [0.8, 0.6], [1, 2])
    b = _pred([[0, 0, 10, 12]], [0.4], [1])
    merged = pseudo.ensemble([a, b], TTAConfig(merge="wbv", score_mode="mean", iou_threshold=0.5))
    assert merged.labels.tolist() == [1, 2]
    # class 1: both transforms voted: mean score (0.8+0.4)/2, box weighted 2:1
    assert merged.scores[0].item() == pytest.approx(0.6)
    assert merged.boxes[0].tolist() == pytest.approx([0, 0, 10, (10 * 0.8 + 12 * 0.4) / 1.2])
    assert merged.masks[0, 5, 5].item() == pytest.approx(0.6)      # (0.8 + 0.4) / 2
    assert merged.masks[0, 11, 5].item() == pytest.approx(0.2)     # only b covers row 11
    # class 2: one transform of two saw it: its score is halved
    assert merged.scores[1].item() == pytest.approx(0.3)
    nms = pseudo.ensemble([a, b], TTAConfig(merge="nms", score_mode="max", iou_threshold=0.5))
    assert nms.boxes[0].tolist() == [0, 0, 10, 10] and nms.scores.tolist() == pytest.approx([0.8, 0.6])


def test_ensemble_keeps_separate_objects_and_classes_apart():
    a = _pred([[0, 0, 8, 8], [10, 10, 18, 18], [0, 0, 8, 8]], [0.9, 0.7, 0.5], [1, 1, 2])
    merged = pseudo.ensemble([a], TTAConfig(min_score=0.6))
    assert merged.labels.tolist() == [1, 1] and merged.scores.tolist() == pytest.approx([0.9, 0.7])
    empty = pseudo.ensemble([Prediction.empty(20, 20)] * 2, TTAConfig())
    assert len(empty) == 0 and empty.masks.shape == (0, 20, 20)


def test_to_annotations_writes_rle_and_scores():
    from pycocotools import mask as mask_utils

    pred = _pred([[2, 3, 7, 9], [0, 0, 1, 1]], [0.9, 0.3], [2, 1])
    pred.masks[1] = 0.0  # empty after binarization: dropped
    anns = pseudo.to_annotations(pred, [5, 9], image_id=3, mask_threshold=0.5)
    assert len(anns) == 1
    ann = anns[0]
    assert ann["category_id"] == 9 and ann["score"] == pytest.approx(0.9)
    assert ann["bbox"] == [2.0, 3.0, 5.0, 6.0] and ann["area"] == 30.0
    decoded = mask_utils.decode(ann["segmentation"])
    assert decoded.sum() == 30 and decoded[3:9, 2:7].all()


def test_density_rule_on_a_constructed_example():
    labeled = [  # 4 labeled images: class 1 twice per image, class 2 once in two images, class 3 never
        [{"category_id": 1}, {"category_id": 1}, {"category_id": 2}],
        [{"category_id": 1}, {"category_id": 1}, {"category_id": 2, "iscrowd": True}],
        [{"category_id": 1}, {"category_id": 1}, {"category_id": 2}],
        [{"category_id": 1}, {"category_id": 1}],
    ]
    density = pseudo.labeled_density(labeled, [1, 2, 3, 4])
    assert density == {1: 2.0, 2: 0.5, 3: 0.0, 4: 0.0}
    rng = np.random.default_rng(0)
    scores = {1: rng.uniform(0, 1, 50).tolist(), 2: rng.uniform(0, 1, 30).tolist(), 4: [0.9]}
    scores[3] = [0.2, 0.3]
    density[4] = 0.5  # wants 5 instances over 10 images but only one candidate exists
    t = pseudo.density_thresholds(scores, 10, density, floor=0.1)
    assert sum(s >= t[1] for s in scores[1]) == 20          # 2 per image x 10 images
    assert sum(s >= t[2] for s in scores[2]) == 5           # 0.5 per image x 10 images
    assert t[3] == NEVER and t[4] == 0.1                    # none wanted; fewer candidates than wanted
    high = pseudo.density_thresholds({1: [0.05, 0.04]}, 1, {1: 2.0}, floor=0.1)
    assert high == {1: 0.1}                                  # never below the floor
    anns = [{"category_id": 1, "score": 0.5}, {"category_id": 3, "score": 0.99}, {"category_id": 1, "score": 0.01}]
    assert pseudo.apply_thresholds(anns, {1: 0.3, 3: NEVER}) == anns[:1]


def test_config_validation_names_the_field():
    with pytest.raises(MaskrayError, match="tta.merge"):
        TTAConfig(merge="vote")
    with pytest.raises(MaskrayError, match="tta.scales"):
        TTAConfig(scales=(0,))
    with pytest.raises(MaskrayError, match="thresholds.mode"):
        pseudo.ThresholdConfig(mode="auto")


def test_bounded_tta_annotations_equal_the_full_size_path():
    """tta_annotations (members pasted one cluster at a time) gives exactly what predict_tta's
    full-size masks + to_annotations give, flips and rescales included."""
    from model.checkpoint import ModelConfig, build_from_config
    from pipeline.infer.predictor import Predictor

    torch.manual_seed(0)
    config = ModelConfig.for_categories([{"id": 3, "name": "a"}, {"id": 9, "name": "b"}], backbone="resnet18",
                                        min_size=64, max_size=96, box_detections_per_img=8,
                                        options={"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30})
    predictor = Predictor(model=build_from_config(config).eval(), config=config, score_threshold=0.05)
    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 50, 70, generator=g), torch.rand(3, 61, 45, generator=g)]
    tta = TTAConfig(scales=(1.0, 0.75), hflip=True, min_score=0.05, mask_threshold=0.4)
    ids = config.category_ids()
    full = [pseudo.to_annotations(p, ids, image_id=i + 1, mask_threshold=tta.mask_threshold)
            for i, p in enumerate(pseudo.predict_tta(predictor.predict, images, tta, scaler=predictor))]
    bounded = pseudo.tta_annotations(predictor, images, tta, ids, image_ids=[1, 2])
    assert sum(len(a) for a in full) > 0
    assert bounded == full


def test_labeler_skips_an_undecodable_row_and_the_count_is_checked(caplog):
    """A corrupt image among unlabeled rows is named and left out (the others are labeled), and
    the candidates count check stops the round only above the allowed fraction."""
    import io

    from PIL import Image

    from model.checkpoint import ModelConfig, build_from_config
    from pipeline.infer.predictor import Predictor

    torch.manual_seed(0)
    config = ModelConfig.for_categories([{"id": 3, "name": "a"}], backbone="resnet18", min_size=64, max_size=96,
                                        box_detections_per_img=4)
    labeler = pseudo.TTALabeler.__new__(pseudo.TTALabeler)
    labeler.config = TTAConfig(scales=(1.0,), hflip=False, min_score=0.0)
    labeler.predictor = Predictor(model=build_from_config(config).eval(), config=config, score_threshold=0.0)
    labeler.category_ids = config.category_ids()
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(buf, format="PNG")
    good = {"image_id": 1, "file_name": "a.png", "width": 50, "height": 40, "image": buf.getvalue()}
    bad = {**good, "image_id": 2, "file_name": "broken.png", "image": buf.getvalue()[:30]}
    with caplog.at_level("WARNING", logger="pipeline.distill.label"):
        out = labeler.label_rows([good, bad])
    assert [r["image_id"] for r in out] == [1]
    assert "image_id=2" in caplog.text and "broken.png" in caplog.text
    assert pseudo._check_skipped(200, 198, "s3://b/pool", 0.01) == 2
    with pytest.raises(MaskrayError, match="3 of 200 images of s3://b/pool could not be decoded"):
        pseudo._check_skipped(200, 197, "s3://b/pool", 0.01)
