"""Table 2b's softmax mask loss: FCN's multinomial cross-entropy, carried into the model the ablation scores."""

import dataclasses
import os
import sys

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from model import mask_heads
from model.checkpoint import build_from_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def _case(seed=0, classes=4, size=8):
    """Logits of 3 RoIs over 2 images with 32-px block masks: (logits, proposals, masks, labels, matched)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, classes + 1, size, size, generator=g)
    masks = torch.zeros(3, 32, 32)  # blocks: pixels all in, all out and on the edge (soft targets)
    for m, (y0, y1, x0, x1) in zip(masks, [(3, 19, 5, 27), (0, 16, 0, 16), (10, 30, 6, 22)]):
        m[y0:y1, x0:x1] = 1
    masks = [masks[:2], masks[2:]]
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 2.0, 20.0, 30.0]]), torch.tensor([[8.0, 8.0, 24.0, 24.0]])]
    labels = [torch.tensor([2, classes]), torch.tensor([1])]
    matched = [torch.tensor([1, 0]), torch.tensor([0])]
    return logits, proposals, masks, labels, matched


def test_softmax_loss_is_fcns_multinomial_cross_entropy():
    """-(t log p_k + (1 - t) log p_bg) is F.cross_entropy over (background, class 1..K) with the pixel's
    label distribution (k with weight t, background 1 - t; hard labels when t is 0 or 1), the background
    score pinned at 0: the predictor's channel 0 takes no part."""
    logits, proposals, masks, labels, matched = _case()
    size = logits.shape[-1]
    t = torch.cat([project_masks_on_boxes(m, p, i, size) for m, p, i in zip(masks, proposals, matched)])
    k = torch.cat([lab[i] for lab, i in zip(labels, matched)])
    assert ((t > 0) & (t < 1)).any() and (t == 1).any() and (t == 0).any()  # soft and hard pixels both
    target = torch.zeros_like(logits)
    target[torch.arange(3), k] = t
    target[:, 0] = 1 - t
    scores = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, 1:]], dim=1)
    expected = F.cross_entropy(scores, target)
    got = mask_heads.mask_loss(logits, proposals, masks, labels, matched, kind="softmax")
    torch.testing.assert_close(got, expected)
    # hard labels where the target is binary: the per-pixel multinomial loss of an FCN
    hard = (t == 0) | (t == 1)
    pixel_label = torch.where(t == 1, k[:, None, None].expand_as(t), torch.zeros_like(t, dtype=torch.long))
    per_pixel = F.cross_entropy(scores, pixel_label, reduction="none")
    soft_per_pixel = -(target * F.log_softmax(scores, dim=1)).sum(1)
    torch.testing.assert_close(soft_per_pixel[hard], per_pixel[hard])
    # channel 0 (a learned background score in FCN) does not matter: softmax is shift-invariant per pixel
    shifted = logits.clone()
    shifted[:, 0] = 100 * torch.randn_like(shifted[:, 0])
    torch.testing.assert_close(mask_heads.mask_loss(shifted, proposals, masks, labels, matched, kind="softmax"), got)


def test_classes_compete_for_the_foreground_mass():
    """A head that does not tell the classes apart (equal class scores) gives each class at most 1/K of
    the pixel, whatever its foreground evidence: under the 0.5 paste threshold for K >= 2. The sigmoid
    of the same logits passes it."""
    logits = torch.full((2, 5, 4, 4), 8.0)  # K = 4, strong foreground on every class channel
    labels = [torch.tensor([1, 3])]
    softmax = torch.cat(mask_heads.mask_inference(logits, labels, kind="softmax"))
    sigmoid = torch.cat(mask_heads.mask_inference(logits, labels, kind="sigmoid"))
    assert (softmax < 0.25).all() and (softmax > 0.24).all()
    assert (sigmoid > 0.99).all()
    # once the class is told apart, the detected class's probability passes 0.5
    logits[:, [2, 4]] = -8.0
    logits[1, 1] = -8.0
    logits[0, 3] = -8.0
    assert (torch.cat(mask_heads.mask_inference(logits, labels, kind="softmax")) > 0.99).all()


def _ablation_model(variant):
    """The model benchmarks/ablation.py trains and scores for ``variant`` (its config path, 3 classes)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import ablation
    finally:
        sys.path.pop(0)
    config = ablation.train_config(ablation.Setup(size=64, images=8, val_images=1, iters=8), "unused", variant, 0)
    categories = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]
    model_config = dataclasses.replace(config.model.model_config(categories), box_score_thresh=0.0)
    return build_from_config(model_config)


def test_the_scored_softmax_model_returns_softmax_probabilities():
    """What the ablation scores for ``softmax``: the model built from its config returns, for each
    detection, the softmax probability of the detected class (not the sigmoid's) to the paste."""
    outputs = {}
    for variant in ("softmax", "roialign"):
        torch.manual_seed(0)
        model = _ablation_model(variant).eval()
        captured = {}
        model.roi_heads.mask_predictor.register_forward_hook(lambda m, i, o: captured.update(logits=o))
        model.roi_heads.register_forward_hook(  # a copy: the transform pastes the masks in place
            lambda m, i, o: captured.update(result=[{k: v.clone() for k, v in r.items()} for r in o[0]]))
        with torch.inference_mode():
            model([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))])
        result = captured["result"][0]
        assert len(result["labels"]) > 0
        outputs[variant] = (captured["logits"], result)
    logits, result = outputs["softmax"]
    assert getattr(_ablation_model("softmax").roi_heads, "mask_loss", None) == "softmax"
    expected = mask_heads.softmax_log_probs(logits)[torch.arange(len(logits)), result["labels"]].exp()
    torch.testing.assert_close(result["masks"][:, 0], expected)
    assert not torch.allclose(result["masks"][:, 0],
                              logits[torch.arange(len(logits)), result["labels"]].sigmoid())
    logits, result = outputs["roialign"]  # the baseline: torchvision's sigmoid
    torch.testing.assert_close(result["masks"][:, 0], logits[torch.arange(len(logits)), result["labels"]].sigmoid())
