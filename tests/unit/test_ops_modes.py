"""The pooling modes of Mask R-CNN's Table 2 as modes of our op (CPU): RoIPool against
torchvision.ops.roi_pool, ROIAlignV2 against torchvision.ops.roi_align(aligned=True), RoIWarp
against a slow pure-Python reference; gradcheck and opcheck of every mode, the fused
multi-level path of every mode against per-level pooling with torchvision's LevelMapper,
hostile input in every mode, and build_maskrcnn(pooler=...) training one step in each."""

import math
import time
from collections import OrderedDict

import pytest
import torch
import torchvision
from test_model_maskrcnn import _synthetic_batch  # images with rectangles and exact targets
from torchvision.ops import poolers as tv_poolers

import roi_reference

from model import build_maskrcnn, ops
from model.errors import MaskrayError

MODES = list(ops.POOLER_MODES)
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------


def _quantize(rois, scale):
    """rois with corners rounded to the feature grid (in feature pixels), computed as the kernel does:
    x * scale in the boxes' dtype, then round half away from zero (exact: trunc and the fraction are exact)."""
    v = rois[:, 1:] * torch.tensor(scale, dtype=rois.dtype)
    t = torch.trunc(v)
    rounded = torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)
    return torch.cat([rois[:, :1], rounded], 1)


def _torchvision_pool(mode, feature, rois, output_size, scale, sampling_ratio):
    """One level pooled by torchvision in `mode` (RoIWarp: torchvision's RoIAlign on the rounded box)."""
    if mode == "roipool":
        return torchvision.ops.roi_pool(feature, rois, output_size, scale)
    if mode == "roiwarp":
        return torchvision.ops.roi_align(feature, _quantize(rois, scale), output_size, 1.0, sampling_ratio, False)
    return torchvision.ops.roi_align(feature, rois, output_size, scale, sampling_ratio, mode == "roialign_v2")


def _rois(batch, height, width, scale, count, generator, dtype=torch.float32, huge=True):
    """Boxes for a `height` x `width` feature map at `scale` (in image coordinates): random ones inside
    and across the border, plus tiny, empty, inverted, outside and huge ones, and corners on exact
    halves of a feature pixel. `huge=False` leaves out the box whose adaptive grid exceeds our cap
    of 64 samples per bin side (where RoIAlign differs from torchvision's uncapped grid by design)."""
    x1 = torch.rand(count, generator=generator) * 1.4 * width - 0.3 * width
    y1 = torch.rand(count, generator=generator) * 1.4 * height - 0.3 * height
    w = torch.rand(count, generator=generator) * 0.8 * width
    h = torch.rand(count, generator=generator) * 0.8 * height
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    special = torch.tensor([
        [2.0, 3.0, 2.0, 3.0],                                    # empty
        [2.2, 3.1, 2.4, 3.3],                                    # tiny (sub-pixel)
        [6.0, 6.0, 2.0, 1.0],                                    # inverted
        [-9.0, -9.0, -3.0, -4.0],                                # outside
        [width + 3.0, 1.0, width + 9.0, 5.0],                    # outside, right
        [-40.0 * width, -40.0 * height, 40.0 * width, 40.0 * height] if huge else [1.0, 1.0, 5.0, 5.0],
        [0.5, 1.5, width - 2.5, height - 0.5],                   # halves (scale 1): round away from zero
        [-1.5, -0.5, 2.5, 3.5],
    ])
    boxes = torch.cat([boxes, special]) / scale
    ids = torch.randint(0, batch, (boxes.shape[0], 1), generator=generator).float()
    return torch.cat([ids, boxes], 1).to(dtype)


def _distinct(shape, generator, dtype=torch.float64):
    """A tensor of distinct values at least 1/numel apart (no ties: RoIPool's argmax is stable under gradcheck)."""
    n = math.prod(shape)
    return (torch.randperm(n, generator=generator).to(dtype) / n - 0.5).reshape(shape)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------
