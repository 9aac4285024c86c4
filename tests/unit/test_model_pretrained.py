"""torchvision's pretrained models by name (weights API, torch.hub cache, hash check), plain
torchvision state dicts recognised by their keys, COCO categories, parity on real photos, import.

Nothing downloads here: files are built with torchvision's own builders (seeded, calibrated:
``pretrained_files``) and served over loopback where a download is tested."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import pretrained_files as pf
from model import pretrained
from model.checkpoint import ModelConfig, build_from_config, load_checkpoint, read_checkpoint, save_checkpoint
from model.errors import MaskrayError

UNUSED_COCO_LABELS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]  # torchvision's "N/A" slots


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


@pytest.mark.parametrize("name,url,filename,prefix", [
    ("torchvision:maskrcnn_resnet50_fpn", "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
     "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "bf2d0c1e"),
    ("torchvision:maskrcnn_resnet50_fpn_v2", "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
     "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", "73cbd019"),
    ("torchvision:maskrcnn_resnet50_fpn.COCO_V1", "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
     "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "bf2d0c1e"),
    ("torchvision:keypointrcnn_resnet50_fpn", "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
     "keypointrcnn_resnet50_fpn_coco-fc266e95.pth", "fc266e95"),
    ("torchvision:resnet50", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "resnet50-11ad3fa6.pth", "11ad3fa6"),
    ("torchvision:ResNet50_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
     "resnet50-0676ba61.pth", "0676ba61"),
])
def test_each_name_resolves_to_its_url_cache_path_and_hash(torch_home, name, url, filename, prefix):
    file = pretrained.resolve(name)
    assert file.url == url
    assert file.path == str(torch_home / "hub" / "checkpoints" / filename)
    assert file.hash_prefix == prefix
    if "keypoint" in name:
        assert file.categories == ("no person", "person")
    elif "rcnn" in name:
        assert len(file.categories) == 91 and file.categories[1] == "person" and file.categories[12] == "N/A"
    else:
        assert file.categories == ()  # ImageNet's 1,000 classes are no detector's categories


def test_unknown_names_are_refused_naming_them():
    with pytest.raises(MaskrayError, match="torchvision:maskrcnn_resnet51_fpn: torchvision has no such weights"):
        pretrained.resolve("torchvision:maskrcnn_resnet51_fpn")
    with pytest.raises(MaskrayError, match="COCO_V9"):
        pretrained.resolve("torchvision:maskrcnn_resnet50_fpn.COCO_V9")


def test_offline_and_not_cached_is_one_line_naming_the_url_and_the_path(torch_home):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    file = dataclasses.replace(pretrained.resolve("torchvision:maskrcnn_resnet50_fpn_v2"),
                               url=f"http://127.0.0.1:{port}/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth")
    with pytest.raises(MaskrayError) as info:
        pretrained.fetch(file, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert file.url in message and file.path in message and "not cached and cannot be downloaded" in message
    assert not os.path.exists(file.path)


@pytest.fixture
def served(tmp_path):
    """``(folder, base_url)``: files under ``folder`` served over loopback HTTP."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _tiny_state() -> dict:
    torch.manual_seed(0)
    model = build_from_config(ModelConfig(backbone="resnet18", num_classes=3, min_size=64, max_size=64))
    return model.state_dict()


def test_download_into_the_cache_with_the_hash_checked_then_a_corrupt_cache_is_refused(torch_home, served):
    folder, base = served
    data_path = folder / "blob"
    torch.save(_tiny_state(), data_path)
    digest = hashlib.sha256(data_path.read_bytes()).hexdigest()
    name = f"tinyrcnn-{digest[:8]}.pth"
    data_path.rename(folder / name)
    base_file = pretrained.resolve("torchvision:maskrcnn_resnet50_fpn")
    file = dataclasses.replace(base_file, url=f"{base}/{name}", hash_prefix=digest[:8],
                               path=str(torch_home / "hub" / "checkpoints" / name))

    path, got = pretrained.fetch(file, progress=False)
    assert path == file.path and got == digest and os.path.exists(path)
    (folder / name).unlink()  # the second use reads the cache, no download
    assert pretrained.fetch(file, progress=False) == (file.path, digest)

    with open(file.path, "r+b") as f:  # one byte changed in the cached file
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(MaskrayError) as info:
        pretrained.fetch(file, progress=False)
    message = str(info.value)
    bad = hashlib.sha256(open(file.path, "rb").read()).hexdigest()
    assert digest[:8] in message and bad[:16] in message and file.path in message


