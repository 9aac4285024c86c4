"""Keypoints through training's data path: decode, flip (left/right swapped), scale jitter (no Ray)."""

import numpy as np
import pytest
import torch

from pipeline.data.decode import TargetError, decode_target
from pipeline.data.synth import encode_rle
from pipeline.train.transforms import TrainAugment, flip_keypoints, hflip, scale_jitter

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