# single level: each mode against its reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_size,scale,shape", [
    ((7, 7), 0.25, (2, 3, 20, 26)),
    ((3, 5), 1.0, (1, 2, 11, 9)),
    ((1, 1), 1 / 16, (2, 2, 6, 7)),
    ((14, 14), 0.5, (1, 4, 33, 17)),
])
def test_roi_pool_equals_torchvision(dtype, output_size, scale, shape, gen):
    x = torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)
    rois = _rois(shape[0], shape[2], shape[3], scale, 40, gen, dtype)
    ours = ops.roi_pool(x, rois, output_size, scale)
    ref = torchvision.ops.roi_pool(x, rois, output_size, scale)
    assert ours.dtype == dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # a max selects one value: exact
    grad = torch.randn(ours.shape, generator=gen, dtype=dtype)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-6)
    # the raw op's argmax is the flat input index of each output (torchvision: index in the plane)
    out, argmax = torch.ops.maskray.roi_pool(x.detach(), rois, scale, *output_size)
    hit = argmax >= 0
    torch.testing.assert_close(x.detach().reshape(-1)[argmax[hit]], out[hit], rtol=0, atol=0)


def test_roi_pool_list_boxes_empty_and_module_forms(gen):
    x = torch.randn(2, 3, 16, 16, generator=gen, requires_grad=True)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]]), torch.tensor([[0.0, 0.0, 15.0, 15.0], [3.0, 3.0, 4.0, 4.0]])]
    torch.testing.assert_close(ops.roi_pool(x, boxes, 3, 1.0), torchvision.ops.roi_pool(x, boxes, 3, 1.0))
    for empty in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)], []):
        out = ops.roi_pool(x, empty, (2, 3))
        assert out.shape == (0, 3, 2, 3)
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        assert grad is None or not grad.any()


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roialign_v2_equals_torchvision_aligned(sampling_ratio, gen):
    x = torch.randn(2, 3, 24, 30, generator=gen, requires_grad=True)
    rois = _rois(2, 24, 30, 0.25, 40, gen, huge=False)
    ours = roi_reference.ours("roialign_v2", x, rois, (7, 7), 0.25, sampling_ratio)
    ref = torchvision.ops.roi_align(x, rois, (7, 7), 0.25, sampling_ratio, aligned=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ours.shape, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                               rtol=1e-5, atol=1e-5)
    # the single-level pooler in mode roialign_v2 is the same
    pooler = ops.MultiScaleRoIAlign(["0"], 7, sampling_ratio, mode="roialign_v2")
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    got = pooler({"0": x}, boxes, [(96, 120)] * 2)
    want = torchvision.ops.roi_align(x, boxes, 7, 0.25, sampling_ratio, aligned=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned,sampling_ratio,scale,output_size", [
    (False, -1, 1.0, (3, 4)),
    (False, 2, 0.25, (2, 2)),
    (True, -1, 0.5, (3, 3)),
    (True, 3, 1 / 3, (4, 2)),
])
def test_roi_warp_matches_python_reference(aligned, sampling_ratio, scale, output_size, gen):
    x = torch.randn(2, 2, 9, 11, generator=gen, dtype=torch.float64)
    rois = _rois(2, 9, 11, scale, 10, gen, torch.float64)
    ours = ops.roi_warp(x, rois, output_size, scale, sampling_ratio, aligned)
    ref = roi_reference.roi_warp(x, rois, output_size, scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # RoIWarp = RoIAlign on the rounded box, in feature pixels
    torch.testing.assert_close(
        ours, ops.roi_align(x, _quantize(rois, scale), output_size, 1.0, sampling_ratio, aligned), rtol=0, atol=0)


def test_roi_warp_differs_from_roi_align_and_rounds_half_away_from_zero():
    x = torch.arange(2 * 8 * 8, dtype=torch.float64).reshape(2, 1, 8, 8)
    rois = torch.tensor([[0, 0.5, 1.5, 5.5, 6.5], [1, -1.5, -0.5, 2.5, 3.4]], dtype=torch.float64)
    warped = ops.roi_warp(x, rois, 2, 1.0, 2)
    # rounded: (1, 2, 6, 7) and (-2, -1, 3, 3)
    quantized = torch.tensor([[0, 1.0, 2.0, 6.0, 7.0], [1, -2.0, -1.0, 3.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(warped, ops.roi_align(x, quantized, 2, 1.0, 2), rtol=0, atol=0)
    assert not torch.allclose(warped, ops.roi_align(x, rois, 2, 1.0, 2))


def test_default_mode_is_torchvision_roialign_bit_for_bit(gen):
    """mode 0 passed explicitly or left out: the same kernel and the same bits (aligned=False default)."""
    x = torch.randn(2, 3, 20, 20, generator=gen)
    rois = _rois(2, 20, 20, 0.25, 30, gen)
    a = torch.ops.maskray.roi_align(x, rois, 0.25, 7, 7, 2, False)
    b = torch.ops.maskray.roi_align(x, rois, 0.25, 7, 7, 2, False, 0)
    assert torch.equal(a, b)
    assert torch.equal(ops.MultiScaleRoIAlign(["0"], 7, 2)({"0": x}, [rois[:, 1:]], [(80, 80)]),
                       ops.roi_align(x, [rois[:, 1:]], 7, 0.25, 2, False))
    assert ops.MultiScaleRoIAlign(["0"], 7, 2).mode == "roialign"


# ---------------------------------------------------------------------------------------
# gradcheck and opcheck, every mode
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_single_level(mode, gen):
    x = _distinct((2, 2, 7, 8), gen).requires_grad_(True)
    rois = torch.tensor([[0, 1.0, 2.0, 10.0, 13.0], [1, -2.0, 0.4, 15.0, 9.0], [0, 3.0, 3.0, 4.0, 4.5],
                         [1, 0.0, 0.0, 15.9, 13.9]], dtype=torch.float64)

    def f(t):
        return roi_reference.ours(mode, t, rois, (3, 2), 0.5, 2)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_multi_level(mode, gen):
    feats = [_distinct((2, 2, 16 >> i, 12 >> i), gen).requires_grad_(True) for i in range(3)]
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 30.0], [1, 0.0, 0.0, 60.0, 50.0], [0, 3.0, 3.0, 9.0, 8.0],
                         [1, 10.0, 5.0, 200.0, 190.0]], dtype=torch.float64)
    mapper = tv_poolers.LevelMapper(2, 4)

    def f(*levels):
        return ops.multi_level_roi_align(list(levels), rois, (3, 2), 2, [0.25, 0.125, 0.0625], mapper, mode=mode)

    assert torch.autograd.gradcheck(f, tuple(feats))
    assert torch.autograd.gradgradcheck(f, tuple(feats))


def test_opcheck_every_mode(gen):
    x = _distinct((2, 2, 7, 8), gen).requires_grad_(True)
    rois = torch.tensor([[0, 1.0, 2.0, 10.0, 13.0], [1, -2.0, 0.4, 15.0, 9.0], [0, 3.0, 3.0, 4.0, 4.5]],
                        dtype=torch.float64)
    m = torch.ops.maskray
    for aligned in (False, True):
        for mode in (ops.MODE_ALIGN, ops.MODE_WARP):
            torch.library.opcheck(m.roi_align.default, (x, rois, 0.5, 3, 4, 2, aligned, mode))
            grad = torch.randn(3, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            torch.library.opcheck(
                m.roi_align_backward.default, (grad, rois, 0.5, 3, 4, 2, 2, 7, 8, 2, aligned, False, mode))
    torch.library.opcheck(m.roi_pool.default, (x, rois, 0.5, 3, 4))
    _, argmax = m.roi_pool(x.detach(), rois, 0.5, 3, 4)
    grad = torch.randn(3, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(m.roi_pool_backward.default, (grad, argmax, 2, 2, [7], [8], False))

    feats = [_distinct((2, 2, 16 >> i, 12 >> i), gen).requires_grad_(True) for i in range(3)]
    mrois = torch.tensor([[0, 1.0, 2.0, 20.0, 30.0], [1, 0.0, 0.0, 60.0, 50.0], [1, 10.0, 5.0, 200.0, 190.0]],
                         dtype=torch.float64)
    scales = [0.25, 0.125, 0.0625]
    torch.library.opcheck(m.multi_level_roi_align.default,
                          (feats, mrois, scales, 3, 2, 2, False, 2, 4, 224.0, 4.0, 1e-6, ops.MODE_WARP))
    mgrad = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        m.multi_level_roi_align_backward.default,
        (mgrad, mrois, scales, 3, 2, 2, 2, [16, 8, 4], [12, 6, 3], 2, True, 2, 4, 224.0, 4.0, 1e-6, False,
         ops.MODE_WARP),
    )
    torch.library.opcheck(m.multi_level_roi_pool.default, (feats, mrois, scales, 3, 2, 2, 4, 224.0, 4.0, 1e-6))
    _, margmax = m.multi_level_roi_pool([f.detach() for f in feats], mrois, scales, 3, 2, 2, 4, 224.0, 4.0, 1e-6)
    torch.library.opcheck(m.roi_pool_backward.default, (mgrad, margmax, 2, 2, [16, 8, 4], [12, 6, 3], False))


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph_every_mode(mode, gen):
    features = OrderedDict((f"p{i}", torch.randn(1, 3, 64 >> i, 64 >> i, generator=gen)) for i in range(2))
    boxes = [torch.tensor([[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 60.0, 63.0]])]
    pooler = ops.MultiScaleRoIAlign(list(features), 4, 2, mode=mode)
    eager = pooler(features, boxes, [(64, 64)])
    compiled = torch.compile(lambda x, b: pooler(x, b, [(64, 64)]), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(features, boxes), eager)


# ---------------------------------------------------------------------------------------
# fused multi-level path = per-level pooling with torchvision's LevelMapper, every mode
# ---------------------------------------------------------------------------------------


def _per_level_reference(mode, features, boxes, shapes, output_size, sampling_ratio):
    """torchvision's _multiscale_roi_align with the per-level pooling of `mode`."""
    x = list(features.values())
    scales, mapper = tv_poolers._setup_scales(x, shapes, 224, 4)
    rois = ops.convert_boxes_to_roi_format(boxes)
    levels = mapper(boxes)
    result = torch.zeros((rois.shape[0], x[0].shape[1]) + output_size, dtype=x[0].dtype)
    for level, (feature, scale) in enumerate(zip(x, scales)):
        idx = torch.where(levels == level)[0]
        result[idx] = _torchvision_pool(mode, feature, rois[idx], output_size, scale, sampling_ratio).to(result.dtype)
    return result


def _boxes(count, height, width, generator, low=4.0, high=600.0):
    size = torch.exp(torch.empty(count, 2).uniform_(math.log(low), math.log(high), generator=generator))
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("output_size,sampling_ratio", [((7, 7), 2), ((3, 5), -1)])
def test_multi_level_equals_per_level_torchvision(mode, output_size, sampling_ratio):
    g = torch.Generator().manual_seed(7)
    features = OrderedDict(
        (f"p{i}", torch.randn(2, 3, -(-160 // (4 << i)), -(-208 // (4 << i)), generator=g).requires_grad_(True))
        for i in range(4))
    boxes = [_boxes(30, 160, 208, g), _boxes(20, 160, 208, g)]
    # no level (negative area), degenerate, outside
    boxes[0] = torch.cat([boxes[0], torch.tensor([[50.0, 10.0, 40.0, 90.0], [5.0, 5.0, 5.0, 5.0],
                                                  [-30.0, -30.0, -10.0, -10.0]])])
    boxes[1] = torch.cat([boxes[1], torch.zeros(0, 4)])
    shapes = [(160, 208), (150, 200)]
    pooler = ops.MultiScaleRoIAlign(list(features), output_size, sampling_ratio, mode=mode)
    out = pooler(features, boxes, shapes)
    ref = _per_level_reference(mode, features, boxes, shapes, output_size, sampling_ratio)
    tol = 0 if mode == "roipool" else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert out[30].abs().sum() == 0  # the negative-area RoI maps to no level
    grad = torch.randn(out.shape, generator=g)
    leaves = list(features.values())
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
    for a, b, f in zip(got, want, leaves):
        a = torch.zeros_like(f) if a is None else a
        b = torch.zeros_like(f) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_multi_level_one_op_call_and_empty(mode):
    g = torch.Generator().manual_seed(3)
    features = OrderedDict((f"p{i}", torch.randn(2, 4, 64 >> i, 64 >> i, generator=g).requires_grad_(True))
                           for i in range(3))
    pooler = ops.MultiScaleRoIAlign(list(features), 7, 2, mode=mode)
    with roi_reference.OpLog() as log:
        out = pooler(features, [_boxes(10, 256, 256, g), _boxes(5, 256, 256, g)], [(256, 256)] * 2)
    op = "maskray::multi_level_roi_pool" if mode == "roipool" else "maskray::multi_level_roi_align"
    assert log.names.count(op) == 1
    with roi_reference.OpLog() as log:
        torch.autograd.grad(out.sum(), list(features.values()))
    backward = "maskray::roi_pool_backward" if mode == "roipool" else "maskray::multi_level_roi_align_backward"
    assert log.names.count(backward) == 1
    none = pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(256, 256)] * 2)
    assert none.shape == (0, 4, 7, 7)
    (grad,) = torch.autograd.grad(none.sum(), features["p0"], allow_unused=True)
    assert grad is None or not grad.any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_every_mode(mode, dtype):
    g = torch.Generator().manual_seed(5)
    features = OrderedDict((f"p{i}", torch.randn(2, 3, 32 >> i, 40 >> i, generator=g).to(dtype)) for i in range(3))
    boxes = [_boxes(12, 128, 160, g).to(dtype), _boxes(7, 128, 160, g).to(dtype)]
    ours = ops.MultiScaleRoIAlign(list(features), 7, 2, mode=mode)(features, boxes, [(128, 160)] * 2)
    assert ours.dtype == dtype
    # the kernels compute in float32 for half types: float32 on the same rounded inputs
    ref = ops.MultiScaleRoIAlign(list(features), 7, 2, mode=mode)(
        OrderedDict((k, v.float()) for k, v in features.items()), [b.float() for b in boxes], [(128, 160)] * 2)
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(ours.float(), ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# hostile input, every mode
# ---------------------------------------------------------------------------------------


def _x(batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad,match", [
    ((1, 2, NAN), "non-finite"), ((1, 3, INF), "non-finite"), ((1, 1, -INF), "non-finite"),
    ((1, 0, 2.0), "batch indices"), ((1, 0, -1.0), "batch indices"), ((1, 0, 0.5), "batch indices"),
    ((1, 0, NAN), "batch indices"),
])
def test_hostile_boxes_raise_in_every_mode(mode, bad, match):
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0], [1, 2.0, 2.0, 9.0, 9.0]])
    row, column, value = bad
    rois[row, column] = value
    with pytest.raises(ops.RoIAlignInputError, match=match) as info:
        roi_reference.ours(mode, _x(), rois, 4, 1.0, -1)
    assert isinstance(info.value, MaskrayError) and isinstance(info.value, ValueError)
    assert "row 1" in str(info.value)
    # the pooler (fused multi-level path)
    features = OrderedDict([("0", torch.randn(2, 2, 32, 32)), ("1", torch.randn(2, 2, 16, 16))])
    pooler = ops.MultiScaleRoIAlign(["0", "1"], 3, 2, mode=mode)
    if column > 0:
        with pytest.raises(ops.RoIAlignInputError, match="non-finite"):
            pooler(features, [rois[:1, 1:], rois[1:, 1:]], [(128, 128)] * 2)
    # the raw CPU ops raise ValueError themselves
    with pytest.raises(ValueError, match=r"rois\[1"):
        if mode == "roipool":
            torch.ops.maskray.roi_pool(_x(), rois, 1.0, 4, 4)
        else:
            torch.ops.maskray.roi_align(_x(), rois, 1.0, 4, 4, -1, mode == "roialign_v2", ops.POOLER_MODES[mode][0])
    fmaps = list(features.values())
    with pytest.raises(ValueError, match=r"rois\[1"):
        if mode == "roipool":
            torch.ops.maskray.multi_level_roi_pool(fmaps, rois, [0.25, 0.125], 3, 3, 2, 3, 224.0, 4.0, 1e-6)
        else:
            torch.ops.maskray.multi_level_roi_align(fmaps, rois, [0.25, 0.125], 3, 3, 2, False, 2, 3, 224.0, 4.0,
                                                    1e-6, ops.POOLER_MODES[mode][0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs,match", [
    (dict(output_size=0), "output_size"),
    (dict(output_size=(3, 5000)), "output_size"),
    (dict(output_size=4, spatial_scale=0.0), "spatial_scale"),
    (dict(output_size=4, spatial_scale=NAN), "spatial_scale"),
    (dict(output_size=4, spatial_scale=-INF), "spatial_scale"),
])
def test_bad_parameters_raise_in_every_mode(mode, kwargs, match):
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0]])
    with pytest.raises(ops.RoIAlignInputError, match=match):
        roi_reference.ours(mode, _x(), rois, kwargs["output_size"], kwargs.get("spatial_scale", 1.0), -1)
    size = kwargs["output_size"] if isinstance(kwargs["output_size"], tuple) else (kwargs["output_size"],) * 2
    scale = kwargs.get("spatial_scale", 1.0)
    with pytest.raises(ValueError, match="output size|spatial_scale"):
        if mode == "roipool":
            torch.ops.maskray.roi_pool(_x(), rois, scale, *size)
        else:
            torch.ops.maskray.roi_align(_x(), rois, scale, *size, -1, False, ops.POOLER_MODES[mode][0])


