"""The fused multi-level RoIAlign (maskray::multi_level_roi_align) behind model.ops.MultiScaleRoIAlign:
one op call for all FPN levels, parity with torchvision.ops.MultiScaleRoIAlign forward and
backward (empty levels, zero RoIs, RoIs that map to no level), scale inference, registration."""

from collections import OrderedDict

import pytest
import torch
import torchvision

import roi_reference

from model import ops


def _pyramid(batch, channels, height, width, levels, generator, dtype=torch.float32):
    return OrderedDict(
        (f"p{i}", torch.randn(batch, channels, -(-height // (4 << i)), -(-width // (4 << i)), generator=generator,
                              dtype=dtype).requires_grad_(True))
        for i in range(levels)
    )


def _boxes(count, height, width, generator, low=4.0, high=600.0):
    size = torch.exp(torch.empty(count, 2).uniform_(float(torch.log(torch.tensor(low))),
                                                    float(torch.log(torch.tensor(high))), generator=generator))
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def _compare(features, boxes, shapes, output_size, sampling_ratio, tol=1e-5):
    names = list(features)
    ours = ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    out, ref = ours(features, boxes, shapes), theirs(features, boxes, shapes)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    leaves = list(features.values())
    if out.numel():
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
        for a, b, f in zip(got, want, leaves):
            a = torch.zeros_like(f) if a is None else a
            b = torch.zeros_like(f) if b is None else b
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert ours.scales == theirs.scales
    assert (ours.map_levels.k_min, ours.map_levels.k_max) == (theirs.map_levels.k_min, theirs.map_levels.k_max)
    return out


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (14, 2), ((3, 5), -1), (7, 0)])
def test_parity_with_torchvision_forward_backward(output_size, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    features = _pyramid(2, 5, 320, 416, 4, g)
    boxes = [_boxes(40, 320, 416, g), _boxes(25, 320, 416, g)]
    # RoIs torchvision maps to no level (negative area: NaN level) and degenerate ones
    boxes[0] = torch.cat([boxes[0], torch.tensor([[50.0, 10.0, 40.0, 90.0], [5.0, 5.0, 5.0, 5.0],
                                                  [-30.0, -30.0, -10.0, -10.0]])])
    out = _compare(features, boxes, [(320, 416), (300, 400)], output_size, sampling_ratio)
    assert out[40].abs().sum() == 0  # the negative-area RoI


def test_empty_levels_and_zero_rois():
    g = torch.Generator().manual_seed(1)
    features = _pyramid(2, 3, 256, 256, 4, g)
    small = [_boxes(12, 256, 256, g, 2.0, 20.0), _boxes(7, 256, 256, g, 2.0, 20.0)]  # all on the finest level
    _compare(features, small, [(256, 256)] * 2, 7, 2)
    large = [_boxes(5, 256, 256, g, 700.0, 900.0), torch.zeros(0, 4)]  # all on the coarsest, image 1 has none
    _compare(features, large, [(256, 256)] * 2, 7, 2)
    none = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = _compare(features, none, [(256, 256)] * 2, 7, 2)
    assert out.shape == (0, 3, 7, 7)
    (grad,) = torch.autograd.grad(ops.MultiScaleRoIAlign(["p0", "p1"], 7, 2)(features, none, [(256, 256)] * 2).sum(),
                                  features["p0"])
    assert not grad.any()


@pytest.mark.parametrize("image,feature_sizes", [
    ((800, 1088), [(200, 272), (100, 136), (50, 68), (25, 34)]),
    ((333, 517), [(84, 130), (42, 65), (21, 33), (11, 17)]),  # sizes that round: scales still powers of 2
    ((640, 480), [(80, 60), (40, 30), (20, 15)]),              # starts at stride 8: k_min 3
])
def test_scale_inference_matches_torchvision(image, feature_sizes):
    g = torch.Generator().manual_seed(2)
    features = OrderedDict((f"f{i}", torch.randn(1, 2, h, w, generator=g).requires_grad_(True))
                           for i, (h, w) in enumerate(feature_sizes))
    _compare(features, [_boxes(30, image[0], image[1], g)], [image], 7, 2)


def test_one_op_call_for_all_levels():
    g = torch.Generator().manual_seed(3)
    features = _pyramid(2, 4, 256, 256, 4, g)
    boxes = [_boxes(20, 256, 256, g), _boxes(20, 256, 256, g)]
    pooler = ops.MultiScaleRoIAlign(list(features), 7, 2)
    with roi_reference.OpLog() as log:
        out = pooler(features, boxes, [(256, 256)] * 2)
    assert log.names.count("maskray::multi_level_roi_align") == 1
    assert "maskray::roi_align" not in log.names
    # no per-level gathers, scatters or index_put in forward
    assert not [n for n in log.names if n.startswith("aten::index") or "scatter" in n or "where" in n]
    with roi_reference.OpLog() as log:
        torch.autograd.grad(out.sum(), list(features.values()))
    assert log.names.count("maskray::multi_level_roi_align_backward") == 1


def test_opcheck_gradcheck_and_compile():
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, 2, 16 >> i, 12 >> i, generator=g, dtype=torch.float64, requires_grad=True)
             for i in range(3)]
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 30.0], [1, 0.0, 0.0, 60.0, 50.0], [0, 3.0, 3.0, 9.0, 8.0],
                         [1, 10.0, 5.0, 200.0, 190.0]], dtype=torch.float64)
    args = ([0.25, 0.125, 0.0625], 3, 2, 2, True, 2, 4, 224.0, 4.0, 1e-6)
    torch.library.opcheck(torch.ops.maskray.multi_level_roi_align.default, (feats, rois, *args))
    grad = torch.randn(4, 2, 3, 2, generator=g, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.maskray.multi_level_roi_align_backward.default,
        (grad, rois, args[0], 3, 2, 2, 2, [16, 8, 4], [12, 6, 3], 2, True, 2, 4, 224.0, 4.0, 1e-6, False),
    )

    def f(*levels):
        return torch.ops.maskray.multi_level_roi_align(list(levels), rois, *args)

    assert torch.autograd.gradcheck(f, tuple(feats))
    assert torch.autograd.gradgradcheck(f, tuple(feats))

    features = _pyramid(1, 3, 64, 64, 2, g)
    boxes = [torch.tensor([[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 60.0, 63.0]])]
    pooler = ops.MultiScaleRoIAlign(list(features), 4, 2)
    eager = pooler(features, boxes, [(64, 64)])
    compiled = torch.compile(lambda x, b: pooler(x, b, [(64, 64)]), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(features, boxes), eager)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_and_autocast(dtype):
    g = torch.Generator().manual_seed(5)
    features = _pyramid(2, 3, 128, 160, 3, g)
    boxes = [_boxes(15, 128, 160, g), _boxes(9, 128, 160, g)]
    shapes = [(128, 160)] * 2
    cast = OrderedDict((k, v.detach().to(dtype)) for k, v in features.items())
    ours = ops.MultiScaleRoIAlign(list(features), 7, 2)(cast, [b.to(dtype) for b in boxes], shapes)
    assert ours.dtype == dtype
    # reference: torchvision in float64 on the same rounded inputs
    ref = torchvision.ops.MultiScaleRoIAlign(list(features), 7, 2)(
        OrderedDict((k, v.double()) for k, v in cast.items()), [b.to(dtype).double() for b in boxes], shapes)
    tol = {torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = ops.MultiScaleRoIAlign(list(features), 7, 2)(cast, boxes, shapes)
            b = torchvision.ops.MultiScaleRoIAlign(list(features), 7, 2)(cast, boxes, shapes)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
