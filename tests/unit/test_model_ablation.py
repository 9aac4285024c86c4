"""Mask-branch ablations of Mask R-CNN's Table 2: softmax loss, class-agnostic masks, MLP head."""

import itertools
import math

import pytest
import torch
from test_model_maskrcnn import _synthetic_batch, _tiny
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_inference,
    maskrcnn_loss,
    project_masks_on_boxes,
)

from model import build_maskrcnn, mask_heads
from model.checkpoint import ModelConfig, ModelConfigError, build_from_config, load_checkpoint, save_checkpoint
from model.errors import MaskrayError

NARROW = dict(fpn_channels=64, box_head_dim=256, mask_head_channels=[64, 64])  # keeps the MLP head small
SWITCHES = list(itertools.product(["sigmoid", "softmax"], [False, True], ["fcn", "mlp"]))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_defaults_are_torchvisions_model_bit_for_bit():
    images, targets = _synthetic_batch(seed=3)
    torch.manual_seed(0)
    plain = _tiny()
    torch.manual_seed(0)
    explicit = _tiny(mask_loss="sigmoid", class_agnostic_mask=False, mask_head_type="fcn")
    assert type(explicit.roi_heads) is RoIHeads  # torchvision's own heads, loss and inference
    _same_state(plain, explicit)
    for model in (plain, explicit):
        model.train()
    torch.manual_seed(1)
    losses_plain = plain(images, targets)
    torch.manual_seed(1)
    losses_explicit = explicit(images, targets)
    assert losses_plain.keys() == losses_explicit.keys()
    for key in losses_plain:
        assert torch.equal(losses_plain[key], losses_explicit[key]), key
    with torch.inference_mode():
        out_plain, out_explicit = plain.eval()(images), explicit.eval()(images)
    assert sum(len(o["boxes"]) for o in out_plain) > 0
    for p, e in zip(out_plain, out_explicit):
        assert p.keys() == e.keys()
        for key in p:
            assert torch.equal(p[key], e[key]), key


def test_mask_roi_heads_forward_is_torchvisions_at_the_sigmoid_loss():
    """MaskRoIHeads' forward (torchvision's with the mask loss/inference calls changed) gives
    torchvision's losses and detections when its loss is the sigmoid one."""
    torch.manual_seed(0)
    model = _tiny(box_score_thresh=0.0, **NARROW)
    stock = model.roi_heads
    ours = mask_heads.MaskRoIHeads(
        stock.box_roi_pool, stock.box_head, stock.box_predictor, 0.5, 0.5, 64, 0.25, None, 0.0, 0.5, 100,
        mask_roi_pool=stock.mask_roi_pool, mask_head=stock.mask_head, mask_predictor=stock.mask_predictor,
    )
    images, targets = _synthetic_batch(seed=4)
    outputs, losses = {}, {}
    for name, heads in (("stock", stock), ("ours", ours)):  # inference first: training moves BN statistics
        model.roi_heads = heads
        with torch.inference_mode():
            outputs[name] = model.eval()(images)
    for name, heads in (("stock", stock), ("ours", ours)):
        model.roi_heads = heads
        torch.manual_seed(5)
        losses[name] = model.train()(images, targets)
    (losses_stock, out_stock), (losses_ours, out_ours) = (losses["stock"], outputs["stock"]), (losses["ours"],
                                                                                                outputs["ours"])
    assert losses_stock.keys() == losses_ours.keys()
    for key in losses_stock:
        assert torch.equal(losses_stock[key], losses_ours[key]), key
    assert sum(len(o["boxes"]) for o in out_stock) > 0
    for e, g in zip(out_stock, out_ours):
        for key in e:
            assert torch.equal(e[key], g[key]), key