def test_bad_modes_and_sampling_ratio_are_clear_errors():
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 8.0]])
    with pytest.raises(ops.RoIAlignInputError, match="sampling_ratio must be at most 64"):
        ops.roi_warp(_x(), rois, 4, 1.0, 65)
    with pytest.raises(ValueError, match=r"mode must be 0 \(RoIAlign\) or 1 \(RoIWarp\), got 2 \(RoIPool is"):
        torch.ops.maskray.roi_align(_x(), rois, 1.0, 4, 4, -1, False, 2)
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.maskray.roi_align_backward(torch.ones(1, 3, 4, 4), rois, 1.0, 4, 4, 2, 3, 16, 16, -1, False, False,
                                             -1)
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.maskray.multi_level_roi_align([_x()], rois, [1.0], 3, 3, 2, False, 2, 2, 224.0, 4.0, 1e-6, 7)
    for bad in ("roi_align", "RoIAlign", "roialignv2", ""):
        with pytest.raises(MaskrayError, match="roialign, roialign_v2, roiwarp, roipool"):
            ops.MultiScaleRoIAlign(["0"], 7, 2, mode=bad)


def test_roi_pool_backward_rejects_bad_argmax():
    grad = torch.ones(1, 2, 2, 2)
    argmax = torch.zeros(1, 2, 2, 2, dtype=torch.int64)  # channel 1's outputs pointing into channel 0
    with pytest.raises(ValueError, match="argmax"):
        torch.ops.maskray.roi_pool_backward(grad, argmax, 1, 2, [4], [4], False)
    for value in (32, -2, 10**15):
        with pytest.raises(ValueError, match="argmax"):
            torch.ops.maskray.roi_pool_backward(grad, torch.full((1, 2, 2, 2), value), 1, 2, [4], [4], False)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.maskray.roi_pool_backward(grad, argmax.int(), 1, 2, [4], [4], False)
    ok = torch.ops.maskray.roi_pool_backward(grad, torch.full((1, 2, 2, 2), -1), 1, 2, [4], [4], False)
    assert len(ok) == 1 and not ok[0].any()


