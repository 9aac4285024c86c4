"""Keypoints through training's data path: decode, flip (left/right swapped), scale jitter (no Ray)."""

import numpy as np
import pytest
import torch

from pipeline.data.decode import TargetError, decode_target
from pipeline.data.synth import encode_rle
from pipeline.train.data import TrainAugment, flip_keypoints, hflip, scale_jitter

# COCO person: nose, then (left, right) pairs of eyes, ears, shoulders, elbows, wrists, hips, knees, ankles
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def reference_flip(kps: torch.Tensor, width: int, flip_inds: list[int]) -> torch.Tensor:
    """torchvision's references/detection/transforms.py ``_flip_coco_person_keypoints``, with the
    permutation as an argument."""
    flipped_data = kps[:, flip_inds]
    flipped_data[..., 0] = width - flipped_data[..., 0]
    # Maintain COCO convention that if visibility == 0, then x, y = 0
    inds = flipped_data[..., 2] == 0
    flipped_data[inds] = 0
    return flipped_data


def random_keypoints(n: int, k: int, width: int, height: int, seed: int = 0) -> torch.Tensor:
    """``[n, k, 3]`` points inside the image on a quarter-pixel grid (exact in float32, so a
    double mirror is exact), v in {0, 1, 2}, v = 0 points (0, 0, 0)."""
    g = torch.Generator().manual_seed(seed)
    kp = (torch.rand((n, k, 3), generator=g) * torch.tensor([width, height, 1.0]) * 4).round() / 4
    kp[..., 2] = torch.randint(0, 3, (n, k), generator=g).float()
    kp[kp[..., 2] == 0] = 0
    return kp


def test_flip_matches_torchvision_reference_and_twice_is_identity():
    kp = random_keypoints(5, 17, 60, 40)
    assert (kp[..., 2] == 0).any() and (kp[..., 2] == 2).any()
    got = flip_keypoints(kp, 60, COCO_FLIP)
    assert torch.equal(got, reference_flip(kp.clone(), 60, COCO_FLIP))
    assert torch.equal(flip_keypoints(got, 60, COCO_FLIP), kp)
    # left eye (1) of the flipped instance is the mirrored right eye (2) of the original
    visible = kp[:, 2, 2] > 0
    assert torch.equal(got[visible, 1, 0], 60 - kp[visible, 2, 0])
    assert torch.equal(got[visible, 1, 1], kp[visible, 2, 1])


def test_flip_with_an_empty_map_mirrors_without_swapping():
    kp = random_keypoints(3, 4, 50, 30, seed=1)
    got = flip_keypoints(kp, 50, None)
    assert torch.equal(got, reference_flip(kp.clone(), 50, [0, 1, 2, 3]))
    assert torch.equal(flip_keypoints(got, 50, None), kp)


def sample(k: int = 4):
    """A 40x60 image with two instances (boxes, masks) and K keypoints each; None for K = 0."""
    h, w = 40, 60
    image = torch.arange(3 * h * w, dtype=torch.int64).reshape(3, h, w).remainder(251).to(torch.uint8)
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:38, 40:58] = 1
    target = {"boxes": torch.tensor([[10, 5, 30, 15], [40, 20, 58, 38]], dtype=torch.float32),
              "labels": torch.tensor([1, 2]), "masks": masks, "iscrowd": torch.tensor([False, False]),
              "area": masks.flatten(1).sum(1).float()}
    if k:
        kp = torch.zeros((2, k, 3))
        kp[0, :, 0] = torch.linspace(11, 29, k)
        kp[0, :, 1] = 10
        kp[0, :, 2] = 2
        kp[0, 1] = 0  # not labeled
        target["keypoints"] = kp  # instance 1: a category without keypoints (all zeros)
    return image, target


