"""RoIAlign on hostile input: non-finite boxes, bad batch indices, bad scales, huge boxes.

Every case gets a clear RoIAlignInputError from model.ops, a ValueError from the raw CPU ops
(torch.ops.maskray.*), and never a crash or an out-of-bounds access (see also `make sanitize`).
"""

import math
import time
from collections import OrderedDict

import pytest
import torch

from model import ops
from model.errors import MaskrayError

NAN, INF = float("nan"), float("inf")


def _x(batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _assert_clear(info, *fragments):
    message = str(info.value)
    assert isinstance(info.value, ops.RoIAlignInputError)
    assert isinstance(info.value, MaskrayError) and isinstance(info.value, ValueError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("column", [1, 2, 3, 4])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_box_is_a_clear_error(column, value):
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0], [1, 2.0, 2.0, 9.0, 9.0]])
    rois[1, column] = value
    with pytest.raises(ops.RoIAlignInputError) as info:
        ops.roi_align(_x(), rois, 4, 1.0, -1, True)
    _assert_clear(info, "row 1", "non-finite")
    boxes = [rois[:1, 1:], rois[1:, 1:]]
    with pytest.raises(ops.RoIAlignInputError, match="non-finite"):
        ops.roi_align(_x(), boxes, 4)
    # the raw op (no Python checks) raises too, forward and backward
    with pytest.raises(ValueError, match=r"rois\[1\].*non-finite"):
        torch.ops.maskray.roi_align(_x(), rois, 1.0, 4, 4, -1, True)
    with pytest.raises(ValueError, match="non-finite"):
        torch.ops.maskray.roi_align_backward(torch.ones(2, 3, 4, 4), rois, 1.0, 4, 4, 2, 3, 16, 16, -1, True, False)


def test_float32_overflow_from_a_float64_box_is_caught():
    # a COCO-style bbox above float32's max (3.4e38) becomes inf when the boxes are cast
    boxes = torch.tensor([[0.0, 0.0, 3.5e38, 10.0]], dtype=torch.float64).float()
    with pytest.raises(ops.RoIAlignInputError, match="non-finite"):
        ops.roi_align(_x(1), [boxes], 2)


@pytest.mark.parametrize("index", [NAN, INF, -INF, 0.5, 1.999, -1.0, 2.0, 1e30])
def test_bad_batch_index_is_a_clear_error(index):
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0], [index, 2.0, 2.0, 9.0, 9.0]])
    with pytest.raises(ops.RoIAlignInputError) as info:
        ops.roi_align(_x(), rois, 4)
    _assert_clear(info, "batch indices in [0, 1]", "row 1")
    with pytest.raises(ValueError, match=r"rois\[1"):
        torch.ops.maskray.roi_align(_x(), rois, 1.0, 4, 4, -1, False)


@pytest.mark.parametrize("scale", [0.0, -0.25, NAN, INF, -INF])
def test_bad_spatial_scale_is_a_clear_error(scale):
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0]])
    with pytest.raises(ops.RoIAlignInputError) as info:
        ops.roi_align(_x(), rois, 4, scale)
    _assert_clear(info, "spatial_scale must be finite and positive")
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.maskray.roi_align(_x(), rois, scale, 4, 4, -1, False)
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.maskray.roi_align_backward(torch.ones(1, 3, 4, 4), rois, scale, 4, 4, 2, 3, 16, 16, -1, False, False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(output_size=0), "output_size"),
    (dict(output_size=(3, 5000)), "output_size"),
    (dict(output_size=4, sampling_ratio=65), "sampling_ratio must be at most 64"),
])
def test_bad_sizes_are_clear_errors(kwargs, match):
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0]])
    with pytest.raises(ops.RoIAlignInputError, match=match):
        ops.roi_align(_x(), rois, **kwargs)
    with pytest.raises(ValueError, match="sampling_ratio|output size"):
        size = kwargs["output_size"] if isinstance(kwargs["output_size"], tuple) else (kwargs["output_size"],) * 2
        torch.ops.maskray.roi_align(_x(), rois, 1.0, size[0], size[1], kwargs.get("sampling_ratio", -1), False)


