"""RoIAlign CUDA kernels against torchvision on the GPU (all four dtypes), deterministic backward."""

import pytest
import torch
import torchvision

import roi_reference

from model import ops

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, -1), (True, -1)])
def test_cuda_forward_backward_match_torchvision(dtype, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 40, 56, generator=g)
    rois = roi_reference.hostile_rois(2, 40, 56, 0.25, 80, g)
    grad = torch.randn(rois.shape[0], 8, 7, 7, generator=g)
    # reference: torchvision in float32/float64 on the same (rounded) inputs
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xr = x.to(dtype).to(ref_dtype).cuda().requires_grad_(True)
    rr, gr = rois.to(dtype).to(ref_dtype).cuda(), grad.to(dtype).to(ref_dtype).cuda()
    ref = torchvision.ops.roi_align(xr, rr, 7, 0.25, sampling_ratio, aligned)
    (ref_grad,) = torch.autograd.grad(ref, xr, gr)

    xd = x.to(dtype).cuda().requires_grad_(True)
    out = ops.roi_align(xd, rois.to(dtype).cuda(), 7, 0.25, sampling_ratio, aligned)
    (gi,) = torch.autograd.grad(out, xd, grad.to(dtype).cuda())
    assert out.dtype == dtype and gi.dtype == dtype and out.is_cuda
    tol = TOL[dtype]
    torch.testing.assert_close(out.to(ref_dtype), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gi.to(ref_dtype), ref_grad, rtol=tol, atol=tol * 4)
    # and against our CPU kernel
    cpu = ops.roi_align(x.to(dtype).to(ref_dtype), rois.to(dtype).to(ref_dtype), 7, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(out.cpu().to(ref_dtype), cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_equals_atomic_backward(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 50, 70, generator=g).to(dtype).cuda()  # 37 channels: a partial channel group
    rois = roi_reference.hostile_rois(2, 50, 70, 0.5, 300, g).to(dtype).cuda()
    grad = torch.randn(rois.shape[0], 37, 14, 14, generator=g).to(dtype).cuda()
    for aligned, sr in ((True, 2), (False, -1), (True, 3)):
        args = (grad, rois, 0.5, 14, 14, 2, 37, 50, 70, sr, aligned)
        atomic = torch.ops.maskray.roi_align_backward(*args, False)
        det = torch.ops.maskray.roi_align_backward(*args, True)
        det2 = torch.ops.maskray.roi_align_backward(*args, True)
        assert torch.equal(det, det2)  # bitwise reproducible
        tol = TOL[dtype] * 4
        torch.testing.assert_close(det.double(), atomic.double(), rtol=tol, atol=tol)


def test_deterministic_mode_uses_deterministic_kernel():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 30, 30, generator=g).cuda().requires_grad_(True)
    rois = roi_reference.hostile_rois(1, 30, 30, 1.0, 200, g).cuda()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [torch.autograd.grad(ops.roi_align(x, rois, 7, 1.0, 2, True).sum(), x)[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])
    expected = torch.ops.maskray.roi_align_backward(
        torch.ones(rois.shape[0], 16, 7, 7, device="cuda"), rois, 1.0, 7, 7, 1, 16, 30, 30, 2, True, True)
    assert torch.equal(grads[0], expected)


def test_cuda_empty_and_noncontiguous():
    x = torch.randn(2, 3, 12, 12, device="cuda")
    assert ops.roi_align(x, torch.zeros(0, 5, device="cuda"), 4).shape == (0, 3, 4, 4)
    xt = torch.randn(2, 12, 12, 3, device="cuda").permute(0, 3, 1, 2)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 10.0], [1, -2.0, 3.0, 14.0, 8.0]], device="cuda")
    torch.testing.assert_close(ops.roi_align(xt, rois, 4, 1.0, 2, True),
                               torchvision.ops.roi_align(xt.contiguous(), rois, 4, 1.0, 2, True))


def test_cuda_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=g).cuda().requires_grad_(True)
    rois = roi_reference.hostile_rois(2, 7, 8, 0.5, 3, g).double().cuda()
    # the atomic backward may sum in a different order run to run: allow rounding-level differences
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 0.5, 2, True), (x,), nondet_tol=1e-10)
    torch.library.opcheck(torch.ops.maskray.roi_align.default, (x, rois, 0.5, 3, 2, 2, True))