def test_hflip_swaps_left_and_right_with_the_instance():
    image, target = sample(k=4)  # points: 0 = left_a, 1 = right_a (v=0), 2 = left_b, 3 = right_b
    flip_index = [1, 0, 3, 2]
    flipped, t = hflip(image, target, flip_index)
    kp = target["keypoints"]
    assert torch.equal(t["keypoints"], reference_flip(kp.clone(), 60, flip_index))
    assert t["keypoints"][0, 0].tolist() == [0.0, 0.0, 0.0]  # left_a <- right_a, not labeled
    assert t["keypoints"][0, 1].tolist() == [60 - kp[0, 0, 0].item(), 10.0, 2.0]  # right_a <- left_a, mirrored
    assert not t["keypoints"][1].any()  # no keypoints stays none
    # every flipped visible point lies in its flipped box
    vis = t["keypoints"][0, :, 2] > 0
    x = t["keypoints"][0, vis, 0]
    assert bool(((x >= t["boxes"][0, 0]) & (x <= t["boxes"][0, 2])).all())
    back, t2 = hflip(flipped, t, flip_index)
    assert torch.equal(back, image) and torch.equal(t2["keypoints"], kp)


def test_an_image_without_keypoint_categories_is_unaffected():
    image, target = sample(k=0)
    for flip_index in (None, [1, 0, 3, 2]):
        flipped, t = hflip(image, target, flip_index)
        assert "keypoints" not in t
        ref, tref = hflip(image, target)
        assert torch.equal(flipped, ref) and torch.equal(t["boxes"], tref["boxes"])
        assert torch.equal(t["masks"], tref["masks"])
    aug = TrainAugment(hflip_prob=1.0, scale_range=(0.7, 1.3), seed=0, keypoint_flip=[1, 0, 3, 2])
    _, t = aug(image, target)
    assert "keypoints" not in t


def test_scale_jitter_scales_points_and_drops_those_that_leave():
    image, target = sample(k=4)
    out, t = scale_jitter(image, target, 2.0, offset=(0.5, 0.5))  # the centre: shift -30, -20
    assert t["labels"].tolist() == [1, 2] and t["keypoints"].shape == (2, 4, 3)
    kp = target["keypoints"][0]
    for i in range(4):
        x, y, v = kp[i].tolist()
        x2, y2 = 2 * x - 30, 2 * y - 20
        if v == 0 or not (0 <= x2 <= 60 and 0 <= y2 <= 40):
            assert t["keypoints"][0, i].tolist() == [0.0, 0.0, 0.0]
        else:
            assert t["keypoints"][0, i].tolist() == [x2, y2, v]
    assert 0 < (t["keypoints"][0, :, 2] > 0).sum() < (kp[:, 2] > 0).sum()  # a labeled point left
    assert not t["keypoints"][1].any()
    _, t = scale_jitter(image, target, 2.0, offset=(0.0, 0.0))  # top-left quarter: instance 2 leaves
    assert t["labels"].tolist() == [1] and t["keypoints"].shape == (1, 4, 3)
    _, t = scale_jitter(image, target, 0.5, offset=(1.0, 1.0))  # bottom-right: shift 30, 20
    vis = kp[:, 2] > 0
    assert torch.allclose(t["keypoints"][0, vis, :2], kp[vis, :2] * 0.5 + torch.tensor([30.0, 20.0]))
    assert not t["keypoints"][0, ~vis].any() and not t["keypoints"][1].any()


def test_augment_keeps_keypoints_aligned_with_instances():
    image, target = sample(k=4)
    aug = TrainAugment(hflip_prob=0.5, scale_range=(0.5, 2.0), seed=5, keypoint_flip=[1, 0, 3, 2])
    for _ in range(20):
        _, t = aug(image, target)
        n = t["boxes"].shape[0]
        assert t["keypoints"].shape == (n, 4, 3) and t["labels"].shape[0] == n
        for i in range(n):  # labeled points of an instance lie in its box; instance 2 has none
            pts = t["keypoints"][i][t["keypoints"][i, :, 2] > 0]
            if t["labels"][i] == 2:
                assert pts.numel() == 0
            box = t["boxes"][i]
            assert bool(((pts[:, 0] >= box[0] - 1) & (pts[:, 0] <= box[2] + 1)).all())
            assert bool(((pts[:, 1] >= box[1] - 1) & (pts[:, 1] <= box[3] + 1)).all())


