"""Mask R-CNN on CUDA: torchvision equality, AMP (bf16/fp16) and channels_last for training and inference."""

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from model import build_maskrcnn

pytestmark = pytest.mark.gpu
SMALL = dict(min_size=256, max_size=320, rpn_post_nms_top_n_test=300, box_detections_per_img=30)


def _images(device):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 240, 300, generator=g).to(device), torch.rand(3, 200, 180, generator=g).to(device)]


def test_cuda_outputs_match_torchvision():
    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **SMALL).cuda().eval()
    ours = build_maskrcnn(**SMALL).cuda().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = _images("cuda")
    with torch.inference_mode():
        expected, got = reference(images), ours(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 0 and torch.equal(e["labels"], g["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g["masks"], e["masks"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_channels_last_train_and_eval(dtype):
    torch.manual_seed(0)
    model = build_maskrcnn(backbone="resnet18", num_classes=3, min_size=128, max_size=128).cuda()
    model = model.to(memory_format=torch.channels_last).train()
    images = [torch.rand(3, 128, 128, device="cuda") for _ in range(2)]
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0]], device="cuda")
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8, device="cuda")
    masks[0, 10:70, 10:60] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1], device="cuda"), "masks": masks}] * 2
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    scaler.scale(loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        out = model(images)
    assert out[0]["masks"].shape[1:] == (1, 128, 128)
