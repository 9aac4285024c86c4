"""model.ops RoIAlign on CPU: against a slow pure-Python reference and torchvision.ops.roi_align,
gradcheck, torch.library.opcheck, list boxes, malformed boxes, torch.compile, the poolers."""

from collections import OrderedDict

import pytest
import torch
import torchvision

import roi_reference

from model import ops
from model.errors import MaskrayError

SCALES = [1.0, 0.25, 1 / 32]


def make_rois(batch, height, width, spatial_scale, count, generator, dtype=torch.float32):
    """Boxes in image coordinates: random ones inside and across the border, plus special cases."""
    x1 = torch.rand(count, generator=generator) * (1.3 * width) - 0.3 * width
    y1 = torch.rand(count, generator=generator) * (1.3 * height) - 0.3 * height
    w = torch.rand(count, generator=generator) * 0.8 * width
    h = torch.rand(count, generator=generator) * 0.8 * height
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    special = torch.tensor([
        [2.0, 3.0, 2.0, 3.0],                               # empty (zero size)
        [1.2, 1.1, 1.7, 1.5],                               # smaller than a pixel
        [-5.0, -6.0, -2.0, -1.5],                           # fully outside, top-left
        [width + 2.0, height + 1.0, width + 6.0, height + 9.0],  # fully outside, bottom-right
        [-2.0, -2.0, width + 2.0, height + 2.0],            # larger than the map
        [width - 1.5, height - 2.0, width + 0.5, height + 0.7],  # across the bottom-right border
    ])
    boxes = torch.cat([boxes, special]) / spatial_scale
    ids = torch.randint(0, batch, (boxes.shape[0], 1), generator=generator).float()
    return torch.cat([ids, boxes], 1).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("spatial_scale", SCALES)
def test_forward_matches_reference_and_torchvision(aligned, sampling_ratio, spatial_scale, gen):
    x = torch.randn(2, 2, 9, 11, generator=gen)
    rois = make_rois(2, 9, 11, spatial_scale, 4, gen)
    out = ops.roi_align(x, rois, (3, 4), spatial_scale, sampling_ratio, aligned)
    ref = roi_reference.roi_align(x, rois, (3, 4), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    tv = torchvision.ops.roi_align(x, rois, (3, 4), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, tv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_forward_and_backward_match_torchvision_larger(aligned, sampling_ratio, gen):
    x = torch.randn(3, 16, 40, 52, generator=gen, requires_grad=True)
    rois = make_rois(3, 40, 52, 0.25, 60, gen)
    grad = torch.randn(rois.shape[0], 16, 7, 7, generator=gen)
    ours = ops.roi_align(x, rois, 7, 0.25, sampling_ratio, aligned)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    tv = torchvision.ops.roi_align(x, rois, 7, 0.25, sampling_ratio, aligned)
    (g_tv,) = torch.autograd.grad(tv, x, grad)
    torch.testing.assert_close(ours, tv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_tv, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input(gen):
    base = torch.randn(2, 11, 9, 3, generator=gen)
    x = base.permute(0, 3, 2, 1)  # [2, 3, 9, 11], not contiguous
    assert not x.is_contiguous()
    rois = make_rois(2, 9, 11, 1.0, 5, gen)
    out = ops.roi_align(x, rois, 2, 1.0, 2, True)
    torch.testing.assert_close(out, roi_reference.roi_align(x, rois, (2, 2), 1.0, 2, True).float(), rtol=1e-5, atol=1e-5)
    # non-contiguous output gradient too
    xg = x.detach().requires_grad_(True)
    grad = torch.randn(2, 2, rois.shape[0], 3, generator=gen).permute(2, 3, 0, 1)
    (g_ours,) = torch.autograd.grad(ops.roi_align(xg, rois, 2, 1.0, 2, True), xg, grad)
    (g_tv,) = torch.autograd.grad(torchvision.ops.roi_align(xg, rois, 2, 1.0, 2, True), xg, grad)
    torch.testing.assert_close(g_ours, g_tv, rtol=1e-5, atol=1e-5)


def test_zero_rois():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.zeros(0, 5)
    out = ops.roi_align(x, rois, 5)
    assert out.shape == (0, 3, 5, 5)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert ops.roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], 5).shape == (0, 3, 5, 5)


def test_empty_feature_map_gives_zeros():
    x = torch.randn(1, 2, 0, 5, requires_grad=True)
    out = ops.roi_align(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    assert out.shape == (1, 2, 2, 2) and not out.any()
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_empty_and_outside_boxes_give_zeros():
    x = torch.randn(1, 2, 8, 8) + 10.0
    rois = torch.tensor([[0, 3.0, 3.0, 3.0, 3.0], [0, 20.0, 20.0, 30.0, 30.0], [0, -9.0, -9.0, -2.0, -2.0]])
    out = ops.roi_align(x, rois, 2, aligned=True)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_forward_backward(dtype, gen):
    x = torch.randn(2, 4, 20, 24, generator=gen)
    rois = make_rois(2, 20, 24, 0.5, 20, gen)
    grad = torch.randn(rois.shape[0], 4, 5, 5, generator=gen)
    x32 = x.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(ops.roi_align(x32, rois, 5, 0.5, 2, True), x32, grad)
    out32 = ops.roi_align(x, rois, 5, 0.5, 2, True)
    xd = x.to(dtype).requires_grad_(True)
    out = ops.roi_align(xd, rois.to(dtype), 5, 0.5, 2, True)
    (g,) = torch.autograd.grad(out, xd, grad.to(dtype))
    assert out.dtype == dtype and g.dtype == dtype
    tol = {torch.float64: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    # reduced-precision boxes move the samples a little: compare loosely, relative to the scale
    if dtype == torch.float64:
        torch.testing.assert_close(out.float(), out32, rtol=tol, atol=tol)
        torch.testing.assert_close(g.float(), g32, rtol=tol, atol=tol)
    else:
        same_boxes = rois.to(dtype).float()
        ref = ops.roi_align(x.to(dtype).float(), same_boxes, 5, 0.5, 2, True)
        x_ref = x.to(dtype).float().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(ops.roi_align(x_ref, same_boxes, 5, 0.5, 2, True), x_ref, grad.to(dtype).float())
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(g.float(), g_ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# gradients, registration, compile
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (True, 2), (True, -1)])
def test_gradcheck_float64(aligned, sampling_ratio, gen):
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = make_rois(2, 7, 8, 0.5, 3, gen, torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 0.5, sampling_ratio, aligned), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 0.5, sampling_ratio, aligned), (x,))