@pytest.mark.parametrize("mode", MODES)
def test_huge_and_overflowing_boxes_are_finite_and_bounded(mode):
    x = _x().requires_grad_(True)
    rois = torch.tensor([[0, -1e8, -1e8, 1e8, 1e8], [1, 0.0, 0.0, 2000.0, 2000.0], [0, 3.0, -1e8, 7.0, 1e8],
                         [1, -3e38, 2.0, 3e38, 9.0], [0, -3e38, -3e38, 3e38, 3e38], [1, 1e30, 1e30, 2e30, 2e30]] * 3)
    start = time.monotonic()
    out = roi_reference.ours(mode, x, rois, 7, 1.0, -1)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert time.monotonic() - start < 2.0
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert out[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------
# build_maskrcnn(pooler=...)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooler", MODES)
def test_build_maskrcnn_pooler_trains_one_step(pooler):
    torch.manual_seed(0)
    model = build_maskrcnn(backbone="resnet18", num_classes=3, min_size=64, max_size=64, pooler=pooler,
                           rpn_batch_size_per_image=64, box_batch_size_per_image=64, rpn_pre_nms_top_n_train=300,
                           rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=50).train()
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert isinstance(pool, ops.MultiScaleRoIAlign) and pool.mode == pooler
    images, targets = _synthetic_batch()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.roi_heads.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.fpn.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        (prediction,) = model(images[:1])
    assert set(prediction) >= {"boxes", "labels", "scores", "masks"}


def test_build_maskrcnn_rejects_unknown_pooler():
    for bad in ("roi_align", "RoIPool", "bilinear", ""):
        with pytest.raises(MaskrayError, match=r"pooler .* is not one of roialign, roialign_v2, roiwarp, roipool"):
            build_maskrcnn(backbone="resnet18", num_classes=3, pooler=bad)
