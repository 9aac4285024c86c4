"""Keypoint R-CNN in maskray's model (the paper's §5): the keypoint branch on our pooler, with and
without masks; its loss without visible keypoints; torchvision keypointrcnn state dicts (legacy and
v1 layouts) loaded strictly and giving torchvision's boxes and keypoints on real photos; checkpoints
(and older ones that kept the Table 2 switches in ``options``); keypoints in the Predictor's output."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pretrained_files as pf
import pytest
import torch
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads

from model import build_maskrcnn, keypoint_heads, mask_heads, ops, pretrained
from model.checkpoint import (
    FORMAT,
    ModelConfig,
    ModelConfigError,
    build_from_config,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from model.errors import MaskrayError

K = 5
SIZE = 64
# narrow heads and few RoIs: a keypoint model trains a step in about a second on one core
TINY = dict(backbone="resnet18", num_classes=3, min_size=SIZE, max_size=SIZE, fpn_channels=32, box_head_dim=64,
            mask_head_channels=[32], keypoint_head_channels=[32, 32], rpn_batch_size_per_image=64,
            box_batch_size_per_image=64, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=300,
            rpn_post_nms_top_n_test=100)


def _tiny(**kwargs):
    return build_maskrcnn(**dict(TINY, **kwargs))


def _batch(seed=0, visible=True, empty=(), n_images=2):
    """Images with two bright rectangles each; every rectangle has K keypoints inside it (v = 2, or
    v = 0 everywhere when not ``visible``); images listed in ``empty`` have no instances at all."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n_images):
        image = torch.rand(3, SIZE, SIZE, generator=g) * 0.2
        boxes, masks, points = [], [], []
        for k in range(0 if i in empty else 2):
            x0, y0 = (int(v) for v in torch.randint(0, SIZE // 2, (2,), generator=g))
            w, h = (int(v) for v in torch.randint(16, SIZE // 2, (2,), generator=g))
            image[k, y0:y0 + h, x0:x0 + w] = 0.9
            mask = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
            mask[y0:y0 + h, x0:x0 + w] = 1
            xy = torch.rand(K, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0]) + torch.tensor([x0, y0])
            v = torch.full((K, 1), 2.0 if visible else 0.0)
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks.append(mask)
            points.append(torch.cat([xy, v], dim=1))
        images.append(image)
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([1, 2][:len(boxes)], dtype=torch.int64),
            "masks": torch.stack(masks) if masks else torch.zeros(0, SIZE, SIZE, dtype=torch.uint8),
            "keypoints": torch.stack(points) if points else keypoint_heads.empty_keypoints(0, K),
        })
    return images, targets


# --------------------------------------------------------------------------- the branch


@pytest.mark.parametrize("masks", [True, False])
def test_keypoint_model_trains_and_infers_with_and_without_masks(masks):
    torch.manual_seed(0)
    model = _tiny(num_keypoints=K, masks=masks)
    heads = model.roi_heads
    assert type(heads) is RoIHeads  # torchvision's: keypointrcnn_loss / keypointrcnn_inference
    assert isinstance(heads.keypoint_roi_pool, ops.MultiScaleRoIAlign)
    assert (heads.keypoint_roi_pool.output_size, heads.keypoint_roi_pool.sampling_ratio) == ((14, 14), 2)
    assert isinstance(heads.keypoint_head, KeypointRCNNHeads) and isinstance(heads.keypoint_predictor,
                                                                               KeypointRCNNPredictor)
    assert heads.has_mask() == masks
    images, targets = _batch()
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
                           "loss_keypoint"} | ({"loss_mask"} if masks else set())
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_keypoint"] > 0
    sum(losses.values()).backward()
    for p in list(heads.keypoint_head.parameters()) + list(heads.keypoint_predictor.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with torch.inference_mode():
        out = model.eval()(images)
    assert sum(len(o["boxes"]) for o in out) > 0
    for o, image in zip(out, images):
        n = len(o["boxes"])
        assert o["keypoints"].shape == (n, K, 3) and o["keypoints_scores"].shape == (n, K)
        assert ("masks" in o) == masks
        # each point lies in its detection's box (heatmaps are pasted in the box)
        inside = (o["keypoints"][..., 0] >= o["boxes"][:, None, 0] - 1e-3) & \
                 (o["keypoints"][..., 0] <= o["boxes"][:, None, 2] + 1e-3)
        assert inside.all()


def test_keypoint_training_reduces_its_loss():
    torch.manual_seed(0)
    model = _tiny(num_keypoints=K, masks=False).train()
    images, targets = _batch(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(4):
        torch.manual_seed(1)  # same proposals sampled each step
        loss = model(images, targets)["loss_keypoint"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(loss.item())
    assert seen[-1] < 0.9 * seen[0] and seen[-1] == min(seen), seen


@pytest.mark.parametrize("case", ["no visible keypoint", "every image empty"])
def test_no_visible_keypoint_gives_a_zero_loss_and_no_nan(case):
    """The paper's loss has nothing to average without a labelled keypoint: 0 with a graph, never
    NaN (torchvision's ``keypointrcnn_loss`` returns ``logits.sum() * 0``)."""
    torch.manual_seed(0)
    model = _tiny(num_keypoints=K).train()
    images, targets = _batch(visible=False) if case == "no visible keypoint" else _batch(empty=(0, 1))
    losses = model(images, targets)
    assert float(losses["loss_keypoint"]) == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.roi_heads.keypoint_predictor.parameters()]
    assert all(g is None or (torch.isfinite(g).all() and not g.any()) for g in grads)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_image_without_instances_beside_one_with_keypoints():
    torch.manual_seed(0)
    model = _tiny(num_keypoints=K).train()
    images, targets = _batch(empty=(0,))
    assert targets[0]["keypoints"].shape == (0, K, 3)
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_keypoint_pooler_takes_the_model_pooler_mode():
    """Table 6 of the paper (RoIPool vs RoIAlign for keypoints): every pooler of the model in the mode."""
    torch.manual_seed(0)
    model = _tiny(num_keypoints=K, pooler="roipool").train()
    heads = model.roi_heads
    assert heads.box_roi_pool.mode == heads.mask_roi_pool.mode == heads.keypoint_roi_pool.mode == "roipool"
    images, targets = _batch()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"] > 0
    losses["loss_keypoint"].backward()
    assert heads.keypoint_head[0].weight.grad.abs().sum() > 0


def test_mask_ablation_heads_run_the_same_keypoint_branch():
    """With a mask switch off its default the RoI heads are MaskRoIHeads; its keypoint branch gives
    torchvision's RoIHeads' keypoint loss and keypoints from the same weights and samples."""
    torch.manual_seed(0)
    stock = _tiny(num_keypoints=K)
    ablated = _tiny(num_keypoints=K, class_agnostic_mask=True, mask_loss="softmax")
    assert isinstance(ablated.roi_heads, mask_heads.MaskRoIHeads)
    state = {k: v for k, v in stock.state_dict().items() if "mask_predictor" not in k}
    missing, unexpected = ablated.load_state_dict(state, strict=False)
    assert missing and all(k.startswith("roi_heads.mask_predictor.") for k in missing) and not unexpected
    images, targets = _batch(seed=2)
    with torch.inference_mode():
        out_stock, out_ablated = stock.eval()(images), ablated.eval()(images)
    for s, a in zip(out_stock, out_ablated):
        assert len(s["boxes"]) > 0
        for key in ("boxes", "keypoints", "keypoints_scores"):
            assert torch.equal(s[key], a[key]), key
    torch.manual_seed(3)
    loss_stock = stock.train()(images, targets)["loss_keypoint"]
    torch.manual_seed(3)
    loss_ablated = ablated.train()(images, targets)["loss_keypoint"]
    assert loss_stock > 0 and torch.equal(loss_stock, loss_ablated)


@pytest.mark.parametrize("kwargs,message", [
    (dict(masks=False), "masks=false needs num_keypoints >= 1"),
    (dict(num_keypoints=-1), "num_keypoints -1 must be an int >= 0"),
    (dict(num_keypoints=True), "num_keypoints True must be an int >= 0"),
    (dict(masks="no", num_keypoints=K), "masks must be true or false"),
    (dict(masks=False, num_keypoints=K, mask_head_type="mlp"), "mask_head_type apply to the mask branch"),
    (dict(masks=False, num_keypoints=K, class_agnostic_mask=True), "class_agnostic_mask apply to the mask branch"),
    (dict(num_keypoints=K, keypoint_head_channels=[]), "keypoint_head_channels"),
    (dict(keypoint_head=torch.nn.Identity()), "need num_keypoints >= 1"),
])
def test_builder_refuses_inconsistent_branches(kwargs, message):
    with pytest.raises(MaskrayError, match=message):
        build_maskrcnn(backbone="resnet18", num_classes=3, **kwargs)


# --------------------------------------------------------------------------- config and checkpoints


def test_config_fields_validate_themselves():
    from model import mask_heads as mh

    assert ModelConfig().masks is True and ModelConfig().num_keypoints == 0 and ModelConfig().pooler == "roialign"
    for kwargs, key in [(dict(masks=False), "masks"), (dict(num_keypoints=-2), "num_keypoints"),
                        (dict(num_keypoints=2.0), "num_keypoints"), (dict(pooler="roi_align"), "pooler"),
                        (dict(mask_loss="bce"), "mask_loss"), (dict(class_agnostic_mask="true"), "class_agnostic_mask"),
                        (dict(mask_head="conv"), "mask_head"), (dict(masks=False, num_keypoints=3, mask_head="mlp"),
                                                                "mask_head"),
                        (dict(num_keypoints=3, num_classes=2, categories=[{"id": 1, "name": "p", "keypoints": ["a"]}]),
                         "categories[0].keypoints")]:
        with pytest.raises(ModelConfigError) as info:
            ModelConfig(**kwargs)
        assert info.value.key == key, (kwargs, info.value)
    # the config's allowed values are the builder's (kept apart so reading a config stays light)
    from model import checkpoint

    assert checkpoint._POOLERS == tuple(ops.POOLER_MODES)
    assert checkpoint._MASK_LOSSES == mh.MASK_LOSSES and checkpoint._MASK_HEADS == mh.MASK_HEAD_TYPES


def test_checkpoint_round_trip_with_keypoints(tmp_path):
    categories = [{"id": 7, "name": "stick", "keypoints": [f"k{i}" for i in range(K)], "skeleton": [[1, 2], [2, 3]]},
                  {"id": 9, "name": "blob"}]
    config = ModelConfig.for_categories(categories, backbone="resnet18", min_size=SIZE, max_size=SIZE,
                                        num_keypoints=K, masks=False, pooler="roialign_v2", box_score_thresh=0.0,
                                        options={k: v for k, v in TINY.items() if k not in (
                                            "backbone", "num_classes", "min_size", "max_size", "mask_head_channels")})
    torch.manual_seed(0)
    model = build_from_config(config)
    save_checkpoint(tmp_path / "kp.pt", model, config)
    loaded, loaded_config, _ = load_checkpoint(tmp_path / "kp.pt")
    assert loaded_config == config and loaded_config.categories[0]["keypoints"] == categories[0]["keypoints"]
    assert loaded.roi_heads.keypoint_roi_pool.mode == "roialign_v2" and not loaded.roi_heads.has_mask()
    images, _ = _batch(seed=4)
    with torch.inference_mode():
        expected, got = model.eval()(images), loaded(images)
    assert sum(len(o["boxes"]) for o in expected) > 0
    for e, g in zip(expected, got):
        assert e.keys() == g.keys() and "keypoints" in e
        for key in e:
            assert torch.equal(e[key], g[key]), key


def test_old_checkpoints_with_the_switches_in_options_still_load(tmp_path):
    """Checkpoints written before the Table 2 switches were fields kept them in ``options``
    (``mask_head_type`` for ``mask_head``): reading moves them to the fields."""
    narrow = dict(fpn_channels=32, box_head_dim=64, mask_head_channels=[32])
    torch.manual_seed(0)
    model = build_maskrcnn(backbone="resnet18", num_classes=3, min_size=SIZE, max_size=SIZE, pooler="roiwarp",
                           mask_loss="softmax", class_agnostic_mask=True, mask_head_type="mlp", **narrow)
    old_config = {"backbone": "resnet18", "num_classes": 3, "variant": "v1", "min_size": SIZE, "max_size": SIZE,
                  "categories": [], "norm": "bn", "trainable_layers": 5, "box_score_thresh": 0.05,
                  "box_detections_per_img": 100,
                  "options": dict(narrow, pooler="roiwarp", mask_loss="softmax", class_agnostic_mask=True,
                                  mask_head_type="mlp")}
    torch.save({"format": FORMAT, "config": old_config, "model": model.state_dict(), "extra": {}}, tmp_path / "old.pt")
    loaded, config, _ = load_checkpoint(tmp_path / "old.pt")
    assert (config.pooler, config.mask_loss, config.class_agnostic_mask, config.mask_head) == (
        "roiwarp", "softmax", True, "mlp")
    assert config.options == narrow
    assert loaded.roi_heads.box_roi_pool.mode == "roiwarp" and loaded.roi_heads.mask_loss == "softmax"
    images, _ = _batch(seed=5)
    with torch.inference_mode():
        for e, g in zip(model.eval()(images), loaded(images)):
            assert torch.equal(e["boxes"], g["boxes"]) and torch.equal(e["masks"], g["masks"])
    # saved again, the switches are fields, and the file reads the same
    save_checkpoint(tmp_path / "new.pt", loaded, config)
    assert read_checkpoint(tmp_path / "new.pt")[0] == config
    # an old option that contradicts its field is refused, naming both
    with pytest.raises(ModelConfigError, match=r"model config pooler: 'roipool' but options.pooler says 'roiwarp'"):
        ModelConfig.from_dict(dict(old_config, pooler="roipool"))


# --------------------------------------------------------------------------- torchvision keypointrcnn


def test_torchvision_keypointrcnn_names_resolve_with_keypoint_names(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    v1 = pretrained.resolve("torchvision:keypointrcnn_resnet50_fpn")
    legacy = pretrained.resolve("torchvision:keypointrcnn_resnet50_fpn.COCO_LEGACY")
    assert os.path.basename(v1.path) == pf.TORCHVISION_FILES["keypointrcnn_resnet50_fpn"]
    assert os.path.basename(legacy.path) == pf.TORCHVISION_FILES["keypointrcnn_resnet50_fpn_legacy"]
    assert v1.categories == ("no person", "person") and len(v1.keypoint_names) == 17
    assert v1.keypoint_names[:3] == ("nose", "left_eye", "right_eye")
    assert pretrained.resolve("torchvision:maskrcnn_resnet50_fpn").keypoint_names == ()


def test_torchvision_keypoint_name_loads_through_the_cache(tmp_path, monkeypatch):
    """``torchvision:keypointrcnn_resnet50_fpn`` anywhere a model is taken: the cached file (here a
    narrow resnet18 model in torchvision's key layout) is hash-checked and read, its categories are
    the weights' ``meta["categories"]`` with ``meta["keypoint_names"]`` and COCO's person skeleton."""
    from pipeline.weights import import_model, load_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(6)
    reference = build_maskrcnn(backbone="resnet18", num_classes=2, masks=False, num_keypoints=17,
                               keypoint_head_channels=[64, 64])
    blob = tmp_path / "blob.pth"
    torch.save(pf.torchvision_state_dict(reference, legacy=True), blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    real = pretrained.resolve("torchvision:keypointrcnn_resnet50_fpn")
    local = dataclasses.replace(real, hash_prefix=digest[:8],
                                path=str(tmp_path / "torch-home" / "hub" / "checkpoints" / f"kp-{digest[:8]}.pth"))
    os.makedirs(os.path.dirname(local.path))
    os.replace(blob, local.path)
    monkeypatch.setattr(pretrained, "resolve", lambda name: local)

    model, config, extra, source = load_model("torchvision:keypointrcnn_resnet50_fpn")
    assert source.weights == "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1" and source.sha256 == digest
    assert (config.num_keypoints, config.masks, config.num_classes) == (17, False, 2)
    assert config.options == {"keypoint_head_channels": [64, 64]}
    (person,) = config.categories
    assert person["id"] == 1 and person["name"] == "person" and len(person["keypoints"]) == 17
    assert [1, 2] in person["skeleton"] and len(person["skeleton"]) == 19
    assert all(1 <= i <= 17 for pair in person["skeleton"] for i in pair)
    for key, value in reference.state_dict().items():
        if not (key.startswith("backbone.body.") and key.endswith("num_batches_tracked")):
            assert torch.equal(model.state_dict()[key], value), key
    summary = import_model("torchvision:keypointrcnn_resnet50_fpn", str(tmp_path / "kp.pt"))
    assert "17 keypoints, no masks" in summary.line()
    assert read_checkpoint(tmp_path / "kp.pt")[0] == config


def test_published_v1_coco_files_get_torchvisions_zero_eps(tmp_path, monkeypatch):
    """torchvision's builders set every FrozenBatchNorm eps to 0 when they load the COCO_V1 files of
    keypointrcnn / maskrcnn / fasterrcnn R50-FPN (``overwrite_eps``; not the keypoint COCO_LEGACY
    file, not v2): maskray recognises those files by their sha256 and builds its model the same."""
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.ops.misc import FrozenBatchNorm2d

    from pipeline.weights import load_model

    zero = {"frozen_bn_eps": 0.0}
    assert pretrained.builder_options("fc266e95" + "0" * 56) == zero  # keypointrcnn_resnet50_fpn COCO_V1
    assert pretrained.builder_options("bf2d0c1e" + "0" * 56) == zero  # maskrcnn_resnet50_fpn COCO_V1
    assert pretrained.builder_options("9f466800" + "0" * 56) == {}  # keypointrcnn COCO_LEGACY keeps 1e-5
    assert pretrained.builder_options("73cbd019" + "0" * 56) == {}  # maskrcnn v2
    torch.manual_seed(0)
    reference = _tiny(num_keypoints=K, masks=False, num_classes=2, norm="frozen_bn", box_score_thresh=0.0).eval()
    with torch.no_grad():  # variances about eps, where eps 1e-5 vs 0 shows (scales kept about 1 at eps 0)
        for m in reference.backbone.body.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(1e-6, 1e-5)
                m.weight.mul_(m.running_var.sqrt())
    path = tmp_path / "kp.pth"
    torch.save(pf.torchvision_state_dict(reference), path)
    monkeypatch.setattr(pretrained, "builder_options", lambda sha256: zero)  # as for the published file
    model, config, _, _ = load_model(str(path))
    assert config.options["frozen_bn_eps"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.eps == 0.0 for m in norms)
    model.transform = reference.transform  # the reference's test-time sizes and thresholds
    model.rpn._pre_nms_top_n, model.rpn._post_nms_top_n = reference.rpn._pre_nms_top_n, reference.rpn._post_nms_top_n
    model.roi_heads.score_thresh = reference.roi_heads.score_thresh
    images, _ = _batch(seed=6)
    with torch.inference_mode():
        before = reference(images)
        overwrite_eps(reference, 0.0)
        expected, got = reference(images), model(images)
    assert not torch.equal(before[0]["scores"], expected[0]["scores"])  # the eps matters here
    for e, g in zip(expected, got):
        for key in ("boxes", "scores", "keypoints", "keypoints_scores"):
            assert torch.equal(e[key], g[key]), key


@pytest.fixture(scope="module")
def keypointrcnn_reference():
    """torchvision's keypointrcnn_resnet50_fpn, seeded and calibrated on a photo of a person."""
    reference = pf.build_torchvision("keypointrcnn_resnet50_fpn", seed=1, min_size=256, max_size=400)
    pf.calibrate(reference, pf.as_tensor(pf.photo("astronaut")))
    return reference


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "v1"])
def test_torchvision_keypointrcnn_state_dicts_load_strictly_and_match_on_real_photos(
        tmp_path, keypointrcnn_reference, legacy):
    """A torchvision keypointrcnn file in the published layout (legacy: the old RPN key names of the
    COCO files) is recognised (``masks=False``, 17 keypoints, COCO person), loads with strict=True
    and, through maskray's Predictor (norms folded, as infer runs it), gives torchvision's boxes,
    scores, keypoints and keypoint scores on photographs, one to one."""
    from pipeline.infer.predictor import Predictor
    from pipeline.weights import load_model

    reference = keypointrcnn_reference
    state = pf.torchvision_state_dict(reference, legacy=legacy)
    assert ("rpn.head.conv.weight" in state) == legacy
    assert pretrained.detect_layout(state) == {
        "backbone": "resnet50", "variant": "v1", "norm": "frozen_bn", "num_classes": 2, "trainable_layers": 3,
        "masks": False, "num_keypoints": 17, "options": {}}
    path = tmp_path / pf.TORCHVISION_FILES["keypointrcnn_resnet50_fpn" + ("_legacy" if legacy else "")]
    torch.save(state, path)
    model, config, extra, _ = load_model(str(path))  # strict
    assert extra["source_format"] == "torchvision-state-dict"
    assert config.categories[0]["name"] == "person" and len(config.categories[0]["keypoints"]) == 17
    model.transform.min_size, model.transform.max_size = (256,), 400  # the reference's test-time sizes
    predictor = Predictor(model=model, config=config, score_threshold=0.05, optimize=True)
    for name in ("astronaut", "coffee"):  # 512x512 (a person), 600x400
        image = pf.photo(name)
        with torch.inference_mode():
            expected = reference([pf.as_tensor(image)])[0]
        keep = expected["scores"] >= 0.05
        expected = {k: v[keep] for k, v in expected.items()}
        assert len(expected["boxes"]) >= 10
        (got,) = predictor.predict([torch.from_numpy(image).permute(2, 0, 1).contiguous()])
        got = {k: v.cpu() for k, v in got.items()}
        assert got["keypoints"].shape == (len(got["boxes"]), 17, 3)
        got["keypoints_scores"] = got["keypoints"][..., 2]  # maskray carries the score in the third column
        pf.assert_same_detections(expected, got)


# --------------------------------------------------------------------------- inference output


def test_predictor_keypoints_are_in_the_original_frame_with_their_scores():
    """Predictor output = the model's own (torchvision's postprocess: ``resize_keypoints`` to the
    input's frame), with ``keypoints_scores`` in place of torchvision's constant v = 1."""
    from pipeline.infer.predictor import Predictor

    torch.manual_seed(0)
    model = _tiny(num_keypoints=K, masks=False, box_score_thresh=0.0, min_size=80, max_size=120).eval()
    g = torch.Generator().manual_seed(8)
    image = (torch.rand(3, 150, 210, generator=g) * 255).to(torch.uint8)  # resized by 80/150 inside
    with torch.inference_mode():
        expected = model([image.float() / 255])[0]
    assert len(expected["boxes"]) > 0 and torch.all(expected["keypoints"][..., 2] == 1)
    (got,) = Predictor(model=model, score_threshold=0.0).predict([image])
    assert "masks" not in got
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(got["keypoints"][..., :2], expected["keypoints"][..., :2], atol=1e-3, rtol=0)
    torch.testing.assert_close(got["keypoints"][..., 2], expected["keypoints_scores"], atol=1e-4, rtol=0)
    assert got["keypoints"][..., 0].max() > 120  # in the 210-px frame, not the model's 120-px one


def test_only_categories_that_name_keypoints_report_them():
    """The keypoint head predicts for every detection; a category without keypoint names (a shape
    beside stick figures) gets none: NaN rows in the Predictor's output, null in result instances."""
    from pipeline.infer.predictor import Predictor

    categories = [{"id": 4, "name": "box"}, {"id": 9, "name": "figure", "keypoints": [f"k{i}" for i in range(K)]}]
    config = ModelConfig.for_categories(categories, backbone="resnet18", min_size=SIZE, max_size=SIZE,
                                        num_keypoints=K, box_score_thresh=0.0)
    torch.manual_seed(0)
    model = _tiny(num_keypoints=K, box_score_thresh=0.0).eval()
    predictor = Predictor(model=model, config=config, score_threshold=0.0)
    assert predictor.keypoint_labels == [2]
    image = (_batch(seed=7)[0][0] * 255).to(torch.uint8)
    (out,) = predictor.predict([image])
    labels = out["labels"].cpu()
    assert (labels == 1).any() and (labels == 2).any()
    assert torch.isnan(out["keypoints"][labels == 1]).all()
    assert torch.isfinite(out["keypoints"][labels == 2]).all()
    (instances,) = predictor.segment([image])
    assert {i["category_id"] for i in instances} == {4, 9}
    for i in instances:
        assert (i["keypoints"] is None) == (i["category_id"] == 4)
        assert i["keypoints"] is None or len(i["keypoints"]) == 3 * K
    unnamed = Predictor(model=model, config=dataclasses.replace(config, categories=[]), score_threshold=0.0)
    assert unnamed.keypoint_labels is None  # no names anywhere: every detection's keypoints reported


def test_visibility_comes_from_each_keypoint_score():
    scores = torch.tensor([[-3.0, 0.0, 1.99, 2.0, 15.0]])
    assert keypoint_heads.visibility(scores).tolist() == [[1, 1, 1, 2, 2]]
    assert keypoint_heads.to_coco_keypoints([10.0, 20.0, 1.5, 30.5, 40.25, 7.0]) == [10.0, 20.0, 1.0, 30.5, 40.25, 2.0]
    with pytest.raises(MaskrayError, match="not \\(x, y, score\\) triples"):
        keypoint_heads.to_coco_keypoints([1.0, 2.0])
    assert keypoint_heads.empty_keypoints(0, 17).shape == (0, 17, 3)


def test_reading_a_config_builds_nothing_heavy():
    """model.checkpoint and model.keypoint_heads' rules import neither the op library nor torchvision's
    detection models (results code and drivers read configs and apply the visibility rule)."""
    import subprocess
    import sys

    code = ("import sys; import model.checkpoint, model.keypoint_heads; "
            "print(int('model.ops' in sys.modules), int('torchvision.models.detection' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["0", "0"]

