"""One optimizer step of configs/coco-r50-fpn-1x.yaml's model at 800 px on CPU, its backbone initialised from a
locally made torchvision ResNet-50 ImageNet state dict (the key layout of resnet50-0676ba61.pth)."""

from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.train.config import load_config
from pipeline.train.loop import RunPlan, setup, train_step

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_one_step_of_the_coco_recipe_at_800px(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet50-0676ba61.pth"
    imagenet = torchvision.models.resnet50().state_dict()
    torch.save(imagenet, weights)
    config = load_config(str(REPO / "configs" / "coco-r50-fpn-1x.yaml"), [
        "data.train=/unused", f"model.backbone_weights={weights}", "threads_per_worker=2"])
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, 81)]
    plan = RunPlan(categories=categories, train_images=117266, val_images=0, total_iters=config.schedule.max_iters,
                   lr=config.lr, global_batch=config.global_batch)
    w, lines = setup(config, plan, rank=0, world=1, device=torch.device("cpu"))
    assert lines == [f"backbone initialised from {weights} (265 tensors)"]
    body = w.model.backbone.body
    assert torch.equal(body.layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])
    frozen = {k: v.clone() for k, v in body.state_dict().items() if not k.startswith(("layer2", "layer3", "layer4"))}
    layer4 = body.layer4[0].conv1.weight.clone()

    image = torch.rand(3, 800, 1066)  # a 4:3 photo at the recipe's 800-px short side
    masks = torch.zeros(2, 800, 1066, dtype=torch.uint8)
    masks[0, 100:400, 100:500] = 1
    masks[1, 300:700, 600:1000] = 1
    target = {"boxes": torch.tensor([[100.0, 100.0, 500.0, 400.0], [600.0, 300.0, 1000.0, 700.0]]),
              "labels": torch.tensor([1, 17]), "masks": masks}
    w.iteration = 5000  # past warm-up: the step uses the recipe's full lr
    losses, lr = train_step(w, [image], [target])

    assert lr == pytest.approx(0.02) and w.iteration == 5001
    assert set(losses) == {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"} and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert not torch.equal(body.layer4[0].conv1.weight, layer4)  # trainable stages moved
    after = body.state_dict()
    for key, value in frozen.items():  # conv1, layer1 and every frozen BN kept the ImageNet values
        assert torch.equal(after[key], value), key