def test_opcheck(gen):
    x = torch.randn(2, 3, 10, 12, generator=gen, requires_grad=True)
    rois = make_rois(2, 10, 12, 0.5, 4, gen)
    torch.library.opcheck(torch.ops.maskray.roi_align.default, (x, rois, 0.5, 3, 4, 2, True))
    grad = torch.randn(rois.shape[0], 3, 3, 4, generator=gen)
    torch.library.opcheck(
        torch.ops.maskray.roi_align_backward.default, (grad, rois, 0.5, 3, 4, 2, 3, 10, 12, 2, True, False)
    )


def test_torch_compile_fullgraph(gen):
    x = torch.randn(2, 3, 16, 16, generator=gen, requires_grad=True)
    boxes = [torch.tensor([[1.0, 2.0, 20.0, 30.0]]), torch.tensor([[0.0, 0.0, 40.0, 40.0], [5.0, 5.0, 9.0, 9.0]])]

    def f(t, b):
        return ops.roi_align(t, b, 4, 0.5, 2, True).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, boxes)
    (g,) = torch.autograd.grad(out, x)
    (g_ref,) = torch.autograd.grad(f(x, boxes), x)
    torch.testing.assert_close(out, f(x, boxes))
    torch.testing.assert_close(g, g_ref)


def test_deterministic_mode_cpu(gen):
    x = torch.randn(2, 3, 12, 12, generator=gen, requires_grad=True)
    rois = make_rois(2, 12, 12, 1.0, 30, gen)
    (g1,) = torch.autograd.grad(ops.roi_align(x, rois, 3, 1.0, 2).sum(), x)
    torch.use_deterministic_algorithms(True)
    try:
        (g2,) = torch.autograd.grad(ops.roi_align(x, rois, 3, 1.0, 2).sum(), x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(g1, g2)


# ---------------------------------------------------------------------------------------
# boxes: list form and malformed input
# ---------------------------------------------------------------------------------------


def test_list_of_boxes_equals_tensor_form(gen):
    x = torch.randn(3, 2, 10, 10, generator=gen)
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 7.0], [0.0, 2.0, 9.0, 9.5]]), torch.zeros(0, 4), torch.tensor([[3.0, 3.0, 5.0, 8.0]])]
    rois = ops.convert_boxes_to_roi_format(boxes)
    assert rois[:, 0].tolist() == [0.0, 0.0, 2.0]
    out = ops.roi_align(x, boxes, 3, 1.0, 2, True)
    torch.testing.assert_close(out, ops.roi_align(x, rois, 3, 1.0, 2, True))
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, boxes, 3, 1.0, 2, True))
    torch.testing.assert_close(ops.roi_align(x, tuple(boxes), 3), torchvision.ops.roi_align(x, boxes, 3))


