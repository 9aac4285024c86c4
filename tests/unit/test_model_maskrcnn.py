"""Mask R-CNN builder: torchvision checkpoint compatibility, our poolers, training, AMP, channels_last."""

import pretrained_files as pf
import pytest
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from model import build_maskrcnn, ops
from model.errors import MaskrayError

# Few proposals and detections keep the r50 comparisons to a few seconds on 2 cores.
SMALL = dict(min_size=128, max_size=160, rpn_post_nms_top_n_test=200, box_detections_per_img=20)


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 120, 150, generator=g), torch.rand(3, 100, 90, generator=g)]


@pytest.mark.parametrize("variant,torchvision_builder", [("v1", maskrcnn_resnet50_fpn), ("v2", maskrcnn_resnet50_fpn_v2)])
def test_torchvision_state_dict_loads_strict_and_outputs_match(variant, torchvision_builder):
    """Same detections as torchvision from the same weights. The seeded random model is calibrated
    (``pretrained_files.calibrate``): uncalibrated, its scores tie (v1) or saturate at 1.0 (v2), and
    float noise from the thread count alone reorders ties and flips NMS (4 of 80 boxes moved 8.8 px
    at 2 threads on a 2-core EPYC). Detections are then matched one to one, whatever their order."""
    torch.manual_seed(0)
    reference = torchvision_builder(weights=None, weights_backbone=None, num_classes=91, **SMALL).eval()
    images = _images()
    pf.calibrate(reference, images[0])
    ours = build_maskrcnn(variant=variant, **SMALL).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)

    assert isinstance(ours.roi_heads.box_roi_pool, ops.MultiScaleRoIAlign)
    assert isinstance(ours.roi_heads.mask_roi_pool, ops.MultiScaleRoIAlign)

    with torch.inference_mode():
        expected = reference(images)
        got = ours(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) >= 10
        pf.assert_same_detections(dict(e, rles=pf.rles_of(e["masks"])), dict(g, rles=pf.rles_of(g["masks"])))


def test_our_pooler_matches_torchvision_multiscale_roialign():
    g = torch.Generator().manual_seed(0)
    features = {str(i): torch.randn(2, 8, 64 // 2**i, 80 // 2**i, generator=g) for i in range(4)}
    image_shapes = [(256, 320), (240, 300)]
    boxes = []
    for n in (30, 17):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 230.0])
        wh = torch.rand(n, 2, generator=g) * 200 + 1
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    for size in (7, 14):
        ours = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)
        reference = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)
        assert list(ours.parameters()) == []
        torch.testing.assert_close(ours(features, boxes, image_shapes), reference(features, boxes, image_shapes))


def _synthetic_batch(n_images=2, size=64, seed=0):
    """Images holding bright rectangles, with exact boxes and masks as targets."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n_images):
        image = torch.rand(3, size, size, generator=g) * 0.2
        boxes, masks, labels = [], [], []
        for k in range(2):
            x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            w, h = (int(v) for v in torch.randint(12, size // 2, (2,), generator=g))
            mask = torch.zeros(size, size, dtype=torch.uint8)
            mask[y0:y0 + h, x0:x0 + w] = 1
            image[k, y0:y0 + h, x0:x0 + w] = 0.9
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks.append(mask)
            labels.append(k + 1)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels), "masks": torch.stack(masks)})
    return images, targets


def _tiny(**kwargs):
    return build_maskrcnn(backbone="resnet18", num_classes=3, min_size=64, max_size=64,
                          rpn_batch_size_per_image=64, box_batch_size_per_image=64, rpn_pre_nms_top_n_train=300,
                          rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=100, **kwargs)


def test_training_loss_decreases_on_tiny_batch():
    torch.manual_seed(0)
    model = _tiny().train()
    images, targets = _synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        loss_dict = model(images, targets)
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] == min(losses), losses


def test_autocast_bf16_and_channels_last_train_and_eval():
    torch.manual_seed(0)
    model = _tiny().to(memory_format=torch.channels_last)
    images, targets = _synthetic_batch(seed=1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert len(out) == 2
    for o in out:
        assert o["boxes"].shape[1] == 4 and o["masks"].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize("backbone,variant,norm,head_norm", [
    ("resnet18", "v1", "frozen_bn", None),
    ("resnet34", "v2", "gn", "gn"),
])
def test_builder_options(backbone, variant, norm, head_norm):
    model = build_maskrcnn(backbone=backbone, variant=variant, norm=norm, head_norm=head_norm, num_classes=5,
                           min_size=64, max_size=64, trainable_layers=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert all(p.requires_grad for p in body.layer4.parameters())
    norms = {type(m).__name__ for m in model.modules()}
    assert ("FrozenBatchNorm2d" in norms) == (norm == "frozen_bn")
    assert ("GroupNorm" in norms) == (norm == "gn")
    model.eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}


def test_builder_rejects_bad_arguments():
    with pytest.raises(MaskrayError, match="backbone"):
        build_maskrcnn(backbone="vgg16")
    with pytest.raises(MaskrayError, match="variant"):
        build_maskrcnn(variant="v3")
    with pytest.raises(MaskrayError, match="num_classes"):
        build_maskrcnn(num_classes=1)
    with pytest.raises(TypeError):
        build_maskrcnn("resnet50")


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_narrow_widths_build_train_and_shrink_the_model(variant):
    torch.manual_seed(0)
    narrow = build_maskrcnn(backbone="resnet18", num_classes=3, variant=variant, min_size=64, max_size=64,
                            fpn_channels=64, box_head_dim=256, mask_head_channels=[64, 64])
    wide = build_maskrcnn(backbone="resnet18", num_classes=3, variant=variant, min_size=64, max_size=64)
    assert narrow.backbone.out_channels == 64
    assert {o.shape[1] for o in narrow.backbone(torch.rand(1, 3, 64, 64)).values()} == {64}
    assert len([m for m in narrow.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]) == 2
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(narrow) < 0.6 * count(wide)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    target["masks"][0, 8:40, 8:40] = 1
    losses = narrow.train()([torch.rand(3, 64, 64)], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(MaskrayError, match="mask_head_channels"):
        build_maskrcnn(backbone="resnet18", num_classes=3, mask_head_channels=[])
    with pytest.raises(MaskrayError, match="fpn_channels"):
        build_maskrcnn(backbone="resnet18", num_classes=3, fpn_channels=0)