@pytest.mark.parametrize("mask_loss,agnostic,head", SWITCHES)
def test_every_combination_trains_and_infers(mask_loss, agnostic, head):
    torch.manual_seed(0)
    model = _tiny(mask_loss=mask_loss, class_agnostic_mask=agnostic, mask_head_type=head,
                  box_score_thresh=0.0, **NARROW)
    assert isinstance(model.roi_heads, mask_heads.MaskRoIHeads) == (mask_loss == "softmax" or agnostic)
    images, targets = _synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses, mask_losses = [], []
    model.train()
    for _ in range(5):
        loss_dict = model(images, targets)
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                  "loss_rpn_box_reg"}
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        mask_losses.append(loss_dict["loss_mask"].item())
    assert all(math.isfinite(v) for v in losses + mask_losses), losses
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.inference_mode():
        out = model(images)
    assert sum(len(o["boxes"]) for o in out) > 0
    for o in out:
        assert o["masks"].shape == (len(o["boxes"]), 1, 64, 64)
        assert o["masks"].dtype == torch.float32
        assert torch.all((o["masks"] >= 0) & (o["masks"] <= 1))


def _hand_made_case():
    """Two 8x8 images, three positive RoIs over rectangles, K = 3 classes, 4x4 mask logits."""
    g = torch.Generator().manual_seed(0)
    gt_masks = [torch.zeros(2, 8, 8), torch.zeros(1, 8, 8)]
    gt_masks[0][0, 1:5, 2:7] = 1
    gt_masks[0][1, 4:8, 0:3] = 1
    gt_masks[1][0, 0:6, 3:8] = 1
    gt_labels = [torch.tensor([2, 3]), torch.tensor([1])]
    proposals = [torch.tensor([[1.0, 0.5, 7.0, 5.5], [0.0, 3.0, 4.0, 8.0]]), torch.tensor([[2.5, 0.0, 8.0, 7.0]])]
    matched = [torch.tensor([0, 1]), torch.tensor([0])]
    logits = torch.randn(3, 4, 4, 4, generator=g) * 2  # channel 0: the background label's, never used
    return logits, proposals, gt_masks, gt_labels, matched


def _slow_softmax_loss(logits, proposals, gt_masks, gt_labels, matched):
    """-(t log p_k + (1 - t) log p_bg), p a softmax over (0, x_1..x_K) at each pixel: plain Python."""
    targets = torch.cat([project_masks_on_boxes(m, p, i, logits.shape[-1])
                         for m, p, i in zip(gt_masks, proposals, matched)])
    labels = torch.cat([lab[i] for lab, i in zip(gt_labels, matched)]).tolist()
    agnostic = logits.shape[1] == 1
    total, count = 0.0, 0
    for r, k in enumerate(labels):
        for y in range(logits.shape[2]):
            for x in range(logits.shape[3]):
                class_scores = [float(logits[r, 0, y, x])] if agnostic else [
                    float(logits[r, j, y, x]) for j in range(1, logits.shape[1])]
                z = 1.0 + sum(math.exp(s) for s in class_scores)
                p_k = math.exp(class_scores[0 if agnostic else k - 1]) / z
                t = float(targets[r, y, x])
                total += -(t * math.log(p_k) + (1 - t) * math.log(1.0 / z))
                count += 1
    return total / count


def test_softmax_loss_matches_a_slow_reference():
    logits, proposals, gt_masks, gt_labels, matched = _hand_made_case()
    targets = torch.cat([project_masks_on_boxes(m, p, i, 4) for m, p, i in zip(gt_masks, proposals, matched)])
    assert 0 < targets.mean() < 1  # both foreground and background pixels take part
    logits64 = logits.double().requires_grad_()
    got = mask_heads.mask_loss(logits64, proposals, gt_masks, gt_labels, matched, kind="softmax")
    expected = _slow_softmax_loss(logits, proposals, gt_masks, gt_labels, matched)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert torch.all(logits64.grad[:, 0] == 0)  # the background label's channel takes no part
    assert torch.all(logits64.grad[:, 1:] != 0)  # classes compete: every class channel gets a gradient

    # the sigmoid kind is torchvision's loss, and the softmax kind differs from it
    sigmoid = mask_heads.mask_loss(logits, proposals, gt_masks, gt_labels, matched, kind="sigmoid")
    assert torch.equal(sigmoid, maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched))
    assert abs(sigmoid.item() - expected) > 1e-3

    # class-agnostic: one channel; the softmax over (0, x) is the sigmoid, so the two kinds coincide
    one = logits[:, 2:3].clone()
    agnostic_softmax = mask_heads.mask_loss(one, proposals, gt_masks, gt_labels, matched, kind="softmax")
    assert agnostic_softmax.item() == pytest.approx(_slow_softmax_loss(one, proposals, gt_masks, gt_labels, matched),
                                                    rel=1e-5)
    torch.testing.assert_close(agnostic_softmax,
                               mask_heads.mask_loss(one, proposals, gt_masks, gt_labels, matched, kind="sigmoid"))