@pytest.mark.parametrize(
    "boxes,match",
    [
        (torch.zeros(3, 4), r"Tensor\[K, 5\]"),
        (torch.zeros(3), r"Tensor\[K, 5\]"),
        ([torch.zeros(2, 5)], r"boxes\[0\] must be a Tensor\[L, 4\]"),
        ([torch.zeros(2, 4), "nope"], r"boxes\[1\]"),
        ("boxes", "must be a Tensor"),
        (torch.zeros(2, 5, dtype=torch.float64), "dtype"),
        ([torch.zeros(2, 4, dtype=torch.float16)], "dtype"),
        (torch.zeros(2, 5, device="meta"), "device"),
        (torch.tensor([[2.0, 0, 0, 4, 4]]), r"batch indices in \[0, 1\]"),
        (torch.tensor([[-1.0, 0, 0, 4, 4]]), "batch indices"),
        ([torch.zeros(1, 4)] * 3, "3 box lists for an input batch of 2"),
    ],
)
def test_malformed_boxes_raise_clear_errors(boxes, match):
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(MaskrayError, match=match) as info:
        ops.roi_align(x, boxes, 2)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_malformed_input_raises():
    with pytest.raises(MaskrayError, match=r"Tensor\[N, C, H, W\]"):
        ops.roi_align(torch.zeros(2, 8, 8), torch.zeros(1, 5), 2)
    with pytest.raises(MaskrayError, match="floating point"):
        ops.roi_align(torch.zeros(1, 2, 8, 8, dtype=torch.int64), torch.zeros(1, 5, dtype=torch.int64), 2)


def test_op_checks_batch_index_itself():
    # the raw op must not read out of bounds either
    with pytest.raises(ValueError, match="not a batch index"):
        torch.ops.maskray.roi_align(torch.randn(1, 1, 4, 4), torch.tensor([[3.0, 0, 0, 2, 2]]), 1.0, 2, 2, -1, False)


# ---------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------


def test_roi_align_module_matches_torchvision(gen):
    x = torch.randn(2, 3, 12, 12, generator=gen)
    rois = make_rois(2, 12, 12, 0.5, 6, gen)
    ours, theirs = ops.RoIAlign((3, 2), 0.5, 2, aligned=True), torchvision.ops.RoIAlign((3, 2), 0.5, 2, aligned=True)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois))
    assert "RoIAlign(output_size=(3, 2)" in repr(ours)


@pytest.mark.parametrize("levels", [1, 4])
def test_multiscale_matches_torchvision(levels, gen):
    names = [str(i) for i in range(levels)]
    features = OrderedDict((n, torch.randn(2, 4, 64 >> i, 48 >> i, generator=gen, requires_grad=True))
                           for i, n in enumerate(names))
    features["pool"] = torch.randn(2, 4, 2, 2, generator=gen)  # not pooled from
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [10.0, 10.0, 180.0, 250.0], [0.0, 0.0, 191.0, 255.0]]),
             torch.tensor([[5.0, 5.0, 100.0, 120.0], [3.0, 4.0, 9.0, 10.0]])]
    shapes = [(256, 192), (250, 180)]
    ours = ops.MultiScaleRoIAlign(names, 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    out, ref = ours(features, boxes, shapes), theirs(features, boxes, shapes)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    leaves = [features[n] for n in names]
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours.scales == theirs.scales
    assert list(ours.state_dict()) == [] and list(ours.parameters()) == []
    assert repr(ours) == repr(theirs)


def test_multiscale_inside_torchvision_roi_heads(gen):
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.faster_rcnn import TwoMLPHead, FastRCNNPredictor

    pooler = ops.MultiScaleRoIAlign(["0", "1"], 7, 2)
    heads = RoIHeads(pooler, TwoMLPHead(4 * 49, 16), FastRCNNPredictor(16, 3),
                     0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 10)
    reference = RoIHeads(torchvision.ops.MultiScaleRoIAlign(["0", "1"], 7, 2), TwoMLPHead(4 * 49, 16),
                         FastRCNNPredictor(16, 3), 0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 10)
    reference.load_state_dict(heads.state_dict(), strict=True)
    heads.eval()
    reference.eval()
    features = OrderedDict([("0", torch.randn(1, 4, 32, 32, generator=gen)), ("1", torch.randn(1, 4, 16, 16, generator=gen))])
    proposals = [torch.tensor([[2.0, 3.0, 60.0, 50.0], [10.0, 20.0, 100.0, 120.0], [0.0, 0.0, 127.0, 127.0]])]
    with torch.no_grad():
        det, _ = heads(features, proposals, [(128, 128)])
        ref, _ = reference(features, proposals, [(128, 128)])
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(det[0][k], ref[0][k])


def test_autocast_matches_torchvision(gen):
    x = torch.randn(2, 3, 16, 16, generator=gen).bfloat16()
    boxes = [torch.tensor([[1.0, 2.0, 20.0, 30.0]]), torch.tensor([[0.0, 0.0, 40.0, 40.0]])]  # float32 boxes
    features = OrderedDict([("0", x), ("1", x[:, :, ::2, ::2])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.roi_align(x, boxes, 4, 0.5, 2, True)
        theirs = torchvision.ops.roi_align(x, boxes, 4, 0.5, 2, True)
        pooled = ops.MultiScaleRoIAlign(["0", "1"], 3, 2)(features, boxes, [(32, 32)] * 2)
        pooled_tv = torchvision.ops.MultiScaleRoIAlign(["0", "1"], 3, 2)(features, boxes, [(32, 32)] * 2)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)
    assert pooled.dtype == pooled_tv.dtype
    torch.testing.assert_close(pooled, pooled_tv)