def test_a_download_whose_hash_differs_is_refused_and_not_cached(torch_home, served):
    folder, base = served
    torch.save(_tiny_state(), folder / "tinyrcnn-00000000.pth")
    file = dataclasses.replace(pretrained.resolve("torchvision:maskrcnn_resnet50_fpn"),
                               url=f"{base}/tinyrcnn-00000000.pth", hash_prefix="00000000",
                               path=str(torch_home / "hub" / "checkpoints" / "tinyrcnn-00000000.pth"))
    with pytest.raises(MaskrayError, match="failed its hash check"):
        pretrained.fetch(file, progress=False)
    assert not os.path.exists(file.path)


def test_a_cached_file_that_is_not_the_published_one_is_refused_naming_both_hashes(torch_home, tmp_path):
    """What a user who copied a locally-built file into the cache under the published name meets."""
    file = pretrained.resolve("torchvision:maskrcnn_resnet50_fpn_v2")
    os.makedirs(os.path.dirname(file.path))
    torch.save(_tiny_state(), file.path)
    actual = hashlib.sha256(open(file.path, "rb").read()).hexdigest()
    with pytest.raises(MaskrayError, match=f"sha256 {actual[:16]}.*must start with 73cbd019"):
        pretrained.fetch(file, progress=False)


# --------------------------------------------------------------------------- layouts and categories


@pytest.mark.parametrize("name,legacy,variant", [
    ("maskrcnn_resnet50_fpn", False, "v1"), ("maskrcnn_resnet50_fpn", True, "v1"), ("maskrcnn_resnet50_fpn_v2", False, "v2"),
])
def test_torchvision_layouts_are_recognised_and_load_strictly(name, legacy, variant):
    reference = pf.build_torchvision(name, seed=3)
    state = pf.torchvision_state_dict(reference, legacy=legacy)
    assert ("rpn.head.conv.weight" in state) == legacy
    layout = pretrained.detect_layout(state)
    assert layout == {"backbone": "resnet50", "variant": variant, "norm": "frozen_bn", "num_classes": 91,
                      "trainable_layers": 3, "masks": True, "num_keypoints": 0, "options": {}}
    model = build_from_config(ModelConfig(**layout))
    model.load_state_dict(dict(state), strict=True)  # strict: every key in place, none left over
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[key], value), key


def test_other_state_dicts_are_refused_naming_what_they_are():
    """(Keypoint R-CNN state dicts load: tests/unit/test_model_keypoints.py.)"""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    boxes = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    with pytest.raises(MaskrayError, match=r"frcnn.pth is a Faster R-CNN state dict \(neither a mask nor a keypoint"):
        pretrained.detect_layout(boxes, "frcnn.pth")
    with pytest.raises(MaskrayError, match="no backbone.body.conv1.weight"):
        pretrained.detect_layout({"conv.weight": torch.zeros(1)}, "x.pth")


def test_coco_categories_map_labels_to_coco_ids_and_never_report_na():
    from pipeline.weights import reported_categories

    categories = pretrained.coco_categories()
    config = ModelConfig(categories=categories, num_classes=91)
    assert config.category_ids() == list(range(1, 91))  # label i is COCO category id i
    assert config.unused_labels() == UNUSED_COCO_LABELS
    reported = reported_categories(config)
    assert len(reported) == 80 and all(c["name"] != "N/A" for c in reported)
    assert reported[0] == {"id": 1, "name": "person"} and reported[-1] == {"id": 90, "name": "toothbrush"}
    assert {"id": 13, "name": "stop sign"} in reported  # ids keep COCO's gaps