def test_no_positive_roi_gives_a_zero_loss_with_a_graph():
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    empty = [torch.zeros(0, dtype=torch.int64)]
    for kind in mask_heads.MASK_LOSSES:
        loss = mask_heads.mask_loss(logits, [torch.zeros(0, 4)], [torch.zeros(1, 8, 8)], [torch.tensor([1])],
                                    empty, kind=kind)
        assert loss.item() == 0
        loss.backward()


def test_mask_inference_takes_the_class_probability():
    logits, *_ = _hand_made_case()
    labels = [torch.tensor([2, 3]), torch.tensor([1])]
    sigmoid = mask_heads.mask_inference(logits, labels, kind="sigmoid")
    for got, expected in zip(sigmoid, maskrcnn_inference(logits, labels)):
        assert torch.equal(got, expected)
    softmax = torch.cat(mask_heads.mask_inference(logits, labels, kind="softmax"))
    assert softmax.shape == (3, 1, 4, 4)
    for r, k in enumerate(torch.cat(labels).tolist()):
        scores = torch.cat([torch.zeros(1, 4, 4), logits[r, 1:]])
        torch.testing.assert_close(softmax[r, 0], torch.softmax(scores, 0)[k])
    # class-agnostic: channel 0 whatever the label
    one = logits[:, :1]
    for kind in mask_heads.MASK_LOSSES:
        a = torch.cat(mask_heads.mask_inference(one, labels, kind=kind))
        b = torch.cat(mask_heads.mask_inference(one, [torch.tensor([1, 1]), torch.tensor([2])], kind=kind))
        assert torch.equal(a, b)
        torch.testing.assert_close(a, one.sigmoid())


@pytest.mark.parametrize("head", ["fcn", "mlp"])
def test_class_agnostic_predicts_one_channel_and_ignores_the_label(head):
    torch.manual_seed(0)
    model = _tiny(class_agnostic_mask=True, mask_head_type=head, **NARROW).eval()
    predictor = model.roi_heads.mask_predictor
    if head == "fcn":
        assert predictor.mask_fcn_logits.weight.shape == (1, 64, 1, 1)
    else:
        assert predictor.mask_fc_logits.weight.shape == (28 * 28, 256)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0]])]
    logits = predictor(model.roi_heads.mask_head(model.roi_heads.mask_roi_pool(features, boxes, [(64, 64)])))
    assert logits.shape == (2, 1, 28, 28)
    with torch.inference_mode():
        as_one = mask_heads.mask_inference(logits, [torch.tensor([1, 1])])[0]
        as_two = mask_heads.mask_inference(logits, [torch.tensor([2, 2])])[0]
    assert torch.equal(as_one, as_two)


def test_mlp_head_has_the_documented_layers():
    torch.manual_seed(0)
    model = _tiny(mask_head_type="mlp", **NARROW)
    head, predictor = model.roi_heads.mask_head, model.roi_heads.mask_predictor
    assert type(model.roi_heads) is RoIHeads  # sigmoid, class-specific: torchvision's loss and inference
    linear = [(name, m.in_features, m.out_features)
              for name, m in head.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [("mask_fc1", 64 * 14 * 14, 256), ("mask_fc2", 256, 256)]
    assert (predictor.mask_fc_logits.in_features, predictor.mask_fc_logits.out_features) == (256, 3 * 28 * 28)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in list(head.modules()) + list(predictor.modules()))
    assert head(torch.rand(5, 64, 14, 14)).shape == (5, 256)
    assert predictor(torch.rand(5, 256)).shape == (5, 3, 28, 28)
    keys = [k for k in model.state_dict() if k.startswith("roi_heads.mask_")]
    assert keys == ["roi_heads.mask_head.mask_fc1.weight", "roi_heads.mask_head.mask_fc1.bias",
                    "roi_heads.mask_head.mask_fc2.weight", "roi_heads.mask_head.mask_fc2.bias",
                    "roi_heads.mask_predictor.mask_fc_logits.weight", "roi_heads.mask_predictor.mask_fc_logits.bias"]


