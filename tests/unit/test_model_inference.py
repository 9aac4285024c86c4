"""Inference rewrites (model/inference.py): norms folded into convs give the same detections."""

import copy

import pretrained_files as pf
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.checkpoint import ModelConfig, build_from_config
from model.inference import fold_batchnorm


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


@pytest.mark.parametrize("variant,norm", [("v1", "frozen_bn"), ("v2", "bn"), ("v2", "frozen_bn")])
def test_folded_model_gives_the_same_detections(variant, norm):
    torch.manual_seed(0)
    model = build_from_config(ModelConfig(backbone="resnet18", variant=variant, norm=norm, num_classes=5,
                                          min_size=160, max_size=200)).eval()
    image = pf.as_tensor(pf.photo("coffee"))
    with torch.no_grad():  # statistics away from their init, so a wrong fold shows
        for m in _norms(model):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    pf.calibrate(model, image)
    folded = copy.deepcopy(model)
    count = fold_batchnorm(folded)
    assert count == len(_norms(model)) and not _norms(folded)  # every norm follows a conv here
    with torch.inference_mode():
        expected, got = model([image])[0], folded([image])[0]
    assert len(expected["boxes"]) >= 10
    pf.assert_same_detections(dict(expected, rles=pf.rles_of(expected["masks"])),
                              dict(got, rles=pf.rles_of(got["masks"])))


def test_a_training_batchnorm_is_left_alone():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert fold_batchnorm(block) == 0 and isinstance(block[1], nn.BatchNorm2d)
    block.eval()
    x = torch.rand(2, 3, 9, 9)
    expected = block(x)
    assert fold_batchnorm(block) == 1 and isinstance(block[1], nn.Identity)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
