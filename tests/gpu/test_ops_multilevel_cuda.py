"""Fused multi-level RoIAlign and hostile input on CUDA: parity with torchvision and with our CPU
kernels, deterministic backward, invalid RoIs (zeros, no gradient, never a fault), the grid cap."""

import time
from collections import OrderedDict

import pytest
import torch
import torchvision

from model import ops

pytestmark = pytest.mark.gpu
NAN = float("nan")


def _setup(dtype=torch.float32, device="cuda", seed=0, channels=8):
    g = torch.Generator().manual_seed(seed)
    features = OrderedDict(
        (f"p{i}", torch.randn(2, channels, 100 >> i, 136 >> i, generator=g).to(device, dtype).requires_grad_(True))
        for i in range(4)
    )
    boxes = []
    for count in (300, 200):
        size = torch.exp(torch.empty(count, 2).uniform_(2.5, 6.5, generator=g))  # 12 .. 665 px
        centre = torch.rand(count, 2, generator=g) * torch.tensor([544.0, 400.0])
        boxes.append(torch.cat([centre - size / 2, centre + size / 2], 1).to(device, dtype))
    boxes[0][0] = torch.tensor([50.0, 10.0, 40.0, 90.0])  # negative area: no level, zeros
    return features, boxes, [(400, 544)] * 2


@pytest.mark.parametrize("size", [7, 14])
def test_multilevel_matches_torchvision_cuda(size):
    features, boxes, shapes = _setup()
    ours = ops.MultiScaleRoIAlign(list(features), size, 2)(features, boxes, shapes)
    ref = torchvision.ops.MultiScaleRoIAlign(list(features), size, 2)(features, boxes, shapes)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ours)
    leaves = list(features.values())
    for a, b in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not ours[0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_multilevel_cuda_matches_cpu_and_deterministic_backward(dtype):
    features, boxes, shapes = _setup(dtype)
    cpu_features = OrderedDict((k, v.detach().cpu()) for k, v in features.items())
    pooler = ops.MultiScaleRoIAlign(list(features), 7, 2)
    out = pooler(features, boxes, shapes)
    ref = ops.MultiScaleRoIAlign(list(features), 7, 2)(cpu_features, [b.cpu() for b in boxes], shapes)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.double(), rtol=tol, atol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    leaves = list(features.values())
    atomic = torch.autograd.grad(pooler(features, boxes, shapes), leaves, grad)
    torch.use_deterministic_algorithms(True)
    try:
        det = torch.autograd.grad(pooler(features, boxes, shapes), leaves, grad)
        det2 = torch.autograd.grad(pooler(features, boxes, shapes), leaves, grad)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, d, d2 in zip(atomic, det, det2):
        assert torch.equal(d, d2)  # bitwise reproducible
        torch.testing.assert_close(d.double(), a.double(), rtol=tol * 4, atol=tol * 4)


def test_invalid_rois_on_cuda_give_zeros_and_errors():
    x = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0], [0, NAN, 1.0, 9.0, 9.0], [1.5, 1.0, 1.0, 9.0, 9.0],
                         [7.0, 1.0, 1.0, 9.0, 9.0], [1, 2.0, 2.0, float("inf"), 9.0]], device="cuda")
    # the raw op cannot raise without a sync: invalid rows pool to zeros and send no gradient
    out = torch.ops.maskray.roi_align(x, rois, 1.0, 4, 4, -1, True)
    assert out[0].abs().sum() > 0 and not out[1:].any()
    (from_invalid,) = torch.autograd.grad(out[1:].sum(), x)
    assert not from_invalid.any()
    for deterministic in (False, True):
        g = torch.ops.maskray.roi_align_backward(torch.ones(5, 3, 4, 4, device="cuda"), rois, 1.0, 4, 4, 2, 3, 16, 16,
                                                 -1, True, deterministic)
        g0 = torch.ops.maskray.roi_align_backward(torch.ones(1, 3, 4, 4, device="cuda"), rois[:1], 1.0, 4, 4, 2, 3,
                                                  16, 16, -1, True, deterministic)
        torch.testing.assert_close(g, g0)
    with pytest.raises(ops.RoIAlignInputError, match="non-finite"):
        ops.roi_align(x, rois, 4)
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.maskray.roi_align(x, rois[:1], NAN, 4, 4, -1, True)
    torch.cuda.synchronize()


def test_huge_box_bounded_and_capped_on_cuda():
    x = torch.randn(2, 16, 64, 64, device="cuda")
    rois = torch.tensor([[0, -1e8, -1e8, 1e8, 1e8], [1, 0.0, 0.0, 2000.0, 2000.0]] * 50, device="cuda")
    torch.cuda.synchronize()
    start = time.monotonic()
    out = ops.roi_align(x, rois, 7, 1.0, -1, True)
    torch.cuda.synchronize()
    assert time.monotonic() - start < 5.0
    torch.testing.assert_close(out, ops.roi_align(x, rois, 7, 1.0, 64, True), rtol=0, atol=0)
    assert torch.isfinite(out).all()


def test_multilevel_opcheck_cuda():
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, 2, 16 >> i, 12 >> i, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
             for i in range(3)]
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 30.0], [1, 0.0, 0.0, 60.0, 50.0], [1, 10.0, 5.0, 200.0, 190.0]],
                        dtype=torch.float64, device="cuda")
    args = ([0.25, 0.125, 0.0625], 3, 2, 2, True, 2, 4, 224.0, 4.0, 1e-6)
    torch.library.opcheck(torch.ops.maskray.multi_level_roi_align.default, (feats, rois, *args))
