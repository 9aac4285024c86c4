"""Property tests (hypothesis) of our RoIAlign against torchvision's, forward and backward.

Random shapes, dtypes, scales, `aligned`, sampling ratios and boxes (inside, across and far
outside the map, degenerate, negative-size); extreme finite boxes must give finite results
in bounded time. Budget: well under a minute on 2 cores (max_examples, no deadline).
"""

from collections import OrderedDict

import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import ops

# derandomize: the same examples every run (CI is reproducible); no example database on disk
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
SCALES = [1.0, 0.5, 0.25, 0.125, 1 / 32, 2.0, 0.3]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 1e-2}


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64)):
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    scale = draw(st.sampled_from(SCALES))
    count = draw(st.integers(0, 6))
    # boxes in feature-map units, then to image units: inside, across and outside the map
    coord = st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False)
    boxes = []
    for _ in range(count):
        x1, x2 = draw(coord) * width, draw(coord) * width
        y1, y2 = draw(coord) * height, draw(coord) * height
        if draw(st.booleans()):  # mostly well-formed, sometimes negative size
            x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        boxes.append([draw(st.integers(0, batch - 1)), x1 / scale, y1 / scale, x2 / scale, y2 / scale])
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64).to(dtype)
    rois = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 5).to(dtype)
    return dict(
        x=x, rois=rois, scale=scale, generator=g,
        output_size=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        sampling_ratio=draw(st.integers(-1, 3)),
        aligned=draw(st.booleans()),
    )


def _fwd_bwd(fn, p, dtype=None):
    x = p["x"] if dtype is None else p["x"].to(dtype)
    rois = p["rois"] if dtype is None else p["rois"].to(dtype)
    x = x.detach().requires_grad_(True)
    out = fn(x, rois, p["output_size"], p["scale"], p["sampling_ratio"], p["aligned"])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    (gx,) = torch.autograd.grad(out, x, grad) if out.numel() else (torch.zeros_like(x),)
    return out, gx


def _negative_adaptive_aligned(p):
    """Rows torchvision has no defined result for: aligned, adaptive sampling and a negative
    extent give it a negative grid (its CPU kernel then fails to size a vector). Ours samples
    nothing for them: zeros."""
    rois = p["rois"]
    if not (p["aligned"] and p["sampling_ratio"] <= 0):
        return torch.zeros(rois.shape[0], dtype=torch.bool)
    return (rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])


@settings(max_examples=400, **SETTINGS)
@given(problems())
def test_matches_torchvision_forward_backward(p):
    undefined = _negative_adaptive_aligned(p)
    if undefined.any():
        pooled = ops.roi_align(p["x"], p["rois"], p["output_size"], p["scale"], p["sampling_ratio"], True)
        assert not pooled[undefined].any()
        p = dict(p, rois=p["rois"][~undefined])
    out, gx = _fwd_bwd(ops.roi_align, p)
    ref, gref = _fwd_bwd(torchvision.ops.roi_align, p)
    tol = TOL[p["x"].dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gref, rtol=tol, atol=tol)


@settings(max_examples=100, **SETTINGS)
@given(problems(dtypes=(torch.float16, torch.bfloat16)))
def test_reduced_precision_matches_float32_on_the_same_inputs(p):
    # half and bfloat16 compute in float32 inside; compare to torchvision in float32 on the rounded inputs
    p = dict(p, rois=p["rois"][~_negative_adaptive_aligned(p)])
    out, gx = _fwd_bwd(ops.roi_align, p)
    assert out.dtype == gx.dtype == p["x"].dtype
    ref, gref = _fwd_bwd(torchvision.ops.roi_align, p, torch.float32)
    tol = 1e-2 if p["x"].dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), gref, rtol=tol, atol=tol)


@settings(max_examples=100, **SETTINGS)
@given(
    problems(dtypes=(torch.float32,)),
    st.lists(st.sampled_from([1e6, -1e6, 1e12, -1e12, 3e38, -3e38, 1e-30]), min_size=4, max_size=4),
)
def test_extreme_finite_boxes_give_finite_results(p, corners):
    rois = torch.cat([p["rois"], torch.tensor([[0.0] + corners])])
    x = p["x"].detach().requires_grad_(True)
    out = ops.roi_align(x, rois, p["output_size"], p["scale"], -1, p["aligned"])
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    assert out.shape == (rois.shape[0], x.shape[1]) + p["output_size"]
    # the well-formed rows are unaffected by the extreme one
    if p["rois"].numel() and not p["aligned"]:
        torch.testing.assert_close(out[:-1], ops.roi_align(p["x"], p["rois"], p["output_size"], p["scale"], -1, False))


@settings(max_examples=100, **SETTINGS)
@given(
    st.integers(1, 2), st.integers(2, 4), st.integers(96, 400), st.integers(96, 400), st.integers(0, 12),
    st.sampled_from([7, 14, (3, 5)]), st.sampled_from([-1, 2]), st.integers(0, 2**31 - 1),
)
def test_multiscale_matches_torchvision(batch, levels, height, width, count, output_size, sampling_ratio, seed):
    g = torch.Generator().manual_seed(seed)
    features = OrderedDict(
        (str(i), torch.randn(batch, 2, -(-height // (4 << i)), -(-width // (4 << i)), generator=g).requires_grad_(True))
        for i in range(levels)
    )
    boxes = []
    for _ in range(batch):
        xy = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) * 1.2 - 10
        # 1 .. 665 px: a bin spans at most 665 / 4 / 3 < 64 feature pixels even at the finest level and
        # the 3-row output, so the adaptive grid's cap of 64 samples (README) never applies here
        wh = torch.exp(torch.rand(count, 2, generator=g) * 6.5)
        boxes.append(torch.cat([xy, xy + wh], 1))
    shapes = [(height, width)] * batch
    out = ops.MultiScaleRoIAlign(list(features), output_size, sampling_ratio)(features, boxes, shapes)
    ref = torchvision.ops.MultiScaleRoIAlign(list(features), output_size, sampling_ratio)(features, boxes, shapes)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    if out.numel():
        grad = torch.randn(out.shape, generator=g)
        leaves = list(features.values())
        got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
        for a, b, f in zip(got, want, leaves):
            torch.testing.assert_close(torch.zeros_like(f) if a is None else a,
                                       torch.zeros_like(f) if b is None else b, rtol=2e-5, atol=2e-5)
