"""The pooling modes (roialign, roialign_v2, roiwarp, roipool) on CUDA equal our CPU kernels,
forward and backward, single-level and fused multi-level, float32 and half; RoIPool's
deterministic backward; invalid RoIs on the raw CUDA ops."""

from collections import OrderedDict

import pytest
import torch
import torchvision

import roi_reference

from model import ops

pytestmark = pytest.mark.gpu

MODES = list(ops.POOLER_MODES)
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_cpu_single_level(mode, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 40, 56, generator=g).to(dtype)
    rois = roi_reference.hostile_rois(2, 40, 56, 0.25, 80, g).to(dtype)
    grad = torch.randn(rois.shape[0], 8, 7, 7, generator=g).to(dtype)
    outs, grads = [], []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        out = roi_reference.ours(mode, xd, rois.to(device), 7, 0.25, 2)
        (gi,) = torch.autograd.grad(out, xd, grad.to(device))
        assert out.dtype == dtype and gi.dtype == dtype and out.device.type == device
        outs.append(out.cpu().float())
        grads.append(gi.cpu().float())
    tol = TOL[dtype]
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[1], grads[0], rtol=tol, atol=tol * 4)
    if mode == "roipool":  # a max picks the same element on both devices
        assert torch.equal(outs[1], outs[0])
        cpu = torch.ops.maskray.roi_pool(x, rois, 0.25, 7, 7)
        cuda = torch.ops.maskray.roi_pool(x.cuda(), rois.cuda(), 0.25, 7, 7)
        assert torch.equal(cuda[1].cpu(), cpu[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_cpu_multi_level(mode, dtype):
    g = torch.Generator().manual_seed(1)
    features = OrderedDict((f"p{i}", torch.randn(2, 5, 200 >> i, 272 >> i, generator=g).to(dtype)) for i in range(4))
    boxes = [roi_reference.hostile_rois(1, 800, 1088, 1.0, 60, g)[:, 1:].to(dtype), roi_reference.hostile_rois(1, 800, 1088, 1.0, 40, g)[:, 1:].to(dtype)]
    shapes = [(800, 1088)] * 2
    outs, grads = [], []
    grad = None
    for device in ("cpu", "cuda"):
        feats = OrderedDict((k, v.to(device).requires_grad_(True)) for k, v in features.items())
        pooler = ops.MultiScaleRoIAlign(list(feats), 7, 2, mode=mode)
        out = pooler(feats, [b.to(device) for b in boxes], shapes)
        if grad is None:
            grad = torch.randn(out.shape, generator=g).to(dtype)
        gs = torch.autograd.grad(out, list(feats.values()), grad.to(device), allow_unused=True)
        outs.append(out.cpu().float())
        grads.append([torch.zeros(f.shape) if a is None else a.cpu().float() for a, f in zip(gs, feats.values())])
    tol = TOL[dtype]
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_roi_pool_deterministic_backward_equals_atomic(dtype):
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 37, 50 >> i, 70 >> i, generator=g).to(dtype).cuda() for i in range(3)]
    rois = roi_reference.hostile_rois(2, 200, 280, 1.0, 300, g).to(dtype).cuda()
    _, argmax = torch.ops.maskray.multi_level_roi_pool(features, rois, [0.25, 0.125, 0.0625], 7, 7, 2, 4, 224.0,
                                                      4.0, 1e-6)
    grad = torch.randn(rois.shape[0], 37, 7, 7, generator=g).to(dtype).cuda()
    args = (grad, argmax, 2, 37, [f.size(2) for f in features], [f.size(3) for f in features])
    atomic = torch.ops.maskray.roi_pool_backward(*args, False)
    det = torch.ops.maskray.roi_pool_backward(*args, True)
    det2 = torch.ops.maskray.roi_pool_backward(*args, True)
    cpu = torch.ops.maskray.roi_pool_backward(grad.cpu(), argmax.cpu(), *args[2:], False)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for a, b, d2, c in zip(atomic, det, det2, cpu):
        assert torch.equal(b, d2)  # bitwise reproducible
        torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(b.cpu().double(), c.double(), rtol=tol, atol=tol)
    torch.use_deterministic_algorithms(True)
    try:
        x = features[0].float().requires_grad_(True)
        runs = [torch.autograd.grad(ops.roi_pool(x, rois.float(), 7, 0.25).sum(), x)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0], runs[1])


def test_cuda_invalid_rois_write_zeros_and_empty_inputs():
    x = torch.randn(2, 3, 12, 12, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 10.0], [5, 1.0, 1.0, 9.0, 10.0], [0, float("nan"), 1.0, 9.0, 10.0]],
                        device="cuda")
    out, argmax = torch.ops.maskray.roi_pool(x, rois, 1.0, 3, 3)
    assert out[1:].abs().sum() == 0 and (argmax[1:] == -1).all() and out[0].abs().sum() > 0
    for mode in (ops.MODE_ALIGN, ops.MODE_WARP):
        out = torch.ops.maskray.roi_align(x, rois, 1.0, 3, 3, 2, False, mode)
        assert out[1:].abs().sum() == 0 and out[0].abs().sum() > 0
    for mode in MODES:
        assert roi_reference.ours(mode, x, torch.zeros(0, 5, device="cuda"), 4, 1.0, 2).shape == (0, 3, 4, 4)
    # RoIPool on CUDA equals torchvision's on CUDA
    good = rois[:1]
    torch.testing.assert_close(ops.roi_pool(x, good, 3, 1.0), torchvision.ops.roi_pool(x, good, 3, 1.0))


def test_cuda_gradcheck_and_opcheck_every_mode():
    g = torch.Generator().manual_seed(3)
    n = 2 * 2 * 7 * 8
    x = (torch.randperm(n, generator=g).double() / n).reshape(2, 2, 7, 8).cuda().requires_grad_(True)
    rois = roi_reference.hostile_rois(2, 7, 8, 0.5, 3, g).double().cuda()
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda t: roi_reference.ours(mode, t, rois, (3, 2), 0.5, 2), (x,), nondet_tol=1e-10)
    torch.library.opcheck(torch.ops.maskray.roi_align.default, (x, rois, 0.5, 3, 2, 2, False, ops.MODE_WARP))
    torch.library.opcheck(torch.ops.maskray.roi_pool.default, (x, rois, 0.5, 3, 2))
