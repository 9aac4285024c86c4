"""ImageNet classification state dicts (torchvision resnet key layout, made locally) into the detector's ResNet body."""

import io

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from model.checkpoint import ModelConfig, build_from_config, load_backbone_weights, save_checkpoint
from model.errors import MaskrayError


def _state_bytes(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _imagenet_like(arch: str, seed: int = 0) -> dict:
    """A torchvision classification state dict (``resnetXX-*.pth`` layout) with random, non-default values."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)()
    for m in net.modules():  # BN statistics away from their init, so a missed copy shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return net.state_dict()


def _model(backbone="resnet18", norm="frozen_bn", trainable_layers=3):
    return build_from_config(ModelConfig(backbone=backbone, num_classes=3, norm=norm, trainable_layers=trainable_layers,
                                         min_size=128, max_size=128))


def test_every_body_tensor_lands_in_place_and_bn_is_frozen():
    state = _imagenet_like("resnet18")
    assert "fc.weight" in state and "layer1.0.conv1.weight" in state and "bn1.num_batches_tracked" in state
    model = _model()
    fpn_before = model.backbone.fpn.inner_blocks[0][0].weight.clone()
    copied = load_backbone_weights(model, _state_bytes(state))
    body = model.backbone.body
    # every non-fc, non-counter tensor is copied, nothing else
    expected = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert copied == len(expected) == len(body.state_dict())
    own = body.state_dict()
    for key in expected:
        assert torch.equal(own[key], state[key]), key
    assert torch.equal(body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert torch.equal(model.backbone.fpn.inner_blocks[0][0].weight, fpn_before)  # FPN keeps its init
    # frozen BN everywhere in the body, as maskrcnn_resnet50_fpn(weights_backbone=...)
    norms = [m for m in body.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    # trainable_layers=3: layer2..4 train; conv1 and layer1 are frozen
    for name, p in body.named_parameters():
        assert p.requires_grad == name.startswith(("layer2", "layer3", "layer4")), name


def test_frozen_bn_gives_the_classifiers_features():
    state = _imagenet_like("resnet18", seed=1)
    model = _model(trainable_layers=0)
    load_backbone_weights(model, _state_bytes(state))
    net = torchvision.models.resnet18()
    net.load_state_dict(state)
    net.eval()
    x = torch.rand(1, 3, 64, 64)
    ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    model.train()  # frozen BN uses its statistics even in train mode
    out = model.backbone.body(x)["3"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())


def test_resnet50_layout_loads_into_a_resnet50_body():
    model = _model("resnet50")
    state = torchvision.models.resnet50().state_dict()  # the key layout of resnet50-0676ba61.pth
    assert load_backbone_weights(model, _state_bytes(state)) == len(model.backbone.body.state_dict())
    assert torch.equal(model.backbone.body.layer3[5].conv3.weight, state["layer3.5.conv3.weight"])


def test_wrong_depth_wrong_file_and_missing_tensors_are_refused():
    model = _model("resnet18")
    with pytest.raises(MaskrayError, match=r"layer1\.0\.conv3\.weight has no place|shape"):
        load_backbone_weights(model, _state_bytes(torchvision.models.resnet50().state_dict()))
    partial = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(MaskrayError, match=r"lack \d+ tensors.*layer4"):
        load_backbone_weights(model, _state_bytes(partial))
    whole = io.BytesIO()
    save_checkpoint(whole, model, ModelConfig(backbone="resnet18", num_classes=3, min_size=128, max_size=128,
                                              norm="frozen_bn", trainable_layers=3))
    with pytest.raises(MaskrayError, match="whole maskray checkpoint"):
        load_backbone_weights(model, whole.getvalue())