def test_huge_box_adaptive_sampling_is_capped_and_bounded():
    """ceil(1e8 / 7) samples per bin side would overflow grid_h * grid_w and take minutes:
    the grid is capped at 64 per side, so adaptive sampling equals sampling_ratio=64."""
    x = _x().requires_grad_(True)
    # row 1: adaptive grid ceil(2000 / 7) = 286 > 64, and its samples (4.5 px apart) land in the map
    rois = torch.tensor([[0, -1e8, -1e8, 1e8, 1e8], [1, 0.0, 0.0, 2000.0, 2000.0], [0, 3.0, -1e8, 7.0, 1e8]] * 4)
    start = time.monotonic()
    out = ops.roi_align(x, rois, 7, 1.0, -1, True)
    (grad,) = torch.autograd.grad(out.sum(), x)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"huge boxes took {elapsed:.1f} s"
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    capped = ops.roi_align(x, rois, 7, 1.0, ops.MAX_SAMPLING_GRID, True)
    torch.testing.assert_close(out, capped, rtol=0, atol=0)
    # the map is sampled (not all zeros) where the box crosses it
    assert out[1].abs().sum() > 0


def test_cap_leaves_normal_boxes_unchanged():
    # a bin of exactly 64 feature pixels per side: adaptive grid 64 = torchvision's
    import torchvision

    x = torch.randn(1, 2, 500, 500, generator=torch.Generator().manual_seed(1))
    rois = torch.tensor([[0, 10.0, 20.0, 10.0 + 448, 20.0 + 447.5], [0, 0.0, 0.0, 100.0, 60.0]])
    torch.testing.assert_close(ops.roi_align(x, rois, 7, 1.0, -1, False),
                               torchvision.ops.roi_align(x, rois, 7, 1.0, -1, False), rtol=1e-5, atol=1e-5)


def test_overflowing_box_extent_gives_finite_output():
    # finite corners whose difference overflows float32 (inf extent, inf * 0 = NaN samples)
    x = _x().requires_grad_(True)
    rois = torch.tensor([[0, -3e38, 2.0, 3e38, 9.0], [1, -3e38, -3e38, 3e38, 3e38]])
    for aligned in (False, True):
        out = ops.roi_align(x, rois, 3, 1.0, -1, aligned)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_multiscale_rejects_non_finite_boxes_and_raw_op_checks_scales():
    features = OrderedDict([("0", torch.randn(1, 2, 32, 32)), ("1", torch.randn(1, 2, 16, 16))])
    pooler = ops.MultiScaleRoIAlign(["0", "1"], 3, 2)
    with pytest.raises(ops.RoIAlignInputError, match="non-finite"):
        pooler(features, [torch.tensor([[0.0, 0.0, NAN, 10.0]])], [(128, 128)])
    rois = torch.tensor([[0, 1.0, 1.0, 50.0, 50.0]])
    fmaps = list(features.values())
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.maskray.multi_level_roi_align(fmaps, rois, [0.25, NAN], 3, 3, 2, False, 2, 3, 224.0, 4.0, 1e-6)
    with pytest.raises(ValueError, match=r"rois\[0, 0\]"):
        torch.ops.maskray.multi_level_roi_align(
            fmaps, torch.tensor([[1.5, 1.0, 1.0, 5.0, 5.0]]), [0.25, 0.125], 3, 3, 2, False, 2, 3, 224.0, 4.0, 1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        torch.ops.maskray.multi_level_roi_align(
            fmaps, torch.tensor([[0, 1.0, INF, 5.0, 5.0]]), [0.25, 0.125], 3, 3, 2, False, 2, 3, 224.0, 4.0, 1e-6)
    assert math.isfinite(float(ops.roi_align(fmaps[0], rois, 3, 0.25).sum()))