@pytest.mark.parametrize("kwargs,name", [
    (dict(mask_loss="multinomial"), "mask_loss"),
    (dict(mask_loss=None), "mask_loss"),
    (dict(class_agnostic_mask="yes"), "class_agnostic_mask"),
    (dict(class_agnostic_mask=1), "class_agnostic_mask"),
    (dict(mask_head_type="conv"), "mask_head_type"),
    (dict(mask_head="mlp"), "mask_head_type"),
])
def test_bad_values_are_refused_naming_the_argument(kwargs, name):
    with pytest.raises(MaskrayError, match=name) as info:
        build_maskrcnn(backbone="resnet18", num_classes=3, **kwargs)
    if "mask_loss" in kwargs:
        assert "sigmoid, softmax" in str(info.value)
    if name == "mask_head_type":
        assert "fcn, mlp" in str(info.value)
    (key, value), = kwargs.items()
    key = "mask_head" if key.startswith("mask_head") else key  # the config's field for build_maskrcnn's mask_head_type
    if (key, value) != ("mask_head", "mlp"):  # a valid field value (the builder's mask_head takes a module)
        with pytest.raises(ModelConfigError, match=f"model config {key}: "):
            ModelConfig(backbone="resnet18", num_classes=3, **{key: value})


def test_switches_are_fields_of_the_model_config():
    config = ModelConfig(backbone="resnet18", num_classes=3, min_size=64, max_size=64, pooler="roiwarp",
                         mask_loss="softmax", class_agnostic_mask=True, mask_head="mlp", options=NARROW)
    model = build_from_config(config)
    assert model.roi_heads.mask_loss == "softmax"
    assert isinstance(model.roi_heads.mask_head, mask_heads.MaskMLPHead)
    assert model.roi_heads.mask_predictor.num_masks == 1
    assert model.roi_heads.box_roi_pool.mode == model.roi_heads.mask_roi_pool.mode == "roiwarp"
    with pytest.raises(ModelConfigError, match="options: repeat top-level fields: mask_loss"):
        ModelConfig(options={"mask_loss": "softmax"})
    with pytest.raises(ModelConfigError, match="mask_head_type is the field mask_head"):
        ModelConfig(options={"mask_head_type": "mlp"})


@pytest.mark.parametrize("switches", [
    dict(mask_loss="softmax"),
    dict(class_agnostic_mask=True, mask_head="mlp"),
])
def test_checkpoint_round_trip_keeps_the_switches(tmp_path, switches):
    config = ModelConfig(backbone="resnet18", num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                         options=NARROW, **switches)
    torch.manual_seed(0)
    model = build_from_config(config)
    images, targets = _synthetic_batch(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    sum(model(images, targets).values()).backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt.pt", model, config)

    loaded, loaded_config, _ = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded_config == config
    assert type(loaded.roi_heads) is type(model.roi_heads)
    if "mask_loss" in switches:
        assert loaded.roi_heads.mask_loss == "softmax"
    _same_state(model, loaded)
    with torch.inference_mode():
        expected, got = model.eval()(images), loaded(images)
    assert sum(len(o["boxes"]) for o in expected) > 0
    for e, g in zip(expected, got):
        for key in e:
            assert torch.equal(e[key], g[key]), key


def test_softmax_mlp_agnostic_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = _tiny(mask_loss="softmax", class_agnostic_mask=True, mask_head_type="mlp", box_score_thresh=0.0,
                  **NARROW).to(memory_format=torch.channels_last)
    images, targets = _synthetic_batch(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(images, targets)
    assert losses["loss_mask"].dtype == torch.float32
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.roi_heads.mask_head.parameters())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(images)
    for o in out:
        assert o["masks"].shape == (len(o["boxes"]), 1, 64, 64)
        assert torch.all((o["masks"] >= 0) & (o["masks"] <= 1))