def test_na_labels_are_never_reported_by_the_predictor():
    from pipeline.infer.predictor import Predictor

    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", categories=pretrained.coco_categories(), num_classes=91,
                         min_size=96, max_size=96, box_detections_per_img=1000)
    model = build_from_config(config).eval()
    with torch.no_grad():  # every RoI's best class an "N/A" slot, "person" second
        model.roi_heads.box_predictor.cls_score.bias.fill_(-10.0)
        model.roi_heads.box_predictor.cls_score.bias[12] = 10.0
        model.roi_heads.box_predictor.cls_score.bias[1] = 9.0
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        raw = model([image])[0]
    assert (raw["labels"] == 12).any()  # the model itself does predict label 12
    predictor = Predictor(model=model, config=config, score_threshold=0.0)
    out = predictor.predict([image])[0]
    assert len(out["labels"]) and not (out["labels"] == 12).any() and (out["labels"] == 1).any()
    instances = predictor.segment([(image * 255).to(torch.uint8)])[0]
    assert instances and {i["category_id"] for i in instances} <= {1}


# --------------------------------------------------------------------------- parity on real photos


@pytest.mark.parametrize("name,legacy", [("maskrcnn_resnet50_fpn", True), ("maskrcnn_resnet50_fpn_v2", False)])
def test_plain_state_dict_parity_on_real_photos(tmp_path, name, legacy):
    """A torchvision-layout file, loaded by maskray as any ``--checkpoint``, gives torchvision's
    instances on photographs of several sizes: same boxes, labels and scores (float tolerance),
    same masks by RLE IoU (maskray pastes per instance in its box; torchvision pastes full-size)."""
    from pipeline.infer.predictor import Predictor
    from pipeline.weights import load_model

    images = [pf.photo(n) for n in ("chelsea", "rocket", "hubble_deep_field")]  # 451x300, 640x427, 1000x872
    reference = pf.build_torchvision(name, seed=1, min_size=320, max_size=512)
    pf.calibrate(reference, pf.as_tensor(images[0]))
    path = tmp_path / pf.TORCHVISION_FILES[name]
    torch.save(pf.torchvision_state_dict(reference, legacy=legacy), path)

    model, config, extra, source = load_model(str(path))
    assert extra["source_format"] == "torchvision-state-dict"
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (config.backbone, config.variant, config.norm) == ("resnet50", "v1" if "v2" not in name else "v2", "frozen_bn")
    model.transform.min_size, model.transform.max_size = (320,), 512  # the reference's test-time sizes
    predictor = Predictor(model=model, config=config, score_threshold=0.05, optimize=True)  # as in infer
    unused = torch.tensor(UNUSED_COCO_LABELS)
    for image in images:
        tensor = pf.as_tensor(image)
        with torch.inference_mode():
            expected = reference([tensor])[0]
        keep = (expected["scores"] >= 0.05) & ~torch.isin(expected["labels"], unused)
        expected = {k: v[keep] for k, v in expected.items()}
        assert len(expected["boxes"]) >= 20
        h, w = image.shape[:2]
        binary = (expected["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        expected["rles"] = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
        got = predictor.segment([torch.from_numpy(image).permute(2, 0, 1).contiguous()])[0]
        boxes = torch.tensor([[i["bbox"][0], i["bbox"][1], i["bbox"][0] + i["bbox"][2], i["bbox"][1] + i["bbox"][3]]
                              for i in got])
        got_dict = {"boxes": boxes, "labels": torch.tensor([i["category_id"] for i in got]),
                    "scores": torch.tensor([i["score"] for i in got]),
                    "rles": [dict(i["segmentation"]) for i in got]}
        assert all(r["size"] == [h, w] for r in got_dict["rles"])
        pf.assert_same_detections(expected, got_dict)


# --------------------------------------------------------------------------- import


def test_import_writes_a_self_describing_checkpoint_that_loads_the_same(tmp_path):
    from jobs import cli
    from pipeline.weights import import_model

    reference = pf.build_torchvision("maskrcnn_resnet50_fpn", seed=2)
    src = tmp_path / pf.TORCHVISION_FILES["maskrcnn_resnet50_fpn"]
    torch.save(pf.torchvision_state_dict(reference, legacy=True), src)
    out = tmp_path / "imported.pt"
    assert cli.invoke(["import", str(src), str(out)]) == 0

    config, state, extra = read_checkpoint(out)
    assert extra["source"] == str(src)
    assert extra["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert config.unused_labels() == UNUSED_COCO_LABELS and config.categories[0] == {"id": 1, "name": "person"}
    direct, _, _ = load_checkpoint(src)
    for key, value in direct.state_dict().items():
        assert torch.equal(state[key], value), key
    # importing the import keeps the original source, not the intermediate file
    again = import_model(str(out), str(tmp_path / "again.pt"))
    assert read_checkpoint(tmp_path / "again.pt")[2]["source"] == str(src)
    assert again.source.uri == str(out)


def test_torchvision_names_load_through_the_cache(torch_home, tmp_path, monkeypatch):
    """``torchvision:NAME`` anywhere a model is taken: the cached file is read (hash-checked) and its
    weights enum's categories are the model's."""
    from pipeline.weights import load_model, read_model_bytes

    reference = pf.build_torchvision("maskrcnn_resnet50_fpn_v2", seed=4)
    blob = tmp_path / "blob.pth"
    torch.save(pf.torchvision_state_dict(reference), blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    real = pretrained.resolve("torchvision:maskrcnn_resnet50_fpn_v2")
    local = dataclasses.replace(real, path=str(torch_home / "hub" / "checkpoints" / f"mrcnn_v2-{digest[:8]}.pth"),
                                hash_prefix=digest[:8])
    os.makedirs(os.path.dirname(local.path))
    os.replace(blob, local.path)
    monkeypatch.setattr(pretrained, "resolve", lambda name: local)

    data, source = read_model_bytes("torchvision:maskrcnn_resnet50_fpn_v2")
    assert source.sha256 == digest and source.weights == "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    assert source.model_id == f"torchvision:maskrcnn_resnet50_fpn_v2#sha256:{digest[:16]}"
    model, config, extra, _ = load_model("torchvision:maskrcnn_resnet50_fpn_v2")
    assert config.variant == "v2" and config.categories[0]["name"] == "person"
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       reference.state_dict()["roi_heads.box_predictor.cls_score.weight"])


def test_train_takes_torchvision_names_for_weights_and_backbone_weights(torch_home, tmp_path, monkeypatch):
    """``model.backbone_weights: torchvision:resnet18`` fills the body from the cached ImageNet file."""
    import torchvision

    from pipeline.train.loop import initial_weights

    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18().state_dict()
    blob = tmp_path / "r18.pth"
    torch.save(imagenet, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    local = dataclasses.replace(pretrained.resolve("torchvision:resnet18"), hash_prefix=digest[:8],
                                path=str(torch_home / "hub" / "checkpoints" / f"resnet18-{digest[:8]}.pth"))
    os.makedirs(os.path.dirname(local.path))
    os.replace(blob, local.path)
    monkeypatch.setattr(pretrained, "resolve", lambda name: local)

    class Config:  # the two fields initial_weights reads
        class model:
            backbone_weights = "torchvision:resnet18"
            weights = ""

    model = build_from_config(ModelConfig(backbone="resnet18", num_classes=3, norm="frozen_bn", trainable_layers=3,
                                          min_size=64, max_size=64))
    lines = initial_weights(model, Config)
    assert lines and "torchvision:resnet18" in lines[0]
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])


def test_save_and_load_keep_unused_labels():
    import io

    config = ModelConfig(backbone="resnet18", categories=pretrained.coco_categories(), num_classes=91,
                         min_size=64, max_size=64)
    model = build_from_config(config)
    buf = io.BytesIO()
    save_checkpoint(buf, model, config)
    buf.seek(0)
    assert read_checkpoint(buf)[0].unused_labels() == UNUSED_COCO_LABELS
