"""Keypoint R-CNN on CUDA: the same detections and keypoints as on the CPU from the same weights,
training under autocast (finite keypoint loss; 0 without a visible keypoint), every pooler mode."""

import pretrained_files as pf
import pytest
import torch

from model import build_maskrcnn, keypoint_heads

pytestmark = pytest.mark.gpu
K = 17
SMALL = dict(min_size=256, max_size=320, rpn_post_nms_top_n_test=300, box_detections_per_img=30)


@pytest.fixture
def float32_cuda():
    """True float32 on the GPU (TF32 convs differ from the CPU's by ~1e-3) for the comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _targets(device, visible=True):
    boxes = torch.tensor([[10.0, 10.0, 60.0, 90.0], [70.0, 20.0, 120.0, 110.0]], device=device)
    g = torch.Generator().manual_seed(0)
    points = boxes[:, None, :2].cpu() + torch.rand(2, K, 2, generator=g) * 40
    v = torch.full((2, K, 1), 2.0 if visible else 0.0)
    return [{"boxes": boxes, "labels": torch.tensor([1, 1], device=device),
             "keypoints": torch.cat([points, v], 2).to(device)},
            {"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device),
             "keypoints": keypoint_heads.empty_keypoints(0, K, device)}]


@pytest.mark.parametrize("masks", [False, True])
def test_cuda_keypoints_match_cpu(float32_cuda, masks):
    torch.manual_seed(0)
    model = build_maskrcnn(num_classes=2, masks=masks, num_keypoints=K, **SMALL).eval()
    photo = pf.as_tensor(pf.photo("astronaut"))
    pf.calibrate(model, photo)
    with torch.inference_mode():
        expected = model([photo])[0]
        got = {k: v.cpu() for k, v in model.cuda()([photo.cuda()])[0].items()}
    assert len(expected["boxes"]) >= 5 and expected["keypoints"].shape[1:] == (K, 3)
    if masks:
        expected["rles"], got["rles"] = pf.rles_of(expected["masks"]), pf.rles_of(got["masks"])
    pf.assert_same_detections(expected, got, score_atol=1e-3, keypoint_score_atol=1e-2)


@pytest.mark.parametrize("pooler", ["roialign", "roialign_v2", "roiwarp", "roipool"])
def test_cuda_keypoint_training_under_autocast(pooler):
    torch.manual_seed(0)
    model = build_maskrcnn(backbone="resnet18", num_classes=2, masks=False, num_keypoints=K, min_size=128,
                           max_size=128, pooler=pooler).cuda().train()
    images = [torch.rand(3, 128, 128, device="cuda") for _ in range(2)]
    for visible in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model(images, _targets("cuda", visible))
        assert all(torch.isfinite(v) for v in losses.values())
        assert (float(losses["loss_keypoint"]) > 0) == visible
        model.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.eval()(images)
    assert all(o["keypoints"].shape == (len(o["boxes"]), K, 3) for o in out)
