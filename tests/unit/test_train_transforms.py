"""Train augmentation keeps image, boxes and masks aligned (no Ray)."""

import torch

from pipeline.train.data import TrainAugment, drop_crowd_and_degenerate, hflip, scale_jitter


def sample(h=40, w=60):
    """One image with two rectangles whose masks and boxes agree exactly."""
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1  # box (10, 5, 30, 15)
    masks[1, 20:38, 40:58] = 1  # box (40, 20, 58, 38)
    image[0][masks[0].bool()] = 200
    image[1][masks[1].bool()] = 150
    target = {
        "boxes": torch.tensor([[10, 5, 30, 15], [40, 20, 58, 38]], dtype=torch.float32),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
        "iscrowd": torch.tensor([False, False]),
        "area": masks.flatten(1).sum(1).float(),
    }
    return image, target


def mask_boxes(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_hflip_moves_boxes_with_masks_and_pixels():
    image, target = sample()
    flipped, t = hflip(image, target)
    assert torch.equal(t["boxes"], torch.tensor([[30, 5, 50, 15], [2, 20, 20, 38]], dtype=torch.float32))
    assert torch.equal(t["boxes"], mask_boxes(t["masks"]))
    assert torch.equal(flipped[0] > 0, t["masks"][0].bool())
    back, t2 = hflip(flipped, t)
    assert torch.equal(back, image) and torch.equal(t2["boxes"], target["boxes"])


def test_scale_up_crops_and_keeps_alignment():
    image, target = sample()
    out, t = scale_jitter(image, target, 2.0, offset=(0.0, 0.0))  # keep the top-left quarter
    assert out.shape == image.shape and t["masks"].shape[1:] == image.shape[1:]
    # the first rectangle doubles to (20, 10, 60, 30); the second leaves the canvas and is dropped
    assert t["labels"].tolist() == [1]
    assert torch.equal(t["boxes"], torch.tensor([[20, 10, 60, 30]], dtype=torch.float32))
    assert torch.equal(t["boxes"], mask_boxes(t["masks"]))
    assert t["area"].tolist() == [800.0]
    assert torch.equal(out[0] > 100, t["masks"][0].bool())


def test_scale_down_pads_and_keeps_alignment():
    image, target = sample()
    out, t = scale_jitter(image, target, 0.5, offset=(1.0, 1.0))  # bottom-right corner
    assert out.shape == image.shape
    assert t["labels"].tolist() == [1, 2]
    assert torch.equal(t["boxes"], torch.tensor([[35, 22.5, 45, 27.5], [50, 30, 59, 39]]))
    assert out[:, :20, :30].sum() == 0  # padding
    got = mask_boxes(t["masks"])
    assert torch.allclose(got, t["boxes"], atol=1.0)


def test_augment_is_random_but_seeded():
    image, target = sample()
    a = TrainAugment(hflip_prob=0.5, scale_range=(0.5, 1.5), seed=3)
    b = TrainAugment(hflip_prob=0.5, scale_range=(0.5, 1.5), seed=3)
    outs = [a(image, target) for _ in range(6)]
    for (im1, t1), (im2, t2) in zip(outs, [b(image, target) for _ in range(6)]):
        assert torch.equal(im1, im2) and torch.equal(t1["boxes"], t2["boxes"])
    assert len({tuple(t["boxes"].flatten().tolist()) for _, t in outs}) > 1
    for _, t in outs:
        assert t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0]


def test_crowd_and_degenerate_instances_are_dropped():
    _, target = sample()
    target["iscrowd"] = torch.tensor([True, False])
    target["boxes"][1] = torch.tensor([40, 20, 40.5, 38])
    kept = drop_crowd_and_degenerate(target)
    assert kept["labels"].numel() == 0 and kept["masks"].shape == (0, 40, 60)


def test_empty_target_passes_through():
    image = torch.zeros((3, 16, 16), dtype=torch.uint8)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
              "masks": torch.zeros((0, 16, 16), dtype=torch.uint8), "iscrowd": torch.zeros((0,), dtype=torch.bool),
              "area": torch.zeros((0,))}
    out, t = TrainAugment(hflip_prob=1.0, scale_range=(0.7, 1.3), seed=0)(image, target)
    assert out.shape == image.shape and t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 16, 16)


def test_dropping_instances_keeps_keypoints_aligned():
    _, target = sample()
    target["keypoints"] = torch.tensor([[[12.0, 6.0, 2.0]], [[41.0, 21.0, 1.0]]])
    target["iscrowd"] = torch.tensor([True, False])
    kept = drop_crowd_and_degenerate(target)
    assert kept["labels"].tolist() == [2] and kept["keypoints"].tolist() == [[[41.0, 21.0, 1.0]]]


def test_empty_keypoint_target_passes_through():
    image = torch.zeros((3, 16, 16), dtype=torch.uint8)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
              "masks": torch.zeros((0, 16, 16), dtype=torch.uint8), "keypoints": torch.zeros((0, 5, 3))}
    _, t = TrainAugment(hflip_prob=1.0, scale_range=(0.7, 1.3), seed=0, keypoint_flip=[0, 2, 1, 4, 3])(image, target)
    assert t["keypoints"].shape == (0, 5, 3)


def test_every_copy_ray_sends_to_a_task_draws_its_own_augmentation():
    """Ray pickles the decode + augment function into every read task of every epoch. Each copy
    must draw its own flips, crops and scales: a pickled generator restarted every copy at one
    state, so the k-th image of a task got the same flip in every epoch (frozen augmentation).
    A seeded augmentation keeps its state (every copy alike: reproducible tests)."""
    from ray import cloudpickle

    from pipeline.train.data import DecodeAugment

    image, target = sample()
    fn = DecodeAugment([1, 2], hflip_prob=0.5, scale_range=(0.5, 1.5), crop=32)
    blob = cloudpickle.dumps(fn)
    epochs = [cloudpickle.loads(blob) for _ in range(2)]

    def flips(copy):  # 64 images, in the order one task meets them
        return [tuple(copy.augment(image, target)[1]["boxes"].flatten().tolist()) for _ in range(64)]

    assert flips(epochs[0]) != flips(epochs[1])  # equal by chance: 2^-64 for the flips alone
    assert [epochs[0]._crop_rng.random() for _ in range(4)] != [epochs[1]._crop_rng.random() for _ in range(4)]
    seeded = cloudpickle.dumps(DecodeAugment([1, 2], hflip_prob=0.5, scale_range=(0.5, 1.5), seed=7))
    assert flips(cloudpickle.loads(seeded)) == flips(cloudpickle.loads(seeded))