def _ann(i, cat, mask, keypoints=None):
    ann = {"id": i, "category_id": cat, "bbox": [0.0, 0.0, 4.0, 4.0], "area": 16.0, "iscrowd": False,
           "segmentation": encode_rle(mask)}
    if keypoints is not None:
        ann["keypoints"] = keypoints
    return ann


def test_decode_target_keypoints():
    mask = np.zeros((8, 10), dtype=np.uint8)
    mask[:4, :4] = 1
    anns = [_ann(1, 3, mask, [1.5, 2.0, 2, 7.0, 7.0, 0, 3.0, 1.0, 1]), _ann(2, 7, mask), _ann(3, 7, mask, [])]
    t = decode_target(anns, 8, 10, [3, 7], num_keypoints=3)
    assert t["keypoints"].dtype == torch.float32 and t["keypoints"].shape == (3, 3, 3)
    assert t["keypoints"][0].tolist() == [[1.5, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]]
    assert not t["keypoints"][1:].any()
    assert decode_target([], 8, 10, [3, 7], num_keypoints=3)["keypoints"].shape == (0, 3, 3)
    assert "keypoints" not in decode_target(anns, 8, 10, [3, 7])  # not a keypoint model
    with pytest.raises(TargetError, match="annotation 1: 9 keypoint values, expected 3 x 2"):
        decode_target(anns, 8, 10, [3, 7], num_keypoints=2)
    bad = [_ann(4, 3, mask, [1.0, 1.0, 3, 0, 0, 0, 0, 0, 0])]
    with pytest.raises(TargetError, match="annotation 4: keypoint visibility"):
        decode_target(bad, 8, 10, [3, 7], num_keypoints=3)


# --------------------------------------------------------------------------- through the model


def _row(image_id: int, instances: list[tuple[tuple[int, int, int, int], list[float] | None]], size: int = 64):
    """A shard row: a gray image with one bright rectangle per instance ``((x0, y0, x1, y1), keypoints)``."""
    from pipeline.data.synth import encode_png

    img = np.full((size, size, 3), 40, dtype=np.uint8)
    anns = []
    for i, ((x0, y0, x1, y1), kps) in enumerate(instances):
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 1
        img[mask.astype(bool)] = 200
        anns.append({**_ann(image_id * 10 + i, 1, mask, kps), "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": float(mask.sum())})
    return {"image_id": image_id, "width": size, "height": size, "image": encode_png(img), "annotations": anns}


def _batch(rows, k: int):
    """Rows through the train stream's decode (``DecodeAugment``, no flip) and ``collate``, as
    Ray Data hands them to a worker (one object array per column)."""
    from pipeline.train.data import DecodeAugment
    from pipeline.train.data import collate

    fn = DecodeAugment([1], hflip_prob=0.0, num_keypoints=k, keypoint_flip=[1, 0, 2])
    decoded = [out for row in rows for out in fn(row)]
    batch = {}
    for key in decoded[0]:
        column = np.empty(len(decoded), dtype=object)
        column[:] = [d[key] for d in decoded]
        batch[key] = column
    return collate(batch)


def _keypoint_model(seed: int = 0):
    """A small keypoint & mask model with frozen BN (one image's loss does not depend on the others')
    and few proposals (every positive RoI is sampled: no randomness in the keypoint loss)."""
    from model.checkpoint import ModelConfig, build_from_config

    torch.manual_seed(seed)
    config = ModelConfig.for_categories([{"id": 1, "name": "thing", "keypoints": ["left", "right", "top"]}],
                                        backbone="resnet18", min_size=64, max_size=64, norm="frozen_bn",
                                        num_keypoints=3, options={
                                            "fpn_channels": 32, "box_head_dim": 64, "mask_head_channels": [16],
                                            "keypoint_head_channels": [32, 32],
                                            "anchor_sizes": [[16], [32], [64], [128], [256]],
                                            "rpn_post_nms_top_n_train": 30, "box_batch_size_per_image": 512})
    return build_from_config(config).train()


