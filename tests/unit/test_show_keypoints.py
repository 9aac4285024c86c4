"""Keypoints in overlays: dots and skeleton lines where the score/visibility passes, at the
expected positions, sized to stay readable on a 12-MP photo (4000 x 3000)."""

from __future__ import annotations

import torch

from pipeline.instances import Instances
from pipeline.show.draw import draw_instances, keypoint_sizes, label_colors, render_overlay

H, W = 3000, 4000
# x, y, score: a visible head and hand, a hidden (low-score) foot; skeleton head-hand, hand-foot
POINTS = [[1000.0, 800.0, 9.0], [2600.0, 1600.0, 3.0], [1200.0, 2400.0, 0.5]]
SKELETON = [[1, 2], [2, 3]]


def photo() -> tuple[torch.Tensor, Instances]:
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    inst = Instances((H, W), torch.tensor([[300.0, 300.0, 3700.0, 2700.0]]), torch.tensor([0.9]),
                     torch.tensor([1]), None, torch.tensor([POINTS]))
    return image, inst


def colour_at(out: torch.Tensor, x: float, y: float) -> tuple[int, ...]:
    return tuple(out[:, int(round(y)), int(round(x))].tolist())


def test_sizes_grow_with_the_picture():
    assert keypoint_sizes(1280) == (5, 3)
    r, w = keypoint_sizes(4000)
    assert r >= 15 and w >= 9


def test_overlay_of_a_12mp_photo_shows_points_and_skeleton_where_expected():
    image, inst = photo()
    out = render_overlay(image, inst, ["person"], skeletons=[SKELETON], long_side=1280)
    scale = 1280 / W
    colour = label_colors(2)[1]
    assert out.shape == (3, 960, 1280)
    radius, _ = keypoint_sizes(1280)
    for x, y, _ in POINTS[:2]:  # drawn: the instance's colour at the point and within its radius
        assert colour_at(out, x * scale, y * scale) == colour
        assert colour_at(out, x * scale + radius - 1, y * scale) == colour
        assert colour_at(out, x * scale + radius + 1, y * scale) == (0, 0, 0)  # the black ring
    hx, hy = POINTS[2][0] * scale, POINTS[2][1] * scale
    assert colour_at(out, hx, hy) == (0, 0, 0)  # score below kp_thresh: no dot
    mid = ((POINTS[0][0] + POINTS[1][0]) / 2 * scale, (POINTS[0][1] + POINTS[1][1]) / 2 * scale)
    assert colour_at(out, *mid) == colour  # the head-hand line, in the instance's colour
    mid_hidden = ((POINTS[1][0] + POINTS[2][0]) / 2 * scale, (POINTS[1][1] + POINTS[2][1]) / 2 * scale)
    assert colour_at(out, *mid_hidden) == (0, 0, 0)  # no line to a hidden point
    # without a skeleton: the dots only
    bare = render_overlay(image, inst, ["person"], long_side=1280)
    assert colour_at(bare, *mid) == (0, 0, 0) and colour_at(bare, POINTS[0][0] * scale, POINTS[0][1] * scale) == colour
    # a lower threshold shows the hidden one too
    low = render_overlay(image, inst, ["person"], skeletons=[SKELETON], long_side=1280, kp_thresh=0.0)
    assert colour_at(low, hx, hy) == colour and colour_at(low, *mid_hidden) == colour


def test_full_size_drawing_scales_dots_to_the_photo():
    image, inst = photo()
    out = draw_instances(image, inst, ["person"], skeletons=[SKELETON])
    colour = label_colors(2)[1]
    radius, width = keypoint_sizes(W)
    x, y, _ = POINTS[0]
    assert colour_at(out, x, y) == colour and colour_at(out, x + radius - 2, y) == colour
    drawn = (out != 0).any(0)
    # the head's dot: a disc of about pi * r^2 pixels, readable at 12 MP (not a 2-px speck)
    disc = drawn[int(y) - radius - 8:int(y) + radius + 9, int(x) - radius - 8:int(x) + radius + 9]
    assert disc.sum() >= 3.14 * radius ** 2 * 0.9
    assert colour_at(out, *POINTS[2][:2]) == (0, 0, 0)


def test_ground_truth_visibility_v2_drawn_v1_not():
    """Ground truth holds v in the score's place: v = 2 passes the default threshold, v = 1 and 0 do not."""
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    ann = {"category_id": 7, "bbox": [2, 20, 60, 42], "keypoints": [10, 35, 2, 30, 45, 1, 50, 55, 0]}
    inst = Instances.from_coco([ann], (64, 64), [7])
    out = render_overlay(image, inst, ["thing"], long_side=64, score_thresh=0.5)
    colour = label_colors(2)[1]
    assert colour_at(out, 10, 35) == colour
    assert colour_at(out, 30, 45) == (0, 0, 0) and colour_at(out, 50, 55) == (0, 0, 0)