def test_no_visible_keypoint_gives_no_loss_and_no_nan():
    seen = [1.5, 2.0, 2, 14.0, 2.0, 1, 8.0, 12.0, 2]  # left, right (labeled, not visible), top
    unseen = [0.0, 0.0, 0, 0.0, 0.0, 0, 0.0, 0.0, 0]
    a = _row(1, [((4, 4, 20, 20), [v + (4 if i % 3 < 2 else 0) for i, v in enumerate(seen)])])
    b = _row(2, [((30, 30, 60, 60), unseen), ((5, 40, 25, 60), None)])  # instances, no labeled point
    c = _row(3, [])  # no instance at all
    model = _keypoint_model()

    images, targets = _batch([b, c], k=3)
    assert [t["keypoints"].shape for t in targets] == [(2, 3, 3), (0, 3, 3)]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_keypoint"].item() == 0.0
    sum(losses.values()).backward()
    for p in model.roi_heads.keypoint_predictor.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any())

    torch.manual_seed(1)
    alone = model(*_batch([a], k=3))["loss_keypoint"]
    torch.manual_seed(1)
    mixed = model(*_batch([a, b, c], k=3))["loss_keypoint"]
    assert alone.item() > 0 and torch.isfinite(mixed)
    # b and c add RoIs but no labeled keypoint: the mean over labeled (RoI, keypoint) pairs is a's alone
    assert mixed.item() == pytest.approx(alone.item(), rel=1e-4)


# --------------------------------------------------------------------------- config and plan

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
FIVE = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]


def _dataset(root, categories, images=8):
    from pipeline.data.format import Manifest, ShardInfo, manifest_uri, write_manifest

    shards = [ShardInfo(path="part-00000.parquet", images=images, instances=images)]
    write_manifest(manifest_uri(str(root)), Manifest(categories=categories, shards=shards))
    return str(root)


def _config(tmp_path, categories, *, model=None, data=None, eval=None, augment=None):
    from pipeline.train.config import TrainConfig

    train = _dataset(tmp_path / "train", categories)
    val = _dataset(tmp_path / "val", categories)
    return TrainConfig.from_dict({
        "name": "kp", "storage_path": str(tmp_path / "runs"), "images_per_worker": 2,
        "data": {"train": train, "val": val, **(data or {})}, "schedule": {"max_iters": 10, "warmup_iters": 1},
        "model": {"backbone": "resnet18", "num_keypoints": 5, **(model or {})},
        "eval": {"kpt_oks_sigmas": [0.05] * 5} if eval is None else eval, "augment": augment or {}})


def test_the_coco_keypoint_recipe_loads():
    from pipeline.train.config import load_config

    cfg = load_config(str(REPO / "configs" / "coco-keypoints-r50-fpn.yaml"))
    assert cfg.model.num_keypoints == 17 and cfg.model.masks is False
    assert cfg.augment.min_sizes == [640, 672, 704, 736, 768, 800] and cfg.model.min_size == 800
    assert cfg.schedule.max_iters == 90000 and cfg.schedule.steps == [60000, 80000]
    assert cfg.lr == 0.02 and cfg.global_batch == cfg.optim.reference_batch == 16
    assert cfg.model.options["box_nms_thresh"] == 0.5
    assert cfg.data.keypoint_flip_map is None and cfg.eval.kpt_oks_sigmas == []
    joint = load_config(str(REPO / "configs" / "coco-keypoints-r50-fpn.yaml"), ["model.masks=true"])
    assert joint.model.masks is True


def test_plan_derives_the_flip_map_from_names_or_takes_the_given_one(tmp_path):
    from pipeline.train.engine import plan_run

    cats = [{"id": 1, "name": "face", "keypoints": FIVE}, {"id": 2, "name": "ball"}]
    plan = plan_run(_config(tmp_path, cats))
    assert plan.keypoint_flip == [0, 2, 1, 4, 3]
    given = plan_run(_config(tmp_path, cats, data={"keypoint_flip_map": [["left_eye", "right_eye"]]}))
    assert given.keypoint_flip == [0, 2, 1, 3, 4]
    assert plan_run(_config(tmp_path, cats, data={"keypoint_flip_map": []})).keypoint_flip == [0, 1, 2, 3, 4]
    assert plan_run(_config(tmp_path, cats, model={"num_keypoints": 0})).keypoint_flip == []
    # the checkpoint's model config keeps the names (show and COCO export read them)
    mc = _config(tmp_path, cats).model.model_config(plan.categories)
    assert mc.categories[0]["keypoints"] == FIVE and "keypoints" not in mc.categories[1]


def test_plan_refuses_keypoint_settings_that_do_not_fit(tmp_path):
    from pipeline.train.config import ConfigError
    from pipeline.train.engine import plan_run

    cats = [{"id": 1, "name": "face", "keypoints": FIVE}]
    with pytest.raises(ConfigError, match=r"^eval\.kpt_oks_sigmas: 4 sigmas for model\.num_keypoints=5$"):
        plan_run(_config(tmp_path, cats, eval={"kpt_oks_sigmas": [0.05] * 4}))
    with pytest.raises(ConfigError, match=r"eval\.kpt_oks_sigmas: needed for model\.num_keypoints=5"):
        plan_run(_config(tmp_path, cats, eval={}))
    with pytest.raises(ConfigError, match=r"category 1 \(face\) of data\.train names 5 keypoints"):
        plan_run(_config(tmp_path, cats, model={"num_keypoints": 4}, eval={"kpt_oks_sigmas": [0.05] * 4}))
    with pytest.raises(ConfigError, match=r"model\.num_keypoints=5: no category of data\.train"):
        plan_run(_config(tmp_path, [{"id": 1, "name": "ball"}]))
    with pytest.raises(ConfigError, match=r"^data\.keypoint_flip_map: .*unknown keypoint 'left_toe'"):
        plan_run(_config(tmp_path, cats, data={"keypoint_flip_map": [["left_toe", "nose"]]}))
    with pytest.raises(ConfigError, match=r"augment\.min_sizes: 2000 is above model\.max_size=1333"):
        plan_run(_config(tmp_path, cats, augment={"min_sizes": [640, 2000]}))


def test_keypoint_metrics_reach_the_console_tensorboard_and_the_result():
    from pipeline.train.engine import TrainResult
    from pipeline.train.hooks import flat_eval, format_eval_line

    metrics = {"bbox": {"AP": 0.5, "AP50": 0.8}, "segm": {"AP": 0.4, "AP50": 0.7},
               "keypoints": {"AP": 0.3, "AP50": 0.65, "APm": None}}
    line = format_eval_line(400, metrics, 100, 2.0)
    assert line == ("eval iter 400: bbox AP 0.500 AP50 0.800 | segm AP 0.400 AP50 0.700 | keypoints AP 0.300 "
                    "AP50 0.650  (100 images, 2.0 s)")
    flat = flat_eval(metrics)
    assert flat["keypoints_AP50"] == 0.65 and flat["keypoints_APm"] is None
    assert TrainResult(None, {**flat, "loss": 1.0}).eval_metrics() == metrics
    only = format_eval_line(10, {"bbox": {"AP": 0.5, "AP50": 0.8}, "keypoints": {"AP": 0.3, "AP50": 0.6}}, 4, 1.0)
    assert only == "eval iter 10: bbox AP 0.500 AP50 0.800 | keypoints AP 0.300 AP50 0.600  (4 images, 1.0 s)"


def test_an_image_without_detections_exports_no_keypoint_result():
    from pipeline.instances import Instances

    empty = Instances((96, 96), torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                      keypoints=torch.zeros((0, 7, 3)))
    assert empty.to_coco(1, [1, 2, 3]) == []  # an untrained model's eval meets such images
